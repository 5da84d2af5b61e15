"""Ray Job entrypoint for stage 2: `python -m pipeline.student [CONFIG] [--set ...]`."""

import sys

from pipeline.config import TrainConfig
from pipeline.entrypoint import run_entrypoint
from pipeline.student.run import run_train

if __name__ == "__main__":
    sys.exit(run_entrypoint("train", TrainConfig, lambda cfg, args: run_train(cfg, overwrite=True)))
