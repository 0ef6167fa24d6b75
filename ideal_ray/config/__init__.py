"""Typed configuration for every part of ideal-ray, in four modules: ``schema`` (the dataclasses), ``presets``
(named presets, ablation variants, :func:`load_config`), ``overrides`` (``a.b=c`` parsing, dict round trips) and
``validation`` (one sentence per wrong value). Everything is importable from here (``from ideal_ray.config import
load_config``). Standard library only: every layer may import it, and a job refuses a bad value before torch loads.
The offline stages (extraction, sampling, evaluation, sweeps) and the chain have configs too (``ExtractConfig`` ...
``PipelineConfig``), each with the presets ``paper`` and ``tiny`` (:data:`STAGE_PRESETS`, :func:`load_stage_config`).
"""
from ideal_ray.config.schema import (ARTrainConfig, AblationSweepConfig, CfgSweepConfig, ClassifierConfig, ConfigError,
                                     DataConfig, DiscriminatorConfig, DistributedConfig, ExtractConfig, FIDConfig,
                                     FeatureDecoderConfig, FusionConfig, GPTConfig, GPT_SIZES, GenEvalConfig,
                                     LossConfig, OptimConfig, PerfConfig, PipelineConfig, PixelDecoderConfig,
                                     QuantizerConfig, ReconEvalConfig, RunConfig, SampleConfig, SampleJobConfig,
                                     ScheduleConfig, SourceConfig, StageConfig, TokenDataConfig, TokenizerConfig,
                                     TokenizerTrainConfig, VFMConfig, flatten)
from ideal_ray.config.overrides import apply_overrides, from_dict, to_json
from ideal_ray.config.presets import (ABLATIONS, AR_PRESETS, PIPELINE_STAGES, PRESETS, STAGE_PRESETS, STUDIES,
                                      TINY_ABLATIONS, ar_preset, check_data_root, gpt_config, load_ar_config,
                                      load_config, load_stage_config, paper, preset_names, tiny)
from ideal_ray.config.validation import (BACKBONES, COMPILE_MODES, ENGINES, FUSION_MODES, LPIPS_NETS, LR_SCHEDULES,
                                         NAN_CHECKS, PRECISIONS, TAP_READOUTS, VFM_PLACEMENTS, get_key, validate,
                                         validate_ar, validate_engine_and_perf, validate_optim, validate_run_folder,
                                         validate_sample, validate_stage, validate_tokenizer, validate_training)

__all__ = [
    "ABLATIONS", "ARTrainConfig", "AR_PRESETS", "AblationSweepConfig", "BACKBONES", "COMPILE_MODES",
    "CfgSweepConfig", "ClassifierConfig", "ConfigError", "DataConfig", "DiscriminatorConfig", "DistributedConfig",
    "ENGINES", "ExtractConfig", "FIDConfig", "FUSION_MODES", "FeatureDecoderConfig", "FusionConfig", "GPTConfig",
    "GPT_SIZES", "GenEvalConfig", "LPIPS_NETS", "LR_SCHEDULES", "LossConfig", "NAN_CHECKS", "OptimConfig",
    "PIPELINE_STAGES", "PRECISIONS", "PRESETS", "PerfConfig", "PipelineConfig", "PixelDecoderConfig",
    "QuantizerConfig", "ReconEvalConfig", "RunConfig", "STAGE_PRESETS", "STUDIES", "SampleConfig",
    "SampleJobConfig", "ScheduleConfig", "SourceConfig", "StageConfig", "TAP_READOUTS", "TINY_ABLATIONS",
    "TokenDataConfig", "TokenizerConfig", "TokenizerTrainConfig", "VFMConfig", "VFM_PLACEMENTS", "apply_overrides",
    "ar_preset", "check_data_root", "flatten", "from_dict", "get_key", "gpt_config", "load_ar_config",
    "load_config", "load_stage_config", "paper", "preset_names", "tiny", "to_json", "validate", "validate_ar",
    "validate_engine_and_perf", "validate_optim", "validate_run_folder", "validate_sample", "validate_stage",
    "validate_tokenizer", "validate_training",
]
