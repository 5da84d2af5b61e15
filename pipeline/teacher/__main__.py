"""Ray Job entrypoint for stage 1: `python -m pipeline.teacher [CONFIG] [--set ...] [--force]`."""

import sys

from pipeline.config import PrecomputeConfig
from pipeline.entrypoint import run_entrypoint
from pipeline.teacher.precompute import run_precompute

if __name__ == "__main__":
    sys.exit(run_entrypoint("precompute", PrecomputeConfig, lambda cfg, args: run_precompute(cfg, force=args.force)))
