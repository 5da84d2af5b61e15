"""`distill sweep`: many students from one cache in one Ray Tune run (`driver`), each trial (`trial`)
the train loop in Tune's process or a Ray Train run, the sweep folder's outputs (`results`) and its
console lines (`progress`).

Names resolve on first use, so importing a submodule does not import Ray Tune. `Progress` (and the
`_say` it pickles as its log) stay reachable here because sweeps saved before they moved pickled
them by this module's path."""

from __future__ import annotations

from typing import Any

_EXPORTS = {"run_sweep": "driver", "trial_mode": "driver", "sweep_dir_of": "driver", "SweepResult": "driver",
            "Progress": "progress", "_say": "progress"}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
