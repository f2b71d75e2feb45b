"""Does filtering matter? DataComp's central finding, reproduced on the synthetic pool.

    python bench/tiny_filtering.py [--scale tiny|xs] [--seeds 0 1] [--recipes NAME ...] [--out DIR]
                                   [--filternet-scale xs|tiny]

At the scale's fixed samples seen, train and evaluate (tiny suite) each recipe with each seed:
no_filter, basic, random 30%, clip_score at 10/20/30/50% (CLIP scores from the filtering network,
by default the tiny recipe trained on the scale's clean reference set), image_cluster, and
image_cluster intersected with clip_score 30%. Prints the table of tiny-suite averages (mean and half the seed range)
and each recipe's precision and recall against the pool's hidden truth (clean = positive).

Everything lands in --out and resumes: pools, network, scores, subsets, runs and evaluations that
are complete are not redone, so a killed benchmark re-run continues. The seed varies the training
run (and the random filter's draw); the pool, network and scores are shared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from clipsift.eval.run import evaluate  # noqa: E402
from clipsift.eval.tiny import make_tiny_suite  # noqa: E402
from clipsift.filters.recipe import apply_recipe, load_recipe  # noqa: E402
from clipsift.filters.subset import encode_uids, read_subset  # noqa: E402
from clipsift.pipeline import synth  # noqa: E402
from clipsift.pipeline.reshard import reshard  # noqa: E402
from clipsift.pipeline.score import ScoreSettings, score_pool  # noqa: E402
from clipsift.train.filternet import train_filternet  # noqa: E402
from clipsift.train.launch import Infra, train  # noqa: E402

CLUSTER = {
    "image_cluster": {"model_id": "${model_id}", "targets": "${reference}", "k": "${k}", "iterations": 20, "seed": 0}
}
CAPTION = {"caption": {"language": "en", "min_words": 2, "min_chars": 6}}


def recipe_steps(name: str, seed: int) -> list:
    """The steps of each benchmarked recipe (`${model_id}`, `${reference}`, `${k}` filled in later)."""
    if name == "no_filter":
        return ["no_filter"]
    if name == "basic":
        return ["basic", {"dedup": {"by": "sha256"}}]
    if name.startswith("random_"):
        return [{"random": {"fraction": int(name.split("_")[1]) / 100, "seed": seed}}]
    if name.startswith("clip_score_"):
        return [{"clip_score": {"model_id": "${model_id}", "fraction": int(name.split("_")[2]) / 100}}]
    if name == "image_cluster":
        return [CAPTION, CLUSTER]
    if name == "image_cluster_and_clip_score_30":
        return [{"all": [{"seq": [CAPTION, CLUSTER]}, {"clip_score": {"model_id": "${model_id}", "fraction": 0.3}}]}]
    return new_recipe_steps(name)


def new_recipe_steps(name: str) -> list:
    """The filters of issue 21, each at about the share clip_score_30 keeps where it has a share to choose."""
    neg = {"model_id": "${model_id}", "temperature": "${temperature}", "seed": 0}
    if name == "neg_clip_loss_30":
        return [{"neg_clip_loss": {**neg, "fraction": 0.3}}]
    if name in ("norm_sim_2_30", "norm_sim_inf_30"):
        p = name.split("_")[2]
        return [{"norm_sim": {"model_id": "${model_id}", "target": "${reference}", "p": p, "fraction": 0.3}}]
    if name == "neg_clip_loss_then_norm_sim_2_30":  # the paper's combination: 50% by negCLIPLoss, then 60% of those
        norm = {"model_id": "${model_id}", "target": "${reference}", "p": "2", "fraction": 0.6}
        return [{"neg_clip_loss": {**neg, "fraction": 0.5}}, {"norm_sim": norm}]
    if name == "balance_wordnet":
        return [{"balance": {"entries": "${entries}", "t": "${t}", "match": "words", "seed": 0}}]
    if name == "semdedup":
        return [{"semdedup": {"model_id": "${model_id}", "eps": 0.05, "which_to_keep": "first", "seed": 0}}]
    if name == "image_quality":  # configs/filters/image_quality.yaml's bounds
        bounds = {"min_blur": 0.5, "min_entropy": 2.0, "min_std": 2.0, "min_brightness": 10, "max_brightness": 245}
        return [{"image_quality": bounds}]
    if name == "caption_quality":
        return ["caption_quality"]
    if name == "caption_quality_then_clip_score_30":
        return ["caption_quality", {"clip_score": {"model_id": "${model_id}", "fraction": 0.3}}]
    if name == "external_score_30":
        return [{"external_score": {"path": "${external}", "fraction": 0.3}}]
    if name == "weight_clip_score_30":
        bins = {"by": "score_quantile", "model_id": "${model_id}", "bins": [0.1, 0.2], "counts": [3, 2, 1]}
        return [{"clip_score": {"model_id": "${model_id}", "fraction": 0.3}}, {"weight": bins}]
    raise SystemExit(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")


RECIPES = (
    "no_filter",
    "basic",
    "random_30",
    "clip_score_10",
    "clip_score_20",
    "clip_score_30",
    "clip_score_50",
    "image_cluster",
    "image_cluster_and_clip_score_30",
)
NEW_RECIPES = (
    "neg_clip_loss_30",
    "norm_sim_2_30",
    "norm_sim_inf_30",
    "neg_clip_loss_then_norm_sim_2_30",
    "balance_wordnet",
    "semdedup",
    "image_quality",
    "caption_quality",
    "caption_quality_then_clip_score_30",
    "external_score_30",
    "weight_clip_score_30",
)
BALANCE_SHARE = 0.3  # balance's t is the one (of T_CANDIDATES) whose expected kept share is nearest this
T_CANDIDATES = (1, 2, 3, 5, 8, 12, 20, 30, 50, 80, 120, 200, 300, 500, 800, 1200, 2000, 3000, 5000)
SEED_DEPENDENT = ("random_",)  # recipes whose subset changes with the seed


@dataclass
class RecipeOutcome:
    recipe: str
    kept: int
    precision: float
    recall: float
    averages: dict[int, float] = field(default_factory=dict)  # seed -> tiny-suite average

    @property
    def mean(self) -> float:
        return statistics.fmean(self.averages.values())

    @property
    def spread(self) -> float:
        """Half the range over seeds (0 with one seed)."""
        return (max(self.averages.values()) - min(self.averages.values())) / 2


def prepare(out: Path, scale: str, filternet_scale: str, workers: int | None) -> dict:
    """Pool + truth, reference set, filtering network, and the pool and reference scored with it."""
    pool, reference = out / "pool", out / "reference"
    synth.synth_pool(str(pool), scale=scale, truth=str(out / "truth.parquet"), workers=workers)
    synth.synth_reference(str(reference), scale=scale, workers=workers)
    net = train_filternet(str(reference), str(out / "filternet"), scale=filternet_scale, workers=workers)
    for target in (pool, reference):
        score_pool(str(target), net.arch, str(net.checkpoint), ScoreSettings(workers=workers))
    if not (out / "tiny-suite" / "suite.json").exists():
        make_tiny_suite(str(out / "tiny-suite"))
    return {
        "pool": str(pool),
        "reference": str(reference),
        "model_id": net.model_id,
        "truth": str(out / "truth.parquet"),
        "checkpoint": str(net.checkpoint),
        "filternet_data": str(reference),
        "suite": "tiny",
        "suite_name": "tiny",
        "data_dir": str(out / "tiny-suite"),
    }


def select(setup: dict, out: Path, name: str, seed: int, workers: int | None) -> Path:
    """Apply the recipe; the subset lands in out/subsets/<name>[_s<seed>].npy."""
    tag = f"{name}_s{seed}" if name.startswith(SEED_DEPENDENT) else name
    subset = out / "subsets" / f"{tag}.npy"
    recipe_file = out / "recipes" / f"{tag}.yaml"
    recipe_file.parent.mkdir(parents=True, exist_ok=True)
    recipe_file.write_text(
        yaml.safe_dump(
            {
                "name": tag,
                "vars": {"model_id": setup["model_id"], "reference": setup["reference"], "k": 64, **setup["extra"]},
                "steps": recipe_steps(name, seed),
            }
        ),
        encoding="utf-8",
    )
    if not subset.exists():
        apply_recipe(setup["pool"], load_recipe(str(recipe_file)), str(subset), workers=workers)
    return subset


def wordnet_entries(out: Path) -> Path:
    """MetaCLIP-like metadata entries: every WordNet 3.0 noun lemma (MetaCLIP's list includes WordNet's synsets)."""
    path = out / "wordnet_nouns.txt"
    if not path.exists():
        from clipsift.filters.wordnet import wordnet_location

        index = Path(wordnet_location()) / "index.noun"
        lemmas = sorted(
            {line.split(" ", 1)[0].replace("_", " ") for line in index.read_text().splitlines() if line[:1] != " "}
        )
        path.write_text("\n".join(lemmas) + "\n", encoding="utf-8")
    return path


def balance_t(pool_url: str, entries: Path) -> int:
    """The t of T_CANDIDATES whose expected kept share, sum over rows of min(1, t / count of the rarest matched
    entry), is nearest BALANCE_SHARE: the operating point, as clip_score_30's 30%."""
    import pyarrow.compute as pc

    from clipsift.filters.balance import EntryMatcher, match_texts
    from clipsift.pipeline.pool import Pool

    pool = Pool(pool_url)
    matcher = EntryMatcher(entries.read_text(encoding="utf-8").lower().splitlines(), "words")
    rows, ids, offset = [], [], 0
    for shard in pool.shard_ids():
        texts = pc.utf8_lower(pool.metadata(shard, ["text"]).column("text")).to_pylist()
        positions, found = match_texts(texts, matcher)
        rows.append(positions + offset)
        ids.append(found)
        offset += len(texts)
    rows, ids = np.concatenate(rows), np.concatenate(ids)
    counts = np.bincount(ids)
    rarest = np.full(offset, np.inf)
    np.minimum.at(rarest, rows, counts[ids])
    shares = {t: float(np.minimum(1.0, t / rarest).sum() / offset) for t in T_CANDIDATES}
    return min(shares, key=lambda t: abs(shares[t] - BALANCE_SHARE))


def teacher_temperature(checkpoint: str) -> float:
    """1 / the filtering network's learned logit scale: negCLIPLoss's tau for this teacher."""
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state = state.get("state_dict", state)
    scale = next(v for k, v in state.items() if k.endswith("logit_scale"))
    return float(1.0 / np.exp(float(scale)))


def external_scores(setup: dict, out: Path, workers: int | None) -> Path:
    """A score made elsewhere, for external_score: the CLIP score of a second, smaller filtering network (the xs
    recipe on the same data the main network saw), as a (uid, score) parquet."""
    path = out / "external_scores.parquet"
    if not path.exists():
        from clipsift.pipeline.pool import Pool

        net = train_filternet(setup["filternet_data"], str(out / "filternet-xs"), scale="xs", workers=workers)
        score_pool(setup["pool"], net.arch, str(net.checkpoint), ScoreSettings(workers=workers))
        pool = Pool(setup["pool"])
        tables = [pool.embeddings(net.model_id, shard, ["uid", "clip_score"]) for shard in pool.shard_ids()]
        table = pa.concat_tables(tables).rename_columns(["uid", "score"])
        pq.write_table(table, str(path) + ".tmp")
        os.replace(str(path) + ".tmp", path)
    return path


def extra_vars(setup: dict, out: Path, recipes: list[str], workers: int | None) -> dict:
    """The variables only the issue-21 recipes use, made when one of them is asked for."""
    found: dict = {}
    if any(r.startswith("neg_clip_loss") for r in recipes):
        found["temperature"] = teacher_temperature(setup["checkpoint"])
    if "balance_wordnet" in recipes:
        found["entries"] = str(wordnet_entries(out))
        found["t"] = balance_t(setup["pool"], wordnet_entries(out))
    if "external_score_30" in recipes:
        found["external"] = str(external_scores(setup, out, workers))
    return found


def against_truth(subset: Path, truth: str) -> tuple[int, float, float]:
    """(samples kept, precision, recall) with clean samples as the positives."""
    table = pq.read_table(truth, columns=["uid", "kind"])
    pairs = encode_uids(table.column("uid"))
    clean = np.asarray(table.column("kind").to_pylist()) == "clean"
    kept = np.isin(pairs, read_subset(str(subset)))
    return int(kept.sum()), float(clean[kept].mean()) if kept.any() else 0.0, float(kept[clean].mean())


def train_and_evaluate(setup: dict, out: Path, scale: str, subset: Path, seed: int, workers: int | None) -> float:
    """The suite's average (the tiny suite, or --real's held-out suite) of the scale's recipe trained on the
    subset with this seed."""
    # a --real pool serves every scale, so its shards (sized by scale) and runs sit in a folder per scale
    per_scale = Path(scale) if setup["suite_name"] != "tiny" else Path()
    shards = out / "shards" / per_scale / subset.stem
    run = out / "runs" / per_scale / f"{subset.stem}_seed{seed}"
    summary = run / "eval" / "summary.json"
    if not summary.exists():
        resharded = reshard(
            setup["pool"], str(subset), str(shards), shard_size=1024 if scale == "xs" else 5_000, workers=workers
        )
        train(scale, [(resharded.out, 1.0)], str(run), infra=Infra(workers=1, seed=seed))
        result = evaluate(str(run), setup["suite"], data_dir=setup["data_dir"])
        if result.failed:
            raise SystemExit(f"{run}: evaluation failed: {result.failed[0]}")
    return float(json.loads(summary.read_text())["suites"][setup["suite_name"]]["average"])


def run_benchmark(
    out: Path,
    scale: str,
    recipes: list[str],
    seeds: list[int],
    filternet_scale: str,
    workers: int | None = None,
    real: Path | None = None,
    noise: float = 0.5,
) -> list[RecipeOutcome]:
    if real is None:
        setup = prepare(out, scale, filternet_scale, workers)
    else:
        from noisy_folder import prepare_real

        setup = prepare_real(real, out, noise, 0, filternet_scale, workers)
    setup["extra"] = extra_vars(setup, out, recipes, workers)
    print(f"recipe variables: {setup['extra']}", flush=True)
    outcomes = []
    for name in recipes:
        outcome = None
        for seed in seeds:
            subset = select(setup, out, name, seed, workers)
            if outcome is None:
                outcome = RecipeOutcome(name, *against_truth(subset, setup["truth"]))
            outcome.averages[seed] = train_and_evaluate(setup, out, scale, subset, seed, workers)
            print(f"{name} seed {seed}: suite average {outcome.averages[seed]:.4f}", flush=True)
        outcomes.append(outcome)
    (out / "results.json").write_text(json.dumps([vars(o) for o in outcomes], indent=1), encoding="utf-8")
    return outcomes


def table(outcomes: list[RecipeOutcome]) -> str:
    lines = [
        f"{'recipe':34} {'kept':>7} {'precision':>9} {'recall':>7}   suite average",
        f"{'-' * 34} {'-' * 7} {'-' * 9} {'-' * 7}   {'-' * 24}",
    ]
    for o in sorted(outcomes, key=lambda o: -o.mean):
        seeds = ", ".join(f"{v:.3f}" for v in o.averages.values())
        lines.append(
            f"{o.recipe:34} {o.kept:7,} {o.precision:9.3f} {o.recall:7.3f}   {o.mean:.4f} ± {o.spread:.4f}  ({seeds})"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", default="tiny", choices=["xs", "tiny"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES + NEW_RECIPES)
    parser.add_argument(
        "--filternet-scale",
        default="tiny",
        choices=["xs", "tiny"],
        help="The filtering network's recipe (default tiny: the xs recipe ranks too weakly to separate recipes "
        "reliably).",
    )
    parser.add_argument("--out", type=Path, default=None, help="Default: bench-tiny-filtering-<scale>/ (resumes).")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument(
        "--real",
        type=Path,
        default=None,
        help="A folder of real images (one sub-folder per class, same-stem .txt captions) to use instead of the "
        "synthetic pool: split, made noisy and evaluated on its held-out part (bench/noisy_folder.py).",
    )
    parser.add_argument("--noise", type=float, default=0.5, help="--real: the share of train captions made noisy.")
    args = parser.parse_args()
    out = args.out or Path(f"bench-tiny-filtering-{args.scale}")
    started = time.perf_counter()
    outcomes = run_benchmark(
        out, args.scale, args.recipes, args.seeds, args.filternet_scale, args.workers, args.real, args.noise
    )
    print(
        f"\nscale {args.scale}, seeds {args.seeds}, {time.perf_counter() - started:.0f} s (resumed work not counted)\n"
    )
    print(table(outcomes))


if __name__ == "__main__":
    main()
