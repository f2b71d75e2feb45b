"""`clipsift report scaling`: power-law fits, predictions and rank correlations against hand computations."""

from __future__ import annotations

import base64
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clipsift import ClipsiftError
from clipsift.eval.aggregate import suite_summary, summary
from clipsift.eval.registry import load_suite
from clipsift.filters.recipe import apply_recipe, load_recipe
from clipsift.pipeline.reshard import read_manifest, reshard
from clipsift.pipeline.scaling import fit_power_law, scaling_analysis
from clipsift.train.recipe import load_recipe as load_scale

from filter_support import build_pool

SEEN = {scale: load_scale(scale).samples_seen for scale in ("xs", "tiny", "small", "medium")}
# (recipe, scale, suite average): A at three scales, B at two with two seeds at xs, C at two
RUNS = [
    ("A", "xs", 0.30),
    ("A", "tiny", 0.40),
    ("A", "small", 0.52),
    ("B", "xs", 0.26),
    ("B", "xs", 0.30),
    ("B", "tiny", 0.38),
    ("C", "xs", 0.29),
    ("C", "tiny", 0.37),
]


def write_run(root: Path, name: str, shards: Path, scale: str, average: float, complete: bool = True) -> Path:
    """A run directory as `clipsift train` and `clipsift eval` leave it (the fields this analysis reads, in their
    formats)."""
    run = root / name
    (run / "eval").mkdir(parents=True)
    manifest = read_manifest(str(shards))
    (run / "run.json").write_text(
        json.dumps(
            {
                "scale": scale,
                "recipe": load_scale(scale).to_dict(),
                "status": "complete",
                "samples_seen": SEEN[scale],
                "seed": 0,
                "data": [
                    {
                        "path": str(shards),
                        "weight": 1.0,
                        "num_shards": manifest["num_shards"],
                        "manifest": manifest,
                        "subset_sha256": manifest["subset_sha256"],
                    }
                ],
            }
        )
    )
    suite = load_suite("tiny")
    tasks = suite.scored if complete else suite.scored[1:]
    results = {task.key: {"value": average} for task in tasks}
    (run / "eval" / "summary.json").write_text(
        json.dumps(summary({"arch": "clipsift-xs"}, {"tiny": suite_summary(suite, results)}))
    )
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """One real subset (subset.json naming its recipe) and reshard per recipe; a run directory per entry of RUNS."""
    root = tmp_path_factory.mktemp("scaling")
    pool = build_pool(root / "pool", [{} for _ in range(6)], per_shard=6)
    shards = {}
    for recipe in ("A", "B", "C"):
        (root / f"{recipe}.yaml").write_text(f"name: {recipe}\nsteps: [no_filter]")
        apply_recipe(pool.url, load_recipe(str(root / f"{recipe}.yaml")), str(root / f"{recipe}.npy"), workers=1)
        shards[recipe] = root / f"{recipe}-shards"
        reshard(pool.url, str(root / f"{recipe}.npy"), str(shards[recipe]), workers=1)
    return [
        write_run(root / "runs", f"{recipe}-{scale}-{i}", shards[recipe], scale, average)
        for i, (recipe, scale, average) in enumerate(RUNS)
    ]


def test_fits_predictions_and_rank_correlation_by_hand(runs: list[Path]) -> None:
    result = scaling_analysis([str(r) for r in runs])
    assert result.suite == "tiny" and len(result.points) == len(RUNS)
    assert result.means["B", "xs"][:2] == (pytest.approx(0.28), 2)

    # B: two scales, so the curve passes exactly through both (mean over the two xs seeds)
    b_fit = result.fits["B"]
    e1, e2 = 1 - 0.28, 1 - 0.38
    b = math.log(e2 / e1) / math.log(SEEN["tiny"] / SEEN["xs"])
    a = e1 / SEEN["xs"] ** b
    assert b_fit.exact and b_fit.r2 is None and (b_fit.a, b_fit.b) == (pytest.approx(a), pytest.approx(b))
    assert b_fit.next_scale == "small" and b_fit.predicted == pytest.approx(1 - a * SEEN["small"] ** b)
    assert float(b_fit.error(SEEN["tiny"])) == pytest.approx(e2)

    # A: three scales, ordinary least squares on (log n, log error) written out
    x = np.log([SEEN["xs"], SEEN["tiny"], SEEN["small"]])
    y = np.log([0.70, 0.60, 0.48])
    slope = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
    intercept = y.mean() - slope * x.mean()
    residual = ((y - intercept - slope * x) ** 2).sum()
    a_fit = result.fits["A"]
    assert not a_fit.exact and (a_fit.b, math.log(a_fit.a)) == (pytest.approx(slope), pytest.approx(intercept))
    assert a_fit.r2 == pytest.approx(1 - residual / ((y - y.mean()) ** 2).sum()) and 0.9 < a_fit.r2 < 1
    assert a_fit.next_scale == "medium" and a_fit.predicted == pytest.approx(
        1 - math.exp(intercept + slope * math.log(SEEN["medium"]))
    )

    # ranks at xs: A .30 > C .29 > B .28; at tiny: A .40 > B .38 > C .37 -> d = (0, 1, 1):
    # rho = 1 - 6*2 / (3*(9-1)) = 0.5
    assert result.rank_correlations["xs", "tiny"] == (pytest.approx(0.5), 3)
    assert result.rank_correlations["xs", "small"] == (None, 1)


def test_power_law_fit_recovers_a_known_curve() -> None:
    samples = [1e4, 1e5, 1e6, 1e7]
    a, b, r2 = fit_power_law(samples, [3.0 * n**-0.2 for n in samples])
    assert (a, b, r2) == (pytest.approx(3.0), pytest.approx(-0.2), pytest.approx(1.0))


def test_cli_writes_the_page_and_refuses_unfinished_runs(runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "scaling.html"
    from clipsift.cli import app

    result = CliRunner().invoke(app, ["report", "scaling", *map(str, runs), "--out", str(out)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "exact, 2 scales" in result.output and "Spearman xs vs tiny" in result.output
    page = out.read_text()
    assert (
        re.search(r'data-recipe="B" data-a="[^"]+" data-b="-0\.0\d+"', page)
        and 'data-scales="xs,tiny" data-rho="0.5' in page
    )
    plot = re.search(r'id="scaling-plot" [^>]*src="data:image/png;base64,([^"]+)"', page).group(1)
    assert Image.open(io.BytesIO(base64.b64decode(plot))).size[0] > 500

    unfinished = write_run(tmp_path, "unfinished", Path(runs[0].parent.parent / "A-shards"), "xs", 0.3, complete=False)
    with pytest.raises(ClipsiftError, match="suite tiny is incomplete"):
        scaling_analysis([str(runs[0]), str(unfinished)])
