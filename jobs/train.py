"""Ray Job entrypoint for stage 2 (what `distill submit train` and the KubeRay RayJob run)."""

import sys

from jobs.entrypoint import run_entrypoint
from pipeline.config import TrainConfig
from pipeline.student.trainer import run_train

if __name__ == "__main__":
    sys.exit(run_entrypoint("train", TrainConfig, lambda cfg, args: run_train(cfg, overwrite=True)))
