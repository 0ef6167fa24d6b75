"""Typed configuration for every part of ideal-ray, in four modules: ``schema`` (the dataclasses), ``presets``
(named presets, ablation variants, :func:`load_config`), ``overrides`` (``a.b=c`` parsing, dict round trips) and
``validation`` (one sentence per wrong value). Everything is importable from here (``from ideal_ray.config import
load_config``). Standard library only: every layer may import it, and a job refuses a bad value before torch loads.
"""
from ideal_ray.config.schema import (ARTrainConfig, ConfigError, DataConfig, DiscriminatorConfig, DistributedConfig,
                                     FeatureDecoderConfig, FusionConfig, GPTConfig, GPT_SIZES, LossConfig, OptimConfig,
                                     PerfConfig, PixelDecoderConfig, QuantizerConfig, SampleConfig, ScheduleConfig,
                                     StageConfig, TokenDataConfig, TokenizerConfig, TokenizerTrainConfig, VFMConfig,
                                     flatten)
from ideal_ray.config.overrides import apply_overrides, from_dict, to_json
from ideal_ray.config.presets import (ABLATIONS, AR_PRESETS, PRESETS, TINY_ABLATIONS, ar_preset, check_data_root,
                                      gpt_config, load_ar_config, load_config, paper, preset_names, tiny)
from ideal_ray.config.validation import (BACKBONES, COMPILE_MODES, ENGINES, FUSION_MODES, LPIPS_NETS, LR_SCHEDULES,
                                         NAN_CHECKS, PRECISIONS, TAP_READOUTS, VFM_PLACEMENTS, validate, validate_ar,
                                         validate_engine_and_perf, validate_optim, validate_run_folder,
                                         validate_sample, validate_tokenizer, validate_training)

__all__ = [
    "ABLATIONS", "ARTrainConfig", "AR_PRESETS", "BACKBONES", "COMPILE_MODES", "ConfigError", "DataConfig",
    "DiscriminatorConfig", "DistributedConfig", "ENGINES", "FUSION_MODES", "FeatureDecoderConfig", "FusionConfig",
    "GPTConfig", "GPT_SIZES", "LPIPS_NETS", "LR_SCHEDULES", "LossConfig", "NAN_CHECKS", "OptimConfig",
    "PRECISIONS", "PRESETS", "PerfConfig", "PixelDecoderConfig", "QuantizerConfig", "SampleConfig",
    "ScheduleConfig", "StageConfig", "TAP_READOUTS", "TINY_ABLATIONS", "TokenDataConfig", "TokenizerConfig",
    "TokenizerTrainConfig", "VFMConfig", "VFM_PLACEMENTS", "apply_overrides", "ar_preset", "check_data_root",
    "flatten", "from_dict", "gpt_config", "load_ar_config", "load_config", "paper", "preset_names", "tiny",
    "to_json", "validate", "validate_ar", "validate_engine_and_perf", "validate_optim", "validate_run_folder",
    "validate_sample", "validate_tokenizer", "validate_training",
]
