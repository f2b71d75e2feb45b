"""torchrun entry point: register clipsift's model configs, then run open_clip_train."""

import sys

from open_clip_train.main import main

from clipsift.train.models import register_model_configs

if __name__ == "__main__":
    register_model_configs()
    sys.exit(main(sys.argv[1:]) or 0)
