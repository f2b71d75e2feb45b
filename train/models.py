"""Small CLIP model configs for the CPU scales, registered with open_clip by name.

`configs/models/<name>.json` holds open_clip model configs (embed_dim, vision_cfg, text_cfg);
`register_model_configs()` makes them usable everywhere open_clip takes a model name, including
`open_clip.create_model_and_transforms(name, pretrained=PATH)` and open_clip_train's `--model`.
"""

from __future__ import annotations

import json
from importlib.resources import files

MODEL_CONFIG_DIR = files("clipsift.configs") / "models"


def model_config_names() -> list[str]:
    return sorted(entry.name[: -len(".json")] for entry in MODEL_CONFIG_DIR.iterdir() if entry.name.endswith(".json"))


def register_model_configs() -> list[str]:
    """Register every config of configs/models with open_clip (idempotent); returns their names."""
    import open_clip

    known = set(open_clip.list_models())
    names = model_config_names()
    for name in names:
        if name not in known:
            open_clip.add_model_config(str(MODEL_CONFIG_DIR / f"{name}.json"))
    return names


def model_config(name: str) -> dict:
    return json.loads((MODEL_CONFIG_DIR / f"{name}.json").read_text())
