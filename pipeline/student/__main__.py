"""Ray Job entrypoint for stage 2: `python -m pipeline.student [CONFIG] [--set ...] [--force]`.

A job submitted again (after a failure, or retried by KubeRay) resumes its run from the latest
checkpoint and does not retrain a finished one; `--force` starts the run over."""

import sys

from pipeline.config import TrainConfig
from pipeline.entrypoint import run_entrypoint
from pipeline.student.train.driver import run_train

if __name__ == "__main__":
    sys.exit(run_entrypoint("train", TrainConfig, lambda cfg, args: run_train(
        cfg, existing="overwrite" if args.force else "resume")))
