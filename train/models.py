"""Small CLIP model configs for the CPU scales, registered with open_clip by name, and how open_clip is imported.

`configs/models/<name>.json` holds open_clip model configs (embed_dim, vision_cfg, text_cfg);
`register_model_configs()` makes them usable everywhere open_clip takes a model name, including
`open_clip.create_model_and_transforms(name, pretrained=PATH)` and open_clip_train's `--model`.
clipsift imports open_clip through `open_clip_module()` (without transformers and timm, see OPTIONAL)
and names the models it is about to make to `register_model_configs(arch)`.
"""

from __future__ import annotations

import importlib
import json
import sys
from importlib.resources import files
from types import ModuleType

MODEL_CONFIG_DIR = files("clipsift.configs") / "models"

# open_clip imports transformers (HF text towers, CoCa's generation) and timm (timm vision towers) when they are
# installed, about 2 s of every scoring, training and evaluation process on 2 cores (7.3 s -> 5.4 s for `import
# open_clip`), although no model this project ships or DataComp trains uses them. `open_clip_module` leaves them
# out of the import; `register_model_configs(arch)` puts them back for a model that needs them.
OPTIONAL = ("transformers", "timm")
_WITH_OPTIONAL = ("open_clip.hf_model", "open_clip.timm_model", "open_clip.coca_model")  # what reads them on import
_state = {"lite": False}


class _LeaveOut:
    """A finder that makes the OPTIONAL packages look absent while it is installed."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name.partition(".")[0] in OPTIONAL:
            raise ModuleNotFoundError(f"No module named {name!r} (left out of open_clip's import)", name=name)


def open_clip_module() -> ModuleType:
    """`import open_clip`, the first time without transformers and timm (see OPTIONAL) unless this process has
    them already. torch and torchvision are imported first, so that only open_clip's own modules see them
    missing (and fall back as they do when the packages are not installed)."""
    if "open_clip" in sys.modules:
        return sys.modules["open_clip"]
    import torch  # noqa: F401
    import torchvision  # noqa: F401

    lite = not any(name in sys.modules for name in OPTIONAL)
    finder = _LeaveOut()
    if lite:
        sys.meta_path.insert(0, finder)
    try:
        import open_clip
    finally:
        if lite:
            sys.meta_path.remove(finder)
    _state["lite"] = lite
    return open_clip


def needs_optional(arch: str) -> bool:
    """Whether model `arch` needs transformers or timm: an HF hub id, a timm vision tower, an HF text tower or
    tokenizer, a CoCa decoder."""
    if arch.startswith("hf-hub:"):
        return True
    config = open_clip_module().get_model_config(arch) or {}
    vision, text = config.get("vision_cfg", {}), config.get("text_cfg", {})
    return bool(
        vision.get("timm_model_name")
        or text.get("hf_model_name")
        or text.get("hf_tokenizer_name")
        or "multimodal_cfg" in config
    )


def _with_optional() -> None:
    """Import transformers and timm after all and run again the open_clip modules that read them on import (their
    classes look those names up at run time, so models made from them work from now on)."""
    if not _state["lite"]:
        return
    for name in OPTIONAL:
        try:
            importlib.import_module(name)
        except ImportError:  # not installed: open_clip says so when a model needs it
            pass
    for name in _WITH_OPTIONAL:
        importlib.reload(sys.modules[name])
    _state["lite"] = False


def model_config_names() -> list[str]:
    return sorted(entry.name[: -len(".json")] for entry in MODEL_CONFIG_DIR.iterdir() if entry.name.endswith(".json"))


def register_model_configs(*archs: str) -> list[str]:
    """Register every config of configs/models with open_clip (idempotent), and make sure that the models `archs`
    about to be made have the optional packages they need (`open_clip_module`); returns the configs' names."""
    open_clip = open_clip_module()
    known = set(open_clip.list_models())
    names = model_config_names()
    for name in names:
        if name not in known:
            open_clip.add_model_config(str(MODEL_CONFIG_DIR / f"{name}.json"))
    if any(needs_optional(arch) for arch in archs):
        _with_optional()
    return names


def model_config(name: str) -> dict:
    return json.loads((MODEL_CONFIG_DIR / f"{name}.json").read_text())
