"""Per-shard embeddings tables: their schema, building one from float arrays, reading vectors back."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from clipsift.arrays import numpy_of
from clipsift.pipeline.pool.layout import PoolFormatError


def embeddings_schema(dim: int) -> pa.Schema:
    """Per-shard embeddings: L2-normalised float16 vectors, float32 cosine, and a status per row.

    `status` is "ok", or the reason the row has no embeddings (e.g. "undecodable image: ...").
    """
    vector = pa.list_(pa.float16(), dim)
    return pa.schema(
        [
            ("uid", pa.string()),
            ("image_emb", vector),
            ("text_emb", vector),
            ("clip_score", pa.float32()),
            ("status", pa.string()),
        ]
    )


def embeddings_table(
    uids: list[str], image_emb: Any, text_emb: Any, status: list[str], normalise: bool = True
) -> pa.Table:
    """A shard's embeddings table from float arrays [N, D] (rows whose status is not "ok" become nulls):
    vectors L2-normalised in float32 and stored as float16, clip_score the float32 cosine. normalise=False keeps
    vectors that are unit length already (DataComp's float16 features) bit for bit."""
    import numpy as np

    image, text = np.asarray(image_emb, dtype=np.float32), np.asarray(text_emb, dtype=np.float32)
    if normalise:
        image, text = _l2_normalise(image), _l2_normalise(text)
    missing = np.array([s != "ok" for s in status], dtype=bool)
    dim = image.shape[1]
    schema = embeddings_schema(dim)
    mask = pa.array(missing)

    def vectors(values: Any) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(values.astype(np.float16).reshape(-1)), dim, mask=mask)

    scores = pa.array(np.einsum("nd,nd->n", image, text).astype(np.float32), mask=missing)
    return pa.table(
        [pa.array(uids, pa.string()), vectors(image), vectors(text), scores, pa.array(status, pa.string())],
        schema=schema,
    )


def _l2_normalise(vectors: Any) -> Any:
    import numpy as np

    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1)


def embedding_matrix(table: pa.Table, column: str = "image_emb") -> tuple[np.ndarray, np.ndarray]:
    """(float32 array [rows, D], bool array [rows]: row has a vector) from an embeddings column.

    Rows without a vector (status other than "ok") get zeros.
    """
    array = table.column(column).combine_chunks()
    if not pa.types.is_fixed_size_list(array.type):
        raise PoolFormatError(f"embeddings column {column!r} is {array.type}, expected a fixed_size_list of float16")
    dim = array.type.list_size
    values = array.values.slice(array.offset * dim, len(array) * dim)
    matrix = numpy_of(values).astype(np.float32).reshape(len(array), dim)
    valid = numpy_of(array.is_valid())
    matrix[~valid] = 0.0
    return matrix, valid
