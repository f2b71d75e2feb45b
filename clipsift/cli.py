"""The `clipsift` command line: wires each verb to its stage function and prints its summary."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import typer

from clipsift import ClipsiftError

app = typer.Typer(help="clipsift: a DataComp-style benchmark for image-text dataset curation.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
pool_app = typer.Typer(help="Make, import and check pools of image-text pairs.", no_args_is_help=True)
app.add_typer(pool_app, name="pool")

WorkersOption = typer.Option(None, "--workers", "-w", help="CPU workers of the local Ray cluster (default: all cores; 1 runs in-process).")


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


@app.command("demo")
def demo(
    out: Path = typer.Option(Path("clipsift-demo"), "--out", "-o", help="Directory for everything the demo writes."),
    scale: str = typer.Option("xs", help="Synthetic scale of the demo pool."),
    workers: Optional[int] = WorkersOption,
) -> None:
    """The main job on the embedded default, fully offline: synthesize a pool and its reference set, then check the pool."""
    from clipsift.pipeline import synth
    from clipsift.pipeline.check import check_pool

    started = time.perf_counter()
    pool_dir, reference_dir = out / "pool", out / "reference"
    result = synth.synth_pool(str(pool_dir), scale=scale, truth=str(out / "pool.truth.parquet"), workers=workers)
    reference = synth.synth_reference(str(reference_dir), scale=scale, workers=workers)
    report = check_pool(str(pool_dir), workers=workers)
    if not report.ok:
        raise ClipsiftError(f"the demo pool failed its check: {report.problems[0]}")
    _print_summary("clipsift demo", [
        ("pool", f"{pool_dir} ({result.info['num_samples']:,} samples, {result.info['num_shards']} shards, check ok)"),
        ("reference set", f"{reference_dir} ({reference['num_samples']:,} samples)"),
        ("truth (hidden)", result.truth_path),
        ("time", f"{time.perf_counter() - started:.1f} s"),
        ("next", f"clipsift pool check {pool_dir}"),
    ])


def main() -> None:
    """Entry point: user errors print their message and exit 2, without a traceback."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    try:
        app(prog_name="clipsift")
    except ClipsiftError as err:
        _console().print(f"[bold red]error:[/bold red] {err}", highlight=False)
        raise SystemExit(2) from None
