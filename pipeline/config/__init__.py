"""Typed configs for the two stages (pydantic), loaded from YAML and validated before any Ray work.

One module per concern: `base` (shared parts), `source` (source kinds), `precompute` (stage 1,
logits modes), `train` (stage 2), `load` (YAML, overrides, error messages). The names below are
the public surface.
"""

from pipeline.config.base import PRIMARY_TEACHER, JobOptions, ModelSpec, StorageOptions
from pipeline.config.load import AnyConfig, apply_overrides, load_config, load_precompute_config, load_train_config
from pipeline.config.precompute import (
    LOGITS_MODES,
    FitConfig,
    FullLogits,
    LogitsOutput,
    OutputsConfig,
    PrecomputeConfig,
    SampledLogits,
    TapOutput,
    TeacherConfig,
    TeacherSequences,
    TopkLogits,
    ViewsOutput,
)
from pipeline.config.source import (
    DigitsSource,
    MnistSource,
    ParquetSource,
    Source,
    TextSource,
    TokenizerConfig,
    parse_source,
)
from pipeline.config.train import KNOWN_LOSS_TERMS, LossConfig, OptimizerConfig, RkdOptions, TapMatch, TrainConfig

__all__ = [
    "PRIMARY_TEACHER", "JobOptions", "ModelSpec", "StorageOptions", "AnyConfig", "apply_overrides", "load_config",
    "load_precompute_config", "load_train_config", "LOGITS_MODES", "FitConfig", "FullLogits", "LogitsOutput",
    "OutputsConfig", "PrecomputeConfig", "SampledLogits", "TapOutput", "TeacherConfig", "TeacherSequences", "TopkLogits",
    "ViewsOutput",
    "DigitsSource", "MnistSource", "ParquetSource", "Source", "TextSource", "TokenizerConfig", "parse_source", "KNOWN_LOSS_TERMS",
    "LossConfig", "OptimizerConfig", "RkdOptions", "TapMatch", "TrainConfig",
]
