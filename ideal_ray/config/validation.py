"""Validation: one clear sentence for the first wrong value, before any model is built or cluster time is spent."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Tuple

from ideal_ray.config.overrides import _show
from ideal_ray.config.schema import (AblationSweepConfig, ARTrainConfig, CfgSweepConfig, ClassifierConfig, ConfigError,
                                     DistributedConfig, ExtractConfig, FIDConfig, GenEvalConfig, OptimConfig,
                                     PerfConfig, PipelineConfig, ReconEvalConfig, RunConfig, SampleConfig,
                                     SampleJobConfig,
                                     SourceConfig, TokenizerConfig, TokenizerTrainConfig)
from ideal_ray.storage import is_uri


# ---------------------------------------------------------------------------------------- validation
BACKBONES = ("siglip2", "dinov2", "dinov3", "tiny")
FUSION_MODES = ("attention", "linear", "none")
LPIPS_NETS = ("vgg", "alex", "squeeze")
PRECISIONS = ("bf16", "fp32")
LR_SCHEDULES = ("cosine", "constant")
VFM_PLACEMENTS = ("trainer", "data")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray Train ScalingConfig's
ENGINES = ("deepspeed", "torch")
NAN_CHECKS = ("after_backward", "before_backward")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
TAP_READOUTS = ("add_cls", "cls_token")


def _check(ok: bool, sentence: str) -> None:
    if not ok:
        raise ConfigError(sentence)


def _positive(key: str, v: Any, note: str = "") -> None:
    _check(v > 0, f"{key}={_show(v)} must be positive{note}.")


def _non_negative(key: str, v: Any, note: str = "") -> None:
    _check(v >= 0, f"{key}={_show(v)} cannot be negative{note}.")


def _at_least_one(key: str, v: int, note: str = "") -> None:
    _check(v >= 1, f"{key}={v} must be at least 1{note}.")


def _fraction(key: str, v: float, upper_open: bool = False) -> None:
    """A probability or decay: in [0, 1], or [0, 1) with ``upper_open``."""
    _check(0 <= v < 1 if upper_open else 0 <= v <= 1, f"{key}={v} must be in [0, 1{')' if upper_open else ']'}.")


def _non_empty(key: str, v: str, example: str) -> None:
    _check(bool(v and v.strip()), f"{key} is empty; pass {example}.")


def _require_finite(node: Any, prefix: str = "") -> None:
    """Every float of a (nested) config is a finite number: no field of ours has a use for inf or NaN (a NaN even
    passes comparisons like ``lr > 0`` unnoticed), so a non-finite one is refused before any other check."""
    for f in dataclasses.fields(node):
        v, key = getattr(node, f.name), prefix + f.name
        if dataclasses.is_dataclass(v):
            _require_finite(v, key + ".")
            continue
        if any(isinstance(x, float) and not math.isfinite(x) for x in (v if isinstance(v, (tuple, list)) else (v,))):
            example = "" if f.default is dataclasses.MISSING else f", e.g. {key}={_show(f.default)}"
            raise ConfigError(f"{key}={_show(v)} is not a finite number; give it a finite value{example}.")


def validate_run_folder(name: str, output_dir: str) -> None:
    """A stage's run folder is ``output_dir/name``: ``name`` must be one folder name, so the run stays inside
    ``output_dir`` (``..`` or ``a/b`` would put its checkpoints, records and exports somewhere else)."""
    _non_empty("name", name, "a run name, e.g. name=my-run")
    _check(name not in (".", "..") and not any(c in name for c in "/\\\0"),
           f"name={name} is not a single folder name (the run folder output_dir/name would lie outside output_dir); "
           f"pass a plain name like name=my-run and choose where runs go with output_dir.")
    _non_empty("output_dir", output_dir, "the folder runs are written under, e.g. output_dir=runs")
    _check(not is_uri(output_dir),
           f"output_dir={output_dir} is an object-store URI, but the run's exports, log and MLflow store are written "
           f"there as files; pass a local or shared folder (the checkpoints go to a bucket with "
           f"dist.storage_path={output_dir}).")


def _local_outputs(cfg: Any) -> None:
    """Every output path of a stage config (its ``OUTPUTS``) is a local or shared folder, except those the stage
    writes to an object store itself (``STORE_OUTPUTS``): a URI given to ``os.makedirs`` would become a local
    folder named ``s3:``, the results silently kept on this machine."""
    for key in getattr(cfg, "OUTPUTS", ()):
        value = get_key(cfg, key)
        _check(key in getattr(cfg, "STORE_OUTPUTS", ()) or not is_uri(value),
               f"{key}={value} is an object-store URI, but this stage writes {key} as local files; pass a local or "
               f"shared folder (a bucket takes the training stages' checkpoints, dist.storage_path, and extraction's "
               f"token shards, out).")


def validate_optim(o: OptimConfig, global_batch: int) -> None:
    """The optimizer and its learning-rate schedule, for every training stage."""
    _positive("optim.lr", o.lr)
    _check(o.lr_schedule in LR_SCHEDULES,
           f"optim.lr_schedule '{o.lr_schedule}' is unknown; choose one of {LR_SCHEDULES}.")
    _check(o.precision in PRECISIONS, f"optim.precision '{o.precision}' is unknown; choose one of {PRECISIONS}.")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
           f"optim.betas={_show(o.betas)} must be two values in [0, 1), e.g. optim.betas=0.9,0.95.")
    _non_negative("optim.weight_decay", o.weight_decay)
    _non_negative("optim.warmup_start_lr", o.warmup_start_lr)
    _non_negative("optim.min_lr", o.min_lr)
    _non_negative("optim.base_batch", o.base_batch, " (0 turns linear lr scaling off)")
    if o.lr_schedule == "cosine":
        peak = o.lr * (max(1.0, global_batch / o.base_batch) if o.base_batch else 1.0)
        _check(o.min_lr <= peak, f"optim.min_lr={o.min_lr} is above the peak learning rate {peak:g}; lower "
               f"optim.min_lr or raise optim.lr.")
    _non_negative("optim.warmup_epochs", o.warmup_epochs)
    _non_negative("optim.epochs", o.epochs)
    _check(o.warmup_epochs <= o.epochs,
           f"optim.warmup_epochs={o.warmup_epochs} is longer than optim.epochs={o.epochs}.")
    _non_negative("optim.grad_clip", o.grad_clip, " (0 turns clipping off)")
    _fraction("optim.ema_decay", o.ema_decay, upper_open=True)
    _non_negative("optim.seed", o.seed)


def validate_training(cfg: Any, zero_note: str) -> None:
    """What every training stage's config (tokenizer, AR) shares: run folder, optimizer, schedule, batch over the
    workers, the Ray Train / DeepSpeed settings and the speed levers. ``zero_note``: why ZeRO-3 is not offered."""
    o, s, t = cfg.optim, cfg.schedule, cfg.dist
    validate_run_folder(cfg.name, cfg.output_dir)
    _at_least_one("data.global_batch", cfg.data.global_batch)
    validate_optim(o, cfg.data.global_batch)
    _non_negative("schedule.steps", s.steps, " (0 derives the run's length from optim.epochs)")
    _check(s.steps > 0 or o.epochs > 0,
           "optim.epochs=0 and schedule.steps=0 give a run of no steps; set schedule.steps or optim.epochs.")
    for k in ("steps_per_epoch", "log_every", "ckpt_every", "vis_every"):
        _at_least_one(f"schedule.{k}", getattr(s, k))
    _at_least_one("dist.num_workers", t.num_workers)
    _check(cfg.data.global_batch % t.num_workers == 0,
           f"data.global_batch {cfg.data.global_batch} does not divide evenly over dist.num_workers {t.num_workers}; "
           f"choose a global batch that is a multiple of the worker count.")
    _check(t.zero_stage in (0, 1, 2), f"dist.zero_stage {t.zero_stage} is not supported (0, 1 or 2): {zero_note}.")
    _positive("dist.cpus_per_worker", t.cpus_per_worker)
    _non_negative("dist.max_failures", t.max_failures)
    _at_least_one("dist.keep_checkpoints", t.keep_checkpoints)
    _at_least_one("dist.max_bad_steps", t.max_bad_steps)
    _non_negative("dist.prefetch_batches", t.prefetch_batches)
    _check(t.placement_strategy in PLACEMENT_STRATEGIES,
           f"dist.placement_strategy '{t.placement_strategy}' is unknown; choose one of {PLACEMENT_STRATEGIES} "
           f"(STRICT_SPREAD: one worker per node).")
    validate_engine_and_perf(t, cfg.perf)


def validate_tokenizer(m: TokenizerConfig) -> None:
    _require_finite(m, "model.")
    v, f, q, fd, pd = m.vfm, m.fusion, m.quantizer, m.feature_decoder, m.pixel_decoder
    _check(v.backbone in BACKBONES, f"model.vfm.backbone '{v.backbone}' is unknown; choose one of {BACKBONES}.")
    _check(f.mode in FUSION_MODES, f"model.fusion.mode '{f.mode}' is unknown; choose one of {FUSION_MODES}.")
    for k in ("image_size", "patch_size", "width", "depth", "heads"):
        _at_least_one(f"model.vfm.{k}", getattr(v, k))
    _positive("model.vfm.mlp_ratio", v.mlp_ratio)
    _check(all(s > 0 for s in v.std), f"model.vfm.std={_show(v.std)} must be positive (pixels are divided by it).")
    _check(v.image_size % v.patch_size == 0,
           f"model.vfm.image_size {v.image_size} is not a multiple of model.vfm.patch_size {v.patch_size}.")
    _check(1 <= v.deep_layer <= v.depth,
           f"model.vfm.deep_layer {v.deep_layer} is beyond the backbone's depth {v.depth} (layers are 1..{v.depth}).")
    if not v.single_layer:
        _check(1 <= v.shallow_layer <= v.depth,
               f"model.vfm.shallow_layer {v.shallow_layer} is beyond the backbone's depth {v.depth} "
               f"(layers are 1..{v.depth}).")
        _check(v.shallow_layer < v.deep_layer,
               f"model.vfm.shallow_layer {v.shallow_layer} must come before model.vfm.deep_layer {v.deep_layer}.")
    else:
        _check(f.mode == "none", "Single-layer tokenization (model.vfm.single_layer=true) has no shallow tokens "
               "to fuse: set model.fusion.mode=none.")
    _at_least_one("model.fusion.heads", f.heads)
    _check(v.width % f.heads == 0 or f.mode != "attention",
           f"model.fusion.heads {f.heads} does not divide the VFM width {v.width}.")
    _positive("model.fusion.mlp_ratio", f.mlp_ratio)
    _fraction("model.fusion.dropout", f.dropout, upper_open=True)
    _check(q.codebook_size >= 2, f"model.quantizer.codebook_size {q.codebook_size} must be at least 2.")
    _check(q.codebook_size <= 65536,
           f"model.quantizer.codebook_size {q.codebook_size} exceeds 65536, the range of the uint16 token shards.")
    _check(1 <= q.dim <= v.width,
           f"model.quantizer.dim {q.dim} must be between 1 and the VFM width {v.width}.")
    for k in ("codebook_weight", "commitment_weight", "entropy_weight"):
        _non_negative(f"model.quantizer.{k}", getattr(q, k), " (0 turns that term off)")
    _positive("model.quantizer.entropy_temperature", q.entropy_temperature)
    _at_least_one("model.quantizer.usage_window", q.usage_window)
    for k in ("width", "heads", "mlp_dim", "depth"):
        _at_least_one(f"model.feature_decoder.{k}", getattr(fd, k))
    _check(fd.width % fd.heads == 0,
           f"model.feature_decoder.heads {fd.heads} does not divide its width {fd.width}.")
    _fraction("model.feature_decoder.dropout", fd.dropout, upper_open=True)
    _non_negative("model.feature_decoder.num_registers", fd.num_registers)
    _check(len(pd.ch_mult) >= 1, "model.pixel_decoder.ch_mult needs at least one level.")
    for k in ("base_channels", "num_res_blocks", "norm_groups", "out_channels"):
        _at_least_one(f"model.pixel_decoder.{k}", getattr(pd, k))
    _check(all(c >= 1 for c in pd.ch_mult),
           f"model.pixel_decoder.ch_mult={_show(pd.ch_mult)} must hold multipliers of at least 1.")
    _fraction("model.pixel_decoder.dropout", pd.dropout, upper_open=True)
    for c in pd.ch_mult:
        _check(pd.base_channels * c % pd.norm_groups == 0,
               f"model.pixel_decoder channels {pd.base_channels * c} are not divisible by norm_groups "
               f"{pd.norm_groups}.")
    up = 2 ** (len(pd.ch_mult) - 1)
    _check(v.grid * up == m.image_size,
           f"The pixel decoder upsamples the {v.grid}x{v.grid} token grid by {up} to {v.grid * up}, "
           f"but model.image_size is {m.image_size}: change model.pixel_decoder.ch_mult or model.image_size.")


def validate_engine_and_perf(t: DistributedConfig, p: PerfConfig) -> None:
    """The engine backend and the speed levers, for every training stage."""
    _check(t.engine in ENGINES, f"dist.engine '{t.engine}' is unknown; choose one of {ENGINES}.")
    _check(t.engine == "deepspeed" or t.num_workers == 1,
           f"dist.engine=torch runs one process, but dist.num_workers is {t.num_workers}; use dist.engine=deepspeed "
           f"for several workers, or dist.num_workers=1.")
    _check(p.nan_check in NAN_CHECKS, f"perf.nan_check '{p.nan_check}' is unknown; choose one of {NAN_CHECKS}.")
    _check(p.compile_mode in COMPILE_MODES,
           f"perf.compile_mode '{p.compile_mode}' is unknown; choose one of {COMPILE_MODES}.")


def validate(cfg: TokenizerTrainConfig) -> None:
    """Raise :class:`ConfigError` with one sentence for the first wrong value."""
    _require_finite(cfg)
    validate_tokenizer(cfg.model)
    d, l, dc, t = cfg.discriminator, cfg.loss, cfg.data, cfg.dist
    _check(l.lpips_net in LPIPS_NETS, f"loss.lpips_net '{l.lpips_net}' is unknown; choose one of {LPIPS_NETS}.")
    _check(not (cfg.model.vfm.single_layer and l.shallow_align),
           "Single-layer tokenization has no shallow target: set loss.shallow_align=false.")
    for k in ("recon_weight", "perceptual_weight", "deep_mse_weight", "deep_cos_weight", "shallow_mse_weight",
              "shallow_cos_weight", "adv_weight", "disc_weight", "lecam_weight", "cr_weight"):
        _non_negative(f"loss.{k}", getattr(l, k), " (0 turns that term off)")
    _non_negative("loss.perceptual_warmup_steps", l.perceptual_warmup_steps)
    _non_negative("loss.disc_start", l.disc_start)
    _check(0 < l.lecam_decay < 1, f"loss.lecam_decay={l.lecam_decay} must be in (0, 1).")
    _fraction("loss.diffaug_prob", l.diffaug_prob)
    for k in ("image_size", "patch_size", "width", "depth", "heads", "head_kernel"):
        _at_least_one(f"discriminator.{k}", getattr(d, k))
    _check(d.image_size % d.patch_size == 0,
           f"discriminator.image_size {d.image_size} is not a multiple of discriminator.patch_size {d.patch_size}.")
    _check(d.width % d.heads == 0, f"discriminator.heads {d.heads} does not divide its width {d.width}.")
    for b in d.tap_blocks:
        _check(0 <= b < d.depth,
               f"discriminator.tap_blocks has block {b}, beyond the trunk's depth {d.depth} (0-based 0..{d.depth - 1}).")
    _fraction("discriminator.crop_prob", d.crop_prob)
    _check(d.tap_readout in TAP_READOUTS,
           f"discriminator.tap_readout '{d.tap_readout}' is unknown; choose one of {TAP_READOUTS}.")
    _non_empty("data.root", dc.root, "the image folder, e.g. data.root=/datasets/imagenet")
    _check(dc.format in SOURCE_FORMATS, f"data.format '{dc.format}' is unknown; choose one of {SOURCE_FORMATS}.")
    _at_least_one("data.image_size", dc.image_size)
    _check(dc.resize_min >= dc.image_size,
           f"data.resize_min {dc.resize_min} is smaller than the crop data.image_size {dc.image_size}.")
    _check(dc.resize_max >= dc.resize_min, "data.resize_max is smaller than data.resize_min.")
    _check(dc.image_size == cfg.model.image_size,
           f"data.image_size {dc.image_size} differs from model.image_size {cfg.model.image_size}.")
    _fraction("data.hflip_prob", dc.hflip_prob)
    _non_negative("data.loader_workers", dc.loader_workers)
    for k in ("synthetic_classes", "synthetic_train_per_class", "synthetic_val_per_class", "synthetic_size"):
        _at_least_one(f"data.{k}", getattr(dc, k))
    validate_training(cfg, "the EMA and the frozen VFM need full parameters on every rank")
    _check(t.vfm_placement in VFM_PLACEMENTS,
           f"dist.vfm_placement '{t.vfm_placement}' is unknown; choose one of {VFM_PLACEMENTS}.")
    _check(t.vfm_actors >= 1, f"dist.vfm_actors {t.vfm_actors} must be at least 1 (VFM actors per rank's dataset).")


def validate_ar(cfg: ARTrainConfig) -> None:
    """Raise :class:`ConfigError` with one sentence for the first wrong value of the AR stage."""
    _require_finite(cfg)
    m, d, t = cfg.model, cfg.data, cfg.dist
    for k in ("dim", "n_layer", "n_head", "multiple_of", "num_classes", "grid"):
        _at_least_one(f"model.{k}", getattr(m, k))
    _check(m.dim % m.n_head == 0, f"model.n_head {m.n_head} does not divide model.dim {m.dim}.")
    _check((m.dim // m.n_head) % 4 == 0, f"The head dimension {m.dim // m.n_head} must be a multiple of 4 "
           f"(2D RoPE splits it into rows and columns).")
    _check(m.cls_token_num == 1, "model.cls_token_num must be 1 (class-conditional generation).")
    _check(2 <= m.vocab_size <= 65536, f"model.vocab_size {m.vocab_size} must be in [2, 65536] (uint16 shards).")
    _non_negative("model.ffn_dim_multiplier", m.ffn_dim_multiplier, " (0 = none)")
    for k in ("norm_eps", "rope_base", "initializer_range"):
        _positive(f"model.{k}", getattr(m, k))
    for k in ("class_dropout", "token_dropout", "resid_dropout", "ffn_dropout", "attn_dropout", "drop_path"):
        _fraction(f"model.{k}", getattr(m, k), upper_open=True)
    _non_empty("data.shards", d.shards, "the token shards' folder, e.g. data.shards=data/tokens")
    _at_least_one("data.loader_workers", d.loader_workers)
    validate_training(cfg, "the EMA keeps full parameters on every rank")
    _check(t.vfm_placement == "trainer",
           f"dist.vfm_placement '{t.vfm_placement}' does not apply to the AR stage (it reads token shards and runs "
           f"no VFM); leave dist.vfm_placement=trainer.")


def validate_sample(cfg: SampleConfig, prefix: str = "") -> None:
    """Sampling settings (``ideal_ray.sampling``, the sampling job and the CFG sweep): one sentence for the first
    wrong value; ``prefix``: where they sit in a stage config (``sample.``)."""
    p = prefix
    _require_finite(cfg, p)
    _non_negative(f"{p}cfg_scale", cfg.cfg_scale, " (1.0 = no guidance)")
    _check(len(cfg.cfg_interval) == 2 and 0.0 <= cfg.cfg_interval[0] <= cfg.cfg_interval[1] <= 1.0,
           f"{p}cfg_interval={_show(cfg.cfg_interval)} must be start,end with 0 <= start <= end <= 1 (fractions of "
           f"the token sequence).")
    _check(cfg.temperature >= 0,
           f"{p}temperature={cfg.temperature} is negative; use 0 for greedy decoding or a positive value.")
    _check(cfg.top_k >= 0, f"{p}top_k={cfg.top_k} is negative; use 0 to turn top-k filtering off.")
    _check(0.0 < cfg.top_p <= 1.0, f"{p}top_p={cfg.top_p} must be in (0, 1]; use 1.0 to turn nucleus filtering off.")
    for k in ("per_class", "batch_size", "out_size"):
        _at_least_one(f"{p}{k}", getattr(cfg, k))
    _non_negative(f"{p}seed", cfg.seed)


# ------------------------------------------------------------------------------------ the offline stages
SOURCE_FORMATS = ("auto", "folder", "flat", "parquet", "webdataset")  # data/sources.py FORMATS, and auto
VIEWS = ("llamagen", "release")
RUN_PRECISIONS = ("auto", "bf16", "fp32")
CLASSIFIER_KINDS = ("probe", "cnn")  # ideal_ray.eval.class_accuracy.CLASSIFIER_KINDS (that module loads torch)
SCHEDULERS = ("grid", "asha")


def _optional_at_least_one(key: str, v: Optional[int], note: str = "") -> None:
    if v is not None:
        _at_least_one(key, v, note)


def _device(key: str, v: str, choices: Tuple[str, ...] = ("auto", "cpu", "cuda")) -> None:
    ok = v in choices or (v.startswith("cuda:") and v[5:].isdigit())
    _check(ok, f"{key}={v} is not a device; use one of {', '.join(choices)} or cuda:N.")


def _classes(key: str, classes: Tuple[int, ...]) -> None:
    _check(all(c >= 0 for c in classes), f"{key}={_show(classes)} has a negative class id.")
    _check(len(set(classes)) == len(classes), f"{key}={_show(classes)} names a class twice; list each once.")


def _folder_name(key: str, v: str) -> None:
    _non_empty(key, v, f"a folder name, e.g. {key}=my-sweep")
    _check(v not in (".", "..") and not any(c in v for c in "/\\\0"),
           f"{key}={v} is not a single folder name; pass a plain name like {key}=my-sweep.")


def _validate_source(d: SourceConfig, p: str = "data.") -> None:
    _check(d.format in SOURCE_FORMATS, f"{p}format '{d.format}' is unknown; choose one of {SOURCE_FORMATS}.")
    _non_empty(f"{p}split", d.split, f"the split to read, e.g. {p}split=train")


def _validate_run(r: RunConfig, p: str = "run.") -> None:
    _device(f"{p}device", r.device)
    _check(r.precision in RUN_PRECISIONS, f"{p}precision '{r.precision}' is unknown; choose one of {RUN_PRECISIONS}.")
    _check(not (r.precision == "bf16" and r.device == "cpu"),
           f"{p}precision=bf16 runs on CUDA only; use {p}precision=auto or fp32 with {p}device=cpu.")
    _optional_at_least_one(f"{p}num_actors", r.num_actors)
    _optional_at_least_one(f"{p}decode_actors", r.decode_actors)


def _validate_fid(f: FIDConfig, p: str = "fid.") -> None:
    _at_least_one(f"{p}batch_size", f.batch_size)


def _validate_classifier(c: ClassifierConfig, p: str = "classifier.") -> None:
    _check(c.kind in CLASSIFIER_KINDS, f"{p}kind '{c.kind}' is unknown; choose one of {CLASSIFIER_KINDS}.")
    if c.per_class is not None:
        _non_negative(f"{p}per_class", c.per_class, " (0 = every image of the split)")


def validate_extract(cfg: ExtractConfig) -> None:
    _require_finite(cfg)
    _validate_source(cfg.data)
    _check(cfg.views in VIEWS, f"views '{cfg.views}' is unknown; choose one of {VIEWS}.")
    _optional_at_least_one("image_size", cfg.image_size, " (leave it unset for the tokenizer's own size)")
    _optional_at_least_one("batch_size", cfg.batch_size)
    for k in ("shard_images", "row_group_images", "decode_batch"):
        _at_least_one(k, getattr(cfg, k))
    _optional_at_least_one("max_shards", cfg.max_shards)
    _fraction("max_skip_fraction", cfg.max_skip_fraction)
    _non_negative("num_workers", cfg.num_workers)
    _validate_run(cfg.run)


def validate_sample_job(cfg: SampleJobConfig) -> None:
    _require_finite(cfg)
    validate_sample(cfg.sample, "sample.")
    _classes("classes", cfg.classes)
    _validate_run(cfg.run)


def validate_recon_eval(cfg: ReconEvalConfig) -> None:
    _require_finite(cfg)
    _validate_source(cfg.data)
    _optional_at_least_one("num_images", cfg.num_images, " (leave it unset for the whole split)")
    _at_least_one("batch_size", cfg.batch_size)
    _non_negative("probe_train_images", cfg.probe_train_images, " (0 turns the linear probe off)")
    _non_empty("probe_split", cfg.probe_split, "the linear probe's training split, e.g. probe_split=train")
    _validate_run(cfg.run)
    _validate_fid(cfg.fid)


def validate_gen_eval(cfg: GenEvalConfig) -> None:
    _require_finite(cfg)
    _device("device", cfg.device)
    _validate_fid(cfg.fid)
    _validate_classifier(cfg.classifier)


def validate_cfg_sweep(cfg: CfgSweepConfig) -> None:
    _require_finite(cfg)
    _folder_name("name", cfg.name)
    _non_empty("storage_path", cfg.storage_path, "the sweeps' folder, e.g. storage_path=runs/sweeps")
    _check(bool(cfg.cfg_scales), "cfg_scales is empty; give the scales to sweep, e.g. cfg_scales=1.0,1.75,2.5.")
    _check(all(s >= 0 for s in cfg.cfg_scales), f"cfg_scales={_show(cfg.cfg_scales)} has a negative scale.")
    iv = cfg.cfg_intervals
    _check(len(iv) % 2 == 0 and all(0.0 <= iv[i] <= iv[i + 1] <= 1.0 for i in range(0, len(iv), 2)),
           f"cfg_intervals={_show(iv)} must be start,end pairs with 0 <= start <= end <= 1, e.g. "
           f"cfg_intervals=0,1,0.5,1.")
    _check(all(t >= 0 for t in cfg.temperatures), f"temperatures={_show(cfg.temperatures)} has a negative value.")
    _check(all(k >= 0 for k in cfg.top_ks), f"top_ks={_show(cfg.top_ks)} has a negative value (0 = off).")
    validate_sample(cfg.sample, "sample.")
    _classes("classes", cfg.classes)
    _check(cfg.precision in RUN_PRECISIONS, f"precision '{cfg.precision}' is unknown; choose one of {RUN_PRECISIONS}.")
    if cfg.gpus_per_trial is not None:
        _non_negative("gpus_per_trial", cfg.gpus_per_trial)
    _positive("cpus_per_trial", cfg.cpus_per_trial)
    _optional_at_least_one("max_concurrent_trials", cfg.max_concurrent_trials)
    _validate_fid(cfg.fid)
    _validate_classifier(cfg.classifier)
    _non_negative("verbose", cfg.verbose)


def validate_ablation_sweep(cfg: AblationSweepConfig) -> None:
    from ideal_ray.config.presets import ABLATIONS, PRESETS, STUDIES

    _require_finite(cfg)
    _folder_name("name", cfg.name)
    _non_empty("storage_path", cfg.storage_path, "the sweeps' folder, e.g. storage_path=runs/sweeps")
    _check(cfg.train_preset in PRESETS,
           f"train_preset '{cfg.train_preset}' is unknown; choose one of {sorted(PRESETS)}.")
    studies = sorted(STUDIES) + ["custom"]
    _check(cfg.study in studies, f"study '{cfg.study}' is unknown; choose one of {studies}.")
    if cfg.study == "custom":
        _check(bool(cfg.variants), "study=custom needs variants, e.g. variants=fusion-linear,shallow-align-off.")
        _check(len(set(cfg.variants)) == len(cfg.variants),
               f"variants={_show(cfg.variants)} names one variant twice; list each once.")
        for v in cfg.variants:
            for part in v.split("+"):
                _check(part in ABLATIONS, f"variant '{v}' has unknown part '{part}'; choose from {sorted(ABLATIONS)}.")
    else:
        _check(not cfg.variants, f"study '{cfg.study}' has fixed variants {list(STUDIES[cfg.study])}; give variants "
               f"only with study=custom.")
    _optional_at_least_one("steps", cfg.steps, " (leave it unset for the preset's schedule)")
    _check(cfg.scheduler in SCHEDULERS, f"scheduler '{cfg.scheduler}' is unknown; choose one of {SCHEDULERS}.")
    _check(cfg.asha_mode in ("min", "max"), f"asha_mode '{cfg.asha_mode}' must be min or max.")
    _non_empty("asha_metric", cfg.asha_metric, "the training metric ASHA compares, e.g. asha_metric=train_rec_mse")
    _optional_at_least_one("grace_period", cfg.grace_period)
    _check(cfg.reduction_factor >= 2, f"reduction_factor={cfg.reduction_factor} must be at least 2.")
    _at_least_one("workers_per_trial", cfg.workers_per_trial)
    _non_negative("gpus_per_worker", cfg.gpus_per_worker)
    _optional_at_least_one("max_concurrent_trials", cfg.max_concurrent_trials)
    _non_negative("max_failures", cfg.max_failures)
    _optional_at_least_one("eval_images", cfg.eval_images, " (leave it unset for the whole val split)")
    _at_least_one("eval_batch_size", cfg.eval_batch_size)
    _at_least_one("decode_actors", cfg.decode_actors)
    if cfg.probe_train_images is not None:
        _non_negative("probe_train_images", cfg.probe_train_images, " (0 turns the linear probe off)")


def validate_pipeline(cfg: PipelineConfig) -> None:
    from ideal_ray.config.presets import AR_PRESETS, PIPELINE_STAGES

    _check(cfg.ar_preset in AR_PRESETS, f"ar_preset '{cfg.ar_preset}' is unknown; choose one of {sorted(AR_PRESETS)}.")
    for key in PIPELINE_STAGES:
        sub = getattr(cfg, key)
        if key == "sweep" and not sub.cfg_scales:
            continue  # no sweep stage
        try:
            STAGE_VALIDATORS[type(sub)](sub)
            _local_outputs(sub)
        except ConfigError as e:
            raise ConfigError(f"{key}.{e}") from None


STAGE_VALIDATORS = {PipelineConfig: validate_pipeline, ExtractConfig: validate_extract,
                    SampleJobConfig: validate_sample_job,
                    ReconEvalConfig: validate_recon_eval, GenEvalConfig: validate_gen_eval,
                    CfgSweepConfig: validate_cfg_sweep, AblationSweepConfig: validate_ablation_sweep}


def validate_stage(cfg: Any, complete: bool = True) -> None:
    """One offline stage's config (:data:`STAGE_VALIDATORS`); with ``complete``, also every path the stage needs
    (its ``REQUIRED`` fields) is set: a job checks that, the pipeline fills them in when the earlier stages ran."""
    STAGE_VALIDATORS[type(cfg)](cfg)
    _local_outputs(cfg)
    if complete:
        for key in getattr(cfg, "REQUIRED", ()):
            _non_empty(key, get_key(cfg, key), f"{key}=PATH")


def get_key(cfg: Any, key: str) -> Any:
    """The value of a dotted key (``data.root``) of a config."""
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg
