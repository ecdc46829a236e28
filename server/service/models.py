"""Uploaded global models: a size-capped, checksummed tar stream -> a verified model directory.

A client streams ``ModelChunk`` messages (the first one says the archive's size and sha256). The
service refuses an upload above its limit before reading it, stops reading as soon as the bytes
exceed the announced size, checks the digest, unpacks only ``model.json`` and
``model.safetensors`` (no links, no paths, no other members), loads the model to prove it is one,
and only then moves it into ``models/<id>`` atomically. The id is derived from the archive's
digest, so uploading the same model twice gives the same id and writes nothing new.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from common.errors import EdgeDistillError
from server.service.validation import FAILED_PRECONDITION, INVALID_ARGUMENT, RESOURCE_EXHAUSTED, RequestError

MODEL_MEMBERS = ("model.json", "model.safetensors")


def chunk_messages(message_cls, data: bytes, size: int) -> Iterator:
    """The chunk framing of uploads and downloads: consecutive ``data`` slices, the first one also
    carrying the total size and the sha256 of the whole, so the receiver can refuse early and verify."""
    digest = hashlib.sha256(data).hexdigest()
    for start in range(0, max(len(data), 1), size):
        first = start == 0
        yield message_cls(
            total_bytes=len(data) if first else 0, sha256=digest if first else "", data=data[start : start + size]
        )


def pack_model(directory: str | Path) -> bytes:
    """A model directory as the tar archive ``UploadModel`` takes (the client side)."""
    directory = Path(directory)
    missing = [m for m in MODEL_MEMBERS if not (directory / m).is_file()]
    if missing:
        raise EdgeDistillError(f"{directory} is not a model directory (missing {', '.join(missing)})")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for member in MODEL_MEMBERS:
            info = tar.gettarinfo(str(directory / member), arcname=member)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0  # the same files give the same archive, hence the same id
            with open(directory / member, "rb") as handle:
                tar.addfile(info, handle)
    return buffer.getvalue()


def receive_model(chunks: Iterable, models_dir: Path, limit_bytes: int) -> dict:
    """Store an uploaded model; returns ``{"id", "sha256", "arch", "dataset"}`` (a ModelRef)."""
    from common.fileio import atomic_write_dir
    from common.modelio import load_model

    total, expected, data = _read_chunks(iter(chunks), limit_bytes)
    if hashlib.sha256(data).hexdigest() != expected:
        raise RequestError(FAILED_PRECONDITION, "the upload's sha256 does not match its content; upload it again")
    model_id = expected[:24]
    target = models_dir / model_id
    with tempfile.TemporaryDirectory(dir=models_dir.parent) as tmp:
        unpacked = Path(tmp) / "model"
        _unpack(data, unpacked)
        try:
            _, info, meta = load_model(unpacked)
        except EdgeDistillError as exc:
            raise RequestError(INVALID_ARGUMENT, f"the upload is not a usable model: {exc}") from None
        if not target.exists():
            atomic_write_dir(target, lambda into: _unpack(data, into))
    return {"id": model_id, "sha256": meta.get("sha256", ""), "arch": meta.get("arch", ""), "dataset": info.name}


def _read_chunks(chunks: Iterator, limit_bytes: int) -> tuple[int, str, bytes]:
    first = next(chunks, None)
    if first is None:
        raise RequestError(INVALID_ARGUMENT, "empty upload; send at least one chunk with total_bytes and sha256")
    total, expected = int(first.total_bytes), str(first.sha256).lower()
    if total <= 0 or len(expected) != 64:
        raise RequestError(INVALID_ARGUMENT, "the first chunk must give total_bytes > 0 and the archive's sha256 (hex)")
    if total > limit_bytes:
        raise RequestError(
            RESOURCE_EXHAUSTED,
            f"the model is {total} bytes; this server takes at most {limit_bytes} (its --max-upload-mib)",
        )
    buffer = bytearray(first.data)
    for chunk in chunks:
        buffer += chunk.data
        if len(buffer) > total:
            raise RequestError(INVALID_ARGUMENT, f"the upload sent more than the {total} bytes it announced")
    if len(buffer) != total:
        raise RequestError(INVALID_ARGUMENT, f"the upload ended after {len(buffer)} of the {total} bytes it announced")
    return total, expected, bytes(buffer)


def _unpack(data: bytes, into: Path) -> None:
    """Extract exactly the model's two regular files; anything else in the archive is refused."""
    into.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            members = tar.getmembers()
            names = sorted(m.name for m in members)
            if names != sorted(MODEL_MEMBERS) or not all(m.isfile() for m in members):
                raise RequestError(
                    INVALID_ARGUMENT,
                    f"the archive must hold exactly the regular files {', '.join(MODEL_MEMBERS)}; it holds {names[:5]}",
                )
            for member in members:
                source = tar.extractfile(member)
                (into / member.name).write_bytes(source.read())
    except tarfile.TarError as exc:
        raise RequestError(INVALID_ARGUMENT, f"the upload is not a tar archive ({exc})") from None
