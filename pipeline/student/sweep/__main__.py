"""Ray Job entrypoint of `distill submit sweep`: `python -m pipeline.student.sweep [CONFIG] [--set ...]`.
A resubmitted sweep finishes where it stopped."""

import sys

from pipeline import storage
from pipeline.config.sweep import SweepConfig, load_sweep_config
from pipeline.entrypoint import run_entrypoint
from pipeline.student.sweep.driver import TUNER_FILE, run_sweep, sweep_dir_of


def _run(cfg: SweepConfig, args) -> None:
    tuner = storage.join(sweep_dir_of(cfg), TUNER_FILE)
    run_sweep(cfg, resume=storage.exists(tuner, cfg.train.storage) and not args.force, overwrite=args.force)


if __name__ == "__main__":
    sys.exit(run_entrypoint("sweep", SweepConfig, _run, load=load_sweep_config))
