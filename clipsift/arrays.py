"""Arrow columns as NumPy arrays, and NumPy arrays and Python strings as Arrow, without importing pandas.

pyarrow's `to_numpy` goes through its pandas converter, and `pa.array` / `pa.scalar` of NumPy arrays or Python
values (as `pc.fill_null(x, False)` and any compute function's literal argument make) check them against pandas'
types: either imports pandas on first use, about 0.5 s a process on 2 cores, a third of a small `clipsift
filter` run. Numbers and booleans, what the filters read, are read straight from the Arrow buffers here
(`numpy_of`, `numpy_filled`); arrays for Arrow are built from their buffers (`arrow_of`, `strings_of`,
`string_scalar`, `binary_of`); anything else still goes through pyarrow's own conversions.
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


def binary_of(fixed: np.ndarray) -> pa.Array:
    """`pa.array(fixed, pa.binary())` of a NumPy bytes ("S") array (each value up to its first NUL byte, as
    pyarrow reads it), built from the bytes themselves: pa.array would go through pandas."""
    fixed = np.ascontiguousarray(fixed)
    width = fixed.dtype.itemsize
    if len(fixed) == 0 or width == 0:
        return strings_of([b""] * len(fixed), pa.binary())
    raw = fixed.view(np.uint8).reshape(len(fixed), width)
    nul = raw == 0
    lengths = np.where(nul.any(axis=1), nul.argmax(axis=1), width)
    data = raw[np.arange(width) < lengths[:, None]]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.Array.from_buffers(pa.binary(), len(fixed), [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def strings_of(values: list[str | bytes | None], kind: pa.DataType = pa.string()) -> pa.Array:
    """`pa.array(values, kind)` for a list of str (or bytes) and None, a (large) string or binary `kind`, built
    from the encoded values: pa.array of Python objects imports pandas to check their types."""
    encoded = [b"" if v is None else v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in values]
    large = pa.types.is_large_string(kind) or pa.types.is_large_binary(kind)
    offsets = np.zeros(len(values) + 1, np.int64 if large else np.int32)
    np.cumsum([len(v) for v in encoded], out=offsets[1:])
    valid = np.array([v is not None for v in values], bool)
    bitmap = None if valid.all() else pa.py_buffer(np.packbits(valid, bitorder="little"))
    return pa.Array.from_buffers(
        kind,
        len(values),
        [bitmap, pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded))],
        int(len(values) - valid.sum()),
    )


def string_scalar(text: str) -> pa.Scalar:
    """`pa.scalar(text)`, without the pandas import that pa.scalar makes (for compute functions' literal
    arguments, which pyarrow otherwise converts with pa.scalar)."""
    return strings_of([text])[0]


def arrow_of(values: np.ndarray) -> pa.Array:
    """`pa.array(values)` of a 1-d NumPy array of numbers or booleans, from its buffer: pa.array of a NumPy array
    imports pandas on first use."""
    values = np.ascontiguousarray(values)
    if values.dtype == bool:
        data = pa.py_buffer(np.packbits(values, bitorder="little"))
    else:
        data = pa.py_buffer(values)
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values), [None, data])
