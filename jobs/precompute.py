"""Ray Job entrypoint for stage 1 (what `distill submit precompute` and the KubeRay RayJob run)."""

import sys

from jobs.entrypoint import run_entrypoint
from pipeline.config import PrecomputeConfig
from pipeline.teacher.plan import run_precompute

if __name__ == "__main__":
    sys.exit(run_entrypoint("precompute", PrecomputeConfig, lambda cfg, args: run_precompute(cfg, force=args.force)))
