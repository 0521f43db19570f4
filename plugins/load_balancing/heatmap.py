"""A layer × expert load heat map as an RGB image, and a dependency-free PNG writer for it.

Colour: log2(load / mean load of the layer), clipped to ±2: white is a perfectly average expert,
red up to 4x overloaded, blue down to 4x underloaded; black an expert with no token at all. Each
cell is ``cell`` pixels square. PNG encoding is zlib plus three chunks, so the monitor needs no
matplotlib or PIL.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import torch


def load_heatmap(load_LE: torch.Tensor, cell: int = 12) -> torch.Tensor:
    """uint8 image [L·cell, E·cell, 3] of the relative load."""
    load_LE = load_LE.double()
    ratio = (load_LE / load_LE.mean(-1, keepdim=True).clamp_min(1e-12)).clamp_min(1e-12)
    x = (ratio.log2() / 2).clamp(-1, 1)  # -1 (4x under) .. 1 (4x over)
    white = torch.ones_like(x)
    red = torch.where(x < 0, 1 + x, white)  # fades to blue below average
    green = 1 - x.abs()
    blue = torch.where(x > 0, 1 - x, white)
    rgb = torch.stack([red, green, blue], -1)
    rgb[load_LE == 0] = 0
    image = (rgb * 255).round().to(torch.uint8)
    return image.repeat_interleave(cell, 0).repeat_interleave(cell, 1)


def write_png(path: Path, image_HW3: torch.Tensor) -> None:
    """Writes an 8-bit RGB PNG, atomically (a temporary file renamed into place)."""
    height, width, _ = image_HW3.shape
    raw = b"".join(b"\x00" + bytes(row) for row in image_HW3.contiguous().numpy().reshape(height, -1))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(png)
    os.replace(tmp, path)
