"""Image grids of distilled sets (one row per class)."""

from __future__ import annotations

from pathlib import Path

import torch

from common.datasets import DatasetInfo, denormalise


def save_grid(images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo, path: str | Path, max_per_class: int = 10):
    """Write a PNG with up to ``max_per_class`` images per class, one class per row."""
    from torchvision.utils import save_image

    rows = []
    width = min(max_per_class, max(int((labels == c).sum()) for c in range(info.num_classes)))
    blank = torch.ones(info.channels, info.image_size, info.image_size)
    for c in range(info.num_classes):
        members = denormalise(images[labels == c][:width].detach().cpu().float(), info)
        padding = [blank] * (width - len(members))
        rows.extend(list(members) + padding)
    scale = max(1, 64 // info.image_size)  # tiny images (8x8 digits) are upscaled to stay visible
    grid = torch.stack(rows)
    if scale > 1:
        grid = torch.nn.functional.interpolate(grid, scale_factor=scale, mode="nearest")
    save_image(grid, str(path), nrow=width, padding=2, pad_value=1.0)
