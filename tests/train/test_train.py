"""`clipsift train`: fixed recipes, batch arithmetic, open_clip_train arguments, bad input, a shortened xs
schedule (the default run's one training), and (slow) a real xs run that is killed after its first pseudo-epoch and
resumed to the same samples seen."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from clipsift import ClipsiftError
from clipsift.filters.subset import encode_uids, sort_subset, write_subset
from clipsift.pipeline.pool import Pool, Sample, derive_uid, write_shard
from clipsift.pipeline.reshard import read_manifest, reshard
from clipsift.pipeline.synth import synth_pool
from clipsift.train.launch import (
    DataSource,
    Infra,
    open_clip_args,
    open_data,
    parse_log,
    train,
)
from clipsift.train.recipe import SCALES, load_recipe, plan_batches

from conftest import clipsift_started, image_bytes


def test_datacomp_scales_keep_their_numbers() -> None:
    expected = {  # reference/datacomp.md
        "small": ("ViT-B-32", 12_800_000, 4096, 5e-4, 500, 0.98, "amp"),
        "medium": ("ViT-B-32", 128_000_000, 4096, 5e-4, 500, 0.98, "amp"),
        "large": ("ViT-B-16", 1_280_000_000, 8192, 5e-4, 500, 0.98, "amp"),
        "xlarge": ("ViT-L-14", 12_800_000_000, 90112, 1e-3, 10_000, 0.95, "amp_bfloat16"),
    }
    for scale, (model, seen, batch, lr, warmup, beta2, precision) in expected.items():
        r = load_recipe(scale)
        assert (r.model, r.samples_seen, r.global_batch, r.lr, r.warmup, r.beta2, r.precision) == (
            model,
            seen,
            batch,
            lr,
            warmup,
            beta2,
            precision,
        )
        assert (r.beta1, r.eps, r.weight_decay, r.epochs) == (0.9, 1e-6, 0.2, 5)
        assert r.dataset_resampled and r.local_loss and r.gather_with_grad and r.grad_checkpointing
        assert r.pool_size == r.samples_seen
    tiny = load_recipe("tiny")
    assert tiny.pool_size == tiny.samples_seen == 128_000
    assert set(SCALES) == {"xs", "tiny", "small", "medium", "large", "xlarge"}
    with pytest.raises(ClipsiftError, match="unknown scale 'huge'"):
        load_recipe("huge")


@pytest.mark.parametrize("devices", [1, 8, 64])
def test_batch_plan_keeps_the_global_batch(devices: int) -> None:
    for scale in ("small", "large", "xlarge"):
        batch = load_recipe(scale).global_batch
        for limit in (None, 512, 96):
            plan = plan_batches(batch, devices, limit)
            assert plan.global_batch == batch
            assert limit is None or plan.per_device_batch <= limit
            assert plan.devices == devices
    assert plan_batches(4096, 1, 512).accum_freq == 8
    assert plan_batches(4096, 8, 512).accum_freq == 1
    assert plan_batches(90112, 64, 256).per_device_batch == 176  # 1408 per device = 8 x 176


def test_a_device_count_that_cannot_keep_the_batch_is_refused() -> None:
    with pytest.raises(ClipsiftError, match="4096 cannot be split evenly over 3 devices"):
        plan_batches(4096, 3)


def test_open_clip_args_carry_the_recipe_and_mixing_weights(tmp_path: Path) -> None:
    recipe = load_recipe("small")
    sources = [
        DataSource("/a", [f"/a/shards/{i:08d}.tar" for i in range(3)], 1.0),
        DataSource("/b", ["/b/shards/00000000.tar", "/b/shards/00000001.tar"], 2.0),
    ]
    args = open_clip_args(recipe, sources, tmp_path / "run", plan_batches(4096, 2, 512), Infra(devices=2), "cuda")
    value = lambda flag: args[args.index(flag) + 1]  # noqa: E731
    assert value("--train-data") == "/a/shards/{00000000..00000002}.tar::/b/shards/{00000000..00000001}.tar"
    assert value("--train-data-upsampling-factors") == "1.0::2.0"
    assert (value("--batch-size"), value("--accum-freq")) == ("512", "4")
    assert value("--train-num-samples") == str(12_800_000 // 5) and value("--epochs") == "5"
    assert (value("--lr"), value("--warmup"), value("--beta2"), value("--wd"), value("--eps")) == (
        "0.0005",
        "500",
        "0.98",
        "0.2",
        "1e-06",
    )
    assert value("--precision") == "amp" and value("--resume") == "latest"
    for flag in (
        "--dataset-resampled",
        "--local-loss",
        "--gather-with-grad",
        "--grad-checkpointing",
        "--save-most-recent",
    ):
        assert flag in args
    assert (value("--logs"), value("--name")) == (str(tmp_path), "run")


def test_bad_data_gives_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ClipsiftError, match="no such folder"):
        open_data(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClipsiftError, match="no .tar shards"):
        open_data(str(tmp_path / "empty"))
    (tmp_path / "no_txt" / "shards").mkdir(parents=True)
    with tarfile.open(tmp_path / "no_txt" / "shards" / "00000000.tar", "w") as tar:
        data = image_bytes()
        info = tarfile.TarInfo("k0.jpg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ClipsiftError, match="sample 'k0' has no txt member"):
        open_data(str(tmp_path / "no_txt"))
    broken = tmp_path / "broken"
    write_shard(str(broken), 0, [Sample(derive_uid("b"), image_bytes()[:40], "jpg", "a caption")])
    with pytest.raises(ClipsiftError, match=r"sample '00000000_00000000': undecodable image .*would drop it silently"):
        open_data(str(broken))
    good = tmp_path / "good"
    write_shard(str(good), 0, [Sample(derive_uid("y"), image_bytes(), "jpg", "a caption")])
    with pytest.raises(ClipsiftError, match="2 data workers but only 1 shards"):
        train("xs", [(str(good), 1.0)], str(tmp_path / "run"), infra=Infra(workers=2))
    (tmp_path / "stranger").mkdir()
    (tmp_path / "stranger" / "notes.txt").write_text("not a run")
    with pytest.raises(ClipsiftError, match="exists but is not a clipsift run"):
        train("xs", [(str(good), 1.0)], str(tmp_path / "stranger"))
    with pytest.raises(ClipsiftError, match="no --data"):
        train("xs", [], str(tmp_path / "run2"))


class Stopped(Exception):
    """Raised inside open_clip_train's epoch loop: the process would have been killed here."""


def stopped_in_epoch(number: int, train_one_epoch: Any) -> Any:
    """open_clip_train's train_one_epoch, raising Stopped when epoch `number` (1-based) starts."""
    calls: list[int] = []

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == number:
            raise Stopped
        return train_one_epoch(*args, **kwargs)

    return wrapped


def test_a_shortened_xs_schedule_trains_through_open_clip_train_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default test run's one training: the xs recipe cut to 10 steps (its other numbers kept) through the path
    every recipe takes (resharded data, open_clip_train in this process, checkpoints, run.json), stopped in its
    second pseudo-epoch and resumed by the same call. The whole recipe trains, and is SIGKILLed, in the slow
    tests."""
    import dataclasses

    import open_clip
    import open_clip_train.main as open_clip_main
    import torch

    import clipsift.train.launch as launch

    short = dataclasses.replace(load_recipe("xs"), samples_seen=640, epochs=2)  # 2 pseudo-epochs of 5 steps
    monkeypatch.setattr(launch, "load_recipe", lambda scale: short)
    synth_pool(str(tmp_path / "pool"), scale="xs", num_samples=256, shard_size=64, workers=1)
    write_subset(str(tmp_path / "subset.npy"), sort_subset(encode_uids(Pool(str(tmp_path / "pool")).uids())))
    data = reshard(
        str(tmp_path / "pool"), str(tmp_path / "subset.npy"), str(tmp_path / "shards"), shard_size=64, workers=1
    ).out
    run, threads = tmp_path / "run", torch.get_num_threads()
    with monkeypatch.context() as patch:  # stopped where a kill would leave it: epoch 1 saved, run.json "running"
        patch.setattr(open_clip_main, "train_one_epoch", stopped_in_epoch(2, open_clip_main.train_one_epoch))
        with pytest.raises(Stopped):
            train("xs", [(data, 1.0)], str(run))
    assert torch.get_num_threads() == threads  # the run's CPU thread choice does not leak into the caller
    assert json.loads((run / "run.json").read_text())["status"] == "running"
    assert torch.load(run / "checkpoints" / "epoch_latest.pt", map_location="cpu", weights_only=False)["epoch"] == 1
    result = train("xs", [(data, 1.0)], str(run))
    assert (result.samples_seen, result.epochs_done, result.resumed_from_epoch) == (640, 2, 1)
    assert "resuming checkpoint" in (run / "out.log").read_text()
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "complete" and record["samples_seen"] == 640 and record["recipe"]["samples_seen"] == 640
    assert record["data"][0]["subset_sha256"] == read_manifest(data)["subset_sha256"]
    losses, _ = parse_log(run / "out.log")
    assert len(losses) >= 10 and all(0 < loss < 10 for loss in losses)
    saved = torch.load(result.checkpoint, map_location="cpu", weights_only=False)
    assert saved["epoch"] == 2
    one, other = (open_clip.create_model("clipsift-xs").state_dict() for _ in range(2))
    fixed = [name for name, value in one.items() if torch.equal(value, other[name])]  # LayerNorms, logit scale...
    trained, _, _ = open_clip.create_model_and_transforms("clipsift-xs", pretrained=str(result.checkpoint))
    state = trained.state_dict()
    assert len(fixed) > 10 and "logit_scale" in fixed  # weights that start at the same value whatever the seed
    assert [name for name in fixed if torch.equal(state[name], one[name])] == []  # every one of them moved
    assert sum(losses[-3:]) < sum(losses[:3])  # and the loss went down


@pytest.mark.slow  # two xs trainings, one killed: about a minute
def test_xs_training_resumes_after_a_kill_and_loads(tmp_path: Path) -> None:
    """Kill the training process once its first pseudo-epoch is saved; the same command resumes."""
    import open_clip
    import torch

    synth_pool(str(tmp_path / "pool"), scale="xs", workers=1)
    uids = Pool(str(tmp_path / "pool")).uids()
    write_subset(
        str(tmp_path / "subset.npy"),
        sort_subset(encode_uids(pa.concat_arrays([uids.combine_chunks(), uids[:500].combine_chunks()]))),
    )
    reshard(str(tmp_path / "pool"), str(tmp_path / "subset.npy"), str(tmp_path / "shards"), shard_size=1024, workers=1)
    data = str(tmp_path / "shards")
    run = tmp_path / "run"
    command = ["train", "--scale", "xs", "--data", data, "--out", str(run)]
    first = clipsift_started(*command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = run / "checkpoints" / "epoch_latest.pt"
    deadline = time.time() + 400
    while not latest.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert latest.exists(), "the first pseudo-epoch never finished"
    assert torch.load(latest, map_location="cpu", weights_only=False)["epoch"] < 5
    assert json.loads((run / "run.json").read_text())["status"] == "running"

    threads = torch.get_num_threads()
    result = train("xs", [(data, 1.0)], str(run))
    assert torch.get_num_threads() == threads  # the run's CPU thread choice does not leak into the caller
    recipe = load_recipe("xs")
    assert result.resumed_from_epoch >= 1 and result.epochs_done == 5
    assert result.samples_seen == recipe.samples_seen
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "complete" and record["samples_seen"] == recipe.samples_seen
    assert record["recipe"]["model"] == "clipsift-xs" and record["non_standard"] == {}
    assert record["infrastructure"]["cpu_threads"] == max(
        1, len(os.sched_getaffinity(0)) - 1
    )  # cores left by 1 worker
    manifest = read_manifest(data)
    assert record["data"][0]["num_shards"] == 5 and manifest["num_samples"] == 4096 + 500
    assert (
        record["data"][0]["subset_sha256"] == manifest["subset_sha256"]
        and record["versions"]["open_clip"] == open_clip.__version__
    )
    assert "resuming checkpoint" in (run / "out.log").read_text()
    losses, speeds = parse_log(run / "out.log")
    assert len(losses) >= 40 and len(speeds) == len(losses) and result.samples_per_second > 0
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3  # it learns
    model, _, preprocess = open_clip.create_model_and_transforms("clipsift-xs", pretrained=str(result.checkpoint))
    assert model.visual.image_size in (32, (32, 32))


@pytest.mark.slow  # torchrun with two CPU ranks: about a minute
def test_two_devices_train_through_torchrun_with_the_recipes_global_batch(tmp_path: Path) -> None:
    """The multi-device path (torchrun, one process per device; gloo processes on a CPU machine)."""
    import open_clip

    synth_pool(str(tmp_path / "pool"), scale="xs", workers=1)
    write_subset(
        str(tmp_path / "subset.npy"), sort_subset(encode_uids(Pool(str(tmp_path / "pool")).uids().combine_chunks()))
    )
    data = reshard(
        str(tmp_path / "pool"), str(tmp_path / "subset.npy"), str(tmp_path / "shards"), shard_size=512, workers=1
    ).out
    result = train("xs", [(data, 1.0)], str(tmp_path / "run"), infra=Infra(devices=2))
    recipe = load_recipe("xs")
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["batch_plan"] == {
        "devices": 2,
        "per_device_batch": recipe.global_batch // 2,
        "accum_freq": 1,
        "global_batch": recipe.global_batch,
    }
    assert record["status"] == "complete" and result.samples_seen == recipe.samples_seen and result.epochs_done == 5
    log = (tmp_path / "run" / "out.log").read_text()
    assert "total 2" in log  # open_clip_train ran distributed over two processes
    losses, _ = parse_log(tmp_path / "run" / "out.log")
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    open_clip.create_model_and_transforms("clipsift-xs", pretrained=str(result.checkpoint))


@pytest.mark.slow  # three xs trainings: about 90 s
def test_the_same_seed_trains_to_the_same_weights(tmp_path: Path) -> None:
    """open_clip_train's sample shuffle is seeded (clipsift.train.shuffle), so a seed fixes the data order and,
    on a CPU, the weights bit for bit; another seed gives other weights."""
    import torch

    synth_pool(str(tmp_path / "pool"), scale="xs", workers=1)
    write_subset(
        str(tmp_path / "subset.npy"), sort_subset(encode_uids(Pool(str(tmp_path / "pool")).uids().combine_chunks()))
    )
    data = reshard(
        str(tmp_path / "pool"), str(tmp_path / "subset.npy"), str(tmp_path / "shards"), shard_size=512, workers=1
    ).out

    def weights(name: str, seed: int | None = None) -> list[torch.Tensor]:
        result = train("xs", [(data, 1.0)], str(tmp_path / name), infra=Infra(workers=2, seed=seed))
        return list(torch.load(result.checkpoint, map_location="cpu", weights_only=False)["state_dict"].values())

    first, again, other = weights("first"), weights("again"), weights("other", seed=1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    assert json.loads((tmp_path / "first" / "run.json").read_text())["sample_shuffle"].startswith("seeded")
