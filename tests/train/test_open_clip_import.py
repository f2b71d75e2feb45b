"""open_clip imported without transformers and timm (train/models.py), and put back for a model that needs them.
The case runs in a new process: what a process has imported is the point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

# a timm vision tower (vit_tiny, random weights: nothing is downloaded) with a small native text tower
TIMM_TOWER = {
    "embed_dim": 64,
    "vision_cfg": {
        "timm_model_name": "vit_tiny_patch16_224",
        "timm_model_pretrained": False,
        "timm_pool": "token",
        "timm_proj": "linear",
        "image_size": 224,
    },
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 96, "heads": 3, "layers": 2},
}

CODE = """
import sys, torch
from clipsift.train.models import open_clip_module, register_model_configs
register_model_configs("clipsift-xs")
oc = open_clip_module()
model = oc.create_model("clipsift-xs")
features = model.encode_text(oc.get_tokenizer("clipsift-xs")(["a red square"]))
print("shipped:", tuple(features.shape), "transformers" in sys.modules, "timm" in sys.modules)
oc.add_model_config(CONFIG)
try:  # made without naming it first: open_clip fails as it does without timm
    oc.create_model("timm-tower")
except RuntimeError as err:
    print("refused:", "timm" in str(err))
register_model_configs("timm-tower")
model = oc.create_model("timm-tower")
features = model.encode_image(torch.zeros(1, 3, 224, 224))
print("named:", type(model.visual).__name__, tuple(features.shape), "timm" in sys.modules)
"""


def test_shipped_models_need_no_transformers_or_timm_and_a_timm_tower_gets_timm_back(tmp_path: Path) -> None:
    config = tmp_path / "timm-tower.json"
    config.write_text(json.dumps(TIMM_TOWER))
    code = CODE.replace("CONFIG", repr(str(config)))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-3:] == [
        "shipped: (1, 64) False False",
        "refused: True",
        "named: TimmModel (1, 64) True",
    ]
