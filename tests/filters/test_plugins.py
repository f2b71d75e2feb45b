"""Users' own filters (filters/plugins.py): a plugin package built and installed here with pip (offline), named in
recipes as module:Class and by its entry point, run in-process and on a local Ray cluster, recorded in subset.json."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from clipsift.filters import plugins
from clipsift.filters.base import RecipeError
from clipsift.filters.metadata import Random
from clipsift.filters.recipe import _leaf_task, load_recipe
from clipsift.filters.subset import decode_uids, read_subset
from clipsift.pipeline.report import recorded_recipe

from conftest import REPO, clipsift, clipsift_started
from filter_support import build_pool, run, uids_of

DIST, VERSION = "clipsift-test-plugin", "1.2.3"
TEXTS = [
    "a cat",
    "a photo of a cat on a mat",
    "naïve café façade, 20 c",  # 23 code points, more UTF-8 bytes
    "dog",
    "a very long caption about a dog in a park",
    "exactly twenty chars",
    "nineteen characters",
    "",
    "a red car parked by the sea",
    "片假名のキャプションです、十文字以上",
    "tiny",
    "a bird on a wire above the road",
]

PYPROJECT = f"""
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "{DIST}"
version = "{VERSION}"

[project.entry-points."clipsift.filters"]
long_caption = "csplug.filters:LongCaption"
traced_caption = "csplug.filters:Traced"
random = "csplug.filters:LongCaption"

[tool.setuptools]
packages = ["csplug"]
"""

EXTRAS = """
import os
from pathlib import Path


@dataclass
class Traced(LongCaption):
    trace: str = ""  # a folder: each keep call leaves a file named by its process and shard

    def keep(self, state, data, rows):
        Path(self.trace, f"{os.getpid()}-{data.shard}").touch()
        return super().keep(state, data, rows)


@dataclass
class NoKeep(Filter):
    min_chars: int = 10


class Plain:
    pass
"""


def docs_example() -> str:
    """The ten-line filter of docs/filters.md ("Your own filter"): the plugin the tests install."""
    text = (REPO / "docs" / "filters.md").read_text()
    section = text[text.index("## Your own filter") :]
    return section[section.index("```python\n") + len("```python\n") : section.index("```\n", 10)]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The plugin package, built and installed into a folder of its own by pip (no index: nothing is downloaded)."""
    root = tmp_path_factory.mktemp("plugin")
    (root / "src" / "csplug").mkdir(parents=True)
    (root / "src" / "pyproject.toml").write_text(PYPROJECT)
    (root / "src" / "csplug" / "__init__.py").write_text("")
    (root / "src" / "csplug" / "filters.py").write_text(docs_example() + EXTRAS)
    target = root / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
        + ["--no-cache-dir", "--target", str(target), str(root / "src")],
        check=True,
        capture_output=True,
    )
    return target


@pytest.fixture
def installed(site: Path, monkeypatch) -> Path:
    """The plugin importable in this process; its modules and the entry point cache forgotten afterwards."""
    monkeypatch.syspath_prepend(str(site))
    _forget()
    yield site
    _forget()
    for name in [m for m in sys.modules if m == "csplug" or m.startswith("csplug.")]:
        del sys.modules[name]


def _forget() -> None:
    plugins.plugin_entry_points.cache_clear()
    plugins._LOADED.clear()


@pytest.fixture
def pool(tmp_path: Path):
    return build_pool(tmp_path / "pool", [{"text": text} for text in TEXTS], per_shard=5)


def longer(min_chars: int) -> list[str]:
    return uids_of(n for n, text in enumerate(TEXTS) if len(text) >= min_chars)


def test_a_plugin_named_as_module_class_or_by_entry_point_filters_and_is_recorded(installed, pool, tmp_path) -> None:
    with pytest.warns(
        UserWarning, match=r"entry point 'random' = .*\(clipsift-test-plugin 1.2.3\) has the name of a built-in"
    ):
        by_entry_point = run(pool, tmp_path, "steps: [{long_caption: {min_chars: 15}}]", "ep")
    by_class = run(pool, tmp_path, "steps: [{'csplug.filters:LongCaption': {min_chars: 15}}]", "cls")
    assert by_entry_point == by_class == longer(15) and 0 < len(longer(15)) < len(TEXTS)
    negated = run(pool, tmp_path, "steps: [no_filter, {not: csplug.filters:LongCaption}]", "not")  # default 20
    assert negated == sorted(set(uids_of(range(len(TEXTS)))) - set(longer(20)))

    module_sha = hashlib.sha256((installed / "csplug" / "filters.py").read_bytes()).hexdigest()
    info = json.loads((tmp_path / "ep.json").read_text())
    assert info["plugins"] == {
        "1": {
            "target": "csplug.filters:LongCaption",
            "entry_point": "long_caption",
            "distribution": DIST,
            "version": VERSION,
            "module_sha256": module_sha,
        }
    }
    assert info["steps"][0]["label"] == "long_caption(min_chars=15)"
    recorded = json.loads((tmp_path / "not.json").read_text())["plugins"]
    assert list(recorded) == ["2.1"] and recorded["2.1"]["entry_point"] is None
    assert (recorded["2.1"]["distribution"], recorded["2.1"]["version"]) == (DIST, VERSION)  # found from the module
    assert json.loads((tmp_path / "cls.json").read_text())["steps"][0]["kept"] == len(longer(15))
    assert recorded_recipe(info, str(tmp_path / "ep.json")).leaves()[0].filter.min_chars == 15  # the report's view

    assert isinstance(load_recipe_text(tmp_path, "steps: [{random: {fraction: 0.5}}]").filter, Random)  # built-in wins


def load_recipe_text(tmp_path: Path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return load_recipe(str(path)).leaves()[0]


@pytest.mark.parametrize(
    "step, message",
    [
        ("csplug.filters:Nope", r"filter 'csplug.filters:Nope': module 'csplug.filters' \(.*filters.py\) has no Nope"),
        ("csplug.filters:Plain", r"is <class 'csplug.filters.Plain'>, not a subclass of clipsift.filters.base.Filter"),
        ("csplug.filters:NoKeep", r"'csplug.filters:NoKeep': the class defines no keep\(state, data, rows\) method"),
        (
            "{long_caption: {min_chars: many}}",
            r"step 1 \(long_caption\): parameter 'min_chars' must be int, got 'many'",
        ),
        ("{long_caption: {min_chars: -1}}", r"step 1 \(long_caption\): min_chars must be >= 0"),
        ("{long_caption: {max_chars: 3}}", r"unknown parameter 'max_chars'; long_caption takes min_chars$"),
        (
            "nosuch_plugin_pkg.filters:F",
            r"step 1: filter 'nosuch_plugin_pkg.filters:F': cannot import module 'nosuch_plugin_pkg.filters' "
            r"\(No module named 'nosuch_plugin_pkg'\); is the package installed in this environment "
            r"\(and on every Ray node\)\?",
        ),
        (
            "long_captions",
            r"unknown filter 'long_captions'; known filters: .*; plugins: long_caption, traced_caption \(and",
        ),
        ("':LongCaption'", r"filter ':LongCaption': name your own filter class as module:Class"),
    ],
)
@pytest.mark.filterwarnings("ignore:entry point 'random'")
def test_a_bad_plugin_step_is_a_clear_recipe_error(installed, tmp_path, step: str, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        load_recipe_text(tmp_path, f"steps: [{step}]")


def test_a_module_that_fails_to_import_names_its_error(installed, tmp_path, monkeypatch) -> None:
    broken = tmp_path / "broken_plugin_mod.py"
    broken.write_text("import numpy\nraise ImportError('needs libfoo 2')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RecipeError, match=r"cannot import module 'broken_plugin_mod' \(needs libfoo 2\); is the"):
        load_recipe_text(tmp_path, "steps: [broken_plugin_mod:F]")


def test_a_worker_without_the_plugin_says_so_in_a_recipe_error(installed, pool, tmp_path, monkeypatch) -> None:
    """Per-shard tasks get a plugin's filter as bytes and rebuild it inside the task, where a missing package is a
    RecipeError naming the step (on Ray, map_shards re-raises it as it is) rather than Ray's argument error."""
    leaf = load_recipe_text(tmp_path, "steps: [{'csplug.filters:LongCaption': {min_chars: 20}}]")
    sent = plugins.shipped(leaf.filter, "step 1 (csplug.filters:LongCaption)")
    assert isinstance(sent, plugins.Shipped) and sent.filter() == leaf.filter
    first = pool.shard_ids()[0]
    kept = _leaf_task(pool, sent, None, None, str(tmp_path / "masks"), first)
    assert kept == len([t for t in TEXTS[:5] if len(t) >= 20])
    random = load_recipe_text(tmp_path, "steps: [{random: {fraction: 0.5}}]").filter
    assert plugins.shipped(random, "step 1 (random)") is random  # built-in filters travel as they are

    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(installed)])
    for name in ("csplug", "csplug.filters"):
        del sys.modules[name]
    with pytest.raises(
        RecipeError,
        match=r"step 1 \(csplug.filters:LongCaption\): csplug.filters:LongCaption cannot "
        r"be loaded on .* \(No module named 'csplug'\); is the package installed in this environment",
    ):
        _leaf_task(pool, sent, None, None, str(tmp_path / "masks"), first)


def test_clipsift_filters_lists_plugins_as_such(site: Path, monkeypatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(site))
    result = clipsift("filters")
    rows = {line.split()[0]: line for line in result.stderr.splitlines() if line.strip()}
    assert result.returncode == 0, result.stderr
    assert re.match(
        rf"long_caption +plugin {DIST} {VERSION} +Captions of at least min_chars characters", rows["long_caption"]
    )
    assert re.match(r"traced_caption +plugin ", rows["traced_caption"])
    assert re.match(r"random +built-in +a uniformly random share", rows["random"])  # not the plugin's entry point
    assert "entry point 'random' = 'csplug.filters:LongCaption'" in result.stderr  # the warning


def test_a_plugin_runs_on_ray_workers_that_get_it_from_pythonpath(site: Path, pool, tmp_path, monkeypatch) -> None:
    """As a user runs it: the package's folder on PYTHONPATH when the local cluster starts (its workers inherit the
    environment); two workers and no in-process budget, so every shard is a Ray task in another process."""
    trace = tmp_path / "trace"
    trace.mkdir()
    recipe = tmp_path / "ray.yaml"
    recipe.write_text(f"steps: [{{traced_caption: {{min_chars: 20, trace: {str(trace)!r}}}}}]")
    monkeypatch.setenv("PYTHONPATH", str(site))
    monkeypatch.setenv("CLIPSIFT_LOCAL_MAX_SECONDS", "0")
    out = tmp_path / "ray.npy"
    command = clipsift_started("filter", pool.url, "--recipe", str(recipe), "--out", str(out), "--workers", "2")
    try:
        _, stderr = command.communicate(timeout=120)
    finally:
        command.kill()
    assert command.returncode == 0, stderr
    assert sorted(decode_uids(read_subset(str(out)))) == longer(20)
    calls = [path.name.split("-", 1) for path in trace.iterdir()]
    assert sorted(shard for _, shard in calls) == pool.shard_ids()
    assert command.pid not in {int(pid) for pid, _ in calls}  # every shard ran in a Ray worker
    assert json.loads((tmp_path / "ray.json").read_text())["plugins"]["1"]["version"] == VERSION


AWKWARD = """
from dataclasses import dataclass

import pyarrow.compute as pc

from clipsift.filters.base import Filter


def lengths(data):
    return pc.utf8_length(data.column("text")).to_numpy(zero_copy_only=False)


@dataclass(slots=True, frozen=True)
class Slotted(Filter):
    min_chars: int = 20

    def keep(self, state, data, rows):
        return lengths(data) >= self.min_chars


@dataclass
class HoldsLambda(Filter):
    min_chars: int = 20

    def __post_init__(self):
        self.rule = lambda length: length >= self.min_chars

    def keep(self, state, data, rows):
        return self.rule(lengths(data))


@dataclass
class NamedByProperty(Filter):
    min_chars: int = 20

    @property
    def name(self):
        return "fixed"

    def keep(self, state, data, rows):
        return lengths(data) >= self.min_chars
"""


@pytest.fixture
def awkward(tmp_path: Path, monkeypatch) -> str:
    """A module of plugin classes that are hard to label or to pickle, importable as `awkward_plugin_mod`."""
    (tmp_path / "awkward_plugin_mod.py").write_text(AWKWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugins, "_LOADED", {})
    yield "awkward_plugin_mod"
    sys.modules.pop("awkward_plugin_mod", None)


def test_a_slotted_frozen_plugin_keeps_its_label_in_the_tasks(awkward, pool, tmp_path) -> None:
    """A @dataclass(slots=True, frozen=True) class pickles its fields only: the task's copy gets its label back."""
    target = f"{awkward}:Slotted"
    leaf = load_recipe_text(tmp_path, f"steps: [{{'{target}': {{min_chars: 15}}}}]")
    assert leaf.filter.name == target and leaf.label == f"{target}(min_chars=15)"
    rebuilt = plugins.shipped(leaf.filter, f"step 1 ({target})").filter()
    assert rebuilt == leaf.filter and rebuilt.name == target
    assert run(pool, tmp_path, f"steps: [{{'{target}': {{min_chars: 15}}}}]", "slotted") == longer(15)
    assert json.loads((tmp_path / "slotted.json").read_text())["plugins"]["1"]["target"] == target


def test_a_plugin_that_cannot_be_pickled_or_labelled_is_a_recipe_error(awkward, pool, tmp_path) -> None:
    target = f"{awkward}:HoldsLambda"
    with pytest.raises(
        RecipeError,
        match=rf"^step 1 \({target}\): {target} cannot be pickled for the per-shard tasks \(.*lambda.*\); a plugin "
        r"filter travels to them pickled, .* define functions and classes at module level",
    ):
        run(pool, tmp_path, f"steps: [{{'{target}': {{min_chars: 15}}}}]", "lambda")
    with pytest.raises(
        RecipeError,
        match=rf"step 1 \({awkward}:NamedByProperty\): cannot label the step '{awkward}:NamedByProperty' on a "
        rf"{awkward}.NamedByProperty \(.*no setter\); .* not a property",
    ):
        load_recipe_text(tmp_path, f"steps: ['{awkward}:NamedByProperty']")
