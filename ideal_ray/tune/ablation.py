"""The paper's ablations (Table 1's layer study, Table 7's fusion / shallow-alignment / backbone) as Ray Tune sweeps.

One sweep = one ``Tuner`` at ``<storage_path>/<name>`` over ablation variants of a base preset (``config.ABLATIONS``)::

    driver       validate every variant's config, its pretrained files and the data (nothing starts on a bad one)
                 -> MLflow parent run -> Tuner (grid: every variant to the full budget; asha: ASHAScheduler on a
                 training metric) with one child run per trial (``common.mlflow_callback``)
    trial        a Tune function trainable (1 CPU): ``train_tokenizer`` (Ray Train + DeepSpeed, its own run
                 ``<name>.<variant>`` under ``<sweep>/train``) runs in a thread while this thread forwards each
                 logged training step (``train_<key>`` + ``step``) from the run's MLflow history to Tune, so ASHA
                 can stop it early; a trial that finishes training evaluates its export with ``evaluate_recon`` on
                 the val split (``<sweep>/eval/<variant>``) and reports rFID, rIS (when the Inception weights have
                 logits), PSNR, SSIM, usage, entropy (+ linear-probe top-1 for single-layer variants) as its final
                 result.

The training loop reports to Ray Train only at checkpoints, and ``run_stage`` builds its ``TorchTrainer`` without
callbacks, so Ray's ``TuneReportCallback`` would see checkpoint steps only; the run's MLflow history holds every
logged step, and reading it back is what forwards them.

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
import json
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ideal_ray.config import ABLATIONS, ConfigError, TokenizerTrainConfig, load_config
from ideal_ray.io import record_settings

EXPERIMENT = "ideal-ablation"  # MLflow experiment of the sweeps' parent and child runs
TRAIN_EXPERIMENT = "ideal-tokenizer"  # where train_tokenizer logs each trial's training run
TRAIN_PREFIX = "train_"  # forwarded training metrics; unprefixed names are the evaluation's
STEP_KEY = "samples_per_s"  # the loop logs it at every log step, in the same batch as every other metric
POLL_S = 5.0  # seconds between reads of a trial's training history
LAYER_PROBE_TRAIN_IMAGES = 10000  # linear-probe training images for single-layer variants (capped by the split)
SWEEP_FILE = "sweep.json"

STUDIES: Dict[str, Tuple[str, ...]] = {
    "fusion": ("fusion-attention", "fusion-linear", "fusion-none"),  # Table 7a
    "shallow-align": ("shallow-align-on", "shallow-align-off"),  # Table 7b
    "backbone": ("backbone-siglip2", "backbone-dinov2", "backbone-dinov3"),  # Table 7c
    "layer": tuple(f"layer-{n}" for n in (8, 12, 16, 20, 24)),  # Table 1
}
PAPER_SCALE_STUDIES = ("backbone", "layer")  # they name 24-block paper-scale networks
SCHEDULERS = ("grid", "asha")
# config fields holding paths: made absolute by the driver, since Tune runs each trial in its own folder
_PATH_FIELDS = ("data.root", "data.class_index", "model.vfm.weights_path", "discriminator.weights_path",
                "loss.lpips_weights_path")


@dataclass(frozen=True)
class AblationPlan:
    """A validated sweep: what every trial trains and how it is evaluated (recorded in ``<sweep>/sweep.json``)."""

    name: str
    path: str  # the Tuner's experiment folder
    base_preset: str
    study: str
    variants: Tuple[str, ...]
    overrides: Tuple[str, ...]  # the user's
    path_overrides: Tuple[str, ...]  # the user's relative paths made absolute (trials run in their own folders)
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
def study_variants(study: str, variants: Optional[Sequence[str]] = None) -> Tuple[str, ...]:
    """The variants of a named study, or the ``custom`` list (each ``v`` or ``v1+v2`` of ``config.ABLATIONS``)."""
    if study == "custom":
        chosen = tuple(variants or ())
        if not chosen:
            raise ConfigError("study 'custom' needs variants, e.g. ['fusion-linear', 'shallow-align-off'].")
        if len(set(chosen)) != len(chosen):
            raise ConfigError(f"custom variants {list(chosen)} name one variant twice; list each once.")
        for v in chosen:
            for part in v.split("+"):
                if part not in ABLATIONS:
                    raise ConfigError(f"custom variant '{v}' has unknown part '{part}'; choose from "
                                      f"{sorted(ABLATIONS)}.")
        return chosen
    if study not in STUDIES:
        raise ConfigError(f"Unknown ablation study '{study}'; choose one of {sorted(STUDIES) + ['custom']}.")
    if variants:
        raise ConfigError(f"study '{study}' has fixed variants {list(STUDIES[study])}; pass variants only with "
                          f"study 'custom'.")
    return STUDIES[study]


def _override_keys(overrides: Sequence[str]) -> Dict[str, str]:
    return {o.split("=", 1)[0].strip(): o for o in overrides if "=" in o}


def _check_no_conflict(variants: Sequence[str], overrides: Sequence[str]) -> None:
    """An override of a key that a variant sets would erase the difference the sweep measures."""
    user = _override_keys(overrides)
    for v in variants:
        for part in v.split("+"):
            for key in _override_keys(ABLATIONS[part]):
                if key in user:
                    raise ConfigError(f"Override '{user[key]}' sets {key}, which ablation variant '{part}' varies; "
                                      f"drop it from the overrides.")


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


def plan_sweep(base_preset: str, study: str, name: str, storage_path: str, *, variants: Optional[Sequence[str]] = None,
               overrides: Sequence[str] = (), steps: Optional[int] = None, scheduler: str = "grid",
               asha_metric: str = "train_rec_mse", asha_mode: str = "min", grace_period: Optional[int] = None,
               reduction_factor: int = 3, num_workers_per_trial: int = 1, gpus_per_worker: int = 0,
               eval_images: Optional[int] = None, eval_batch_size: int = 32, decode_actors: int = 1,
               probe_train_images: Optional[int] = None, zero_shot: bool = False, inception_weights: str = "",
               fid_cache_dir: str = "") -> AblationPlan:
    """Validate a sweep before anything starts: every variant's config, its pretrained files (paper scale), the data,
    the Inception weights, the scheduler. Raises :class:`ConfigError` (or ``MissingWeightsError``) naming the bad
    value or file."""
    from ideal_ray.data import sources
    from ideal_ray.eval.inception import resolve_inception_weights
    from ideal_ray.tune.common import sweep_path
    from ideal_ray.weights import MissingWeightsError

    if "+" in base_preset:
        raise ConfigError(f"base_preset '{base_preset}' already holds a variant; pass the base alone (tiny, paper) "
                          f"and the variants through the study.")
    if "://" in storage_path:
        raise ConfigError(f"storage_path {storage_path} is a URI; ablation sweeps need a folder every node can read "
                          f"(local disk or NFS), since each trial's evaluation reads its export from there.")
    chosen = study_variants(study, variants)
    if base_preset == "tiny" and study in PAPER_SCALE_STUDIES:
        raise ConfigError(f"study '{study}' names 24-block paper-scale networks and cannot run on the tiny preset; "
                          f"use base_preset 'paper', or study 'custom' with tiny variants such as 'layer-probe'.")
    if scheduler not in SCHEDULERS:
        raise ConfigError(f"scheduler '{scheduler}' is unknown; choose one of {SCHEDULERS}.")
    if gpus_per_worker not in (0, 1):
        raise ConfigError(f"gpus_per_worker {gpus_per_worker} must be 0 (CPU workers) or 1 (one GPU per worker).")
    if num_workers_per_trial < 1:
        raise ConfigError(f"num_workers_per_trial {num_workers_per_trial} must be at least 1.")
    if steps is not None and steps < 1:
        raise ConfigError(f"steps {steps} must be at least 1 (or None for the preset's schedule).")
    if eval_batch_size < 1 or decode_actors < 1:
        raise ConfigError(f"eval_batch_size {eval_batch_size} and decode_actors {decode_actors} must be at least 1.")
    _check_no_conflict(chosen, overrides)
    path = sweep_path(storage_path, name)

    draft = AblationPlan(name=name, path=path, base_preset=base_preset, study=study, variants=chosen,
                         overrides=tuple(overrides), path_overrides=(), steps=int(steps or 0), scheduler=scheduler,
                         asha_metric=asha_metric, asha_mode=asha_mode, grace_period=0,
                         reduction_factor=reduction_factor, num_workers_per_trial=num_workers_per_trial,
                         gpus_per_worker=gpus_per_worker, eval_images=eval_images, eval_batch_size=eval_batch_size,
                         decode_actors=decode_actors, probe_train_images=0, zero_shot=zero_shot,
                         inception_weights="", fid_cache_dir="")
    first = draft.trial_config(chosen[0])
    draft = dataclasses.replace(draft, path_overrides=tuple(_absolute_path_overrides(first)))
    configs = {v: draft.trial_config(v) for v in chosen}

    for v, cfg in configs.items():
        if zero_shot and cfg.model.vfm.backbone not in ("siglip2", "tiny"):
            raise ConfigError(f"zero_shot needs a text tower, which variant '{v}' ({cfg.model.vfm.backbone}) has "
                              f"not; run the sweep with zero_shot=False.")

    grace = 0
    if scheduler == "asha":
        budget = min(cfg.schedule.steps for cfg in configs.values())
        if budget < 1:
            raise ConfigError("ASHA needs a step budget to place its rungs: pass steps=N (or schedule.steps=N).")
        if not asha_metric.startswith(TRAIN_PREFIX):
            raise ConfigError(f"asha_metric '{asha_metric}' must be a training metric ({TRAIN_PREFIX}<key>, e.g. "
                              f"train_rec_mse): evaluation metrics exist only once a trial has finished.")
        if asha_mode not in ("min", "max"):
            raise ConfigError(f"asha_mode '{asha_mode}' must be 'min' or 'max'.")
        if reduction_factor < 2:
            raise ConfigError(f"reduction_factor {reduction_factor} must be at least 2.")
        log_every = first.schedule.log_every
        grace = grace_period or max(log_every, budget // reduction_factor ** 2)
        if not 1 <= grace < budget:
            raise ConfigError(f"grace_period {grace} must be in [1, {budget}) (the step budget).")

    single_layer = any(cfg.model.vfm.single_layer for cfg in configs.values())
    if probe_train_images is None:
        probe_train_images = LAYER_PROBE_TRAIN_IMAGES if single_layer else 0
    if probe_train_images < 0:
        raise ConfigError(f"probe_train_images={probe_train_images} must be >= 0 (0 = no linear probe).")

    for v, cfg in configs.items():
        try:
            required_weights(cfg)
        except MissingWeightsError as e:
            raise ConfigError(f"Ablation variant '{v}' cannot run on this machine: {e}") from None
    try:
        inception_weights = os.path.abspath(resolve_inception_weights(inception_weights))
    except MissingWeightsError as e:
        raise ConfigError(f"The sweep's evaluation cannot run on this machine: {e}") from None

    from ideal_ray.train.ray_trainer import prepare_data

    prepare_data(first)  # the training images (the synthetic set is made for tiny); clear errors before any trial
    n_val = len(sources.list_images(first.data.root, split="val", class_index=first.data.class_index))
    if not 2 <= (eval_images or n_val) <= n_val:
        raise ConfigError(f"eval_images={eval_images} must be in [2, {n_val}] (the images of {first.data.root}/val).")
    if scheduler == "grid":  # ASHA's settings do not apply: a grid rerun is not refused over them
        draft = dataclasses.replace(draft, asha_metric="", asha_mode="", reduction_factor=0)
    return dataclasses.replace(draft, probe_train_images=int(probe_train_images), grace_period=grace,
                               inception_weights=inception_weights,
                               fid_cache_dir=os.path.abspath(fid_cache_dir) if fid_cache_dir else "")


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


# -------------------------------------------------------------------------------------------------- trial
class TrainingHistory:
    """A trial's training run, read back from MLflow as it grows: ``(step, {train_<key>: value})`` rows logged at
    or after ``since_ms`` (earlier rows belong to an interrupted attempt), each step once. Build it before the run
    starts."""

    def __init__(self, tracking_uri: str, run_name: str, since_ms: int):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri)
        self.run_name, self.since_ms = run_name, since_ms
        self.run_id: Optional[str] = None
        self.last_step = 0
        # Create a SQLite store now, before the train workers open it: two processes creating one store race
        # ("table _alembic_tmp_experiments already exists").
        self.client.search_experiments(max_results=1)

    def _find_run(self) -> Optional[str]:
        exp = self.client.get_experiment_by_name(TRAIN_EXPERIMENT)
        if exp is None:
            return None
        runs = self.client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{self.run_name}'",
                                       order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0].info.run_id if runs else None

    def _history(self, key: str):
        return [m for m in self.client.get_metric_history(self.run_id, key)
                if m.step > self.last_step and m.timestamp >= self.since_ms]

    def new_rows(self) -> List[Tuple[int, Dict[str, float]]]:
        """Steps logged since the last call, in order. The step key is read first: every key of a step it shows is
        already stored (one log_batch per step), so no step is reported with a part of its metrics."""
        self.run_id = self.run_id or self._find_run()
        if self.run_id is None:
            return []
        steps = sorted({m.step for m in self._history(STEP_KEY)})
        if not steps:
            return []
        rows: Dict[int, Dict[str, float]] = {s: {} for s in steps}
        for key in self.client.get_run(self.run_id).data.metrics:
            for m in self._history(key):
                if m.step in rows:
                    rows[m.step][TRAIN_PREFIX + key] = float(m.value)
        self.last_step = steps[-1]
        return sorted(rows.items())


def _numeric(result: Dict[str, Any]) -> Dict[str, float]:
    """The finite numbers of an evaluation result (not the protocol, file lists, paths or timings)."""
    skip = ("seconds", "n", "skipped", "psnr_exact", "max_entropy")
    return {k: float(v) for k, v in result.items()
            if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def evaluate_trial(plan: AblationPlan, variant: str, export: str, cfg: TokenizerTrainConfig,
                   log: Callable[[str], None] = print) -> Dict[str, float]:
    """The trial's final metrics from ``evaluate_recon`` on the val split (read back when already written)."""
    from ideal_ray.pipelines.evaluate import evaluate_recon

    out_dir = plan.eval_dir(variant)
    done = os.path.join(out_dir, "result.json")
    if os.path.exists(done):
        with open(done) as f:
            return _numeric(json.load(f))
    result = evaluate_recon(
        export, cfg.data.root, out_dir, split="val", class_index=cfg.data.class_index, num_images=plan.eval_images,
        batch_size=plan.eval_batch_size, device="cuda" if plan.gpus_per_worker else "cpu", num_actors=1,
        decode_actors=plan.decode_actors, zero_shot=plan.zero_shot, probe_train_images=plan.probe_train_images,
        inception_weights=plan.inception_weights, cache_dir=plan.fid_cache_dir, run_name=f"{plan.name}.{variant}",
        grid=False, log_fn=log)
    return _numeric(result)


def run_trial(config: Dict[str, Any], plan: AblationPlan) -> None:
    """Tune function trainable: train the variant (forwarding its logged steps), then evaluate and report."""
    from mlflow.exceptions import MlflowException
    from ray import tune
    from ray.data import DataContext

    from ideal_ray.tracking import default_tracking_uri
    from ideal_ray.train.ray_trainer import train_tokenizer

    variant = config["variant"]
    cfg = plan.trial_config(variant)
    DataContext.get_current().enable_progress_bars = False
    history = TrainingHistory(default_tracking_uri(os.path.join(cfg.output_dir, cfg.name)), cfg.name,
                              since_ms=int(time.time() * 1000))
    outcome: Dict[str, Any] = {}

    def train() -> None:
        try:
            outcome["summary"] = train_tokenizer(cfg, log=lambda line: print(line, flush=True))
        except BaseException as e:  # re-raised in the trial's own thread below
            outcome["error"] = e

    worker = threading.Thread(target=train, name=f"train-{variant}", daemon=True)
    worker.start()
    last: Dict[str, float] = {}
    total = cfg.schedule.steps
    while True:
        worker.join(POLL_S)
        alive = worker.is_alive()
        try:
            rows = history.new_rows()
        except MlflowException as e:  # e.g. a busy store: the next read picks up where this one stopped
            print(f"[ideal-ray] could not read the training metrics of {cfg.name} this time: {e}", flush=True)
            rows = []
        for step, row in rows:
            last = row
            if not total or step < total:  # the last step is reported with the evaluation
                tune.report({**row, "step": step})
        if not alive:
            break
    if "error" in outcome:
        raise outcome["error"]
    summary = outcome["summary"]
    metrics = evaluate_trial(plan, variant, summary["export"], cfg)
    tune.report({**last, **metrics, "step": summary["steps"]})


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


# -------------------------------------------------------------------------------------------------- sweep
def sweep_ablation(base_preset: str, study: str, name: str, storage_path: str, *,
                   variants: Optional[Sequence[str]] = None, overrides: Sequence[str] = (),
                   steps: Optional[int] = None, scheduler: str = "grid", asha_metric: str = "train_rec_mse",
                   asha_mode: str = "min", grace_period: Optional[int] = None, reduction_factor: int = 3,
                   num_workers_per_trial: int = 1, gpus_per_worker: int = 0,
                   max_concurrent_trials: Optional[int] = None, eval_images: Optional[int] = None,
                   eval_batch_size: int = 32, decode_actors: int = 1, probe_train_images: Optional[int] = None,
                   zero_shot: bool = False, inception_weights: str = "", fid_cache_dir: str = "",
                   tracking_uri: Optional[str] = None, max_failures: int = 0,
                   log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run (or resume) one ablation study of ``base_preset`` as a Ray Tune sweep; see the module notes.

    ``study``: fusion | shallow-align | backbone | layer | custom (``variants``: ``config.ABLATIONS`` names, ``+`` to
    combine). ``steps``: every trial's step budget (None: the preset's). ``scheduler``: grid (every variant to the
    budget) or asha (``ASHAScheduler`` on ``asha_metric``, a ``train_<key>`` training metric, rungs from
    ``grace_period`` steps by ``reduction_factor``). ``probe_train_images``: linear-probe training images (None:
    ``LAYER_PROBE_TRAIN_IMAGES`` when a variant tokenizes a single layer, else 0). ``tracking_uri``: the MLflow
    store of the parent and child runs (None: ``$MLFLOW_TRACKING_URI`` or ``<sweep>/mlflow.db``).

    Returns ``{name, path, tracking_uri, parent_run_id, interrupted, trials: [{variant, metrics, error}]}``; an
    interrupted sweep (Ctrl-C) resumes when called again with the same arguments.
    """
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from ideal_ray.tracking import default_tracking_uri
    from ideal_ray.tune import common

    plan = plan_sweep(base_preset, study, name, storage_path, variants=variants, overrides=overrides, steps=steps,
                      scheduler=scheduler, asha_metric=asha_metric, asha_mode=asha_mode, grace_period=grace_period,
                      reduction_factor=reduction_factor, num_workers_per_trial=num_workers_per_trial,
                      gpus_per_worker=gpus_per_worker, eval_images=eval_images, eval_batch_size=eval_batch_size,
                      decode_actors=decode_actors, probe_train_images=probe_train_images, zero_shot=zero_shot,
                      inception_weights=inception_weights, fid_cache_dir=fid_cache_dir)
    resumed = check_or_record_sweep(plan)
    cfg = plan.trial_config(plan.variants[0])
    tracking_uri = tracking_uri or default_tracking_uri(plan.path)
    if plan.scheduler == "asha":
        sched = ASHAScheduler(time_attr="step", metric=plan.asha_metric, mode=plan.asha_mode,
                              max_t=cfg.schedule.steps, grace_period=plan.grace_period,
                              reduction_factor=plan.reduction_factor, stop_last_trials=False)
    else:
        sched = FIFOScheduler()
    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan), {"CPU": 1})
    concurrent, started = _start_ray(plan, cfg, max_concurrent_trials)
    try:
        parent = common.parent_run(tracking_uri, EXPERIMENT, plan.path, "ablation", common.flat_params(plan.record()))
        log(f"[ideal-ray] ablation sweep '{name}' ({'resuming' if resumed else 'new'}): {len(plan.variants)} variants "
            f"of {base_preset} ({study}), {plan.scheduler}, {concurrent} at a time, {trial_cpus(plan, cfg)} CPUs and "
            f"{trial_gpus(cfg)} GPUs per trial; {plan.path}, MLflow {tracking_uri} (parent run {parent})")
        tune_config = tune.TuneConfig(scheduler=sched, max_concurrent_trials=concurrent,
                                      trial_name_creator=_trial_name, trial_dirname_creator=_trial_dirname)
        status = "FAILED"
        try:
            grid, interrupted = common.run_tuner(
                trainable, plan.param_space(), tune_config, plan.path,
                callbacks=[common.mlflow_callback(tracking_uri, EXPERIMENT, parent)], max_failures=max_failures)
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
    return {"name": name, "path": plan.path, "tracking_uri": tracking_uri, "parent_run_id": parent,
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
