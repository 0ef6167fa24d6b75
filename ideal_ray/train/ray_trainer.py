"""The driver side of a training stage on Ray Train: checks, datasets, ``TorchTrainer``, resume, export.

``train_tokenizer(cfg)`` is the whole tokenizer stage as one function call: it validates the config and the data
folder before any worker starts, builds one deterministic Ray dataset per rank, runs the workers of
``tokenizer_stage.train_loop_per_worker`` with DeepSpeed, and finally exports a single-file inference checkpoint.
A rerun with the same run name continues from the latest checkpoint (Ray Train keeps a checkpoint index in the run
folder); a worker that dies is replaced and the group resumes from the latest checkpoint (``FailureConfig``).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Dict, Optional

import torch

from ideal_ray.checkpoint import save_inference_checkpoint
from ideal_ray.config import ConfigError, TokenizerTrainConfig, validate
from ideal_ray.train.loop import EMA_FILE, LOOP_STATE, NonFiniteLossError

CONFIG_FILE = "ideal_config.json"
# Fields a rerun of an existing run may change: how long, how often, on how many workers. Anything else (model,
# loss, optimizer, data) would silently mix two experiments in one run folder.
# The worker count and ZeRO stage cannot change: ZeRO optimizer shards are per rank.
# The VFM placement may change: the trunk's features are a pure function of the image wherever it runs (the
# trainer's autocast rule applies in the actors too), and the trunk's weights stay in the checkpoint either way.
RESUMABLE_CHANGES = ("schedule.", "dist.storage_path", "dist.max_failures", "dist.keep_checkpoints",
                     "dist.max_bad_steps", "dist.prefetch_batches", "dist.ray_address", "dist.cpus_per_worker",
                     "dist.vfm_placement", "dist.vfm_actors", "output_dir", "preset", "data.loader_workers",
                     "data.root")


# ----------------------------------------------------------------------------------------------- storage
def _fs(uri: str):
    """(pyarrow filesystem, path) for a local path, NFS path, or s3:// / gs:// URI."""
    import pyarrow.fs

    if "://" not in uri:
        uri = os.path.abspath(uri)
        return pyarrow.fs.LocalFileSystem(), uri
    return pyarrow.fs.FileSystem.from_uri(uri)


def storage_uri(cfg: TokenizerTrainConfig) -> str:
    s = cfg.dist.storage_path or cfg.output_dir  # "" = next to the run's exports
    return s if "://" in s else os.path.abspath(s)


def run_uri(cfg: TokenizerTrainConfig) -> str:
    return storage_uri(cfg).rstrip("/") + "/" + cfg.name


def latest_checkpoint_step(run_path: str) -> int:
    """Step of the latest checkpoint Ray Train registered for this run (0 when there is none)."""
    from ray.train import Result  # Train V2's Result (V2 is the default in Ray 2.60)

    fs, path = _fs(run_path)
    import pyarrow.fs

    if fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
        return 0
    try:
        result = Result.from_path(run_path)
    except RuntimeError:  # the folder exists but holds no checkpoint index yet
        return 0
    return int((result.metrics or {}).get("step", 0)) if result.checkpoint else 0


def check_or_record_config(cfg: TokenizerTrainConfig) -> bool:
    """Record the config in the run folder; on a rerun, refuse a config that changes the experiment.

    Returns True when the run folder already held this run (a resume)."""
    import pyarrow.fs

    fs, path = _fs(run_uri(cfg))
    cfg_path = path.rstrip("/") + "/" + CONFIG_FILE
    new = cfg.flat()
    if fs.get_file_info(cfg_path).type == pyarrow.fs.FileType.File:
        with fs.open_input_stream(cfg_path) as f:
            old = json.loads(f.read().decode())
        changed = sorted(k for k in set(old) | set(new) if _norm(old.get(k)) != _norm(new.get(k))
                         and not k.startswith(RESUMABLE_CHANGES))
        if changed:
            raise ConfigError(f"Run '{cfg.name}' already exists in {storage_uri(cfg)} with a different "
                              f"{', '.join(changed[:5])}; choose a new name or restore those values to resume it.")
        resumed = True
    else:
        resumed = False
    fs.create_dir(path, recursive=True)
    with fs.open_output_stream(cfg_path) as f:
        f.write(json.dumps(new, indent=1, sort_keys=True, default=str).encode())
    return resumed


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


# -------------------------------------------------------------------------------------------- the stage
def prepare_data(cfg: TokenizerTrainConfig):
    """List the training images (clear errors before any worker starts); make the synthetic set for tiny."""
    from ideal_ray.data.ray_pipeline import list_training_images
    from ideal_ray.train.local import ensure_dataset

    ensure_dataset(cfg)
    paths, labels = list_training_images(cfg.data.root, "train", cfg.data.class_index)
    if len(paths) < cfg.data.global_batch:
        raise ConfigError(f"data.root {cfg.data.root} has {len(paths)} training images, fewer than one global batch "
                          f"of {cfg.data.global_batch}.")
    return paths, labels


def vfm_actors_total(cfg) -> int:
    """Ray Data VFM actors of the whole run (one pool per rank with ``dist.vfm_placement=data``, else none)."""
    d = cfg.dist
    return d.num_workers * d.vfm_actors if d.vfm_placement == "data" else 0


def local_cluster_cpus(cfg) -> int:
    """Logical CPUs a local cluster needs: the train workers', one decode actor pool per rank, the VFM actors
    (one CPU each, also on GPU) and room for Ray Data's read tasks. On a 2-core laptop Ray Data and Train
    deadlock when workers and actor pools take every logical CPU, so the local cluster claims at least this."""
    d = cfg.dist
    return int(d.num_workers * (d.cpus_per_worker + max(1, cfg.data.loader_workers))) + vfm_actors_total(cfg) + 2


def init_ray(cfg: TokenizerTrainConfig) -> None:
    """Join ``dist.ray_address`` / ``$RAY_ADDRESS`` or start a local cluster sized for the stage
    (:func:`local_cluster_cpus`; DeepSpeed told to use the CPU when the workers have no GPU)."""
    import ray

    from ideal_ray.pipelines.cluster import init_ray as connect_or_start

    d = cfg.dist
    if not connect_or_start(local_cluster_cpus(cfg), d.ray_address,
                            None if d.use_gpu else {"env_vars": {"DS_ACCELERATOR": "cpu"}}):
        return
    if d.use_gpu:  # a local cluster cannot grow: say so now rather than wait forever for GPUs
        have, need = int(ray.cluster_resources().get("GPU", 0)), d.num_workers + vfm_actors_total(cfg)
        if have < need:
            ray.shutdown()
            raise ConfigError(f"dist.use_gpu needs {need} GPUs on this machine ({d.num_workers} train workers + "
                              f"{vfm_actors_total(cfg)} VFM actors) but it has {have}; lower dist.num_workers or "
                              f"dist.vfm_actors, or use dist.vfm_placement=trainer.")


def run_stage(cfg, worker_fn: Callable[[Dict[str, Any]], None], rank_dataset_fn: Callable[[int, int], Any],
              total_steps: int, experiment: str, extra_config: Dict[str, Any], log: Callable[[str], None],
              tracking_uri: Optional[str] = None):
    """Run a stage's workers on Ray Train and return ``(result, final_step, tracking_uri, local_dir)``.

    Shared by every stage: records/checks the config in the run folder, starts Ray, builds one dataset per rank
    (``rank_dataset_fn(rank, start_step)``, evaluated at every (re)start of the worker group so the data resumes
    at the latest checkpoint), and runs ``worker_fn`` on ``cfg.dist.num_workers`` workers with restarts
    (``FailureConfig``) and checkpoints in ``cfg.dist.storage_path/cfg.name``. MLflow: ``tracking_uri``, default
    ``$MLFLOW_TRACKING_URI`` or ``<output_dir>/<name>/mlflow.db``.
    """
    import ray.train
    from ray.data import DataContext
    from ray.train.torch import TorchConfig, TorchTrainer

    from ideal_ray.data.ray_pipeline import train_data_config
    from ideal_ray.tracking import default_tracking_uri

    resumed = check_or_record_config(cfg)
    init_ray(cfg)
    d = cfg.dist
    path = run_uri(cfg)
    local_dir = os.path.join(os.path.abspath(cfg.output_dir), cfg.name)
    tracking_uri = tracking_uri or default_tracking_uri(local_dir)
    log(f"[ideal-ray] run '{cfg.name}' ({'resuming' if resumed else 'new'}): {total_steps} steps on "
        f"{d.num_workers} workers, storage {path}, MLflow {tracking_uri}")

    def dataset_for(rank: int):
        def build():
            return rank_dataset_fn(rank, latest_checkpoint_step(path))
        return build

    # One progress bar per rank dataset would flood the job log; the loop logs throughput instead.
    DataContext.get_current().enable_progress_bars = False
    resources = {"CPU": d.cpus_per_worker, **({"GPU": 1} if d.use_gpu else {})}
    trainer = TorchTrainer(
        worker_fn,
        train_loop_config={"cfg": dataclasses.asdict(cfg), "total_steps": total_steps, "tracking_uri": tracking_uri,
                           "experiment": experiment, **extra_config},
        scaling_config=ray.train.ScalingConfig(num_workers=d.num_workers, use_gpu=d.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=cfg.name, storage_path=storage_uri(cfg),
            failure_config=ray.train.FailureConfig(max_failures=d.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=d.keep_checkpoints)),
        datasets={f"train_{r}": dataset_for(r) for r in range(d.num_workers)},
        dataset_config=train_data_config(),  # no splitting, order preserved: rank r reads only train_r
        torch_config=TorchConfig(backend="nccl" if d.use_gpu else "gloo"),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    final_step = latest_checkpoint_step(path)
    if final_step < total_steps:
        raise NonFiniteLossError(
            f"Run '{cfg.name}' stopped at step {final_step} of {total_steps}: {d.max_bad_steps} non-finite losses in "
            f"a row (see the worker log). The latest good checkpoint (step {final_step}) is kept; rerun the same "
            f"name after lowering the learning rate or fixing the data to resume from it.")
    return result, final_step, tracking_uri, local_dir


def train_tokenizer(cfg: TokenizerTrainConfig, log: Callable[[str], None] = print,
                    tracking_uri: Optional[str] = None) -> Dict[str, Any]:
    """Train (or resume) the tokenizer on Ray Train + DeepSpeed; export the EMA weights. Returns a summary. MLflow
    experiment ``ideal-tokenizer`` at ``tracking_uri`` (default ``$MLFLOW_TRACKING_URI`` or
    ``<output_dir>/<name>/mlflow.db``)."""
    from ideal_ray.data.ray_pipeline import put_images, rank_dataset, schedule_info
    from ideal_ray.train.tokenizer_stage import train_loop_per_worker, vfm_stage

    validate(cfg)
    paths, labels = prepare_data(cfg)
    steps_per_epoch = schedule_info(len(paths), cfg.data.global_batch)
    total_steps = cfg.schedule.steps or int(cfg.optim.epochs * steps_per_epoch)
    vfm = vfm_stage(cfg)
    log(f"[ideal-ray] tokenizer: {len(paths)} images, {steps_per_epoch} steps/epoch, VFM in the "
        + ("trainers" if vfm is None else f"data pipeline ({vfm.num_actors} actor(s) per rank, "
           f"{'bf16' if vfm.bf16 else 'fp32'} features)"))
    init_ray(cfg)
    images = put_images(paths, labels)  # listed once; every rank's decode actors read it from the object store

    def rank_data(rank: int, start: int):
        return rank_dataset(cfg.data, cfg.dist.num_workers, rank, start_step=start,
                            num_steps=max(total_steps - start, 0), seed=cfg.optim.seed, images=images,
                            num_actors=max(1, cfg.data.loader_workers), vfm=vfm)

    result, final_step, tracking_uri, local_dir = run_stage(
        cfg, train_loop_per_worker, rank_data, total_steps, "ideal-tokenizer",
        {"steps_per_epoch": steps_per_epoch}, log, tracking_uri=tracking_uri)
    export_path = export_tokenizer(result.checkpoint, cfg, os.path.join(local_dir, f"tokenizer_step{final_step}.pt"),
                                   step=final_step)
    record_final(tracking_uri, "ideal-tokenizer", result.checkpoint, {"inference_export": export_path})
    log(f"[ideal-ray] done: checkpoint {result.checkpoint.path}, inference export {export_path}")
    return {"checkpoint": result.checkpoint.path, "export": export_path, "steps": final_step,
            "tracking_uri": tracking_uri, "run_path": run_uri(cfg)}


# ----------------------------------------------------------------------------------------------- export
def export_tokenizer(checkpoint, cfg: TokenizerTrainConfig, out_path: str, step: int = 0,
                     overwrite: bool = False) -> str:
    """Single-file inference checkpoint from a training checkpoint: the tokenizer with EMA weights + config.

    The frozen VFM trunk is included when it has no weights file of its own (random-init tiny runs); with a
    pretrained VFM it is left out and the loader takes it from the VFM's weights file (full fp32 precision).
    """
    from ideal_ray.models.tokenizer import IdealTokenizer
    from ideal_ray.train import ds as dsu

    if os.path.exists(out_path) and not overwrite:
        return out_path  # an earlier export of the same step; never replaced silently
    with checkpoint.as_directory() as d:
        module_state = dsu.load_module_state(d, "generator")
        ema = torch.load(os.path.join(d, EMA_FILE), map_location="cpu", weights_only=True)
    model = IdealTokenizer(cfg.model, load_weights=False)
    model.load_state_dict(module_state)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in ema.items():
            params[name].copy_(value)
    include_vfm = not (cfg.model.vfm.pretrained or cfg.model.vfm.weights_path)
    return save_inference_checkpoint(out_path, model, cfg, step=step, include_vfm=include_vfm, overwrite=overwrite)


def record_final(tracking_uri: str, experiment: str, checkpoint, tags: Dict[str, str]) -> None:
    """Attach the final checkpoint (and e.g. the export path) to the run's MLflow record; the run id is in the
    checkpoint's loop state."""
    from ideal_ray.tracking import Tracker

    with checkpoint.as_directory() as d:
        with open(os.path.join(d, LOOP_STATE)) as f:
            run_id = json.load(f).get("tracker_run_id")
    if not run_id:
        return
    t = Tracker(tracking_uri, experiment, run_name="", run_id=run_id)
    t.set_tags({"final_checkpoint": str(checkpoint.path), **tags})
    t.finish("FINISHED")
