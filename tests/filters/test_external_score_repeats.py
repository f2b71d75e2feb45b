"""external_score's refusal of a file listing uids more than once: counted per partition of the join, so the
driver reads a few rows per partition rather than every repeated uid."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipsift.filters.base import RecipeError
from clipsift.filters.external_score import REPEAT_EXAMPLES, ROW_BYTES
from clipsift.pipeline.partition import Shuffle, partitions_for
from clipsift.pipeline.pool import derive_uid

from filter_support import build_pool, run

N, PER_SHARD = 40, 15


@pytest.mark.parametrize("budget_mb", [1.0, 0.002])
def test_a_file_concatenated_twice_is_refused_with_its_count(tmp_path: Path, monkeypatch, budget_mb: float) -> None:
    pool = build_pool(tmp_path / "pool", [{} for _ in range(N)], per_shard=PER_SHARD)
    uids = [derive_uid(f"row/{n}") for n in range(N)]
    listed = uids + uids + uids[:5] + [derive_uid("other/1")]  # twice, five of them three times, one other once
    path = tmp_path / "twice.parquet"
    pq.write_table(
        pa.table({"uid": listed, "score": np.arange(len(listed), dtype=np.float64)}), path, row_group_size=16
    )
    repeated = {uid for uid, count in Counter(listed).items() if count > 1}

    shards = len(pool.shard_ids())
    summaries: list[int] = []  # rows the driver read of the repeats' destination
    real = Shuffle.read

    def read(shuffle: Shuffle, destination: int) -> pa.Table:
        table = real(shuffle, destination)
        if destination == shards:
            summaries.append(table.num_rows)
        return table

    monkeypatch.setattr(Shuffle, "read", read)
    recipe = f"steps: [{{external_score: {{path: {path}, fraction: 0.5, budget_mb: {budget_mb}}}}}]"
    with pytest.raises(RecipeError, match=r"uid\(s\) have more than one row in the file") as err:
        run(pool, tmp_path, recipe)
    count, example = re.search(r"(\d+) uid\(s\) .* \(e\.g\. ([0-9a-f]{32})\)", str(err.value)).groups()
    assert int(count) == len(repeated) == N and example in repeated
    partitions = partitions_for(len(listed) + N, ROW_BYTES, budget_mb)
    assert summaries and summaries[0] <= REPEAT_EXAMPLES * partitions < N  # not one row per repeated uid
    assert (partitions > 1) == (budget_mb < 1)
