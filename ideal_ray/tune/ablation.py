"""The paper's ablations (Table 1's layer study, Table 7's fusion / shallow-alignment / backbone) as Ray Tune sweeps.

One sweep = one ``Tuner`` at ``<storage_path>/<name>`` over ablation variants (``config.ABLATIONS``) of a base training
preset, its settings an ``AblationSweepConfig`` (``ideal_ray.config``; ``jobs/sweep_ablation.py`` builds it)::

    driver       validate every variant's config, its pretrained files and the data (nothing starts on a bad one)
                 -> MLflow parent run -> Tuner (grid: every variant to the full budget; asha: ASHAScheduler on a
                 training metric) with one child run per trial (``common.mlflow_callback``)
    trial        ``ablation_trial.run_trial``, a Tune function trainable (1 CPU): trains the variant with
                 ``train_tokenizer``, forwarding every logged training step to Tune (so ASHA can stop it early),
                 then evaluates its export with ``evaluate_recon`` and reports that as its final result.

This module holds the plan (:class:`AblationPlan`, :func:`plan_sweep`), the resource arithmetic (:func:`trial_cpus`,
:func:`trial_gpus`, :func:`concurrency`) and the driver (:func:`sweep_ablation`, :func:`format_table`).

Resources: in Ray Train V2 a trial's ``TorchTrainer`` schedules its own placement group outside the trial's
resources, so Tune cannot count them; the sweep caps ``max_concurrent_trials`` at what the cluster holds for whole
trials (train workers + their Ray Data actors + headroom for read tasks, or the evaluation's actor pools, plus the
trial's own CPU) and starts a local cluster with that many logical CPUs -- fewer deadlock Ray Data and Train on a
2-core machine (see ``ray_trainer.local_cluster_cpus``).

Rerunning a sweep name restores it (``common.run_tuner``): finished trials are kept, unfinished ones resume from
their latest Ray Train checkpoint, and an evaluation already written is read back, not redone.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ideal_ray.config import (ABLATIONS, STUDIES, AblationSweepConfig, ConfigError, TokenizerTrainConfig, load_config,
                              validate_stage)
from ideal_ray.io import record_settings
from ideal_ray.tune.ablation_trial import TRAIN_PREFIX, run_trial

EXPERIMENT = "ideal-ablation"  # MLflow experiment of the sweeps' parent and child runs
LAYER_PROBE_TRAIN_IMAGES = 10000  # linear-probe training images for single-layer variants (capped by the split)
SWEEP_FILE = "sweep.json"

PAPER_SCALE_STUDIES = ("backbone", "layer")  # they name 24-block paper-scale networks
# config fields holding paths: made absolute by the driver, since Tune runs each trial in its own folder
_PATH_FIELDS = ("data.root", "data.class_index", "model.vfm.weights_path", "discriminator.weights_path",
                "loss.lpips_weights_path")


@dataclass(frozen=True)
class AblationPlan:
    """A validated sweep (:func:`plan_sweep` of an ``AblationSweepConfig``): what every trial trains and how it is
    evaluated (recorded in ``<sweep>/sweep.json``; the keys keep their names, so sweeps made before the config
    resume)."""

    name: str
    path: str  # the Tuner's experiment folder
    base_preset: str
    study: str
    variants: Tuple[str, ...]
    overrides: Tuple[str, ...]  # cfg.train_overrides (the CLI's train.a.b=c)
    path_overrides: Tuple[str, ...]  # their relative paths made absolute (trials run in their own folders)
    steps: int  # 0: the preset's schedule
    scheduler: str
    asha_metric: str
    asha_mode: str
    grace_period: int
    reduction_factor: int
    num_workers_per_trial: int
    gpus_per_worker: int
    eval_images: Optional[int]
    eval_batch_size: int
    decode_actors: int
    probe_train_images: int
    zero_shot: bool
    inception_weights: str
    fid_cache_dir: str

    def trial_config(self, variant: str) -> TokenizerTrainConfig:
        """``base+variant`` with the overrides, the step budget and the trial's own run name and folders."""
        train_dir = os.path.join(self.path, "train")
        own = [f"name={self.name}.{variant}", f"dist.storage_path={train_dir}", f"output_dir={train_dir}",
               f"dist.num_workers={self.num_workers_per_trial}", f"dist.use_gpu={self.gpus_per_worker > 0}"]
        if self.steps:
            own.append(f"schedule.steps={self.steps}")
        try:
            return load_config(f"{self.base_preset}+{variant}", [*self.overrides, *self.path_overrides, *own])
        except ConfigError as e:
            raise ConfigError(f"Ablation variant '{variant}' of {self.base_preset}: {e}") from None

    def eval_dir(self, variant: str) -> str:
        return os.path.join(self.path, "eval", variant)

    def record(self) -> Dict[str, Any]:
        """What defines the sweep's results (a rerun must match it to resume)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("name", "path")}

    def param_space(self) -> Dict[str, Any]:
        """The Tuner's space; every key is a child run's MLflow param."""
        from ray import tune

        return {"variant": tune.grid_search(list(self.variants)), "base_preset": self.base_preset,
                "study": self.study, "overrides": " ".join(self.overrides), "steps": self.steps}


# ----------------------------------------------------------------------------------------------- planning
def study_variants(cfg: AblationSweepConfig) -> Tuple[str, ...]:
    """The sweep's variants: its study's (``config.STUDIES``) or, for study ``custom``, its own ``variants`` (each
    ``v`` or ``v1+v2`` of ``config.ABLATIONS``; :func:`validate_stage` checked them)."""
    return tuple(cfg.variants) if cfg.study == "custom" else STUDIES[cfg.study]


def _override_keys(overrides: Sequence[str]) -> Dict[str, str]:
    return {o.split("=", 1)[0].strip(): o for o in overrides if "=" in o}


def _check_no_conflict(variants: Sequence[str], overrides: Sequence[str]) -> None:
    """An override of a key that a variant sets would erase the difference the sweep measures."""
    user = _override_keys(overrides)
    for v in variants:
        for part in v.split("+"):
            for key in _override_keys(ABLATIONS[part]):
                if key in user:
                    raise ConfigError(f"Training override 'train.{user[key]}' sets {key}, which ablation variant "
                                      f"'{part}' varies; drop it.")


def _absolute_path_overrides(cfg: TokenizerTrainConfig) -> List[str]:
    """``key=<absolute path>`` for every path field of ``cfg`` given relative to this process's folder."""
    out = []
    flat = cfg.flat()
    for key in _PATH_FIELDS:
        value = str(flat[key])
        if value and "://" not in value and not os.path.isabs(value):
            out.append(f"{key}={os.path.abspath(os.path.expanduser(value))}")
    return out


def required_weights(cfg: TokenizerTrainConfig) -> List[str]:
    """The local pretrained files a trial of ``cfg`` loads (VFM, discriminator trunk, LPIPS trunk); a missing one
    raises :class:`ideal_ray.weights.MissingWeightsError` naming it. Random-weight parts (tiny) need none."""
    from ideal_ray.models import vfm
    from ideal_ray.weights import LPIPS_TRUNK_FILES, resolve_hf_file, resolve_torch_hub_file

    files = []
    v = cfg.model.vfm
    found = vfm._open_clip_weights(v) if v.backbone in vfm.OPEN_CLIP_BACKBONES else vfm._timm_weights(v)
    if found:
        files.append(found)
    d = cfg.discriminator
    if d.pretrained:
        files.append(resolve_hf_file(f"timm/{d.model_name}", "model.safetensors", local_path=d.weights_path,
                                     config_key="discriminator.weights_path",
                                     what=f"the DINO discriminator trunk ({d.model_name})"))
    loss = cfg.loss
    if loss.lpips_pretrained:
        files.append(resolve_torch_hub_file(LPIPS_TRUNK_FILES[loss.lpips_net], loss.lpips_weights_path,
                                            config_key="loss.lpips_weights_path",
                                            what=f"the LPIPS '{loss.lpips_net}' trunk"))
    return files


def plan_sweep(cfg: AblationSweepConfig) -> AblationPlan:
    """Validate a sweep before anything starts: its settings, every variant's config, its pretrained files (paper
    scale), the data, the Inception weights, the scheduler. Raises :class:`ConfigError` naming the bad value or
    file; writes nothing."""
    from ideal_ray.data import sources
    from ideal_ray.eval.inception import resolve_inception_weights
    from ideal_ray.tune.common import sweep_path
    from ideal_ray.weights import MissingWeightsError

    validate_stage(cfg)
    base_preset, study, overrides = cfg.train_preset, cfg.study, tuple(cfg.train_overrides)
    if "://" in cfg.storage_path:
        raise ConfigError(f"storage_path={cfg.storage_path} is a URI; ablation sweeps need a folder every node can "
                          f"read (local disk or NFS), since each trial's evaluation reads its export from there.")
    chosen = study_variants(cfg)
    if base_preset == "tiny" and study in PAPER_SCALE_STUDIES:
        raise ConfigError(f"study '{study}' names 24-block paper-scale networks and cannot run on the tiny preset; "
                          f"use train_preset=paper (--preset paper), or study=custom with tiny variants such as "
                          f"variants=layer-probe.")
    if cfg.gpus_per_worker not in (0, 1):
        raise ConfigError(f"gpus_per_worker={cfg.gpus_per_worker} must be 0 (CPU workers) or 1 (one GPU per "
                          f"worker).")
    _check_no_conflict(chosen, overrides)
    path = sweep_path(cfg.storage_path, cfg.name)

    draft = AblationPlan(name=cfg.name, path=path, base_preset=base_preset, study=study, variants=chosen,
                         overrides=overrides, path_overrides=(), steps=int(cfg.steps or 0), scheduler=cfg.scheduler,
                         asha_metric=cfg.asha_metric, asha_mode=cfg.asha_mode, grace_period=0,
                         reduction_factor=cfg.reduction_factor, num_workers_per_trial=cfg.workers_per_trial,
                         gpus_per_worker=cfg.gpus_per_worker, eval_images=cfg.eval_images,
                         eval_batch_size=cfg.eval_batch_size, decode_actors=cfg.decode_actors, probe_train_images=0,
                         zero_shot=cfg.zero_shot, inception_weights="", fid_cache_dir="")
    first = draft.trial_config(chosen[0])
    draft = dataclasses.replace(draft, path_overrides=tuple(_absolute_path_overrides(first)))
    configs = {v: draft.trial_config(v) for v in chosen}

    for v, trial in configs.items():
        if cfg.zero_shot and trial.model.vfm.backbone not in ("siglip2", "tiny"):
            raise ConfigError(f"zero_shot needs a text tower, which variant '{v}' ({trial.model.vfm.backbone}) has "
                              f"not; run the sweep with zero_shot=false.")

    grace = 0
    if cfg.scheduler == "asha":
        budget = min(trial.schedule.steps for trial in configs.values())
        if budget < 1:
            raise ConfigError("ASHA needs a step budget to place its rungs: pass steps=N (or "
                              "train.schedule.steps=N).")
        if not cfg.asha_metric.startswith(TRAIN_PREFIX):
            raise ConfigError(f"asha_metric '{cfg.asha_metric}' must be a training metric ({TRAIN_PREFIX}<key>, "
                              f"e.g. train_rec_mse): evaluation metrics exist only once a trial has finished.")
        grace = cfg.grace_period or max(first.schedule.log_every, budget // cfg.reduction_factor ** 2)
        if not 1 <= grace < budget:
            raise ConfigError(f"grace_period={grace} must be in [1, {budget}) (the step budget).")

    probe_train_images = cfg.probe_train_images
    if probe_train_images is None:
        single_layer = any(trial.model.vfm.single_layer for trial in configs.values())
        probe_train_images = LAYER_PROBE_TRAIN_IMAGES if single_layer else 0

    for v, trial in configs.items():
        try:
            required_weights(trial)
        except MissingWeightsError as e:
            raise ConfigError(f"Ablation variant '{v}' cannot run on this machine: {e}") from None
    try:
        inception_weights = os.path.abspath(resolve_inception_weights(cfg.inception_weights))
    except MissingWeightsError as e:
        raise ConfigError(f"The sweep's evaluation cannot run on this machine: {e}") from None

    from ideal_ray.train.ray_trainer import prepare_data

    prepare_data(first)  # the training images (the synthetic set is made for tiny); clear errors before any trial
    n_val = len(sources.list_images(first.data.root, split="val", class_index=first.data.class_index))
    if not 2 <= (cfg.eval_images or n_val) <= n_val:
        raise ConfigError(f"eval_images={cfg.eval_images} must be in [2, {n_val}] (the images of "
                          f"{first.data.root}/val).")
    if cfg.scheduler == "grid":  # ASHA's settings do not apply: a grid rerun is not refused over them
        draft = dataclasses.replace(draft, asha_metric="", asha_mode="", reduction_factor=0)
    return dataclasses.replace(draft, probe_train_images=int(probe_train_images), grace_period=grace,
                               inception_weights=inception_weights,
                               fid_cache_dir=os.path.abspath(cfg.fid_cache_dir) if cfg.fid_cache_dir else "")


def check_or_record_sweep(plan: AblationPlan) -> bool:
    """Write ``<sweep>/sweep.json``; refuse a rerun whose settings differ. True when the sweep already existed."""
    return record_settings(os.path.join(plan.path, SWEEP_FILE), plan.record(), f"Sweep '{plan.name}'")


# ---------------------------------------------------------------------------------------------- resources
def trial_cpus(plan: AblationPlan, cfg: TokenizerTrainConfig) -> int:
    """Logical CPUs one trial holds at its peak: its own (Tune's), plus the larger of training (train workers,
    their Ray Data actors, read-task headroom) and evaluation (decode + evaluation actors, one task)."""
    from ideal_ray.train.ray_trainer import local_cluster_cpus

    return 1 + max(local_cluster_cpus(cfg), plan.decode_actors + 1 + 1)


def trial_gpus(cfg: TokenizerTrainConfig) -> int:
    """GPUs one trial holds at its peak: the train workers' and VFM actors' (evaluation uses one of them later)."""
    from ideal_ray.train.ray_trainer import vfm_actors_total

    return cfg.dist.num_workers + vfm_actors_total(cfg) if cfg.dist.use_gpu else 0


def concurrency(plan: AblationPlan, cfg: TokenizerTrainConfig, cpus: float, gpus: float,
                max_concurrent_trials: Optional[int]) -> int:
    """How many whole trials fit in a cluster's ``cpus``/``gpus`` (at most ``max_concurrent_trials`` and the variant
    count); a cluster too small for one trial is an error, not a hang."""
    need_c, need_g = trial_cpus(plan, cfg), trial_gpus(cfg)
    fits = int(cpus // need_c)
    if need_g:
        fits = min(fits, int(gpus // need_g))
    if fits < 1:
        raise ConfigError(f"One trial needs {need_c} logical CPUs and {need_g} GPUs, but the Ray cluster has "
                          f"{cpus:g} and {gpus:g}; lower num_workers_per_trial or start Ray with more resources.")
    return min(fits, len(plan.variants), max_concurrent_trials or fits)


def _start_ray(plan: AblationPlan, cfg: TokenizerTrainConfig, max_concurrent_trials: Optional[int]) -> Tuple[int, bool]:
    """Connect to an initialized Ray or ``RAY_ADDRESS``, or start a local cluster with logical CPUs for the concurrent
    trials (default: one CPU trial, or as many GPU trials as this machine's GPUs hold). Returns (concurrent trials,
    whether this call started Ray)."""
    import ray

    from ideal_ray.cluster import init_ray

    if ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
        started = not ray.is_initialized()
        if started:
            init_ray(0)  # joins $RAY_ADDRESS
        res = ray.cluster_resources()
        return concurrency(plan, cfg, res.get("CPU", 0), res.get("GPU", 0), max_concurrent_trials), started
    need_g = trial_gpus(cfg)
    if need_g:
        import torch

        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if have < need_g:
            raise ConfigError(f"One trial needs {need_g} GPUs ({cfg.dist.num_workers} train workers + VFM actors) but "
                              f"this machine has {have}; lower num_workers_per_trial or set RAY_ADDRESS to a cluster.")
        n = max_concurrent_trials or have // need_g
    else:
        n = max_concurrent_trials or 1
    n = max(1, min(n, len(plan.variants)))
    init_ray(n * trial_cpus(plan, cfg), runtime_env=None if need_g else {"env_vars": {"DS_ACCELERATOR": "cpu"}})
    return n, True


# -------------------------------------------------------------------------------------------------- sweep
def _trial_name(trial) -> str:
    return str(trial.config["variant"])


def _trial_dirname(trial) -> str:
    return f"{trial.config['variant']}_{trial.trial_id}"


def _variant_of(result, plan: AblationPlan) -> str:
    """A Tune result's variant; one that never reported (an interrupted sweep) has no config, only its folder."""
    if result.config:
        return str(result.config["variant"])
    folder = os.path.basename(result.path.rstrip("/"))
    return next(v for v in plan.variants if folder.startswith(f"{v}_"))


def sweep_ablation(cfg: AblationSweepConfig, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run (or resume) the ablation sweep ``cfg`` on Ray Tune; see the module notes and
    :class:`ideal_ray.config.AblationSweepConfig`.

    Every trial trains ``cfg.train_preset+<variant>`` with ``cfg.train_overrides``: ``study`` fusion | shallow-align
    | backbone | layer, or custom (``variants``: ``config.ABLATIONS`` names, ``+`` to combine). ``steps``: every
    trial's step budget (None: the preset's). ``scheduler``: grid (every variant to the budget) or asha
    (``ASHAScheduler`` on ``asha_metric``, a ``train_<key>`` training metric, rungs from ``grace_period`` steps by
    ``reduction_factor``). ``probe_train_images``: linear-probe training images (None: ``LAYER_PROBE_TRAIN_IMAGES``
    when a variant tokenizes a single layer, else 0). ``tracking_uri``: the MLflow store of the parent and child
    runs (None or empty: ``$MLFLOW_TRACKING_URI`` or ``<sweep>/mlflow.db``).

    Returns ``{name, path, tracking_uri, parent_run_id, interrupted, trials: [{variant, metrics, error}]}``; an
    interrupted sweep (Ctrl-C) resumes when called again with the same settings (``<sweep>/sweep.json``; other
    settings are refused with :class:`ideal_ray.io.SettingsChangedError`).
    """
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from ideal_ray.tracking import default_tracking_uri
    from ideal_ray.tune import common

    validate_stage(cfg)
    plan = plan_sweep(cfg)
    resumed = check_or_record_sweep(plan)
    first = plan.trial_config(plan.variants[0])
    tracking_uri = cfg.tracking_uri or default_tracking_uri(plan.path)
    if plan.scheduler == "asha":
        sched = ASHAScheduler(time_attr="step", metric=plan.asha_metric, mode=plan.asha_mode,
                              max_t=first.schedule.steps, grace_period=plan.grace_period,
                              reduction_factor=plan.reduction_factor, stop_last_trials=False)
    else:
        sched = FIFOScheduler()
    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan), {"CPU": 1})
    concurrent, started = _start_ray(plan, first, cfg.max_concurrent_trials)
    try:
        parent = common.parent_run(tracking_uri, EXPERIMENT, plan.path, "ablation", common.flat_params(plan.record()))
        log(f"[ideal-ray] ablation sweep '{plan.name}' ({'resuming' if resumed else 'new'}): {len(plan.variants)} "
            f"variants of {plan.base_preset} ({plan.study}), {plan.scheduler}, {concurrent} at a time, "
            f"{trial_cpus(plan, first)} CPUs and {trial_gpus(first)} GPUs per trial; {plan.path}, MLflow "
            f"{tracking_uri} (parent run {parent})")
        tune_config = tune.TuneConfig(scheduler=sched, max_concurrent_trials=concurrent,
                                      trial_name_creator=_trial_name, trial_dirname_creator=_trial_dirname)
        status = "FAILED"
        try:
            grid, interrupted = common.run_tuner(
                trainable, plan.param_space(), tune_config, plan.path,
                callbacks=[common.mlflow_callback(tracking_uri, EXPERIMENT, parent)], max_failures=cfg.max_failures)
            status = "KILLED" if interrupted else ("FAILED" if grid.num_errors else "FINISHED")
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            common.finish_parent(tracking_uri, parent, status)
    finally:
        if started:
            ray.shutdown()
    trials = [{"variant": _variant_of(r, plan),
               "metrics": {k: v for k, v in (r.metrics or {}).items() if isinstance(v, (int, float))},
               "error": None if r.error is None else str(r.error).strip().splitlines()[-1]} for r in grid]
    trials.sort(key=lambda t: plan.variants.index(t["variant"]))
    return {"name": plan.name, "path": plan.path, "tracking_uri": tracking_uri, "parent_run_id": parent,
            "interrupted": interrupted, "trials": trials}


TABLE_COLUMNS = ("rfid", "ris", "psnr", "ssim", "usage", "probe_recon_top1")


def format_table(summary: Dict[str, Any], columns: Sequence[str] = TABLE_COLUMNS) -> str:
    """The sweep's trials as a Markdown table (like the paper's Tables 1 and 7); '-' where a trial has no value
    (a trial stopped by ASHA or by an interruption has no evaluation)."""
    shown = [c for c in columns if any(c in t["metrics"] for t in summary["trials"])]
    lines = ["| variant | " + " | ".join(shown) + " | step | status |",
             "|---" * (len(shown) + 3) + "|"]
    for t in summary["trials"]:
        m = t["metrics"]
        cells = [f"{m[c]:.4g}" if c in m else "-" for c in shown]
        status = ("error: " + t["error"] if t["error"] else "evaluated" if "rfid" in m
                  else "interrupted" if summary["interrupted"] else "stopped early")
        lines.append(f"| {t['variant']} | " + " | ".join(cells) + f" | {int(m.get('step', 0))} | {status} |")
    return "\n".join(lines)
