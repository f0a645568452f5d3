"""A PNG reader for the tests of what cordseg.qc writes (8-bit grey, RGB or palette; filter none or Up)."""
import struct
import zlib

import numpy as np


def read_png(data: bytes):
    """(array, palette, transparency) of an 8-bit grey, RGB or palette PNG (filter none or Up), every CRC checked."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + length
    w, h, depth, colour, _, _, _ = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    channels = {0: 1, 2: 3, 3: 1}[colour]
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(h, 1 + channels * w)
    assert depth == 8 and set(np.unique(raw[:, 0])) <= {0, 2}  # no filter, or 'Up'
    rows = raw[:, 1:].copy()
    for r in range(1, h):
        if raw[r, 0] == 2:
            rows[r] += rows[r - 1]  # wraps modulo 256, as the filter does
    pixels = rows.reshape(h, w, channels) if channels > 1 else rows
    palette = np.frombuffer(chunks[b"PLTE"], np.uint8).reshape(-1, 3) if b"PLTE" in chunks else None
    return pixels, palette, chunks.get(b"tRNS")
