"""Arrow columns as NumPy arrays without importing pandas.

pyarrow's `to_numpy` goes through its pandas converter, and turning a Python value into an Arrow scalar (as
`pc.fill_null(x, False)` does) checks it against pandas' types: either imports pandas on first use, about 0.5 s a
process on 2 cores, a third of a small `clipsift filter` run. Numbers and booleans, what the filters read, are
read straight from the Arrow buffers here; anything else still goes through `to_numpy`.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def numpy_of(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """`values.to_numpy(zero_copy_only=False)`, equal element for element (a read-only view where it can be)."""
    values = _one_array(values)
    if values.null_count == 0:
        raw = _raw(values)
        if raw is not None:
            return raw
    return values.to_numpy(zero_copy_only=False)


def numpy_filled(values: pa.Array | pa.ChunkedArray, fill: bool | int | float) -> np.ndarray:
    """`numpy_of(values)` with `fill` where a value is null (`pc.fill_null(values, fill)`, without pandas)."""
    values = _one_array(values)
    raw = _raw(values)
    if raw is None:
        return values.fill_null(fill).to_numpy(zero_copy_only=False)
    if values.null_count == 0:
        return raw
    out = raw.copy()
    out[~_bits(values.buffers()[0], values.offset, len(values))] = fill
    return out


def _one_array(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        return values.chunk(0) if values.num_chunks == 1 else values.combine_chunks()
    return values


def _raw(values: pa.Array) -> np.ndarray | None:
    """The data buffer of a boolean or fixed-width number array as NumPy (null slots hold whatever is there), or
    None for other types."""
    kind = values.type
    if pa.types.is_boolean(kind):
        return _bits(values.buffers()[1], values.offset, len(values)) if len(values) else np.zeros(0, bool)
    if pa.types.is_integer(kind):
        dtype = np.dtype(f"{'i' if pa.types.is_signed_integer(kind) else 'u'}{kind.bit_width // 8}")
    elif pa.types.is_floating(kind):
        dtype = np.dtype(f"f{kind.bit_width // 8}")
    else:
        return None
    if not len(values):
        return np.zeros(0, dtype)
    return np.frombuffer(values.buffers()[1], dtype, count=len(values), offset=values.offset * dtype.itemsize)


def _bits(buffer: pa.Buffer, offset: int, length: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(buffer, np.uint8), bitorder="little")
    return bits[offset : offset + length].view(bool)
