"""The clipsift pool format (`clipsift-pool/1`). This package is its only home.

Layout (see DESIGN.md)::

    POOL/pool.json                  format, name, num_shards, num_samples, sources, created
    POOL/shards/00000000.tar        webdataset: {key}.jpg|png|webp, {key}.txt, {key}.json
    POOL/metadata/00000000.parquet  one row per sample of that tar, in the same order

Every file is written under a temporary name and renamed when complete; the shard's tar is
renamed before its parquet, so a shard is complete exactly when its parquet exists.
Pools are local paths or fsspec URLs.

Modules: `layout` (format constants, uids, keys, `Sample`), `tar_read` and `tar_write` (webdataset
tars), `shards` (writing one shard), `build` (making a pool resumably, pool.json), `embeddings`
(embeddings tables), `reader` (`Pool`) and `columns` (column sets: per-row values computed once per shard and
cached under POOL/columns/, such as image_quality's). The generic file helpers are in `clipsift.files`; they
are re-exported here for older imports.
"""

from clipsift.files import (
    PARQUET_COMPRESSION,
    file_sha256,
    is_local_fs,
    local_fd,
    open_fs,
    parquet_file,
    read_parquet,
    write_atomic,
    write_json_atomic,
    write_parquet,
)
from clipsift.pipeline.pool.build import ShardFiller, build_pool, finalize_pool, record_build_params
from clipsift.pipeline.pool.embeddings import embedding_matrix, embeddings_schema, embeddings_table
from clipsift.pipeline.pool.layout import (
    BASE_COLUMNS,
    BASE_SCHEMA,
    DEFAULT_SHARD_SIZE,
    IMAGE_EXTS,
    POOL_FORMAT,
    STATS_KEY,
    UID_PATTERN,
    PoolFormatError,
    Sample,
    derive_uid,
    is_valid_uid,
    sample_key,
    shard_id,
)
from clipsift.pipeline.pool.reader import Pool, image_member, sample_from_entry
from clipsift.pipeline.pool.shards import (
    ShardWriter,
    adopt_shard,
    json_members,
    metadata_table,
    shard_is_complete,
    write_metadata,
    write_shard,
)
from clipsift.pipeline.pool.tar_read import (
    ImageSpans,
    TarEntry,
    find_entries,
    image_spans,
    iter_tar,
    owned,
    split_member_name,
    tar_windows,
)
from clipsift.pipeline.pool.tar_write import TarStream, ustar_headers

__all__ = [
    "BASE_COLUMNS",
    "BASE_SCHEMA",
    "DEFAULT_SHARD_SIZE",
    "IMAGE_EXTS",
    "PARQUET_COMPRESSION",
    "POOL_FORMAT",
    "STATS_KEY",
    "UID_PATTERN",
    "ImageSpans",
    "Pool",
    "PoolFormatError",
    "Sample",
    "ShardFiller",
    "ShardWriter",
    "TarEntry",
    "TarStream",
    "adopt_shard",
    "build_pool",
    "derive_uid",
    "embedding_matrix",
    "embeddings_schema",
    "embeddings_table",
    "file_sha256",
    "find_entries",
    "finalize_pool",
    "image_member",
    "image_spans",
    "is_local_fs",
    "is_valid_uid",
    "iter_tar",
    "json_members",
    "local_fd",
    "metadata_table",
    "open_fs",
    "owned",
    "parquet_file",
    "read_parquet",
    "record_build_params",
    "sample_from_entry",
    "sample_key",
    "shard_id",
    "shard_is_complete",
    "split_member_name",
    "tar_windows",
    "ustar_headers",
    "write_atomic",
    "write_json_atomic",
    "write_metadata",
    "write_parquet",
    "write_shard",
]
