"""Pictures: image grids of distilled sets (one row per class), spectra, and the atomic PNG writer."""

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


def mean_log_spectrum(images: torch.Tensor) -> torch.Tensor:
    """Mean log-magnitude of the centred 2-D Fourier transform, averaged over images and channels."""
    spectrum = torch.fft.fftshift(torch.fft.fft2(images.detach().cpu().float()), dim=(-2, -1)).abs()
    return torch.log1p(spectrum).mean(dim=(0, 1))


def save_spectra(sets: dict[str, torch.Tensor], path: str | Path) -> None:
    """One panel per named image set: its mean FFT magnitude (the DSV-vs-DM frequency view)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sets), figsize=(2.6 * len(sets), 2.8), squeeze=False)
    spectra = {name: mean_log_spectrum(images) for name, images in sets.items()}
    top = max(float(s.max()) for s in spectra.values())
    for ax, (name, spectrum) in zip(axes[0], spectra.items()):
        ax.imshow(spectrum.numpy(), cmap="magma", vmin=0, vmax=top)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle("mean log |FFT| (centre = low frequencies)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig, path: str | Path, dpi: int = 100) -> None:
    """Write a matplotlib figure as PNG atomically (never a half-written picture) and close it."""
    import io

    import matplotlib.pyplot as plt

    from common.fileio import atomic_write_bytes

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(Path(path), buffer.getvalue())
