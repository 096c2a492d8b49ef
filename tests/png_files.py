"""PNG files written by hand for the tests: any bit depth, colour type, interlace and row
filter, including what Pillow cannot write, so the readers are checked on all of them."""
from __future__ import annotations

import struct
import zlib

import numpy as np

# Adam7 passes as (x0, y0, dx, dy), from the PNG specification.
ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
         (0, 1, 1, 2)]


def png_file(ihdr_body: bytes, compressed: bytes) -> bytes:
    """PNG bytes from an IHDR body and the (zlib) image data, every chunk with a valid CRC."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr_body) + chunk(b"IDAT", compressed)
            + chunk(b"IEND", b""))


def ihdr(width: int, height: int, depth: int, color_type: int, interlaced: bool = False
         ) -> bytes:
    return struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, int(interlaced))


def png_bytes(samples: np.ndarray, color_type: int, interlaced: bool = False) -> bytes:
    """A PNG of `samples` [H, W, C] (uint8 or uint16), every row with filter 0 (None)."""
    h, w = samples.shape[:2]
    depth = 16 if samples.dtype == np.uint16 else 8
    big = samples.astype(">u2" if depth == 16 else np.uint8)
    images = [big[y0::dy, x0::dx] for x0, y0, dx, dy in ADAM7] if interlaced else [big]
    raw = b"".join(b"\x00" + row.tobytes() for img in images if img.size for row in img)
    return png_file(ihdr(w, h, depth, color_type, interlaced), zlib.compress(raw))


def _paeth(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """The PNG Paeth predictor, element-wise (PNG specification §9.4)."""
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def filtered_scanlines(samples: np.ndarray, filters: list[int]) -> bytes:
    """The scanlines of 8-bit `samples` [H, W, C], row y filtered with type filters[y]
    (0 None, 1 Sub, 2 Up, 3 Average, 4 Paeth), as a PNG encoder writes them."""
    h, w, c = samples.shape
    rows = samples.reshape(h, w * c).astype(np.int64)
    out = []
    for y in range(h):
        x = rows[y]
        up = rows[y - 1] if y else np.zeros_like(x)
        left = np.concatenate([np.zeros(c, np.int64), x[:-c]])
        up_left = np.concatenate([np.zeros(c, np.int64), up[:-c]])
        predictor = {0: np.zeros_like(x), 1: left, 2: up, 3: (left + up) // 2,
                     4: _paeth(left, up, up_left)}[filters[y]]
        out.append(bytes([filters[y]]) + ((x - predictor) % 256).astype(np.uint8).tobytes())
    return b"".join(out)


def filtered_png_bytes(samples: np.ndarray, filters: list[int]) -> bytes:
    """An 8-bit RGB (C = 3) or RGBA (C = 4) PNG of `samples` with the given row filters."""
    h, w, c = samples.shape
    return png_file(ihdr(w, h, 8, 2 if c == 3 else 6),
                    zlib.compress(filtered_scanlines(samples, filters)))
