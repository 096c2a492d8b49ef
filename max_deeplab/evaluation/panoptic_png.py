"""COCO panoptic PNGs, read and checked for the `pq` verb, without decoding them into arrays.

A panoptic PNG stores one segment id per pixel (`max_deeplab.panoptic_labels.rgb_to_id`;
0 = void). `read_png` reads and checks a file's chunks; `inflated_scanlines` inflates its
image data with libdeflate (the `deflate` package; ~30x faster than zlib on these highly
compressible maps) into the still filtered rows that the C extension reads
(`png_overlap`). Nothing here imports numpy, so a `pq` process does not pay numpy's ~0.1 s
start-up.

Errors are `PanopticEvalError`s naming the file: not a PNG, a CRC mismatch or truncation
(checked on every chunk; Pillow, the reference evaluator's reader, checks the chunks before
the image data only), a non-RGB colour type, an empty image or one whose header is larger
than its data can hold, corrupt compressed data or more of it than the header's size (which
Pillow ignores), an unknown row filter, or two PNGs of one image that differ in size: a
damaged file is reported rather than turned into a possibly wrong number.
"""
from __future__ import annotations

import zlib

import deflate

from max_deeplab.evaluation.errors import PanopticEvalError
from max_deeplab.file_system import read_regular_file
from max_deeplab.panoptic_labels import PNG_ID_BITS

# An overlap key is (gt_id << ID_BITS) | pred_id, as the C extension builds it.
ID_BITS = PNG_ID_BITS
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG colour types (IHDR byte 9) that carry R, G, B samples: truecolour (+ alpha). The
# others have no RGB id.
_CHANNELS_OF_COLOR_TYPE = {2: 3, 6: 4}
_OTHER_COLOR_TYPES = {0: "grayscale", 3: "palette", 4: "grayscale + alpha"}
# Deflate encodes at most 258 bytes per (>= 2-bit) match code: no stream expands by more.
_MAX_DEFLATE_RATIO = 1032
# PNG row filter types: None, Sub, Up, Average, Paeth.
_MAX_FILTER_TYPE = 4


class PanopticPng:
    """A read and checked RGB(A) PNG file: its header fields and its compressed image data.

    (A plain class: importing `dataclasses` costs ~8 ms of the `pq` verb's timed start-up.)
    """

    __slots__ = ("path", "data", "width", "height", "bit_depth", "channels", "interlaced",
                 "image_data")

    def __init__(self, path: str, data: bytes, width: int, height: int, bit_depth: int,
                 channels: int, interlaced: bool, image_data: bytes) -> None:
        self.path = path
        self.data = data  # the whole file
        self.width = width
        self.height = height
        self.bit_depth = bit_depth
        self.channels = channels  # 3 (RGB) or 4 (RGBA)
        self.interlaced = interlaced
        self.image_data = image_data  # the IDAT chunks' payload, joined: one zlib stream

    @property
    def scanline_bytes(self) -> int:
        """Bytes of the inflated image data of a non-interlaced image (filter byte + row)."""
        return self.height * (1 + -(-self.width * self.channels * self.bit_depth // 8))


def read_png(path: str) -> PanopticPng:
    """Reads `path` and checks its chunk structure, CRCs and header (see module docstring)."""
    try:
        data = read_regular_file(path)
    except FileNotFoundError:
        raise PanopticEvalError(f"PNG not found: {path}") from None
    except OSError as e:
        raise PanopticEvalError(f"cannot read PNG {path}: {e}") from None
    if (data[:8] != PNG_SIGNATURE or data[8:16] != b"\x00\x00\x00\x0dIHDR"
            or len(data) < 33):
        raise PanopticEvalError(f"cannot decode PNG {path}: not a PNG file")
    bit_depth, color_type = data[24], data[25]
    channels = _CHANNELS_OF_COLOR_TYPE.get(color_type)
    if channels is None:
        kind = _OTHER_COLOR_TYPES.get(color_type, f"unknown colour type {color_type}")
        raise PanopticEvalError(f"PNG {path} is {kind}; expected an RGB panoptic PNG [H, W, 3] "
                                "with id = R + 256 G + 256^2 B")
    if data[26] != 0 or data[27] != 0 or data[28] > 1:
        raise PanopticEvalError(f"cannot decode PNG {path}: unknown compression, filter or "
                                f"interlace method ({data[26]}, {data[27]}, {data[28]}) in its "
                                "header")
    png = PanopticPng(path=path, data=data, width=int.from_bytes(data[16:20], "big"),
                      height=int.from_bytes(data[20:24], "big"), bit_depth=bit_depth,
                      channels=channels, interlaced=data[28] != 0,
                      image_data=_image_data(data, path))
    if png.width < 1 or png.height < 1:
        raise PanopticEvalError(f"cannot decode PNG {path}: its header says {png.width}x"
                                f"{png.height} pixels")
    if png.scanline_bytes > _MAX_DEFLATE_RATIO * (len(png.image_data) + 64):
        # Caught before any decoder allocates the whole image from the header (a failing
        # allocation can be a crash rather than a Python error).
        raise PanopticEvalError(f"cannot decode PNG {path}: its header says {png.width}x"
                                f"{png.height} pixels, more than its {len(png.image_data)} "
                                "bytes of image data can hold")
    return png


def _image_data(data: bytes, path: str) -> bytes:
    """Checks the chunk structure and the CRC-32 of every chunk (up to IEND); returns the
    IDAT payloads joined. The chunks hold compressed data, so this costs microseconds."""
    view = memoryview(data)
    pos, n = 8, len(data)
    parts = []
    while pos < n:
        length = int.from_bytes(view[pos:pos + 4], "big")
        end = pos + 8 + length
        if end + 4 > n:
            raise PanopticEvalError(f"cannot decode PNG {path}: truncated at byte {pos}")
        ctype = bytes(view[pos + 4:pos + 8])
        if zlib.crc32(view[pos + 4:end]) != int.from_bytes(view[end:end + 4], "big"):
            raise PanopticEvalError(f"cannot decode PNG {path}: CRC mismatch in chunk "
                                    f"{ctype.decode('latin-1')!r} at byte {pos}")
        if ctype == b"IDAT":
            parts.append(view[pos + 8:end])
        elif ctype == b"IEND":
            break
        pos = end + 4
    return b"".join(parts)


def inflated_scanlines(png: PanopticPng) -> bytes:
    """The inflated, still filtered rows of a non-interlaced 8-bit PNG, checked."""
    size = png.scanline_bytes
    try:
        # libdeflate checks the zlib header and the Adler-32 checksum of the output.
        rows = deflate.zlib_decompress(png.image_data, size)
    except deflate.DeflateError:
        raise PanopticEvalError(f"cannot decode PNG {png.path}: corrupt compressed image data "
                                "(or more of it than its header's size)") from None
    if len(rows) != size:
        raise PanopticEvalError(f"cannot decode PNG {png.path}: {len(rows)} bytes of image data "
                                f"where its {png.width}x{png.height} header needs {size}")
    filters = rows[::size // png.height]
    if max(filters) > _MAX_FILTER_TYPE:
        row = next(y for y, f in enumerate(filters) if f > _MAX_FILTER_TYPE)
        raise PanopticEvalError(f"cannot decode PNG {png.path}: row {row} has unknown filter "
                                f"type {filters[row]}")
    return rows
