"""The `clipsift` command line: wires each verb to its stage function and prints its summary."""

from __future__ import annotations

import os
import time
from pathlib import Path

import typer
from typer.core import TyperCommand, TyperGroup

from clipsift import ClipsiftError

app = typer.Typer(
    help="clipsift: a DataComp-style benchmark for image-text dataset curation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
pool_app = typer.Typer(help="Make, import and check pools of image-text pairs.", no_args_is_help=True)
app.add_typer(pool_app, name="pool")

WorkersOption = typer.Option(
    None,
    "--workers",
    "-w",
    help="CPU workers of a local Ray cluster (default: all cores, small work in-process; 1: always in-process).",
)
AddressOption = typer.Option(
    None, "--address", help="Ray cluster to join (default: RAY_ADDRESS, else a new local cluster)."
)


@app.callback()
def _options(
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Show Ray's own notices and its workers' output (hidden by default)."
    ),
) -> None:
    if verbose:
        from clipsift.pipeline.parallel import set_verbose

        set_verbose(True)


def _console():
    from clipsift.pipeline.ui import console

    return console


def _settings(cls, **options):
    """A settings section from CLI options; a bad value is an error naming the option (--shard-size ...)."""
    from pydantic import ValidationError

    try:
        return cls(**options)
    except ValidationError as err:
        problems = "; ".join(f"--{'.'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in err.errors())
        raise ClipsiftError(problems) from None


def _print_summary(title: str, rows: list[tuple[str, object]]) -> None:
    from clipsift.pipeline.ui import summary_table

    _console().print(summary_table(title, rows))


@pool_app.command("synth")
def pool_synth(
    out: Path = typer.Option(..., "--out", "-o", help="Pool directory (or fsspec URL) to write."),
    scale: str = typer.Option("xs", help="xs (about 4,000 samples) or tiny (128,000)."),
    seed: int = typer.Option(0, help="Everything the generator draws follows from this seed."),
    truth: Path | None = typer.Option(
        None, help="Where the truth file goes (outside the pool). Default: OUT.truth.parquet."
    ),
    clean_reference: bool = typer.Option(
        False, "--clean-reference", help="Write the clean, labelled reference set instead of the pool."
    ),
    num_samples: int | None = typer.Option(None, help="Override the scale's number of samples."),
    shard_size: int | None = typer.Option(None, help="Override the scale's samples per shard."),
    workers: int | None = WorkersOption,
) -> None:
    """Synthesize a web-like pool (with a hidden truth file) or a clean reference set."""
    from clipsift.pipeline import synth

    started = time.perf_counter()
    if clean_reference:
        info = synth.synth_reference(
            str(out), scale=scale, seed=seed, num_samples=num_samples, shard_size=shard_size, workers=workers
        )
        rows = [("reference", out), ("samples", info["num_samples"]), ("shards", info["num_shards"])]
    else:
        result = synth.synth_pool(
            str(out),
            scale=scale,
            seed=seed,
            truth=str(truth) if truth else None,
            num_samples=num_samples,
            shard_size=shard_size,
            workers=workers,
        )
        info = result.info
        kinds = ", ".join(f"{k} {v:,}" for k, v in sorted(result.kind_counts.items(), key=lambda kv: -kv[1]))
        rows = [
            ("pool", out),
            ("samples", info["num_samples"]),
            ("shards", info["num_shards"]),
            ("truth (hidden)", result.truth_path),
            ("kinds", kinds),
        ]
    elapsed = time.perf_counter() - started
    rows.append(("time", f"{elapsed:.1f} s ({info['num_samples'] / elapsed:,.0f} samples/s)"))
    _print_summary("synthetic reference set" if clean_reference else "synthetic pool", rows)


@pool_app.command("import")
def pool_import(
    src: str = typer.Argument(
        ..., help="Image folder (+ same-stem .txt captions), Parquet/CSV/JSONL table, or webdataset tar(s)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Pool directory (or fsspec URL) to write."),
    kind: str | None = typer.Option(None, help="folder | table | webdataset (default: detected from SRC)."),
    image_column: str | None = typer.Option(None, help="Table column with image paths or bytes (default: detected)."),
    caption_column: str | None = typer.Option(None, help="Table column with captions (default: detected)."),
    shard_size: int = typer.Option(10_000, help="Samples per shard."),
    name: str | None = typer.Option(None, help="Pool name recorded in pool.json."),
    workers: int | None = WorkersOption,
) -> None:
    """Bring your own data: turn images and captions into a pool."""
    from clipsift.pipeline import importer

    result = importer.import_pool(
        src,
        str(out),
        kind=kind,
        image_column=image_column,
        caption_column=caption_column,
        shard_size=shard_size,
        workers=workers,
        name=name,
    )
    _print_summary("import", importer.import_summary_rows(result))


@pool_app.command("download")
def pool_download(
    urls: str = typer.Argument(
        ..., help="Parquet/CSV/JSONL table with url and caption columns, or a folder of DataComp metadata parquets."
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Pool directory to write (img2dataset's own output is staged in OUT/download/)."
    ),
    processes: int | None = typer.Option(None, help="img2dataset download processes (default: all cores)."),
    threads: int = typer.Option(64, help="img2dataset download threads per process."),
    image_size: int = typer.Option(512, help="Longer side of the stored images; smaller images are kept as they are."),
    shard_size: int = typer.Option(10_000, help="Samples per shard."),
    retries: int = typer.Option(2, help="Extra attempts per url after a failure."),
    timeout: int = typer.Option(10, help="Seconds before a request gives up."),
    blur_faces: bool = typer.Option(
        True, "--blur-faces/--no-blur-faces", help="Blur the face_bboxes of each image (DataComp does)."
    ),
    verify_sha256: bool = typer.Option(
        False, "--verify-sha256", help="Leave out (and report) images whose bytes differ from the listed sha256."
    ),
    url_column: str | None = typer.Option(None, help="Column with the image urls (default: detected)."),
    caption_column: str | None = typer.Option(None, help="Column with the captions (default: detected)."),
    name: str | None = typer.Option(None, help="Pool name recorded in pool.json."),
    workers: int | None = WorkersOption,
) -> None:
    """Download images with img2dataset (DataComp's settings) into a pool; re-run to continue a killed download."""
    from clipsift.pipeline import download

    started = time.perf_counter()
    settings = _settings(
        download.DownloadSettings,
        processes=processes,
        threads=threads,
        image_size=image_size,
        shard_size=shard_size,
        retries=retries,
        timeout=timeout,
        blur_faces=blur_faces,
        verify_sha256=verify_sha256,
        url_column=url_column,
        caption_column=caption_column,
        name=name,
    )
    result = download.download_pool(urls, str(out), settings, workers=workers)
    elapsed = time.perf_counter() - started
    rows = download.download_summary_rows(result)
    rows.append(("time", f"{elapsed:.1f} s ({result.info['num_samples'] / elapsed:,.0f} images/s stored)"))
    _print_summary("pool download", rows)


@pool_app.command("from-datacomp")
def pool_from_datacomp(
    metadata: Path = typer.Option(
        ..., "--metadata", help="Folder of DataComp's metadata parquets (and their .npz features)."
    ),
    shards: Path = typer.Option(..., "--shards", help="Folder of DataComp's img2dataset .tar shards."),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Pool directory (or fsspec URL) to write; the tars are linked, not copied."
    ),
    name: str | None = typer.Option(None, help="Pool name recorded in pool.json."),
    workers: int | None = WorkersOption,
) -> None:
    """Make a pool from an existing DataComp download, with their CLIP features as embeddings.

    Nothing is downloaded: the tars are linked into the pool."""
    from clipsift.pipeline import datacomp

    started = time.perf_counter()
    result = datacomp.from_datacomp(str(metadata), str(shards), str(out), workers=workers, name=name)
    rows = datacomp.datacomp_summary_rows(result)
    rows.append(("time", f"{time.perf_counter() - started:.1f} s"))
    _print_summary("pool from DataComp", rows)


@pool_app.command("check")
def pool_check(
    pool: str = typer.Argument(..., help="Pool directory or fsspec URL."),
    workers: int | None = WorkersOption,
    show: int = typer.Option(50, help="How many problems to list."),
) -> None:
    """Validate a pool: files, alignment, uids, images and captions. Exits 1 when anything is wrong; notes images
    with transparent pixels (not an error)."""
    from clipsift.pipeline.check import check_pool

    report = check_pool(pool, workers=workers)
    console = _console()
    for problem in report.problems[:show]:
        console.print(f"[red]✗[/red] {problem}", markup=True, highlight=False)
    if report.num_problems > show:
        console.print(f"... and {report.num_problems - show:,} more problems")
    for notice in report.notices:
        console.print(f"[yellow]![/yellow] {notice}", markup=True, highlight=False)
    verdict = "[green]ok[/green]" if report.ok else f"[red]{report.num_problems:,} problems[/red]"
    rows = [("pool", pool), ("shards", report.num_shards), ("samples", report.num_samples)]
    rows += [("transparent images", report.num_transparent)] if report.num_transparent else []
    _print_summary("pool check", [*rows, ("result", verdict)])
    if not report.ok:
        raise typer.Exit(1)


@pool_app.command("columns")
def pool_columns(
    name: str = typer.Argument(..., help="The column set: image_quality (blur, entropy, std, brightness)."),
    pool: str = typer.Argument(..., help="Pool directory or fsspec URL."),
    folder: str | None = typer.Option(None, "--folder", help="Keep the set here (default POOL/columns/NAME)."),
    address: str | None = AddressOption,
    workers: int | None = WorkersOption,
) -> None:
    """Compute a column set's missing or outdated shards (the filters that read it then reuse them)."""
    from clipsift.filters import image_quality
    from clipsift.pipeline.pool import Pool

    if name != image_quality.NAME:
        raise ClipsiftError(f"unknown column set {name!r}; known: {image_quality.NAME}")
    started = time.perf_counter()
    opened = Pool(pool)
    columns, computed = image_quality.precompute(opened, folder, workers, address)
    rows = [("column set", f"{name} (version {columns.version})"), ("folder", columns.folder)]
    rows += [("shards computed", len(computed)), ("shards reused", len(opened.shard_ids()) - len(computed))]
    _print_summary("pool columns", [*rows, ("time", f"{time.perf_counter() - started:.1f} s")])


@app.command("score")
def score(
    pool: str = typer.Argument(..., help="Pool directory or fsspec URL."),
    model: list[str] = typer.Option(
        ...,
        "--model",
        "-m",
        help="open_clip architecture, e.g. ViT-B-32, or a config of configs/models "
        "(clipsift-xs). Repeat --model/--pretrained to score several models in one read of the pool.",
    ),
    pretrained: list[str] = typer.Option(
        ...,
        "--pretrained",
        "-p",
        help="open_clip pretrained tag (e.g. openai) or a checkpoint file, one per --model, in the same order.",
    ),
    batch_size: int = typer.Option(256, help="Samples per model batch."),
    precision: str = typer.Option("auto", help="auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16 | fp16."),
    address: str | None = AddressOption,
    gpus_per_worker: float | None = typer.Option(
        None, help="GPUs per model actor (default: 1 where the cluster has GPUs, else 0)."
    ),
    workers: int | None = typer.Option(None, help="Model actors (default: one per GPU, or one per CPU)."),
    decode: str = typer.Option(
        "cpu",
        help="Where images are decoded and resized: cpu (PIL, in CPU tasks) | device (in the "
        "model actors: torchvision's batched JPEG decoder, nvJPEG on GPUs).",
    ),
    out: str | None = typer.Option(
        None,
        "--out",
        "-o",
        help="Folder or URL for the embeddings, OUT/<model_id>/<shard>.parquet "
        "(default POOL/embeddings), e.g. for a pool you cannot write to; filter with "
        "`clipsift filter POOL --embeddings OUT`.",
    ),
) -> None:
    """CLIP image/text embeddings and CLIP scores for every shard (resumes: scored shards are skipped)."""
    from clipsift.pipeline.score import ScoreSettings, score_models, score_summary_rows

    if len(model) != len(pretrained):
        raise ClipsiftError(
            f"{len(model)} --model but {len(pretrained)} --pretrained: give one --pretrained per --model, in the "
            "same order"
        )
    settings = _settings(
        ScoreSettings,
        batch_size=batch_size,
        precision=precision,
        decode=decode,
        workers=workers,
        gpus_per_worker=gpus_per_worker,
    )
    results = score_models(pool, list(zip(model, pretrained)), settings, address=address, out=out)
    for result in results:
        _print_summary("score" if len(results) == 1 else f"score {result.model_id}", score_summary_rows(result))


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
    recipe: str = typer.Option(
        ..., "--recipe", "-r", help="Recipe YAML file, or the name of a shipped recipe (e.g. basic_filter)."
    ),
    out: str = typer.Option(..., "--out", "-o", help="Subset file to write (.npy); subset.json is written beside it."),
    set_: list[str] = typer.Option(
        [], "--set", help="Set a recipe variable, NAME=VALUE (repeatable), e.g. --set model_id=tiny__ab12."
    ),
    embeddings: str | None = typer.Option(
        None,
        "--embeddings",
        help="Where the pool's embeddings are when `clipsift score --out` "
        "put them outside the pool (default POOL/embeddings).",
    ),
    address: str | None = AddressOption,
    workers: int | None = WorkersOption,
) -> None:
    """Apply a filter recipe to a pool and write the subset (DataComp's uid .npy) and subset.json."""
    from clipsift.filters.recipe import apply_recipe, load_recipe

    loaded = load_recipe(recipe, _parse_sets(set_))
    result = apply_recipe(pool, loaded, out, workers=workers, address=address, embeddings=embeddings)
    from rich.table import Table

    table = Table(
        title=f"recipe {loaded.name}: rows kept by each step", title_justify="left", box=None, pad_edge=False
    )
    for column in ("step", "filter", "in", "kept", "share"):
        table.add_column(column, justify="right" if column in ("in", "kept", "share") else "left")
    for step in result.steps:
        share = f"{step.kept / step.rows_in:.1%}" if step.rows_in else "-"
        table.add_row(step.path, step.label, f"{step.rows_in:,}", f"{step.kept:,}", share)
    _console().print(table)
    _print_summary(
        "filter",
        [
            ("subset", f"{out} ({result.num_uids:,} uids)"),
            *(  # a recipe ending in a weight step lists uids several times
                [("copies", f"{result.info['num_unique_uids']:,} unique; {_copies_text(result.info['copies'])}")]
                if "copies" in result.info
                else []
            ),
            ("subset.json", result.info_path),
            ("sha256", result.npy_sha256),
            ("time", f"{result.seconds:.1f} s"),
            ("next", f"clipsift reshard {pool} --subset {out} --out SHARDS"),
        ],
    )


@app.command("filters")
def filters_command() -> None:
    """List the filters a recipe can name: the built-in ones and plugins (entry points of `clipsift.filters`)."""
    from rich.markup import escape
    from rich.table import Table

    from clipsift.filters.plugins import listed_filters

    table = Table(title="filters", title_justify="left", box=None, pad_edge=False)
    for column in ("name", "source", "summary"):
        table.add_column(column)
    for row in listed_filters():
        table.add_row(escape(row.name), escape(row.source), escape(row.summary))  # a plugin's text is not markup
    _console().print(table)
    _console().print("Also: combinators all, any, not, seq; a filter class of your own as module:Class.")


def _copies_text(repeats: dict) -> str:
    """'1x: 9,000 uids, 2x: 500, 3x: 12': how many uids a subset lists once, twice, ..."""
    parts = [f"{k}x: {n:,}" for k, n in sorted((int(k), int(n)) for k, n in repeats.items())]
    return (", ".join(parts) + " uids") if parts else "none"


@subset_app.command("info")
def subset_info_cmd(path: str = typer.Argument(..., help="Subset .npy (ours or a DataComp baseline's).")) -> None:
    """Count, duplicates, how many uids appear 1, 2, ... times, and sha256 of a subset file."""
    from clipsift.filters.subset import subset_info

    info = subset_info(path)
    _print_summary(
        "subset",
        [
            ("file", info.path),
            ("uids", info.count),
            ("unique", info.unique),
            ("duplicates", f"{info.duplicates:,} (most repeated uid: {info.max_repeat}x)"),
            ("copies", _copies_text(info.repeats)),
            ("sorted", "yes" if info.sorted else "no"),
            ("sha256", info.sha256),
        ],
    )


@app.command("reshard")
def reshard_cmd(
    pool: str = typer.Argument(..., help="Pool directory or fsspec URL."),
    subset: str = typer.Option(..., "--subset", "-s", help="Subset .npy (a repeated uid is written that many times)."),
    out: str = typer.Option(
        ..., "--out", "-o", help="Folder for the training shards (a clipsift pool + manifest.json)."
    ),
    shard_size: int = typer.Option(10_000, help="Samples per output shard (the last may hold fewer)."),
    address: str | None = AddressOption,
    workers: int | None = WorkersOption,
) -> None:
    """Copy the subset's samples byte for byte into new webdataset shards for training (resumable)."""
    from clipsift.pipeline.reshard import reshard, reshard_summary_rows

    result = reshard(pool, subset, out, shard_size=shard_size, workers=workers, address=address)
    _print_summary("reshard", reshard_summary_rows(result))


@app.command("train")
def train_command(
    scale: str = typer.Option(
        ..., "--scale", "-s", help="xs | tiny | small | medium | large | xlarge: the fixed recipe."
    ),
    data: list[str] = typer.Option(
        ..., "--data", "-d", help="Resharded data (clipsift reshard --out); repeat to mix sources."
    ),
    weight: list[float] | None = typer.Option(
        None, "--weight", help="Sampling weight per --data, in order (default 1 each)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory; re-running the same command resumes it."),
    gpus: int = typer.Option(1, "--gpus", help="Devices (1 trains in-process; more go through torchrun)."),
    workers: int = typer.Option(1, "--workers", help="Data-loading workers per device."),
    max_per_device_batch: int | None = typer.Option(
        None, help="Largest batch one device holds; the rest is gradient accumulation."
    ),
    torchcompile: bool = typer.Option(
        False, "--torchcompile", help="torch.compile the model (infrastructure, results unchanged)."
    ),
    non_standard_precision: str | None = typer.Option(
        None, help="Train in another precision than the recipe's: recorded as non-standard."
    ),
    seed: int | None = typer.Option(
        None, "--seed", help="Training seed (default: the recipe's); for measuring seed spread."
    ),
) -> None:
    """Train a CLIP model with the scale's fixed recipe through open_clip_train."""
    from clipsift.train.launch import Infra, train, train_summary_rows

    weights = list(weight or [])
    if weights and len(weights) != len(data):
        raise ClipsiftError(
            f"{len(weights)} --weight values for {len(data)} --data sources; give one weight per source or none"
        )
    infra = Infra(
        devices=gpus,
        workers=workers,
        max_per_device_batch=max_per_device_batch,
        torchcompile=torchcompile,
        precision=non_standard_precision,
        seed=seed,
    )
    result = train(scale, list(zip(data, weights or [1.0] * len(data))), str(out), infra=infra)
    _print_summary("train", train_summary_rows(result))


filternet_app = typer.Typer(
    help="The filtering network: a small CLIP trained on a clean reference set, to score pools with.",
    no_args_is_help=True,
)
app.add_typer(filternet_app, name="filternet")


@filternet_app.command("train")
def filternet_train(
    reference: str = typer.Option(
        ...,
        "--reference",
        "-r",
        help="Clean reference pool (clipsift pool synth --clean-reference, or your curated pairs imported).",
    ),
    scale: str = typer.Option(
        "tiny",
        "--scale",
        "-s",
        help="Training recipe for the network: tiny (the default: xs networks are unreliable, docs/science.md) or xs.",
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Folder for the network (filternet.json, run/, the checkpoint); re-running resumes."
    ),
    workers: int | None = WorkersOption,
) -> None:
    """Train the filtering network on a clean reference set; `clipsift score` then scores a pool with it."""
    from clipsift.train.filternet import train_filternet

    result = train_filternet(reference, str(out), scale=scale, workers=workers)
    _print_summary(
        "filternet train",
        [
            ("reference", f"{reference} ({result.reference_samples:,} samples)"),
            ("recipe", f"{scale}: {result.samples_seen:,} samples seen"),
            ("network", f"{result.arch}, {result.checkpoint}"),
            ("model_id", result.model_id),
            ("time", f"{result.seconds:.0f} s"),
            ("next", f"clipsift score POOL --model {result.arch} --pretrained {result.checkpoint}"),
        ],
    )


class _EvalGroup(TyperGroup):
    """`clipsift eval RUN ...` dispatches to the hidden `run` command; `download`, `make-tiny-suite` and `make-task`
    are verbs, unless a run folder or checkpoint file of that name is there (then it is evaluated)."""

    default = "run"  # the hidden command that a first argument other than a verb goes to

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        verbs = {name for name, command in self.commands.items() if not command.hidden}
        first = args[0] if args else None
        if first and first not in ctx.help_option_names and (first not in verbs or _eval_target(first)):
            args = [self.default, *args]
        return super().parse_args(ctx, args)


def _eval_target(path: str) -> bool:
    """Whether `path` is something `clipsift eval` evaluates: a checkpoint file or a run folder."""
    return os.path.isfile(path) or any(os.path.exists(os.path.join(path, p)) for p in ("run.json", "checkpoints"))


class _EvalRunCommand(TyperCommand):
    def format_usage(self, ctx, formatter) -> None:
        formatter.write_usage(ctx.parent.command_path, "RUN|CHECKPOINT [OPTIONS]")


eval_app = typer.Typer(
    cls=_EvalGroup,
    no_args_is_help=True,
    help=(
        "Zero-shot evaluation. `clipsift eval RUN|CHECKPOINT --suite datacomp38|tiny` "
        "evaluates a run (or a checkpoint with --model ARCH) into RUN/eval/results.jsonl "
        "and summary.json; `clipsift eval RUN --help` lists its options."
    ),
)
app.add_typer(eval_app, name="eval")


def _split_list(values: list[str] | None) -> list[str] | None:
    return [v.strip() for value in values for v in value.split(",") if v.strip()] if values else None


@eval_app.command("run", hidden=True, cls=_EvalRunCommand)
def eval_run(
    target: str = typer.Argument(
        ...,
        metavar="RUN|CHECKPOINT",
        help="Run directory (RUN/checkpoints/epoch_latest.pt, model from run.json) or a checkpoint file.",
    ),
    suite: str = typer.Option(
        "datacomp38", "--suite", "-s", help="datacomp38 | tiny | a custom suite YAML file (docs/evaluation.md)."
    ),
    data_dir: str | None = typer.Option(
        None,
        "--data-dir",
        help="The suite's data (default: $CLIPSIFT_EVAL_DATA/SUITE or ~/.cache/clipsift/eval/SUITE).",
    ),
    tasks: list[str] | None = typer.Option(
        None, "--tasks", "-t", help="Only these tasks: keys, globs (vtab/*) or group tags; repeat or comma-separate."
    ),
    batch_size: int = typer.Option(256, "--batch-size", "-b", help="Images per model batch."),
    model: str | None = typer.Option(
        None, "--model", "-m", help="Architecture of a bare checkpoint (e.g. clipsift-tiny, ViT-B-32)."
    ),
    out: str | None = typer.Option(
        None, "--out", "-o", help="Results folder (default: RUN/eval, or CHECKPOINT_eval beside a checkpoint)."
    ),
    workers: int | None = typer.Option(
        None, "--workers", "-w", help="Data-loading processes (default: CPUs - 2 on GPU machines, 0 on CPU)."
    ),
    precision: str = typer.Option(
        "auto",
        help="auto (DataComp's evaluation: fp16 text / fp32 image tower for classification, fp16 retrieval, on GPU; "
        "fp32 on CPU) | fp32 | bf16 | fp16.",
    ),
    save_classifiers: str | None = typer.Option(
        None, "--save-classifiers", help="Write each classification task's zero-shot classifier to DIR/KEY.npz."
    ),
) -> None:
    """Evaluate a run or checkpoint zero-shot; re-running skips the tasks already in results.jsonl."""
    from clipsift.eval.run import eval_summary_rows, evaluate

    console = _console()

    def show(outcome) -> None:
        if outcome.status == "failed":
            console.print(f"[red]✗[/red] {outcome.error}", markup=True, highlight=False)

    result = evaluate(
        target,
        suite,
        data_dir=data_dir,
        tasks=_split_list(tasks),
        batch_size=batch_size,
        arch=model,
        out=out,
        workers=workers,
        precision=precision,
        save_classifiers=save_classifiers,
        on_task=show,
    )
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
    rows += [
        ("suite", out),
        ("time", f"{time.perf_counter() - started:.1f} s"),
        ("next", f"clipsift eval RUN --suite tiny --data-dir {out}"),
    ]
    _print_summary("tiny evaluation suite", rows)


@eval_app.command("make-task")
def eval_make_task(
    src: Path = typer.Option(
        ..., "--from", help="An image folder (one sub-folder per class) or a CSV/Parquet table of image paths."
    ),
    task_type: str = typer.Option(..., "--type", help="classification | retrieval"),
    out: Path = typer.Option(..., "--out", "-o", help="Task folder to write (clip_benchmark's webdataset layout)."),
    shard_size: int = typer.Option(10_000, "--shard-size", help="Samples per tar."),
    image_column: str | None = typer.Option(
        None, "--image-column", help="Table column of image paths (default: image)."
    ),
    label_column: str | None = typer.Option(
        None, "--label-column", help="Table column of class labels (default: label)."
    ),
    caption_column: str | None = typer.Option(
        None, "--caption-column", help="Table column of captions (default: caption)."
    ),
    group_column: str | None = typer.Option(
        None, "--group-column", help="Table column of groups, for worst-group metrics."
    ),
    classnames: Path | None = typer.Option(
        None, "--classnames", help="Class names, one per line (or 'label<TAB>name'); default: the labels."
    ),
    templates: Path | None = typer.Option(
        None, "--templates", help="Prompt templates with {c}, one per line; default: 'a photo of a {c}.'."
    ),
    metric: str | None = typer.Option(
        None,
        "--metric",
        help="Main metric; default: acc1, or mean_per_class_recall when the largest class has over 1.5x the "
        "samples of the smallest (acc_wg with groups, mean_recall@1 for retrieval).",
    ),
) -> None:
    """Convert an image folder or table into a task in the webdataset layout (resumable).

    Its suite entry is written to OUT/task.yaml."""
    from clipsift.eval.layouts import make_task, read_lines_file

    started = time.perf_counter()
    made = make_task(
        str(src),
        task_type,
        str(out),
        shard_size=shard_size,
        image_column=image_column,
        label_column=label_column,
        caption_column=caption_column,
        group_column=group_column,
        classnames=read_lines_file(str(classnames), pairs=True) if classnames else None,
        templates=read_lines_file(str(templates)) if templates else None,
        metric=metric,
    )
    _print_summary(
        "eval make-task",
        [
            ("task", out),
            ("samples", f"{made.samples:,}"),
            ("classes", made.classes or "-"),
            ("metric", made.entry["metric"]),
            ("tars", f"{made.shards} ({made.written} written now)"),
            ("time", f"{time.perf_counter() - started:.1f} s"),
            (
                "next",
                f"add `- include: {out / 'task.yaml'}` to a suite file's tasks; clipsift eval RUN --suite S.yaml",
            ),
        ],
    )


@eval_app.command("download")
def eval_download(
    out: Path = typer.Option(..., "--out", "-o", help="Data folder (pass it to `clipsift eval --data-dir`)."),
    suite: str = typer.Option("datacomp38", "--suite", "-s", help="The suite whose data to fetch."),
    tasks: list[str] | None = typer.Option(None, "--tasks", "-t", help="Only these tasks: keys, globs or group tags."),
) -> None:
    """Fetch a suite's data from the Hugging Face Hub (resumable; sizes and hashes checked)."""
    from clipsift.eval.download import download_suite
    from clipsift.eval.registry import load_suite

    loaded = load_suite(suite)
    if loaded.name == "tiny":
        raise ClipsiftError(
            f"the tiny suite is not downloaded: write it with `clipsift eval make-tiny-suite --out {out}`"
        )
    console = _console()
    report = download_suite(
        loaded,
        str(out),
        loaded.select(_split_list(tasks)),
        on_task=lambda key, status: console.print(f"{key}: {status}", highlight=False),
    )
    _print_summary(
        "eval download",
        [
            ("data", out),
            ("tasks fetched", len(report.done)),
            ("already complete", len(report.skipped)),
            ("failed", len(report.failed)),
            ("fetched", f"{report.files_fetched:,} files, {report.bytes_fetched / 1e9:.2f} GB"),
            ("next", f"clipsift eval RUN --suite {loaded.name} --data-dir {out}"),
        ],
    )
    if report.failed:
        raise typer.Exit(1)


leaderboard_app = typer.Typer(help="The leaderboard server and its API tokens.", no_args_is_help=True)
app.add_typer(leaderboard_app, name="leaderboard")
token_app = typer.Typer(help="API tokens (stored hashed; shown once when created).", no_args_is_help=True)
leaderboard_app.add_typer(token_app, name="token")
DbOption = typer.Option(
    "leaderboard.sqlite",
    "--db",
    help="SQLAlchemy URL (e.g. postgresql+psycopg://user:pw@host/db) or a SQLite file path.",
)


@leaderboard_app.command("serve")
def leaderboard_serve(
    db: str = DbOption,
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Address to bind (loopback by default; put a TLS proxy in front to publish it)."
    ),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    rate: float = typer.Option(
        1.0, "--rate", help="Requests per second a token's bucket refills (writes and authenticated calls)."
    ),
    burst: int = typer.Option(30, "--burst", help="Requests a token may send at once."),
    max_body: int = typer.Option(1_000_000, "--max-body", help="Largest request body in bytes."),
    public_url: str | None = typer.Option(
        None,
        "--public-url",
        help="The server's public base URL, http(s)://HOST[:PORT], for the URLs it returns (default: http://HOST:PORT "
        "of --host and --port; the request's Host header is never used).",
    ),
    anon_rate: float = typer.Option(
        20.0, "--anon-rate", help="Requests per second a client address's bucket refills (requests without a token)."
    ),
    anon_burst: int = typer.Option(100, "--anon-burst", help="Requests a client address may send at once."),
    header_timeout: float = typer.Option(
        10.0, "--header-timeout", help="Seconds a client has to send a request line and headers (then 408, closed)."
    ),
    body_timeout: float = typer.Option(
        30.0, "--body-timeout", help="Seconds a client has to send a whole request body (then 408, closed)."
    ),
    max_connections: int = typer.Option(
        200, "--max-connections", help="Open connections or requests in progress beyond which requests get 503."
    ),
) -> None:
    """Serve the leaderboard (API at /api/v1, web page at /); the schema is created or upgraded on start."""
    from clipsift.leaderboard.app import Settings, serve

    settings = Settings(
        db=db,
        max_body=max_body,
        rate=rate,
        burst=burst,
        public_url=public_url,
        anon_rate=anon_rate,
        anon_burst=anon_burst,
        header_timeout=header_timeout,
        body_timeout=body_timeout,
        max_connections=max_connections,
    )
    serve(settings, host=host, port=port)


@token_app.command("create")
def leaderboard_token_create(
    name: str = typer.Argument(..., help="Who or what the token is for (unique)."),
    admin: bool = typer.Option(False, "--admin", help="May change a submission's status and register suites."),
    expires_days: int | None = typer.Option(
        None, "--expires-days", min=1, help="Valid for this many days from now (default: until revoked)."
    ),
    db: str = DbOption,
) -> None:
    """Create an API token and print it once (only its hash is stored)."""
    from datetime import timedelta

    from clipsift.leaderboard.db import Database, show_time, utcnow

    expires_at = utcnow() + timedelta(days=expires_days) if expires_days else None
    database = Database(db)
    try:
        token = database.create_token(name, admin=admin, expires_at=expires_at)
    finally:
        database.close()
    typer.echo(token)
    until = f", valid until {show_time(expires_at)}" if expires_at else ""
    typer.echo(f"{'admin' if admin else 'submitter'} token {name!r} created{until}; it is not shown again.", err=True)


@token_app.command("list")
def leaderboard_token_list(db: str = DbOption) -> None:
    """List the API tokens: name, role, created, expires, last used, revoked (never a token or its hash)."""
    from clipsift.leaderboard.db import Database, show_time, utcnow

    database = Database(db)
    try:
        tokens = database.tokens()
    finally:
        database.close()
    if not tokens:
        typer.echo("no tokens; create one with `clipsift leaderboard token create NAME`", err=True)
        return
    now = utcnow()
    header = ("name", "role", "created", "expires", "last used", "revoked")
    rows = [
        (
            t.name,
            t.role,
            show_time(t.created),
            show_time(t.expires_at) + (" (expired)" if t.expires_at is not None and t.expires_at <= now else ""),
            show_time(t.last_used),
            show_time(t.revoked_at),
        )
        for t in tokens
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


@token_app.command("revoke")
def leaderboard_token_revoke(
    name: str = typer.Argument(..., help="The token's name (as `token list` shows it)."),
    db: str = DbOption,
) -> None:
    """Revoke a token: a running server refuses it from its next request on (401 "token revoked")."""
    from clipsift.leaderboard.db import Database, show_time

    database = Database(db)
    try:
        token, now = database.revoke_token(name)
    finally:
        database.close()
    if now:
        typer.echo(f"token {name!r} revoked on {show_time(token.revoked_at)}")
    else:
        typer.echo(f"token {name!r} was revoked already, on {show_time(token.revoked_at)}")


@leaderboard_app.command("verify")
def leaderboard_verify(
    file: Path = typer.Argument(..., help="An export (`clipsift submit RUN --export FILE`) or a submission payload."),
    run: Path | None = typer.Option(
        None, "--run", help="Also compare the export's provenance hashes with this run directory's files."
    ),
) -> None:
    """Verify a submission as the server would, without one (built-in suites; duplicates are not checked).

    Exits 0 with a summary, or 1 listing each problem as `field: reason`."""
    import json

    from clipsift.leaderboard.verify import verify_document

    try:
        document = json.loads(file.read_text(encoding="utf-8"))
    except OSError as err:
        raise ClipsiftError(f"{file}: cannot read it ({err.strerror or err})") from None
    except ValueError as err:
        raise ClipsiftError(f"{file}: not valid JSON ({err})") from None
    report = verify_document(document, run_dir=str(run) if run is not None else None)
    if report.problems:
        typer.echo(f"{file}: {len(report.problems)} problem(s); the server would refuse it:")
        for field, reason in report.problems:
            typer.echo(f"{field}: {reason}")
        raise typer.Exit(1)
    submission, verified = report.submission, report.verified
    groups = ", ".join(
        f"{tag} {value:.4f}" if value is not None else f"{tag} -" for tag, value in verified.groups.items()
    )
    _print_summary(
        "verified",
        [
            ("file", file),
            ("method", submission.method_name),
            ("track · scale · suite", f"{submission.track} · {submission.scale} · {report.suite.name}"),
            ("tasks", f"{len(verified.results)} ({sum(row['scored'] for row in verified.results)} scored)"),
            ("average", f"{verified.average:.6f} (recomputed)"),
            ("groups", groups or "none"),
            ("payload sha256", report.payload_sha256 + (" (matches the export)" if report.export else "")),
            ("provenance", "compared with " + str(run) if run is not None else "not compared (no --run)"),
            ("duplicates", "not checked: only the server knows what it stores"),
        ],
    )


@app.command("submit")
def submit(
    run: Path = typer.Argument(..., help="Run directory: RUN/run.json and RUN/eval/results.jsonl + summary.json."),
    server: str | None = typer.Option(
        None, "--server", help="Leaderboard URL, e.g. http://127.0.0.1:8000 (needed unless --export)."
    ),
    token: str | None = typer.Option(
        None, "--token", envvar="CLIPSIFT_LEADERBOARD_TOKEN", help="API token (or set CLIPSIFT_LEADERBOARD_TOKEN)."
    ),
    method_name: str = typer.Option(..., "--method-name", help="The method's name on the leaderboard."),
    track: str = typer.Option("filtering", "--track", help="filtering | byod."),
    authors: list[str] | None = typer.Option(None, "--author", help="An author (repeat for several)."),
    links: list[str] | None = typer.Option(None, "--link", help="A paper or code link, http(s) (repeat for several)."),
    description: str | None = typer.Option(
        None, "--description", help="Method notes; for byod, the description of the data (required)."
    ),
    suite: str | None = typer.Option(
        None, "--suite", help="The suite to submit (default: the one summary.json has complete)."
    ),
    export: Path | None = typer.Option(
        None,
        "--export",
        help="Write the submission and its provenance hashes to this file instead of sending it "
        "(check it with `clipsift leaderboard verify FILE`).",
    ),
) -> None:
    """Submit an evaluated run to a leaderboard; prints its URL, or the server's reasons for refusing it.

    With --export FILE nothing is sent: the complete submission is written to FILE."""
    from clipsift.leaderboard.client import build_submission, export_submission, post_submission, submission_url

    if export is None and (server is None or token is None):
        raise ClipsiftError("submit needs --server and --token (or CLIPSIFT_LEADERBOARD_TOKEN), or --export FILE")
    payload = build_submission(
        str(run),
        method_name=method_name,
        track=track,
        authors=authors,
        links=links,
        description=description,
        suite=suite,
    )
    if export is not None:
        document = export_submission(str(run), payload, export)
        _print_summary(
            "exported",
            [
                ("file", export),
                ("suite", payload["suite"]["name"]),
                ("scale", payload["scale"]),
                ("payload sha256", document["payload_sha256"]),
                ("check it", f"clipsift leaderboard verify {export}"),
            ],
        )
        return
    submission_id = post_submission(server, token, payload)
    _print_summary(
        "submitted",
        [
            ("submission", submission_id),
            ("suite", payload["suite"]["name"]),
            ("scale", payload["scale"]),
            ("status", "pending (an admin verifies it)"),
        ],
    )
    typer.echo(submission_url(server, submission_id))


def _print_run(result, title: str) -> None:
    """Per-stage times of a `clipsift run` (or demo) and where its result lies."""
    from rich.table import Table

    from clipsift.pipeline.run import time_rows

    table = Table(title=f"{title}: stages", title_justify="left", box=None, pad_edge=False)
    for column in ("stage", "status", "seconds", "cpu seconds", "what"):
        table.add_column(column, justify="right" if "seconds" in column else "left")
    for row in time_rows(result):
        table.add_row(*row)
    _console().print(table)


def _run_summary_rows(result) -> list[tuple[str, object]]:
    from clipsift.eval.stage import EvalStage
    from clipsift.leaderboard.stage import SubmitStage

    rows: list[tuple[str, object]] = [("run", result.run_dir)]
    evaluated, submitted = result.outputs.get(EvalStage), result.outputs.get(SubmitStage)
    if evaluated:
        rows.append(
            (
                "score",
                f"{evaluated.suite} average {evaluated.average:.3f} over {evaluated.tasks} tasks "
                f"({evaluated.summary})",
            )
        )
    if submitted:
        rows.append(("leaderboard", f"submission {submitted.id} in {submitted.url or submitted.leaderboard}"))
    rows.append(
        ("provenance", f"{result.run_dir / 'provenance.json'} ({len(result.provenance['checks'])} hash checks ok)")
    )
    return rows


def _stage_rule(name: str, title: str) -> None:
    _console().rule(title)


@app.command("run")
def run_command(
    config: str = typer.Argument(
        ..., help="Run config YAML, or a shipped one by name (tiny, xs, datacomp_small, datacomp_medium)."
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Run directory (default: runs/NAME); re-running resumes it."
    ),
    until: str | None = typer.Option(
        None,
        "--until",
        help="Stop after this stage (pool, reference, filternet, score, filter, reshard, train, eval, submit).",
    ),
    check: bool = typer.Option(False, "--check", help="Validate the config, list its stages and stop."),
    workers: int | None = WorkersOption,
) -> None:
    """Run a whole job from one config: pool, filtering network (optional), score, filter, reshard, train, eval, submit
    (optional). Every stage resumes: re-running the same command continues where a killed run stopped, and a config
    that changed since is refused instead of mixing results (docs/run.md)."""
    from clipsift.pipeline.run import default_run_dir, run_pipeline, stage_names
    from clipsift.pipeline.run_config import load_run_config

    loaded, where = load_run_config(config)
    if check:
        _print_summary(
            "run config ok",
            [
                ("config", where),
                ("name", loaded.name),
                ("stages", " -> ".join(stage_names(loaded))),
                ("run directory", out or default_run_dir(loaded)),
                ("sha256", loaded.sha256()),
            ],
        )
        return
    result = run_pipeline(loaded, out, where=where, workers=workers, until=until, on_stage=_stage_rule)
    _print_run(result, f"clipsift run {loaded.name}")
    _print_summary(f"clipsift run {loaded.name}", _run_summary_rows(result))


class _ReportGroup(_EvalGroup):
    """`clipsift report SUBSET|RUN ...` dispatches to the hidden `curation` command; `scaling` is a verb."""

    default = "curation"


class _ReportCurationCommand(TyperCommand):
    def format_usage(self, ctx, formatter) -> None:
        formatter.write_usage(ctx.parent.command_path, "SUBSET|RUN --out REPORT.html [OPTIONS]")


report_app = typer.Typer(
    cls=_ReportGroup,
    no_args_is_help=True,
    help=(
        "Reports. `clipsift report SUBSET|RUN --out report.html` writes the curation report of a subset "
        "(or of the subset a run trained on); `clipsift report SUBSET --help` lists its options; `clipsift "
        "report scaling RUN... --out scaling.html` fits each recipe's score against samples seen."
    ),
)
app.add_typer(report_app, name="report")


@report_app.command("curation", hidden=True, cls=_ReportCurationCommand)
def report_curation(
    target: str = typer.Argument(
        ..., metavar="SUBSET|RUN", help="Subset .npy (subset.json beside it) or a run directory (run.json)."
    ),
    out: str = typer.Option(
        ..., "--out", "-o", help="The HTML page to write (images embedded: one self-contained file)."
    ),
    truth: str | None = typer.Option(
        None, "--truth", help="Truth file (uid -> kind) of a synthetic pool: adds precision and recall per kind."
    ),
    samples: int = typer.Option(
        12, "--samples", "-n", help="Samples per gallery (random, at each threshold's margin, per cluster)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the random galleries and clusters."),
    pool: str | None = typer.Option(
        None, "--pool", help="Where the pool is now, if it moved since filtering (its pool.json must match)."
    ),
    embeddings: str | None = typer.Option(
        None,
        "--embeddings",
        help="Where the embeddings are now, if the filter read them from a "
        "folder (`clipsift filter --embeddings`) that has moved since.",
    ),
    workers: int | None = typer.Option(
        1, "--workers", "-w", help="Ray workers to re-apply the recipe with (default 1: in-process)."
    ),
    address: str | None = AddressOption,
) -> None:
    """The curation report: what each step kept, CLIP-score histograms with thresholds, galleries, cluster montages."""
    from clipsift.pipeline.report import curation_report, report_summary_rows

    result = curation_report(
        target,
        out,
        truth=truth,
        samples=samples,
        seed=seed,
        pool_url=pool,
        embeddings=embeddings,
        workers=workers,
        address=address,
    )
    _print_summary("curation report", report_summary_rows(result))


@report_app.command("scaling")
def report_scaling(
    runs: list[str] = typer.Argument(
        ..., metavar="RUN...", help="Run directories (run.json and eval/summary.json), several recipes and scales."
    ),
    out: str = typer.Option(..., "--out", "-o", help="The HTML page to write."),
    suite: str | None = typer.Option(
        None, "--suite", "-s", help="The suite whose average is fitted (default: the runs' only suite)."
    ),
) -> None:
    """Fit each recipe's error against samples seen with a power law, predict the next scale, rank recipes.

    The error is 1 - the suite average."""
    from clipsift.pipeline.scaling import scaling_report, scaling_summary_rows

    _print_summary("scaling", scaling_summary_rows(scaling_report(runs, out, suite=suite)))


@app.command("quickstart")
def quickstart_command(
    src: str = typer.Argument(
        ..., help="Your data: an image folder (+ same-stem .txt captions), a Parquet/CSV/JSONL table, or tars."
    ),
    out: Path = typer.Option(
        Path("clipsift-quickstart"), "--out", "-o", help="Folder for everything it makes (re-running resumes)."
    ),
    scale: str = typer.Option("xs", "--scale", help="Training recipe of every baseline: xs (seconds) or tiny."),
    filternet_scale: str = typer.Option(
        "tiny", "--filternet-scale", help="Recipe of the filtering network (when no --model is given)."
    ),
    recipe: str | None = typer.Option(
        None, "--recipe", "-r", help="Your recipe (a YAML file or a shipped name), ranked beside the baselines."
    ),
    set_: list[str] = typer.Option([], "--set", help="A variable of your recipe, NAME=VALUE (repeatable)."),
    fraction: float = typer.Option(0.3, "--fraction", help="Share the random and CLIP-score baselines keep."),
    heldout: float = typer.Option(0.15, "--heldout", help="Share of your data held out for the evaluation suite."),
    max_heldout: int = typer.Option(1000, "--max-heldout", help="At most this many held-out pairs."),
    seed: int = typer.Option(0, "--seed", help="Seed of the split, the random baseline and training."),
    model: str | None = typer.Option(
        None, "--model", help="An open_clip architecture for CLIP scores (default: train a filtering network)."
    ),
    pretrained: str | None = typer.Option(None, "--pretrained", help="Its weights file (with --model)."),
    reference: str | None = typer.Option(
        None, "--reference", help="A clean set (pool, folder or table) to train the filtering network on."
    ),
    label_column: str | None = typer.Option(
        None, "--label-column", help="A table's class column (folders: one sub-folder per class)."
    ),
    caption_column: str | None = typer.Option(None, "--caption-column", help="A table's caption column."),
    image_column: str | None = typer.Option(None, "--image-column", help="A table's image column."),
    shard_size: int = typer.Option(1000, "--shard-size", help="Samples per pool shard."),
    workers: int | None = WorkersOption,
) -> None:
    """From your own images and captions to a ranked baseline table (no filter, random, CLIP score, your recipe),
    trained at a CPU scale and evaluated on a held-out part of the same data, with an HTML report."""
    from clipsift.pipeline.quickstart import QuickstartSettings, quickstart, quickstart_summary_rows

    settings = _settings(
        QuickstartSettings,
        scale=scale,
        filternet_scale=filternet_scale,
        recipe=recipe,
        set=_parse_sets(set_),
        fraction=fraction,
        heldout=heldout,
        max_heldout=max_heldout,
        seed=seed,
        model=model,
        pretrained=pretrained,
        reference=reference,
        label_column=label_column,
        caption_column=caption_column,
        image_column=image_column,
        shard_size=shard_size,
        workers=workers,
    )
    steps = iter(range(1, 100))
    result = quickstart(
        src, str(out), settings, on_step=lambda title: _stage_rule("quickstart", f"{next(steps)}. {title}")
    )
    _print_summary("clipsift quickstart", quickstart_summary_rows(result))


@app.command("demo")
def demo(
    out: Path = typer.Option(
        Path("clipsift-demo"), "--out", "-o", help="Directory for everything the demo writes (re-running resumes)."
    ),
    scale: str = typer.Option(
        "tiny", "--scale", help="tiny: the full demo (128,000 samples; minutes) | xs: a quick version (4,096 samples)."
    ),
    workers: int | None = WorkersOption,
) -> None:
    """The main job on the embedded default (configs/runs/tiny.yaml), offline on CPU: synthesize the pool and
    the clean reference set, train a filtering network on the reference, score the pool with it, keep the top 30%
    by CLIP score, reshard, train the fixed recipe, evaluate on the tiny suite, post to a local leaderboard."""
    from clipsift.pipeline.run import run_pipeline
    from clipsift.pipeline.run_config import load_run_config

    if scale not in ("tiny", "xs"):
        raise ClipsiftError(f"--scale {scale!r}: choose tiny (the full demo) or xs (a quick version)")
    config, where = load_run_config(scale)
    result = run_pipeline(config, out, where=where, workers=workers, on_stage=_stage_rule)
    _print_run(result, "clipsift demo")
    _print_summary("clipsift demo", _demo_rows(result))


def _demo_rows(result) -> list[tuple[str, object]]:
    from clipsift.eval.stage import EvalStage
    from clipsift.filters.stage import FilterStage
    from clipsift.leaderboard.stage import SubmitStage
    from clipsift.pipeline.stages import PoolStage, ReferenceStage, ScoreStage
    from clipsift.train.stages import FilternetStage, TrainStage

    o = result.outputs
    pool, net, subset, trained, evaluated, board = (
        o[PoolStage],
        o[FilternetStage],
        o[FilterStage],
        o[TrainStage],
        o[EvalStage],
        o[SubmitStage],
    )
    n = pool.num_samples
    return [
        (
            "pool",
            f"{pool.path}: {n:,} synthetic web-like pairs (noise kinds in {pool.truth}, which filters never read)",
        ),
        (
            "filtering network",
            f"{net.arch} trained on {o[ReferenceStage].num_samples:,} clean reference pairs "
            f"({net.samples_seen:,} samples seen)",
        ),
        ("scores", f"{o[ScoreStage].pairs:,} pairs scored ({o[ScoreStage].embeddings})"),
        (
            "subset",
            f"{subset.recipe['name']}: kept {subset.num_uids:,} of {n:,} ({subset.num_uids / n:.0%}); {subset.subset}",
        ),
        (
            "training",
            f"{trained.scale} recipe: {trained.samples_seen:,} samples seen, final loss {trained.final_loss:.3f}",
        ),
        ("score", f"tiny suite average {evaluated.average:.3f} over {evaluated.tasks} tasks ({evaluated.summary})"),
        ("leaderboard", f"submission {board.id} in {board.leaderboard}"),
        ("time", f"{result.seconds:.0f} s"),
        ("report", f"clipsift report {subset.subset} --truth {pool.truth} --out {result.run_dir / 'report.html'}"),
        (
            "leaderboard page",
            f"clipsift leaderboard serve --db {board.leaderboard}, then open "
            f"http://127.0.0.1:8000/submissions/{board.id}",
        ),
    ]


def main() -> None:
    """Entry point: user errors print their message and exit 2, without a traceback."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    try:
        app(prog_name="clipsift")
    except ClipsiftError as err:
        _console().print(f"[bold red]error:[/bold red] {err}", highlight=False)
        raise SystemExit(2) from None
