"""clipsift.arrays.numpy_of against pyarrow's own to_numpy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from clipsift.arrays import binary_of, numpy_filled, numpy_of

CASES = {
    "int64": pa.array(range(-5, 70), pa.int64()),
    "uint8": pa.array(range(0, 200, 3), pa.uint8()),
    "int16": pa.array(range(-300, 300, 7), pa.int16()),
    "float16": pa.array(np.linspace(-2, 2, 33).astype(np.float16)),
    "float32": pa.array(np.linspace(-1, 1, 41).astype(np.float32)),
    "double": pa.array(np.linspace(0, 9, 50)),
    "bool": pa.array([i % 3 == 0 for i in range(77)]),
    "with nulls": pa.array([1.5, None, 3.0] * 9, pa.float32()),
    "strings": pa.array(["a", "bc", None, "d"] * 5),
    "bool with nulls": pa.array([True, None, False, True, None] * 7),
    "int with nulls": pa.array([4, None, -2] * 11, pa.int32()),
}
FILL = {
    "bool": False,
    "bool with nulls": False,
    "strings": "",
    "int with nulls": 0,
    "int64": 0,
    "uint8": 0,
    "int16": 0,
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_equal_to_to_numpy_whole_sliced_chunked_and_empty(name: str) -> None:
    array = CASES[name]
    variants = [
        array,
        array.slice(3, 17),  # an offset into the buffers (booleans: not a multiple of 8)
        array.slice(5, 0),
        pa.chunked_array([array.slice(0, 9), array.slice(9)]),
        pa.chunked_array([array.slice(2, 11)]),
        pa.chunked_array([], array.type),
    ]
    for values in variants:
        expected = values.to_numpy() if isinstance(values, pa.ChunkedArray) else values.to_numpy(zero_copy_only=False)
        got = numpy_of(values)
        assert got.dtype == expected.dtype and got.shape == expected.shape, (name, got.dtype, expected.dtype)
        if got.dtype.kind == "f":
            np.testing.assert_array_equal(got, expected)  # nan where null, in both
        else:
            assert got.tolist() == expected.tolist(), name


@pytest.mark.parametrize("name", sorted(CASES))
def test_filled_equals_fill_null_then_to_numpy(name: str) -> None:
    array, fill = CASES[name], FILL.get(name, 7.0)
    for values in (array, array.slice(3, 17), pa.chunked_array([array.slice(0, 9), array.slice(9)])):
        expected = (
            values.fill_null(fill).to_numpy(zero_copy_only=False)
            if isinstance(values, pa.Array)
            else (values.combine_chunks().fill_null(fill).to_numpy(zero_copy_only=False))
        )
        got = numpy_filled(values, fill)
        assert got.dtype == expected.dtype and got.tolist() == expected.tolist(), name


def test_columns_read_from_parquet_need_no_pandas(tmp_path: Path) -> None:
    """What a filter does (a parquet column, a comparison) imports no pandas: a new process checks."""
    import pyarrow.parquet as pq

    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"w": [300, 100, 250], "h": [200, 200, 200], "e": pa.array(np.ones(3, np.float16))}), path)
    code = (
        "import sys, pyarrow.compute as pc, pyarrow.parquet as pq; from clipsift.arrays import numpy_of as n; "
        f"t = pq.ParquetFile({str(path)!r}).read(); "
        "print(n(t.column('w')).tolist(), n(pc.greater(t.column('w'), t.column('h'))).tolist(), "
        "n(t.column('e')).tolist(), 'pandas' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[300, 100, 250] [True, False, True] [1.0, 1.0, 1.0] False"


def test_binary_of_equals_pyarrow_on_bytes_arrays() -> None:
    """Up to the first NUL byte, as pyarrow reads a NumPy "S" array: trailing and inner NULs, empty values, views."""
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 4, (500, 9), dtype=np.uint8).view("S9").ravel()
    cases = [np.array([b"abc", b"", b"a\x00b", b"xyz\x00\x00"], "S6"), np.array([], "S3"), noisy, noisy[::3]]
    for values in cases:
        assert binary_of(values).equals(pa.array(values, pa.binary())), values
