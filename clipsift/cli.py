"""The `clipsift` command line: wires each verb to its stage function and prints its summary."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperCommand, TyperGroup

from clipsift import ClipsiftError

app = typer.Typer(help="clipsift: a DataComp-style benchmark for image-text dataset curation.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
pool_app = typer.Typer(help="Make, import and check pools of image-text pairs.", no_args_is_help=True)
app.add_typer(pool_app, name="pool")

WorkersOption = typer.Option(None, "--workers", "-w", help="CPU workers of the local Ray cluster (default: all cores; 1 runs in-process).")
AddressOption = typer.Option(None, "--address", help="Ray cluster to join (default: RAY_ADDRESS, else a new local cluster).")


def _console():
    from clipsift.pipeline.ui import console

    return console


def _print_summary(title: str, rows: list[tuple[str, object]]) -> None:
    from clipsift.pipeline.ui import summary_table

    _console().print(summary_table(title, rows))


@pool_app.command("synth")
def pool_synth(
    out: Path = typer.Option(..., "--out", "-o", help="Pool directory (or fsspec URL) to write."),
    scale: str = typer.Option("xs", help="xs (about 4,000 samples) or tiny (128,000)."),
    seed: int = typer.Option(0, help="Everything the generator draws follows from this seed."),
    truth: Optional[Path] = typer.Option(None, help="Where the truth file goes (outside the pool). Default: OUT.truth.parquet."),
    clean_reference: bool = typer.Option(False, "--clean-reference", help="Write the clean, labelled reference set instead of the pool."),
    num_samples: Optional[int] = typer.Option(None, help="Override the scale's number of samples."),
    shard_size: Optional[int] = typer.Option(None, help="Override the scale's samples per shard."),
    workers: Optional[int] = WorkersOption,
) -> None:
    """Synthesize a web-like pool (with a hidden truth file) or a clean reference set."""
    from clipsift.pipeline import synth

    started = time.perf_counter()
    if clean_reference:
        info = synth.synth_reference(str(out), scale=scale, seed=seed, num_samples=num_samples, shard_size=shard_size, workers=workers)
        rows = [("reference", out), ("samples", info["num_samples"]), ("shards", info["num_shards"])]
    else:
        result = synth.synth_pool(str(out), scale=scale, seed=seed, truth=str(truth) if truth else None,
                                  num_samples=num_samples, shard_size=shard_size, workers=workers)
        info = result.info
        kinds = ", ".join(f"{k} {v:,}" for k, v in sorted(result.kind_counts.items(), key=lambda kv: -kv[1]))
        rows = [("pool", out), ("samples", info["num_samples"]), ("shards", info["num_shards"]),
                ("truth (hidden)", result.truth_path), ("kinds", kinds)]
    elapsed = time.perf_counter() - started
    rows.append(("time", f"{elapsed:.1f} s ({info['num_samples'] / elapsed:,.0f} samples/s)"))
    _print_summary("synthetic reference set" if clean_reference else "synthetic pool", rows)


@pool_app.command("import")
def pool_import(
    src: str = typer.Argument(..., help="Image folder (+ same-stem .txt captions), Parquet/CSV/JSONL table, or webdataset tar(s)."),
    out: Path = typer.Option(..., "--out", "-o", help="Pool directory (or fsspec URL) to write."),
    kind: Optional[str] = typer.Option(None, help="folder | table | webdataset (default: detected from SRC)."),
    image_column: Optional[str] = typer.Option(None, help="Table column with image paths or bytes (default: detected)."),
    caption_column: Optional[str] = typer.Option(None, help="Table column with captions (default: detected)."),
    shard_size: int = typer.Option(10_000, help="Samples per shard."),
    name: Optional[str] = typer.Option(None, help="Pool name recorded in pool.json."),
    workers: Optional[int] = WorkersOption,
) -> None:
    """Bring your own data: turn images and captions into a pool."""
    from clipsift.pipeline import importer

    result = importer.import_pool(src, str(out), kind=kind, image_column=image_column, caption_column=caption_column,
                                  shard_size=shard_size, workers=workers, name=name)
    _print_summary("import", importer.import_summary_rows(result))


@pool_app.command("download")
def pool_download(
    urls: str = typer.Argument(..., help="Parquet/CSV/JSONL table with url and caption columns, or a folder of DataComp metadata parquets."),
    out: Path = typer.Option(..., "--out", "-o", help="Pool directory to write (img2dataset's own output is staged in OUT/download/)."),
    processes: Optional[int] = typer.Option(None, help="img2dataset download processes (default: all cores)."),
    threads: int = typer.Option(64, help="img2dataset download threads per process."),
    image_size: int = typer.Option(512, help="Longer side of the stored images; smaller images are kept as they are."),
    shard_size: int = typer.Option(10_000, help="Samples per shard."),
    retries: int = typer.Option(2, help="Extra attempts per url after a failure."),
    timeout: int = typer.Option(10, help="Seconds before a request gives up."),
    blur_faces: bool = typer.Option(True, "--blur-faces/--no-blur-faces", help="Blur the face_bboxes of each image (DataComp does)."),
    verify_sha256: bool = typer.Option(False, "--verify-sha256", help="Leave out (and report) images whose bytes differ from the listed sha256."),
    url_column: Optional[str] = typer.Option(None, help="Column with the image urls (default: detected)."),
    caption_column: Optional[str] = typer.Option(None, help="Column with the captions (default: detected)."),
    name: Optional[str] = typer.Option(None, help="Pool name recorded in pool.json."),
    workers: Optional[int] = WorkersOption,
) -> None:
    """Download images with img2dataset (DataComp's settings) into a pool; re-run to continue a killed download."""
    from clipsift.pipeline import download

    started = time.perf_counter()
    result = download.download_pool(urls, str(out), processes=processes, threads=threads, image_size=image_size,
                                    shard_size=shard_size, retries=retries, blur_faces=blur_faces, verify_sha256=verify_sha256,
                                    timeout=timeout, url_column=url_column, caption_column=caption_column, workers=workers, name=name)
    elapsed = time.perf_counter() - started
    rows = download.download_summary_rows(result)
    rows.append(("time", f"{elapsed:.1f} s ({result.info['num_samples'] / elapsed:,.0f} images/s stored)"))
    _print_summary("pool download", rows)


@pool_app.command("from-datacomp")
def pool_from_datacomp(
    metadata: Path = typer.Option(..., "--metadata", help="Folder of DataComp's metadata parquets (and their .npz features)."),
    shards: Path = typer.Option(..., "--shards", help="Folder of DataComp's img2dataset .tar shards."),
    out: Path = typer.Option(..., "--out", "-o", help="Pool directory (or fsspec URL) to write; the tars are linked, not copied."),
    name: Optional[str] = typer.Option(None, help="Pool name recorded in pool.json."),
    workers: Optional[int] = WorkersOption,
) -> None:
    """Make a pool from an existing DataComp download, with their CLIP features as embeddings; nothing is downloaded."""
    from clipsift.pipeline import datacomp

    started = time.perf_counter()
    result = datacomp.from_datacomp(str(metadata), str(shards), str(out), workers=workers, name=name)
    rows = datacomp.datacomp_summary_rows(result)
    rows.append(("time", f"{time.perf_counter() - started:.1f} s"))
    _print_summary("pool from DataComp", rows)


@pool_app.command("check")
def pool_check(
    pool: str = typer.Argument(..., help="Pool directory or fsspec URL."),
    workers: Optional[int] = WorkersOption,
    show: int = typer.Option(50, help="How many problems to list."),
) -> None:
    """Validate a pool: files, alignment, uids, images and captions. Exits 1 when anything is wrong."""
    from clipsift.pipeline.check import check_pool

    report = check_pool(pool, workers=workers)
    console = _console()
    for problem in report.problems[:show]:
        console.print(f"[red]✗[/red] {problem}", markup=True, highlight=False)
    if report.num_problems > show:
        console.print(f"... and {report.num_problems - show:,} more problems")
    verdict = "[green]ok[/green]" if report.ok else f"[red]{report.num_problems:,} problems[/red]"
    _print_summary("pool check", [("pool", pool), ("shards", report.num_shards), ("samples", report.num_samples), ("result", verdict)])
    if not report.ok:
        raise typer.Exit(1)


@app.command("score")
def score(
    pool: str = typer.Argument(..., help="Pool directory or fsspec URL."),
    model: str = typer.Option(..., "--model", "-m", help="open_clip architecture, e.g. ViT-B-32, or a config of configs/models (clipsift-xs)."),
    pretrained: str = typer.Option(..., "--pretrained", "-p", help="open_clip pretrained tag (e.g. openai) or a checkpoint file."),
    batch_size: int = typer.Option(256, help="Samples per model batch."),
    precision: str = typer.Option("auto", help="auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16 | fp16."),
    address: Optional[str] = AddressOption,
    gpus_per_worker: Optional[float] = typer.Option(None, help="GPUs per model actor (default: 1 where the cluster has GPUs, else 0)."),
    workers: Optional[int] = typer.Option(None, help="Model actors (default: one per GPU, or half the CPUs)."),
) -> None:
    """CLIP image/text embeddings and CLIP scores for every shard (resumes: scored shards are skipped)."""
    from clipsift.pipeline.score import score_pool, score_summary_rows

    result = score_pool(pool, model, pretrained, batch_size=batch_size, precision=precision, address=address,
                        gpus_per_worker=gpus_per_worker, workers=workers)
    _print_summary("score", score_summary_rows(result, pool))


subset_app = typer.Typer(help="Inspect subset files (.npy uid lists, DataComp's format).", no_args_is_help=True)
app.add_typer(subset_app, name="subset")


def _parse_sets(values: list[str]) -> dict[str, str]:
    pairs = {}
    for value in values:
        key, sep, rest = value.partition("=")
        if not sep or not key:
            raise ClipsiftError(f"--set {value!r}: expected NAME=VALUE (a variable of the recipe)")
        pairs[key.strip()] = rest
    return pairs


@app.command("filter")
def filter_pool(
    pool: str = typer.Argument(..., help="Pool directory or fsspec URL."),
    recipe: str = typer.Option(..., "--recipe", "-r", help="Recipe YAML file, or the name of a shipped recipe (e.g. basic_filter)."),
    out: str = typer.Option(..., "--out", "-o", help="Subset file to write (.npy); subset.json is written beside it."),
    set_: list[str] = typer.Option([], "--set", help="Set a recipe variable, NAME=VALUE (repeatable), e.g. --set model_id=tiny__ab12."),
    address: Optional[str] = AddressOption,
    workers: Optional[int] = WorkersOption,
) -> None:
    """Apply a filter recipe to a pool and write the subset (DataComp's uid .npy) and subset.json."""
    from clipsift.filters.recipe import apply_recipe, load_recipe

    loaded = load_recipe(recipe, _parse_sets(set_))
    result = apply_recipe(pool, loaded, out, workers=workers, address=address)
    from rich.table import Table

    table = Table(title=f"recipe {loaded.name}: rows kept by each step", title_justify="left", box=None, pad_edge=False)
    for column in ("step", "filter", "in", "kept", "share"):
        table.add_column(column, justify="right" if column in ("in", "kept", "share") else "left")
    for step in result.steps:
        share = f"{step.kept / step.rows_in:.1%}" if step.rows_in else "-"
        table.add_row(step.path, step.label, f"{step.rows_in:,}", f"{step.kept:,}", share)
    _console().print(table)
    _print_summary("filter", [("subset", f"{out} ({result.num_uids:,} uids)"), ("subset.json", result.info_path),
                              ("sha256", result.npy_sha256), ("time", f"{result.seconds:.1f} s"),
                              ("next", f"clipsift reshard {pool} --subset {out} --out SHARDS")])


@subset_app.command("info")
def subset_info_cmd(path: str = typer.Argument(..., help="Subset .npy (ours or a DataComp baseline's).")) -> None:
    """Count, duplicates and sha256 of a subset file."""
    from clipsift.filters.subset import subset_info

    info = subset_info(path)
    _print_summary("subset", [("file", info.path), ("uids", info.count), ("unique", info.unique),
                              ("duplicates", f"{info.duplicates:,} (most repeated uid: {info.max_repeat}x)"),
                              ("sorted", "yes" if info.sorted else "no"), ("sha256", info.sha256)])


@app.command("reshard")
def reshard_cmd(
    pool: str = typer.Argument(..., help="Pool directory or fsspec URL."),
    subset: str = typer.Option(..., "--subset", "-s", help="Subset .npy (a repeated uid is written that many times)."),
    out: str = typer.Option(..., "--out", "-o", help="Folder for the training shards (a clipsift pool + manifest.json)."),
    shard_size: int = typer.Option(10_000, help="Samples per output shard (the last may hold fewer)."),
    address: Optional[str] = AddressOption,
    workers: Optional[int] = WorkersOption,
) -> None:
    """Copy the subset's samples byte for byte into new webdataset shards for training (resumable)."""
    from clipsift.pipeline.reshard import reshard, reshard_summary_rows

    result = reshard(pool, subset, out, shard_size=shard_size, workers=workers, address=address)
    _print_summary("reshard", reshard_summary_rows(result))


@app.command("train")
def train_command(
    scale: str = typer.Option(..., "--scale", "-s", help="xs | tiny | small | medium | large | xlarge: the fixed recipe."),
    data: list[str] = typer.Option(..., "--data", "-d", help="Resharded data (clipsift reshard --out); repeat to mix sources."),
    weight: Optional[list[float]] = typer.Option(None, "--weight", help="Sampling weight per --data, in order (default 1 each)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory; re-running the same command resumes it."),
    gpus: int = typer.Option(1, "--gpus", help="Devices (1 trains in-process; more go through torchrun)."),
    workers: int = typer.Option(1, "--workers", help="Data-loading workers per device."),
    max_per_device_batch: Optional[int] = typer.Option(None, help="Largest batch one device holds; the rest is gradient accumulation."),
    torchcompile: bool = typer.Option(False, "--torchcompile", help="torch.compile the model (infrastructure, results unchanged)."),
    non_standard_precision: Optional[str] = typer.Option(None, help="Train in another precision than the recipe's: recorded as non-standard."),
) -> None:
    """Train a CLIP model with the scale's fixed recipe through open_clip_train."""
    from clipsift.train.launch import Infra, train, train_summary_rows

    weights = list(weight or [])
    if weights and len(weights) != len(data):
        raise ClipsiftError(f"{len(weights)} --weight values for {len(data)} --data sources; give one weight per source or none")
    infra = Infra(devices=gpus, workers=workers, max_per_device_batch=max_per_device_batch, torchcompile=torchcompile,
                  precision=non_standard_precision)
    result = train(scale, list(zip(data, weights or [1.0] * len(data))), str(out), infra=infra)
    _print_summary("train", train_summary_rows(result))


class _EvalGroup(TyperGroup):
    """`clipsift eval RUN ...` dispatches to the hidden `run` command; `download` and `make-tiny-suite` are verbs."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["run", *args]
        return super().parse_args(ctx, args)


class _EvalRunCommand(TyperCommand):
    def format_usage(self, ctx, formatter) -> None:
        formatter.write_usage(ctx.parent.command_path, "RUN|CHECKPOINT [OPTIONS]")


eval_app = typer.Typer(cls=_EvalGroup, no_args_is_help=True, help=(
    "Zero-shot evaluation. `clipsift eval RUN|CHECKPOINT --suite datacomp38|tiny` evaluates a run (or a checkpoint with "
    "--model ARCH) into RUN/eval/results.jsonl and summary.json; `clipsift eval RUN --help` lists its options."))
app.add_typer(eval_app, name="eval")


def _split_list(values: Optional[list[str]]) -> Optional[list[str]]:
    return [v.strip() for value in values for v in value.split(",") if v.strip()] if values else None


@eval_app.command("run", hidden=True, cls=_EvalRunCommand)
def eval_run(
    target: str = typer.Argument(..., metavar="RUN|CHECKPOINT", help="Run directory (RUN/checkpoints/epoch_latest.pt, model from run.json) or a checkpoint file."),
    suite: str = typer.Option("datacomp38", "--suite", "-s", help="datacomp38 | tiny (or a suite YAML file)."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="The suite's data (default: $CLIPSIFT_EVAL_DATA/SUITE or ~/.cache/clipsift/eval/SUITE)."),
    tasks: Optional[list[str]] = typer.Option(None, "--tasks", "-t", help="Only these tasks: keys, globs (vtab/*) or group tags; repeat or comma-separate."),
    batch_size: int = typer.Option(256, "--batch-size", "-b", help="Images per model batch."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Architecture of a bare checkpoint (e.g. clipsift-tiny, ViT-B-32)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Results folder (default: RUN/eval, or CHECKPOINT_eval beside a checkpoint)."),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", help="Data-loading processes (default: CPUs - 2 on GPU machines, 0 on CPU)."),
    precision: str = typer.Option("auto", help="auto (fp16 autocast on GPU as DataComp, fp32 on CPU) | fp32 | bf16 | fp16."),
) -> None:
    """Evaluate a run or checkpoint zero-shot; re-running skips the tasks already in results.jsonl."""
    from clipsift.eval.run import eval_summary_rows, evaluate

    console = _console()

    def show(outcome) -> None:
        if outcome.status == "failed":
            console.print(f"[red]✗[/red] {outcome.error}", markup=True, highlight=False)

    result = evaluate(target, suite, data_dir=data_dir, tasks=_split_list(tasks), batch_size=batch_size, arch=model, out=out,
                      workers=workers, precision=precision, on_task=show)
    _print_summary(f"eval ({result.suite})", eval_summary_rows(result))
    if result.failed:
        raise typer.Exit(1)


@eval_app.command("make-tiny-suite")
def eval_make_tiny_suite(
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the suite (one sub-folder per task)."),
    seed: int = typer.Option(0, help="Everything the generator draws follows from this seed."),
) -> None:
    """Write the tiny synthetic suite (held out from every synthetic pool) in the real suite's layouts."""
    from clipsift.eval.tiny import make_tiny_suite

    started = time.perf_counter()
    info = make_tiny_suite(str(out), seed=seed)
    rows: list[tuple[str, object]] = [(key, f"{size:,} samples") for key, size in info["tasks"].items()]
    rows += [("suite", out), ("time", f"{time.perf_counter() - started:.1f} s"), ("next", f"clipsift eval RUN --suite tiny --data-dir {out}")]
    _print_summary("tiny evaluation suite", rows)


@eval_app.command("download")
def eval_download(
    out: Path = typer.Option(..., "--out", "-o", help="Data folder (pass it to `clipsift eval --data-dir`)."),
    suite: str = typer.Option("datacomp38", "--suite", "-s", help="The suite whose data to fetch."),
    tasks: Optional[list[str]] = typer.Option(None, "--tasks", "-t", help="Only these tasks: keys, globs or group tags."),
) -> None:
    """Fetch a suite's data from the Hugging Face Hub (resumable; sizes and hashes checked)."""
    from clipsift.eval.download import download_suite
    from clipsift.eval.registry import load_suite

    loaded = load_suite(suite)
    if loaded.name == "tiny":
        raise ClipsiftError(f"the tiny suite is not downloaded: write it with `clipsift eval make-tiny-suite --out {out}`")
    console = _console()
    report = download_suite(loaded, str(out), loaded.select(_split_list(tasks)),
                            on_task=lambda key, status: console.print(f"{key}: {status}", highlight=False))
    _print_summary("eval download", [("data", out), ("tasks fetched", len(report.done)), ("already complete", len(report.skipped)),
                                     ("failed", len(report.failed)), ("fetched", f"{report.files_fetched:,} files, {report.bytes_fetched / 1e9:.2f} GB"),
                                     ("next", f"clipsift eval RUN --suite {loaded.name} --data-dir {out}")])
    if report.failed:
        raise typer.Exit(1)


@app.command("demo")
def demo(
    out: Path = typer.Option(Path("clipsift-demo"), "--out", "-o", help="Directory for everything the demo writes (re-running resumes)."),
    workers: Optional[int] = WorkersOption,
) -> None:
    """The main job on the embedded default, offline on CPU: synthesize the xs pool and its reference set,
    check the pool, filter it with the basic recipe, reshard, train the xs recipe, evaluate on the tiny suite."""
    from clipsift.eval.run import evaluate
    from clipsift.eval.tiny import make_tiny_suite
    from clipsift.filters.recipe import apply_recipe, load_recipe
    from clipsift.pipeline import synth
    from clipsift.pipeline.check import check_pool
    from clipsift.pipeline.reshard import reshard
    from clipsift.train.launch import Infra, train

    started = time.perf_counter()
    console = _console()
    pool_dir = out / "pool"
    console.rule("1/6 synthesize the xs pool (hidden truth beside it) and the clean reference set")
    pool = synth.synth_pool(str(pool_dir), scale="xs", truth=str(out / "pool.truth.parquet"), workers=workers)
    reference = synth.synth_reference(str(out / "reference"), scale="xs", workers=workers)
    console.rule("2/6 check the pool")
    report = check_pool(str(pool_dir), workers=workers)
    if not report.ok:
        raise ClipsiftError(f"the demo pool failed its check: {report.problems[0]}")
    console.rule("3/6 filter: synth_basic (English, caption length, image size and aspect, exact dedup)")
    subset = apply_recipe(str(pool_dir), load_recipe("synth_basic"), str(out / "subset.npy"), workers=workers)
    console.rule("4/6 reshard the subset")
    shards = reshard(str(pool_dir), subset.subset, str(out / "shards"), shard_size=1024, workers=workers)
    console.rule("5/6 train the xs recipe")
    run = train("xs", [(shards.out, 1.0)], str(out / "run"), infra=Infra(workers=1))
    console.rule("6/6 evaluate on the tiny suite (held-out synthetic tasks)")
    make_tiny_suite(str(out / "tiny-suite"))
    evaluation = evaluate(str(out / "run"), "tiny", data_dir=str(out / "tiny-suite"))
    if evaluation.failed:
        raise ClipsiftError(f"tiny-suite evaluation failed: {evaluation.failed[0]}")
    average = evaluation.summary["suites"]["tiny"]["average"]
    _print_summary("clipsift demo", [
        ("pool", f"{pool_dir} ({pool.info['num_samples']:,} samples, check ok); reference {reference['num_samples']:,}"),
        ("subset", f"{subset.subset}: kept {subset.num_uids:,} of {pool.info['num_samples']:,}"),
        ("training", f"{run.run}: {run.samples_seen:,} samples seen, final loss {run.final_loss:.3f}"),
        ("tiny suite", f"average {average:.3f} over {len(evaluation.summary['suites']['tiny']['tasks'])} tasks ({out / 'run' / 'eval' / 'summary.json'})"),
        ("time", f"{time.perf_counter() - started:.0f} s"),
        ("next", f"clipsift eval {out / 'run'} --suite tiny   |   clipsift filter {pool_dir} --recipe synth_text_based --out other.npy"),
    ])


def main() -> None:
    """Entry point: user errors print their message and exit 2, without a traceback."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    try:
        app(prog_name="clipsift")
    except ClipsiftError as err:
        _console().print(f"[bold red]error:[/bold red] {err}", highlight=False)
        raise SystemExit(2) from None
