"""Users' own filters (plugins): a Filter subclass in the user's own package, named in a recipe.

A recipe names one as `module:Class` (`- mypkg.filters:LongCaption: {min_chars: 20}`) or by the name of an entry
point of the group `clipsift.filters` that the package declares (`long_caption = "mypkg.filters:LongCaption"`).
The class is a typed dataclass subclassing `clipsift.filters.base.Filter`, checked and built by `make_filter` like a
built-in filter. Its steps run per shard like a built-in's (on Ray the filter instance is pickled by reference to
its class, so the package must be importable on every Ray node), and subset.json records, per step, the class, the
distribution that installed it with its version (importlib.metadata), and the sha256 of the class's module file.

Names: a built-in filter's name wins over an entry point of the same name, with a warning (the plugin stays usable
as `module:Class`), so a recipe naming a built-in means the same filter whatever is installed. Entry points are
read once per process, when a recipe first names a filter that is not built in (or when filters are listed).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import pickle
import socket
import warnings
from dataclasses import dataclass
from importlib.metadata import EntryPoint, PackageNotFoundError, entry_points, files, packages_distributions, version
from pathlib import Path
from typing import Any

from clipsift.filters.base import Filter, RecipeError

GROUP = "clipsift.filters"
INSTALL_HINT = "is the package installed in this environment (and on every Ray node)?"


@dataclass(frozen=True)
class Plugin:
    """A plugin filter class and where it came from."""

    cls: type[Filter]
    target: str  # "module:Class"
    entry_point: str | None  # the entry point's name, None when the recipe named module:Class
    distribution: str | None  # None: the module is on sys.path without installed metadata
    version: str | None
    module_sha256: str | None  # of the file defining the class: tells edited code apart at one version

    def record(self) -> dict[str, Any]:
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self) if field.name != "cls"}


_LOADED: dict[str, Plugin] = {}  # by the name a recipe used


@functools.cache
def plugin_entry_points() -> dict[str, list[EntryPoint]]:
    """The group's entry points by name, read once; names of built-in filters are dropped with a warning."""
    from clipsift.filters.registry import known_filters

    builtins = known_filters()
    found: dict[str, list[EntryPoint]] = {}
    for point in entry_points(group=GROUP):
        if point.name in builtins:
            warnings.warn(
                f"entry point {point.name!r} = {point.value!r} ({_dist_label(point)}) has the name of a built-in "
                f"filter, which wins; name the plugin in a recipe as {point.value}",
                stacklevel=2,
            )
            continue
        found.setdefault(point.name, []).append(point)
    return found


def plugin(name: str, where: str) -> Plugin | None:
    """The plugin a recipe's filter name refers to (imported once), or None when no entry point has the name."""
    if name not in _LOADED:
        if ":" in name:
            _LOADED[name] = _load(name, None, None, where)
        else:
            points = plugin_entry_points().get(name)
            if not points:
                return None
            if len(points) > 1:
                owners = ", ".join(f"{p.value} ({_dist_label(p)})" for p in points)
                raise RecipeError(
                    f"{where}: filter {name!r} is an entry point of several installed packages: {owners}; "
                    "name the one you mean as module:Class"
                )
            (point,) = points
            dist = point.dist
            _LOADED[name] = _load(point.value, point.name, (dist.name, dist.version) if dist else None, where)
    return _LOADED[name]


def plugin_of(instance: Filter) -> Plugin | None:
    """The plugin a step's filter was made from, None for a built-in filter."""
    found = _LOADED.get(instance.name)
    return found if found is not None and type(instance) is found.cls else None


def plugin_record(instance: Filter) -> dict[str, Any] | None:
    """What subset.json records of a step's filter: its plugin's provenance, None for a built-in filter."""
    found = plugin_of(instance)
    return found.record() if found is not None else None


@dataclass(frozen=True)
class Shipped:
    """A plugin filter as pickled bytes, for per-shard tasks: rebuilt inside the task, so that a Ray worker without
    the plugin's package fails with a RecipeError saying so (Ray reports an argument it cannot unpickle as its own
    system error, which names no step and gives no hint)."""

    where: str
    target: str
    data: bytes
    name: str  # the step's label (`label`): a frozen slotted dataclass pickles its fields only

    def filter(self) -> Filter:
        try:
            instance = pickle.loads(self.data)
        except (ImportError, AttributeError) as err:  # no such module; a version of it without the class
            host = socket.gethostname()
            raise RecipeError(
                f"{self.where}: {self.target} cannot be loaded on {host} ({err}); {INSTALL_HINT}"
            ) from err
        label(instance, self.name, self.where)
        return instance


def shipped(instance: Filter, where: str) -> Filter | Shipped:
    """What a per-shard task gets of a step's filter: a plugin's as Shipped, a built-in one as it is."""
    found = plugin_of(instance)
    if found is None:
        return instance
    try:
        data = pickle.dumps(instance, protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, TypeError, AttributeError) as err:  # a lambda, a local class, an open file, a lock
        raise RecipeError(
            f"{where}: {found.target} cannot be pickled for the per-shard tasks ({err}); a plugin filter travels to "
            "them pickled, so its instance may hold only picklable values: define functions and classes at module "
            "level, not as lambdas or inside methods, and open files, locks or clients inside keep()"
        ) from err
    return Shipped(where, found.target, data, instance.name)


def label(instance: Filter, name: str, where: str) -> None:
    """Label a plugin step's filter with the name the recipe gives it (its `name`, which describe(), plugin_of and
    messages read); a class whose instances cannot take that attribute is a RecipeError saying what to do."""
    if getattr(instance, "name", None) == name:
        return
    try:
        object.__setattr__(instance, "name", name)  # object's: a frozen dataclass too
    except AttributeError as err:  # `name` a property without a setter, or instances without a __dict__
        cls = type(instance)
        raise RecipeError(
            f"{where}: cannot label the step {name!r} on a {cls.__module__}.{cls.__qualname__} ({err}); clipsift "
            "sets the `name` of a plugin step's filter to the name the recipe uses, so leave `name` a plain class "
            "attribute (or undefined), not a property, and give the class no __slots__ that leave out __dict__"
        ) from None


def _load(target: str, entry_point: str | None, dist: tuple[str, str] | None, where: str) -> Plugin:
    """Import `module:Class` and check that it is a filter class."""
    module_name, _, qualname = target.partition(":")
    if not module_name or not qualname:
        raise RecipeError(f"{where}: filter {target!r}: name your own filter class as module:Class")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise RecipeError(
            f"{where}: filter {target!r}: cannot import module {module_name!r} ({err}); {INSTALL_HINT}"
        ) from err
    cls: Any = module
    for part in qualname.split("."):
        cls = getattr(cls, part, None)
    if cls is None:
        raise RecipeError(f"{where}: filter {target!r}: module {module_name!r} ({module.__file__}) has no {qualname}")
    _check_class(cls, target, where)
    if dist is None:
        dist = _distribution(module)
    file = getattr(module, "__file__", None)
    digest = hashlib.sha256(Path(file).read_bytes()).hexdigest() if file and Path(file).is_file() else None
    return Plugin(cls, target, entry_point, *(dist or (None, None)), digest)


def _check_class(cls: Any, target: str, where: str) -> None:
    here = f"{where}: filter {target!r}"
    if not (isinstance(cls, type) and issubclass(cls, Filter)):
        raise RecipeError(f"{here} is {cls!r}, not a subclass of clipsift.filters.base.Filter")
    if not dataclasses.is_dataclass(cls):
        raise RecipeError(f"{here}: decorate the class with @dataclass (its fields are the filter's parameters)")
    if cls.keep is Filter.keep:
        raise RecipeError(f"{here}: the class defines no keep(state, data, rows) method")


def _distribution(module: Any) -> tuple[str, str] | None:
    """(name, version) of the installed distribution that holds the module, None when it is not from one."""
    top = module.__name__.split(".")[0]
    names = packages_distributions().get(top, [])
    if len(names) > 1:  # a namespace package: the distribution whose files hold this module
        path = module.__name__.replace(".", "/")
        names = [n for n in names if any(str(f).startswith(path) for f in files(n) or [])]
    if len(names) != 1:
        return None
    try:
        return names[0], version(names[0])
    except PackageNotFoundError:
        return None


def _dist_label(point: EntryPoint) -> str:
    return f"{point.dist.name} {point.dist.version}" if point.dist else "unknown package"


@dataclass(frozen=True)
class Listed:
    """One line of `clipsift filters`."""

    name: str
    source: str  # "built-in" or the plugin's distribution and version
    summary: str


def listed_filters() -> list[Listed]:
    """Built-in filters, then plugins by entry point (a plugin that fails to load shows its error as summary)."""
    from clipsift.filters.registry import known_filters

    rows = [Listed(name, "built-in", cls.summary) for name, cls in sorted(known_filters().items())]
    for name in sorted(plugin_entry_points()):
        where = f"entry point {name!r}"
        try:
            found = plugin(name, where)
            source = f"plugin {found.distribution or '?'} {found.version or ''}".rstrip()
            summary = found.cls.summary or (found.cls.__doc__ or "").strip().split("\n")[0]
        except RecipeError as err:
            source, summary = "plugin (broken)", str(err)
        rows.append(Listed(name, source, summary))
    return rows
