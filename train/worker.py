"""torchrun entry point: register clipsift's model configs, then run open_clip_train with the
arguments recorded in the run's run.json (`python -m clipsift.train.worker RUN/run.json`)."""

import json
import sys

import torch

from clipsift.train.models import open_clip_module, register_model_configs
from clipsift.train.shuffle import seeded_sample_shuffle


class _CpuDistributedDataParallel(torch.nn.parallel.DistributedDataParallel):
    """open_clip_train passes device_ids=[device] to DDP, which DDP refuses for CPU modules: drop them
    there, so that several gloo processes on a CPU machine run the same multi-device path as GPUs."""

    def __init__(self, module: torch.nn.Module, device_ids=None, **kwargs) -> None:
        if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
            device_ids = None
        super().__init__(module, device_ids=device_ids, **kwargs)


if __name__ == "__main__":
    open_clip_module()  # before open_clip_train imports it (see train/models.py)
    with open(sys.argv[1], encoding="utf-8") as f:
        args = json.load(f)["open_clip_train_args"]
    register_model_configs(args[args.index("--model") + 1])
    from open_clip_train.main import main

    if args[args.index("--device") + 1] == "cpu":
        torch.nn.parallel.DistributedDataParallel = _CpuDistributedDataParallel
    with seeded_sample_shuffle():
        status = main(args) or 0
    sys.exit(status)
