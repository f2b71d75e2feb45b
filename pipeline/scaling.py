"""Scaling analysis (`clipsift report scaling RUN...`): how each recipe's score grows with compute.

Each run gives one point: its recipe (the name in subset.json of the subset it trained on, found
through run.json -> reshard manifest -> subset), its scale and samples seen (run.json), and its
suite average (RUN/eval/summary.json). Runs of the same recipe and scale (seeds) are averaged.

Per recipe, the error 1 - average is fitted as a power law of samples seen, error = a * n^b, by
least squares on (log n, log error): exact through two scales, a regression from three on (R² in
log space reported). The fit predicts the next scale's average from that scale's samples seen
(configs/scales). Fitting the error rather than the average keeps the prediction below 1. The
recipes' ranks are compared between every pair of scales with Spearman's rank correlation.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clipsift import ClipsiftError, __version__
from clipsift.files import open_fs
from clipsift.pipeline.report import escape, figure_uri, find_subset, html_page, html_table, write_page
from clipsift.train.recipe import SCALES, load_recipe


@dataclass
class RunPoint:
    run: str
    recipe: str
    scale: str
    samples_seen: int
    average: float
    suite: str


@dataclass
class PowerLaw:
    """error = a * samples_seen ** b for one recipe, and its prediction for the next scale."""

    recipe: str
    a: float
    b: float
    scales: list[str]
    exact: bool  # two scales: the curve passes through both points
    r2: float | None  # in log space, from three scales
    next_scale: str | None
    next_samples: int | None
    predicted: float | None  # suite average at the next scale

    def error(self, samples: float | np.ndarray) -> float | np.ndarray:
        return self.a * np.asarray(samples, np.float64) ** self.b


@dataclass
class ScalingResult:
    suite: str
    points: list[RunPoint]
    means: dict[tuple[str, str], tuple[float, int, int]]  # (recipe, scale) -> (mean average, runs, samples seen)
    fits: dict[str, PowerLaw]
    rank_correlations: dict[tuple[str, str], tuple[float | None, int]] = field(
        default_factory=dict
    )  # -> (rho, recipes)
    out: str = ""
    seconds: float = 0.0


def read_run(run: str, suite: str | None = None) -> RunPoint:
    """One run's point: recipe name, scale, samples seen and suite average."""
    fs, root = open_fs(run)
    if not fs.exists(f"{root}/run.json"):
        raise ClipsiftError(f"{run}: no run.json; give run directories made by `clipsift train`")
    record = json.loads(fs.cat_file(f"{root}/run.json"))
    if record.get("status") != "complete" or "samples_seen" not in record:
        raise ClipsiftError(
            f"{run}/run.json: training is {record.get('status', 'not recorded')}, not complete; "
            "finish it (re-run the same `clipsift train`) before fitting"
        )
    summary_path = f"{root}/eval/summary.json"
    if not fs.exists(summary_path):
        raise ClipsiftError(
            f"{run}: no eval/summary.json; evaluate it first: clipsift eval {run} --suite tiny|datacomp38"
        )
    suites = json.loads(fs.cat_file(summary_path)).get("suites", {})
    name = suite or (next(iter(suites)) if len(suites) == 1 else None)
    if name is None or name not in suites:
        raise ClipsiftError(
            f"{summary_path}: {'no suite ' + repr(suite) if suite else 'several suites'} "
            f"(it has: {', '.join(suites) or 'none'}); pick one with --suite"
        )
    result = suites[name]
    if not result.get("complete") or result.get("average") is None:
        raise ClipsiftError(
            f"{summary_path}: suite {name} is incomplete (missing "
            f"{', '.join(result.get('missing', [])) or 'the average'}); "
            f"finish it: clipsift eval {run} --suite {name}"
        )
    return RunPoint(
        run, recipe_name(run), str(record["scale"]), int(record["samples_seen"]), float(result["average"]), name
    )


def recipe_name(run: str) -> str:
    """The recipe of the subset a run trained on (subset.json), or the subset file's name when it has none."""
    subset = find_subset(run)
    fs, path = open_fs(subset)
    info_path = path.removesuffix(".npy") + ".json"
    if fs.exists(info_path):
        return str(json.loads(fs.cat_file(info_path))["recipe"]["name"])
    return path.rsplit("/", 1)[-1].removesuffix(".npy")


def fit_power_law(samples: list[int], errors: list[float]) -> tuple[float, float, float | None]:
    """(a, b, R² in log space or None with two points) of error = a * samples ** b, least squares in log space."""
    x, y = np.log(np.asarray(samples, np.float64)), np.log(np.asarray(errors, np.float64))
    b, log_a = np.polyfit(x, y, 1)
    r2 = None
    if len(x) > 2:
        residual = float(((y - (log_a + b * x)) ** 2).sum())
        total = float(((y - y.mean()) ** 2).sum())
        r2 = 1 - residual / total if total else None
    return float(math.exp(log_a)), float(b), r2


def next_scale(scale: str) -> str | None:
    if scale not in SCALES:
        return None
    index = SCALES.index(scale) + 1
    return SCALES[index] if index < len(SCALES) else None


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation (ties share their average rank); None when undefined."""
    from scipy.stats import spearmanr

    if len(a) < 2:
        return None
    rho = float(spearmanr(a, b).statistic)
    return None if math.isnan(rho) else rho


def scaling_analysis(runs: list[str], suite: str | None = None) -> ScalingResult:
    points = [read_run(run, suite) for run in runs]
    if not points:
        raise ClipsiftError("no runs given")
    suites = sorted({p.suite for p in points})
    if len(suites) > 1:
        raise ClipsiftError(f"the runs were read on different suites ({', '.join(suites)}); pick one with --suite")
    means: dict[tuple[str, str], tuple[float, int, int]] = {}
    for key in dict.fromkeys((p.recipe, p.scale) for p in points):
        group = [p for p in points if (p.recipe, p.scale) == key]
        seen = {p.samples_seen for p in group}
        if len(seen) > 1:
            raise ClipsiftError(
                f"recipe {key[0]} at scale {key[1]}: runs saw different numbers of samples ({sorted(seen)}), "
                f"so they are not the same point: {', '.join(p.run for p in group)}"
            )
        means[key] = (float(np.mean([p.average for p in group])), len(group), seen.pop())
    result = ScalingResult(suites[0], points, means, _fits(means))
    scales = _scale_order({scale for _, scale in means})
    for i, first in enumerate(scales):
        for second in scales[i + 1 :]:
            shared = sorted(r for r, s in means if s == first and (r, second) in means)
            rho = spearman([means[r, first][0] for r in shared], [means[r, second][0] for r in shared])
            result.rank_correlations[first, second] = (rho, len(shared))
    return result


def _scale_order(scales: set[str]) -> list[str]:
    return sorted(scales, key=lambda s: (SCALES.index(s) if s in SCALES else len(SCALES), s))


def _fits(means: dict[tuple[str, str], tuple[float, int, int]]) -> dict[str, PowerLaw]:
    fits = {}
    for recipe in dict.fromkeys(r for r, _ in means):
        scales = _scale_order({s for r, s in means if r == recipe})
        if len(scales) < 2:
            continue
        samples = [means[recipe, s][2] for s in scales]
        errors = [1 - means[recipe, s][0] for s in scales]
        if min(errors) <= 0:
            raise ClipsiftError(f"recipe {recipe}: a suite average of 1 leaves no error to fit a power law to")
        a, b, r2 = fit_power_law(samples, errors)
        upcoming = next_scale(scales[-1])
        upcoming_samples = load_recipe(upcoming).samples_seen if upcoming else None
        predicted = float(1 - a * upcoming_samples**b) if upcoming_samples else None
        fits[recipe] = PowerLaw(recipe, a, b, scales, len(scales) == 2, r2, upcoming, upcoming_samples, predicted)
    return fits


# --------------------------------------------------------------------------- the page


def scaling_figure(result: ScalingResult) -> str:
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter

    figure = Figure(figsize=(11, 4), layout="constrained")
    average_axes, error_axes = figure.subplots(1, 2)
    for index, recipe in enumerate(dict.fromkeys(r for r, _ in result.means)):
        colour = f"C{index % 10}"
        keys = [k for k in result.means if k[0] == recipe]
        samples = np.array([result.means[k][2] for k in keys], np.float64)
        averages = np.array([result.means[k][0] for k in keys])
        average_axes.plot(samples, averages, "o", color=colour, label=recipe)
        error_axes.plot(samples, 1 - averages, "o", color=colour, label=recipe)
        fit = result.fits.get(recipe)
        if fit:
            end = fit.next_samples or samples.max()
            grid = np.geomspace(samples.min(), end, 50)
            average_axes.plot(grid, 1 - fit.error(grid), "-", color=colour, alpha=0.7)
            error_axes.plot(grid, fit.error(grid), "-", color=colour, alpha=0.7)
            if fit.predicted is not None:
                average_axes.plot([fit.next_samples], [fit.predicted], "o", mfc="none", color=colour)
                error_axes.plot([fit.next_samples], [1 - fit.predicted], "o", mfc="none", color=colour)
    for axes, label in ((average_axes, f"{result.suite} suite average"), (error_axes, "error = 1 - average")):
        axes.set_xscale("log")
        axes.set_xlabel("samples seen")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
    error_axes.set_yscale("log")
    error_axes.yaxis.set_major_formatter(FormatStrFormatter("%.2f"))
    error_axes.yaxis.set_minor_formatter(FormatStrFormatter("%.2f"))  # a decade rarely fits: label the minor ticks
    average_axes.legend(fontsize=8)
    average_axes.set_title("points: runs (mean over seeds); lines: power-law fits; hollow: predictions", fontsize=9)
    return figure_uri(figure)


def scaling_page(result: ScalingResult) -> str:
    point_rows = [[p.recipe, p.scale, f"{p.samples_seen:,}", f"{p.average:.4f}", p.run] for p in result.points]
    fit_rows, fit_attrs = [], []
    for fit in result.fits.values():
        how = (
            "exact (2 scales)"
            if fit.exact
            else f"least squares, R² {fit.r2:.3f}"
            if fit.r2 is not None
            else "least squares"
        )
        predicted = (
            f"{fit.predicted:.4f} at {fit.next_scale} ({fit.next_samples:,} samples)"
            if fit.predicted is not None
            else "-"
        )
        fit_rows.append([fit.recipe, ", ".join(fit.scales), f"{fit.a:.4g}", f"{fit.b:.4f}", how, predicted])
        fit_attrs.append(
            f'data-recipe="{escape(fit.recipe)}" data-a="{fit.a!r}" data-b="{fit.b!r}" '
            f'data-predicted="{fit.predicted!r}"'
        )
    rank_rows, rank_attrs = [], []
    for (first, second), (rho, count) in result.rank_correlations.items():
        rank_rows.append([first, second, count, "-" if rho is None else f"{rho:.3f}"])
        rank_attrs.append(f'data-scales="{escape(first)},{escape(second)}" data-rho="{rho!r}"')
    body = [
        f"<h1>Scaling: {len(result.fits)} recipe(s) fitted, suite <code>{escape(result.suite)}</code></h1>",
        '<img class="plot" id="scaling-plot" alt="suite average against samples seen" '
        f'src="{scaling_figure(result)}">',
        "<h2>Power-law fits: error = a · samples<sup>b</sup></h2>",
        '<div id="fits">'
        f"{html_table(['recipe', 'scales', 'a', 'b', 'fit', 'predicted average'], fit_rows, fit_attrs)}</div>",
        (
            '<p class="note">Least squares on (log samples seen, log error). With '
            "two scales the curve passes through both points exactly (no check of "
            "the power-law form); a recipe seen at one scale is not fitted.</p>"
        ),
        "<h2>Rank correlation of recipes between scales (Spearman)</h2>",
        '<div id="ranks">'
        f"{html_table(['scale', 'scale', 'recipes at both', 'Spearman ρ'], rank_rows, rank_attrs)}</div>",
        "<h2>Runs</h2>",
        html_table(["recipe", "scale", "samples seen", "average", "run"], point_rows),
        f'<p class="note">clipsift {__version__}, {time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}</p>',
    ]
    return html_page("clipsift scaling analysis", body)


def scaling_report(runs: list[str], out: str, *, suite: str | None = None) -> ScalingResult:
    """Fit, predict and rank; write the page to `out`."""
    started = time.perf_counter()
    result = scaling_analysis(runs, suite)
    write_page(out, scaling_page(result))
    result.out, result.seconds = out, time.perf_counter() - started
    return result


def scaling_summary_rows(result: ScalingResult) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = [("report", result.out), ("runs", len(result.points)), ("suite", result.suite)]
    for fit in result.fits.values():
        predicted = f"; {fit.next_scale} predicted {fit.predicted:.4f}" if fit.predicted is not None else ""
        rows.append(
            (
                fit.recipe,
                f"error = {fit.a:.4g} · n^{fit.b:.4f} "
                f"({'exact, 2 scales' if fit.exact else 'least squares'}){predicted}",
            )
        )
    for (first, second), (rho, count) in result.rank_correlations.items():
        rows.append((f"Spearman {first} vs {second}", f"{'-' if rho is None else f'{rho:.3f}'} over {count} recipes"))
    rows.append(("time", f"{result.seconds:.1f} s"))
    return rows
