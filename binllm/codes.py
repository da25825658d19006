"""Binary codes: packing, the two text forms (binary digits, dotted decimal), code tables.

A code of B bits (B a multiple of 8) is held packed as B/8 bytes, most significant bit first:
+1 -> bit 1, -1 -> bit 0. The dotted form writes each byte as a decimal integer joined by '.',
so 32 bits read like an IPv4 address (10110010... -> 178.112.245.45).
"""
from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
import pyarrow as pa

CodeFormat = Literal["binary", "dotted"]


def pack_bits(signs: np.ndarray) -> np.ndarray:
    """(n, B) codes -> (n, B/8) uint8.

    bool or unsigned arrays are read as bits (0/1); signed or float arrays as signs, where every
    value >= 0 is bit 1 (sign(0) = +1).
    """
    signs = np.asarray(signs)
    if signs.ndim != 2 or signs.shape[1] % 8:
        raise ValueError(f"codes must be a 2-D array with a multiple of 8 bits per row, got shape {signs.shape}")
    bits = signs > 0 if signs.dtype == bool or np.issubdtype(signs.dtype, np.unsignedinteger) else signs >= 0
    return np.packbits(bits.astype(np.uint8), axis=1)


def unpack_bits(packed: np.ndarray) -> np.ndarray:
    """(n, B/8) uint8 -> (n, B) uint8 of 0/1."""
    return np.unpackbits(np.asarray(packed, dtype=np.uint8), axis=1)


def packed_to_uint32(packed: np.ndarray) -> np.ndarray:
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    if packed.ndim != 2 or packed.shape[1] != 4:
        raise ValueError(f"uint32 codes need 4 bytes per row, got shape {packed.shape}")
    return packed.view(">u4").reshape(-1).astype(np.uint32)


def uint32_to_packed(values: np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.uint32).astype(">u4").view(np.uint8).reshape(-1, 4)


def code_text(packed: np.ndarray, fmt: CodeFormat) -> list[str]:
    """Text form of each packed code: '0101...' (binary) or '178.112.245.45' (dotted)."""
    packed = np.asarray(packed, dtype=np.uint8)
    if fmt == "binary":
        digits = (unpack_bits(packed) + ord("0")).astype(np.uint8)
        width = digits.shape[1]
        return [s.decode() for s in digits.view(f"S{width}").reshape(-1)] if len(digits) else []
    if fmt == "dotted":
        cols = [np.char.mod("%d", packed[:, j]) for j in range(packed.shape[1])]
        if not cols or not len(packed):
            return []
        out = cols[0]
        for col in cols[1:]:
            out = np.char.add(np.char.add(out, "."), col)
        return out.tolist()
    raise ValueError(f"unknown code format {fmt!r}; expected 'binary' or 'dotted'")


def parse_code_text(texts: Sequence[str], fmt: CodeFormat) -> np.ndarray:
    """Inverse of code_text; raises ValueError naming the first malformed code."""
    if fmt == "binary":
        width = len(texts[0]) if len(texts) else 0
        for t in texts:
            if len(t) != width or width % 8 or set(t) - {"0", "1"}:
                raise ValueError(f"malformed binary code {t!r}: expected {width or 'a multiple of 8'} digits of 0/1")
        bits = np.frombuffer("".join(texts).encode(), dtype=np.uint8).reshape(len(texts), width) - ord("0")
        return np.packbits(bits, axis=1)
    if fmt == "dotted":
        rows = []
        for t in texts:
            parts = t.split(".")
            if not all(p.isdigit() and int(p) < 256 for p in parts) or (rows and len(parts) != len(rows[0])):
                raise ValueError(f"malformed dotted code {t!r}: expected bytes 0-255 joined by '.'")
            rows.append([int(p) for p in parts])
        return np.asarray(rows, dtype=np.uint8).reshape(len(texts), -1)
    raise ValueError(f"unknown code format {fmt!r}; expected 'binary' or 'dotted'")


def code_table(ids: Sequence[str], packed: np.ndarray) -> pa.Table:
    """The code-table contract: id, bits (uint32 for 32-bit codes, fixed-size binary otherwise), binary, dotted."""
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    if len(ids) != len(packed):
        raise ValueError(f"{len(ids)} ids but {len(packed)} codes")
    if packed.shape[1] == 4:
        bits = pa.array(packed_to_uint32(packed), type=pa.uint32())
    else:
        width = packed.shape[1]
        bits = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(packed), [None, pa.py_buffer(packed.tobytes())])
    return pa.table({
        "id": pa.array([str(i) for i in ids], type=pa.string()),
        "bits": bits,
        "binary": pa.array(code_text(packed, "binary"), type=pa.string()),
        "dotted": pa.array(code_text(packed, "dotted"), type=pa.string()),
    })


def read_code_table(table: pa.Table, source: str = "code table") -> tuple[np.ndarray, np.ndarray]:
    """(ids as an object array of str, packed uint8 codes) from a code table; errors name `source`."""
    for col in ("id", "bits"):
        if col not in table.column_names:
            raise ValueError(f"{source}: missing column '{col}' (expected id, bits, binary, dotted)")
    bits = table.column("bits").combine_chunks()
    if pa.types.is_uint32(bits.type):
        packed = uint32_to_packed(bits.to_numpy(zero_copy_only=False))
    elif pa.types.is_fixed_size_binary(bits.type):
        width = bits.type.byte_width
        packed = np.frombuffer(bits.buffers()[1], dtype=np.uint8, count=len(bits) * width, offset=bits.offset * width)
        packed = packed.reshape(len(bits), width).copy()
    else:
        raise ValueError(f"{source}: column 'bits' must be uint32 or fixed-size binary, got {bits.type}")
    if bits.null_count or table.column("id").null_count:
        raise ValueError(f"{source}: columns 'id' and 'bits' must not contain nulls")
    ids = np.asarray(table.column("id").cast(pa.string()).to_pylist(), dtype=object)
    return ids, packed
