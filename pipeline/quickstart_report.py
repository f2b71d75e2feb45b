"""OUT/report.html of `clipsift quickstart`: the baselines ranked, and what each recipe removed.

One pass over the train pool, a shard at a time: per baseline a CLIP-score histogram of kept and
removed rows and a seeded draw of removed rows (bounded: `SHOWN` rows per baseline), then the
thumbnails of only the rows shown. Each filtering baseline also gets the full curation report of
its subset (reports/NAME.html: every step, thresholds, more galleries).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from clipsift.filters.subset import encode_uids, read_subset, subset_counts
from clipsift.pipeline.pool import Pool
from clipsift.pipeline.report import (
    Histogram,
    Shown,
    Smallest,
    curation_report,
    escape,
    figure_uri,
    gallery,
    histogram_figure,
    html_page,
    html_table,
    thumbnails,
    write_page,
)

if TYPE_CHECKING:
    from clipsift.pipeline.quickstart import Outcome, QuickstartResult, QuickstartSettings

SHOWN = 18  # removed samples shown per baseline


class _Draw:
    """Per baseline: its score histogram and the removed rows with the smallest seeded keys."""

    def __init__(self, outcome: Outcome):
        self.outcome = outcome
        self.subset = read_subset(os.path.join(outcome.run, "subset.npy"))
        self.histogram = Histogram()
        self.removed = Smallest(SHOWN)


def write_report(result: QuickstartResult, settings: QuickstartSettings) -> None:
    from clipsift.pipeline.quickstart import heldout_key

    pool = Pool(os.path.join(result.out, "pool"))
    draws = [_Draw(o) for o in result.outcomes]
    shards, offsets, offset = pool.shard_ids(), {}, 0
    for shard in shards:
        table = pool.metadata(shard, ["uid"])
        uids = table.column("uid").to_pylist()
        scores = _scores(pool, result.scorer, shard, len(uids))
        keys = np.array([heldout_key(u, settings.seed + 1) for u in uids], dtype=np.float64)
        pairs = encode_uids(uids)
        rows = np.arange(offset, offset + len(uids))
        for draw in draws:
            kept = subset_counts(draw.subset, pairs) > 0
            draw.histogram.add(scores, kept, ~kept)
            draw.removed.add(keys[~kept], rows[~kept])
        offsets[shard], offset = (offset, offset + len(uids)), offset + len(uids)
    shown = _read_shown(pool, result.scorer, offsets, {r for d in draws for r in d.removed.rows.tolist()})
    linked = {d.outcome.baseline.name: _curation(result, d.outcome) for d in draws if d.outcome.kept < offset}
    write_page(result.report, _page(result, settings, draws, shown, linked))


def _scores(pool: Pool, model_id: str, shard: str, rows: int) -> np.ndarray:
    if not pool.has_embeddings(model_id, shard):
        return np.full(rows, np.nan, np.float32)
    column = pool.embeddings(model_id, shard, ["clip_score"]).column("clip_score")
    return column.to_numpy(zero_copy_only=False).astype(np.float32)


def _read_shown(pool: Pool, model_id: str, offsets: dict[str, tuple[int, int]], rows: set[int]) -> dict[int, Shown]:
    shown: dict[int, Shown] = {}
    for shard, (start, end) in offsets.items():
        wanted = sorted(r - start for r in rows if start <= r < end)
        if not wanted:
            continue
        table = pool.metadata(shard, ["uid", "key", "text"]).take(np.array(wanted))
        scores = _scores(pool, model_id, shard, end - start)[wanted]
        images = thumbnails(pool, shard, dict(zip(wanted, table.column("key").to_pylist())))
        for i, position in enumerate(wanted):
            score = float(scores[i])
            shown[start + position] = Shown(
                table.column("uid")[i].as_py(),
                table.column("text")[i].as_py() or "",
                images[position],
                {model_id: None if np.isnan(score) else score},
                None,
            )
    return shown


def _curation(result: QuickstartResult, outcome: Outcome) -> str:
    """reports/NAME.html, the curation report of the baseline's subset (made once)."""
    out = os.path.join(result.out, "reports", f"{outcome.baseline.name}.html")
    if not os.path.exists(out):
        curation_report(os.path.join(outcome.run, "subset.npy"), out)
    return os.path.relpath(out, result.out)


def _page(
    result: QuickstartResult,
    settings: QuickstartSettings,
    draws: list[_Draw],
    shown: dict[int, Shown],
    linked: dict[str, str],
) -> str:
    ranked = result.ranked()
    base = next((o for o in ranked if o.baseline.name == "no_filter"), None)
    task_keys = list(result.tasks)
    rows, attrs = [], []
    for rank, outcome in enumerate(ranked, 1):
        delta = f"{outcome.average - base.average:+.4f}" if base and outcome is not base else "-"
        values = [f"{outcome.tasks[k]['value']:.4f}" if k in outcome.tasks else "-" for k in task_keys]
        rows.append(
            [rank, outcome.baseline.label, f"{outcome.kept:,}", f"{outcome.kept / result.train_samples:.1%}"]
            + [f"{outcome.average:.4f}", delta, *values]
        )
        attrs.append(f'data-baseline="{escape(outcome.baseline.name)}"')
    body = [
        "<h1>clipsift quickstart</h1>",
        f'<p class="note">{escape(result.src)}: {result.samples:,} pairs; {result.train_samples:,} to filter and '
        f"train on, {result.heldout_samples:,} held out for the evaluation suite "
        f"({escape(', '.join(f'{k}: {v:,}' for k, v in result.tasks.items()))}). Every baseline trains the fixed "
        f"{escape(settings.scale)} recipe (seed {settings.seed}); CLIP scores from {escape(result.scorer)}.</p>",
        "<h2>Baselines, ranked by the held-out average</h2>",
        html_table(
            ["#", "baseline", "kept", "share", "average", "vs no filter", *task_keys],
            rows,
            attrs,
        ),
        '<p class="note">One training seed per baseline: differences smaller than the spread between seeds '
        "(measure it with train.seed in the configs under configs/) are not findings.</p>",
        f'<img class="plot" alt="held-out scores per baseline" src="{_bars(ranked, task_keys)}">',
        "<h2>What each recipe removed</h2>",
    ]
    for draw in draws:
        outcome = draw.outcome
        if outcome.kept >= result.train_samples:
            continue
        name = outcome.baseline.name
        link = f' <a href="{escape(linked[name])}">full curation report</a>' if name in linked else ""
        body += [
            f'<h3 id="{escape(name)}">{escape(outcome.baseline.label)}: removed '
            f"{result.train_samples - outcome.kept:,} of {result.train_samples:,}{link}</h3>",
            f'<img class="plot" alt="CLIP scores, {escape(name)}" src="'
            + histogram_figure(draw.histogram, f"{outcome.baseline.label}: CLIP scores", None, "kept", "removed")
            + '">',
            gallery(f"removed:{name}", "removed: a random draw", draw.removed.rows.tolist(), shown, result.scorer),
        ]
    body.append(
        f'<p class="note">Runs: {escape(os.path.join(result.out, "runs"))}; configs: '
        f"{escape(os.path.join(result.out, 'configs'))}.</p>"
    )
    return html_page("clipsift quickstart", body)


def _bars(ranked: list[Outcome], task_keys: list[str]) -> str:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 0.6 + 0.45 * len(ranked) * (len(task_keys) + 1)))
    axes = figure.subplots()
    labels = [o.baseline.label for o in ranked][::-1]
    height = 0.8 / (len(task_keys) + 1)
    series = [("average", [o.average for o in ranked][::-1])]
    series += [(k, [o.tasks.get(k, {}).get("value", 0.0) for o in ranked][::-1]) for k in task_keys]
    for i, (name, values) in enumerate(series):
        positions = np.arange(len(labels)) + (i - len(series) / 2 + 0.5) * height
        axes.barh(positions, values, height=height, label=name)
    axes.set_yticks(np.arange(len(labels)), labels)
    axes.set_xlabel("held-out score")
    axes.legend(fontsize=8, loc="lower right")
    return figure_uri(figure)
