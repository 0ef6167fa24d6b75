"""The driver side of a training stage: checks, data, the run record, workers, resume, export.

``train_tokenizer(cfg)`` is the whole tokenizer stage as one function call: it validates the config and the data
folder before any worker starts, records the config in the run folder (a changed experiment under an existing name
is refused), runs the stage's workers (``tokenizer_stage.train_loop_per_worker``: the shared loop over
``TokenizerStage``), and finally exports a single-file inference checkpoint. Two places to run the workers, one
path otherwise (:func:`run_stage`):

* on Ray Train (default): one deterministic Ray dataset per rank, ``TorchTrainer`` workers, checkpoints reported
  to Ray in ``dist.storage_path/<name>``; a worker that dies is replaced and the group resumes from the latest
  checkpoint (``FailureConfig``);
* in this process (``in_process=True``): rank 0 of 1, no Ray; the same worker function, stage, loop, MLflow
  record and export, the batches a 1-worker Ray run reads (``ray_pipeline.local_batches``) and checkpoints in the
  run folder (``LocalSession``).

Either way a rerun with the same run name continues from the latest checkpoint, and either way the files that
could not be read are reported the same way: the decode code reports each to one ledger
(:class:`~ideal_ray.data.skipped.SkipLedger`, a Ray actor on Ray), from which the driver writes ``skipped.tsv`` in the
run folder, logs ``data/skipped_files`` and the file to MLflow and returns the count; a batch mostly unreadable (a
vanished mount) stops the run with the pipeline's one sentence (:class:`~ideal_ray.data.skipped.UnreadableDataError`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch

from ideal_ray.checkpoint import save_inference_checkpoint
from ideal_ray.config import ConfigError, TokenizerTrainConfig, validate
from ideal_ray.data.skipped import UnreadableDataError
from ideal_ray.train.loop import EMA_FILE, LOOP_STATE, NonFiniteLossError
from ideal_ray.train.run_storage import (check_or_record_config, check_storage, latest_checkpoint_step, publish_export,
                                         run_uri, storage_uri)

# -------------------------------------------------------------------------------------------- the stage
def prepare_data(cfg: TokenizerTrainConfig):
    """The training images' :class:`~ideal_ray.data.sources.Listing`, as extraction lists them (``data.format``, with
    ``data.labels_file`` for a flat folder; clear errors before any worker starts). When ``data.root`` holds no
    training split yet, make the synthetic set there only where asked: the tiny preset's own root
    (``data/synthetic``, the demo's) or ``data.make_synthetic=true``; any other missing root is refused (a typo must
    not train on invented data)."""
    from ideal_ray.config import check_data_root
    from ideal_ray.data.ray_pipeline import training_listing
    from ideal_ray.data.synthetic import make_synthetic_imagenet

    d = cfg.data
    if not check_data_root(cfg):
        make_synthetic_imagenet(d.root, num_classes=d.synthetic_classes, train_per_class=d.synthetic_train_per_class,
                                val_per_class=d.synthetic_val_per_class, size=d.synthetic_size, seed=cfg.optim.seed)
    listing = training_listing(d, "train")
    if len(listing) < d.global_batch:
        raise ConfigError(f"data.root {d.root} has {len(listing)} training images, fewer than one global batch "
                          f"of {d.global_batch}.")
    return listing


def vfm_actors_total(cfg) -> int:
    """Ray Data VFM actors of the whole run (one pool per rank with ``dist.vfm_placement=data``, else none)."""
    d = cfg.dist
    return d.num_workers * d.vfm_actors if d.vfm_placement == "data" else 0


def data_cpus_per_rank(cfg) -> int:
    """Logical CPUs one rank's input pipeline reserves at most: its decode (or shard-reader) actors, its VFM actors
    with ``dist.vfm_placement=data``, and one for Ray Data's read tasks."""
    d = cfg.dist
    return max(1, cfg.data.loader_workers) + (d.vfm_actors if d.vfm_placement == "data" else 0) + 1


def local_cluster_cpus(cfg) -> int:
    """Logical CPUs a local cluster needs: the train workers', one decode actor pool per rank, the VFM actors
    (one CPU each, also on GPU) and room for Ray Data's read tasks. On a 2-core laptop Ray Data and Train
    deadlock when workers and actor pools take every logical CPU, so the local cluster claims at least this."""
    d = cfg.dist
    return int(d.num_workers * (d.cpus_per_worker + max(1, cfg.data.loader_workers))) + vfm_actors_total(cfg) + 2


def init_ray(cfg, *more) -> None:
    """Join ``dist.ray_address`` / ``$RAY_ADDRESS`` or start a local cluster sized for the stage ``cfg`` and any
    ``more`` stage configs that will run on it (:func:`local_cluster_cpus` of the largest; DeepSpeed told to use the
    CPU when no stage's workers have a GPU). A pipeline starts one such cluster for all its stages."""
    import ray

    from ideal_ray.cluster import init_ray as connect_or_start

    cfgs = (cfg,) + more
    use_gpu = any(c.dist.use_gpu for c in cfgs)
    if not connect_or_start(max(local_cluster_cpus(c) for c in cfgs), cfg.dist.ray_address,
                            None if use_gpu else {"env_vars": {"DS_ACCELERATOR": "cpu"}}):
        return
    have = int(ray.cluster_resources().get("GPU", 0))
    for c in cfgs:  # a local cluster cannot grow: say so now rather than wait forever for GPUs
        need = c.dist.num_workers + vfm_actors_total(c)
        if c.dist.use_gpu and have < need:
            ray.shutdown()
            raise ConfigError(f"dist.use_gpu needs {need} GPUs on this machine ({c.dist.num_workers} train workers + "
                              f"{vfm_actors_total(c)} VFM actors) but it has {have}; lower dist.num_workers or "
                              f"dist.vfm_actors, or use dist.vfm_placement=trainer.")
        if c.dist.placement_strategy == "STRICT_SPREAD" and c.dist.num_workers > 1:
            ray.shutdown()
            raise ConfigError(f"dist.placement_strategy=STRICT_SPREAD puts each of the {c.dist.num_workers} workers "
                              f"on its own node, but the local cluster started here is one node; join a cluster "
                              f"(dist.ray_address / RAY_ADDRESS) or choose another placement strategy.")


@dataclass
class LocalResult:
    """What an in-process :func:`run_stage` returns where a Ray run returns Ray Train's ``Result``."""

    checkpoint: Optional[str]  # the latest checkpoint: a directory in the run folder


def run_stage(cfg, worker_fn: Callable[[Dict[str, Any]], None], rank_dataset_fn: Optional[Callable[[int, int], Any]],
              total_steps: int, experiment: str, extra_config: Dict[str, Any], log: Callable[[str], None],
              tracking_uri: Optional[str] = None, local_batches: Optional[Callable[[int], Iterator[Any]]] = None):
    """Run a stage's workers and return ``(result, final_step, tracking_uri, local_dir)``; ``result.checkpoint`` is
    the latest checkpoint (Ray Train's ``Result``, or a :class:`LocalResult` in process).

    Shared by every stage and both runners: records/checks the config in the run folder, picks the MLflow store
    (``tracking_uri``, default ``$MLFLOW_TRACKING_URI`` or ``<output_dir>/<name>/mlflow.db``), hands ``worker_fn``
    one train_loop_config, and checks that the run reached its last step (else the NaN guard stopped it).

    * On Ray Train (``local_batches`` None): starts Ray, builds one dataset per rank (``rank_dataset_fn(rank,
      start_step)``, evaluated at every (re)start of the worker group so the data resumes at the latest checkpoint),
      and runs ``worker_fn`` on ``cfg.dist.num_workers`` workers with restarts (``FailureConfig``) and checkpoints
      in ``cfg.dist.storage_path/cfg.name``.
    * In this process (``local_batches(start_step)``: the one rank's batches from a step on): ``worker_fn`` runs here
      as rank 0 of 1 (:class:`~ideal_ray.train.worker.LocalRun`) on the device of ``dist.use_gpu``, with
      checkpoints in the same run folder (``LocalSession``).
    """
    from ideal_ray.tracking import default_tracking_uri

    in_process = local_batches is not None
    d = cfg.dist
    path = run_uri(cfg)
    if in_process and "://" in path:
        raise ConfigError(f"An in-process run keeps its checkpoints in a local folder, but dist.storage_path is "
                          f"{d.storage_path}; set a local (or NFS) path, or run on Ray.")
    device = local_device(cfg) if in_process else None
    resumed = check_or_record_config(cfg, "in-process" if in_process else "ray")
    local_dir = os.path.join(os.path.abspath(cfg.output_dir), cfg.name)
    tracking_uri = tracking_uri or default_tracking_uri(local_dir)
    where = f"in this process ({device}, {d.engine} engine)" if in_process else f"on {d.num_workers} workers"
    log(f"[ideal-ray] run '{cfg.name}' ({'resuming' if resumed else 'new'}): {total_steps} steps {where}, "
        f"storage {path}, MLflow {tracking_uri}")
    config = {"cfg": dataclasses.asdict(cfg), "total_steps": total_steps, "tracking_uri": tracking_uri,
              "experiment": experiment, **extra_config}
    if in_process:
        result = _run_in_process(worker_fn, config, local_batches, device, path, log)
        final_step = local_checkpoint_step(path)
    else:
        result = _run_on_ray(cfg, worker_fn, config, rank_dataset_fn, path)
        final_step = latest_checkpoint_step(path)
    if final_step < total_steps:
        raise NonFiniteLossError(
            f"Run '{cfg.name}' stopped at step {final_step} of {total_steps}: {d.max_bad_steps} non-finite losses in "
            f"a row (see the worker log). The latest good checkpoint (step {final_step}) is kept; rerun the same "
            f"name after lowering the learning rate or fixing the data to resume from it.")
    return result, final_step, tracking_uri, local_dir


def _run_on_ray(cfg, worker_fn, config: Dict[str, Any], rank_dataset_fn, path: str):
    import ray.train
    from ray.data import DataContext
    from ray.train.torch import TorchConfig, TorchTrainer

    from ideal_ray.data.ray_pipeline import train_data_config

    init_ray(cfg)
    d = cfg.dist

    def dataset_for(rank: int):
        def build():
            return rank_dataset_fn(rank, latest_checkpoint_step(path))
        return build

    # One progress bar per rank dataset would flood the job log; the loop logs throughput instead.
    DataContext.get_current().enable_progress_bars = False
    resources = {"CPU": d.cpus_per_worker, **({"GPU": 1} if d.use_gpu else {})}
    # Ray Train 2.60 patches print() in its workers to also log each line through the root logger, and still prints
    # it itself, since a Ray worker's sys.stdout is never sys.__stdout__: every line twice. Ray Train hands this
    # driver setting to its workers.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    trainer = TorchTrainer(
        worker_fn,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=d.num_workers, use_gpu=d.use_gpu,
                                               resources_per_worker=resources,
                                               placement_strategy=d.placement_strategy),
        run_config=ray.train.RunConfig(
            name=cfg.name, storage_path=storage_uri(cfg),
            failure_config=ray.train.FailureConfig(max_failures=d.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=d.keep_checkpoints)),
        datasets={f"train_{r}": dataset_for(r) for r in range(d.num_workers)},
        # no splitting, order preserved: rank r reads only train_r, within its share of the CPUs
        dataset_config=train_data_config(data_cpus_per_rank(cfg)),
        torch_config=TorchConfig(backend="nccl" if d.use_gpu else "gloo"),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return result


def local_device(cfg) -> torch.device:
    """The device of an in-process run: the current CUDA device with ``dist.use_gpu``, else the CPU."""
    if not cfg.dist.use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("dist.use_gpu is true but this process sees no CUDA device; run on a GPU machine, or set "
                          "dist.use_gpu=false (--cpu).")
    return torch.device("cuda", torch.cuda.current_device())


def local_checkpoint(run_path: str) -> tuple:
    """(directory, step) of the latest checkpoint an in-process run wrote in ``run_path`` ((None, 0) if none)."""
    from ideal_ray.train.sessions import LocalSession

    if not os.path.isdir(run_path):
        return None, 0
    ckpts = LocalSession(run_path).checkpoints()
    if not ckpts:
        return None, 0
    with open(os.path.join(ckpts[-1], LOOP_STATE)) as f:
        return ckpts[-1], int(json.load(f)["step"])


def local_checkpoint_step(run_path: str) -> int:
    """Step of the latest checkpoint of an in-process run (0 when there is none)."""
    return local_checkpoint(run_path)[1]


def _run_in_process(worker_fn, config: Dict[str, Any], local_batches, device: torch.device, path: str,
                    log: Callable[[str], None]) -> LocalResult:
    """``worker_fn`` in this process as rank 0 of 1, inside a one-rank process group (created for the run, unless
    the caller has one), from the latest checkpoint in ``path``."""
    from ideal_ray.train.sessions import local_process_group
    from ideal_ray.train.worker import LocalRun

    with local_process_group(device):
        worker_fn({**config, "local": LocalRun(device, path, local_batches(local_checkpoint_step(path)), log)})
    return LocalResult(local_checkpoint(path)[0])


def train_tokenizer(cfg: TokenizerTrainConfig, log: Callable[[str], None] = print,
                    tracking_uri: Optional[str] = None, in_process: bool = False) -> Dict[str, Any]:
    """Train (or resume) the tokenizer; export the EMA weights. Returns a summary (``checkpoint``, ``export``,
    ``steps``, ``tracking_uri``, ``run_path``, ``metrics``: the MLflow run's latest values; ``export_uri``: the
    export's copy in the run folder when ``dist.storage_path`` is an object store, else None; ``skipped_files``: the
    image files training found unreadable, listed in ``skipped_file``; ``images``: the listed images less those).
    MLflow experiment ``ideal-tokenizer`` at ``tracking_uri`` (default ``$MLFLOW_TRACKING_URI`` or
    ``<output_dir>/<name>/mlflow.db``).

    On Ray Train by default; ``in_process=True`` runs the same stage in this process, as the one rank of a 1-worker
    run (``dist.num_workers`` is taken as 1), on the engine of ``dist.engine`` (``torch`` is the quick CPU option)."""
    from ideal_ray.data.augment import schedule_info
    from ideal_ray.data.ray_pipeline import local_batches, put_listing, rank_dataset
    from ideal_ray.data.skipped import SkipLedger, remote_ledger
    from ideal_ray.train.tokenizer_stage import train_loop_per_worker, vfm_stage

    if in_process:
        cfg = dataclasses.replace(cfg, dist=dataclasses.replace(cfg.dist, num_workers=1))
    validate(cfg)
    check_storage(cfg)
    vfm = vfm_stage(cfg)
    if in_process and vfm is not None:
        raise ConfigError(f"dist.vfm_placement={cfg.dist.vfm_placement} runs the VFM in Ray Data actors, which an "
                          f"in-process run does not have; set dist.vfm_placement=trainer (the same math).")
    listing = prepare_data(cfg)
    steps_per_epoch = schedule_info(len(listing), cfg.data.global_batch)
    total_steps = cfg.schedule.steps or int(cfg.optim.epochs * steps_per_epoch)
    log(f"[ideal-ray] tokenizer: {len(listing)} images ({listing.fmt}), {steps_per_epoch} steps/epoch, VFM in the "
        + ("trainers" if vfm is None else f"data pipeline ({vfm.num_actors} actor(s) per rank, "
           f"{'bf16' if vfm.bf16 else 'fp32'} features)"))

    if in_process:
        rank_data = None
        skips = SkipLedger()  # the run's list of unreadable files
        packed = listing.pack()  # the one packing, as a Ray run puts it into the object store

        def local(start: int):  # the batches of rank 0 of a 1-worker Ray run, made here
            return local_batches(cfg.data, 1, 0, start, max(total_steps - start, 0), cfg.optim.seed,
                                 images=packed, skips=skips)
    else:
        local = None
        init_ray(cfg)
        images = put_listing(listing)  # listed once; every rank's decode actors read it from the object store
        skips = remote_ledger()  # ... and report unreadable files to this actor, which outlives worker restarts

        def rank_data(rank: int, start: int):
            return rank_dataset(cfg.data, cfg.dist.num_workers, rank, start_step=start,
                                num_steps=max(total_steps - start, 0), seed=cfg.optim.seed, images=images,
                                num_actors=max(1, cfg.data.loader_workers), vfm=vfm, skips=skips)

    try:
        result, final_step, tracking_uri, local_dir = run_stage(
            cfg, train_loop_per_worker, rank_data, total_steps, "ideal-tokenizer",
            {"steps_per_epoch": steps_per_epoch}, log, tracking_uri=tracking_uri, local_batches=local)
    except Exception as e:
        stopped = None
        with contextlib.suppress(Exception):  # a ledger gone with its cluster has nothing to add to the error
            skipped_path, _, stopped = report_skipped(cfg, listing, skips, write_empty=False)
        if stopped:  # the data pipeline's own sentence, however Ray wrapped the error on its way here
            log(f"[ideal-ray] the unreadable files met are listed in {skipped_path}")
            raise UnreadableDataError(stopped) from e
        raise
    skipped_path, skipped, _ = report_skipped(cfg, listing, skips)
    export_path = export_tokenizer(result.checkpoint, cfg, os.path.join(local_dir, f"tokenizer_step{final_step}.pt"),
                                   step=final_step)
    export_uri, metrics = publish_and_record(cfg, export_path, tracking_uri, "ideal-tokenizer", result.checkpoint,
                                             metrics={"data/skipped_files": len(skipped)}, step=final_step,
                                             artifacts=[skipped_path])
    if skipped:
        log(f"[ideal-ray] {len(skipped)} unreadable image file(s) skipped (first: {skipped[0]['image_id']}: "
            f"{skipped[0]['error']}); listed in {skipped_path}")
    log(f"[ideal-ray] done: checkpoint {checkpoint_path(result.checkpoint)}, inference export {export_path}"
        + (f" (and {export_uri})" if export_uri else ""))
    return {"checkpoint": checkpoint_path(result.checkpoint), "export": export_path, "export_uri": export_uri,
            "steps": final_step, "tracking_uri": tracking_uri, "run_path": run_uri(cfg), "metrics": metrics,
            "images": len(listing) - len(skipped), "skipped_files": len(skipped), "skipped_file": skipped_path}


def report_skipped(cfg: TokenizerTrainConfig, listing, skips, write_empty: bool = True) -> tuple:
    """Write the run's ``skipped.tsv`` (``<output_dir>/<name>/``, the columns of extraction's) from the decode actors'
    ledger ``skips`` (indices into ``listing``), merged with the list an earlier, resumed attempt of the run wrote (an
    empty list is written only with ``write_empty``). Returns (its path, its entries ``[{"image_id", "error"}]``, the
    sentence that stopped the run or None). Ids are the listing's, as extraction names them (a file's path relative
    to ``data.root``; a Parquet row's or WebDataset sample's id)."""
    from ideal_ray.data.skipped import SKIPPED_FILE, ledger_call, read_skipped, write_skipped

    folder = os.path.join(os.path.abspath(cfg.output_dir), cfg.name)
    path = os.path.join(folder, SKIPPED_FILE)
    found = ledger_call(skips, "items")
    entries = {x["image_id"]: x for x in read_skipped(path)}  # an earlier attempt's (the run resumed)
    for i in sorted(found, key=lambda i: listing.ids[i]):
        image_id = listing.ids[i]
        entries.setdefault(image_id, {"image_id": image_id, "error": found[i]})
    if entries or write_empty:
        os.makedirs(folder, exist_ok=True)
        write_skipped(path, entries.values())
    return path, list(entries.values()), ledger_call(skips, "stopped")


# ----------------------------------------------------------------------------------------------- export
@contextlib.contextmanager
def checkpoint_dir(checkpoint, only: Sequence[str] = ()) -> Iterator[str]:
    """A local directory holding ``checkpoint``: a Ray Train ``Checkpoint`` (fetched when remote) or the directory
    of an in-process run's checkpoint. (Ray's ``Checkpoint`` counts as ``os.PathLike`` but refuses ``fspath``.)

    ``only``: the files the caller reads (paths relative to the checkpoint). From a checkpoint on an object store
    just those are fetched, into a temporary folder removed afterwards: an export reads the module states and the
    EMA, not the optimizer shards that are most of a checkpoint's bytes (gigabytes at paper scale, on the driver's
    disk). A file the checkpoint lacks is a FileNotFoundError naming it and the checkpoint."""
    if isinstance(checkpoint, str):
        yield checkpoint
    elif not only or getattr(checkpoint.filesystem, "type_name", "local") == "local":
        with checkpoint.as_directory() as d:
            yield d
    else:
        import pyarrow.fs

        from ideal_ray.storage import file_size

        fs = checkpoint.filesystem
        with tempfile.TemporaryDirectory(prefix="ideal-ray-checkpoint-") as d:
            for rel in only:
                source = f"{checkpoint.path}/{rel}"
                if file_size(fs, source) is None:
                    raise FileNotFoundError(f"No {rel} in the checkpoint {checkpoint_path(checkpoint)}.")
                os.makedirs(os.path.dirname(os.path.join(d, rel)), exist_ok=True)
                pyarrow.fs.copy_files(source, os.path.join(d, rel), source_filesystem=fs,
                                      destination_filesystem=pyarrow.fs.LocalFileSystem())
            yield d


def checkpoint_path(checkpoint) -> str:
    """Where ``checkpoint`` is stored (a Ray Train ``Checkpoint``'s path, as a URI on an object store; or the
    directory itself)."""
    if isinstance(checkpoint, str):
        return checkpoint
    scheme = getattr(checkpoint.filesystem, "type_name", "local")
    return str(checkpoint.path) if scheme == "local" else f"{scheme}://{checkpoint.path}"


def export_tokenizer(checkpoint, cfg: TokenizerTrainConfig, out_path: str, step: int = 0,
                     overwrite: bool = False) -> str:
    """Single-file inference checkpoint from a training checkpoint (a Ray Train ``Checkpoint`` or an in-process
    run's checkpoint directory): the tokenizer with EMA weights + config.

    The frozen VFM trunk is included when it has no weights file of its own (random-init tiny runs); with a
    pretrained VFM it is left out and the loader takes it from the VFM's weights file (full fp32 precision).
    """
    from ideal_ray.models.tokenizer import IdealTokenizer
    from ideal_ray.train.engines import MODULE_FILE, load_module_state

    if os.path.exists(out_path) and not overwrite:
        return out_path  # an earlier export of the same step; never replaced silently
    with checkpoint_dir(checkpoint, only=(f"generator/{MODULE_FILE}", EMA_FILE)) as d:
        module_state = load_module_state(d, "generator")
        ema = torch.load(os.path.join(d, EMA_FILE), map_location="cpu", weights_only=True)
    model = IdealTokenizer(cfg.model, load_weights=False)
    model.load_state_dict(module_state)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in ema.items():
            params[name].copy_(value)
    include_vfm = not (cfg.model.vfm.pretrained or cfg.model.vfm.weights_path)
    return save_inference_checkpoint(out_path, model, cfg, step=step, include_vfm=include_vfm, overwrite=overwrite)


def publish_and_record(cfg, export_path: str, tracking_uri: str, experiment: str, checkpoint,
                       **record: Any) -> Tuple[Optional[str], Dict[str, float]]:
    """The end of a training stage: the inference export published next to the checkpoints when they are on an
    object store (:func:`~ideal_ray.train.run_storage.publish_export`), then the run's MLflow record given the
    export (tags ``inference_export`` and, when published, ``inference_export_uri``) and ``record``
    (:func:`record_final`'s ``metrics``, ``step``, ``artifacts``), the export itself one of the artifacts unless
    ``dist.export_to_mlflow`` is off. Returns (the export's URI or None, the run's metrics)."""
    export_uri = publish_export(export_path, cfg)
    tags = {"inference_export": export_path, **({"inference_export_uri": export_uri} if export_uri else {})}
    artifacts = [*record.pop("artifacts", ()), *([export_path] if cfg.dist.export_to_mlflow else [])]
    return export_uri, record_final(tracking_uri, experiment, checkpoint, tags, artifacts=artifacts, **record)


def record_final(tracking_uri: str, experiment: str, checkpoint, tags: Dict[str, str],
                 metrics: Optional[Dict[str, float]] = None, step: int = 0,
                 artifacts: Sequence[str] = ()) -> Dict[str, float]:
    """Attach the final checkpoint (and e.g. the export path) to the run's MLflow record, with what only the driver
    knows: ``metrics`` (logged at ``step``) and ``artifacts`` (files); the run id is in the checkpoint's loop state.
    Returns the run's metrics (the latest value of each; empty without a run)."""
    from ideal_ray.tracking import Tracker

    if isinstance(checkpoint, str):
        with open(os.path.join(checkpoint, LOOP_STATE)) as f:
            run_id = json.load(f).get("tracker_run_id")
    else:  # the one small file, not the whole checkpoint (on an object store, a download of every shard)
        with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{LOOP_STATE}") as f:
            run_id = json.loads(f.read().decode()).get("tracker_run_id")
    if not run_id:
        return {}
    t = Tracker(tracking_uri, experiment, run_name="", run_id=run_id)
    t.set_tags({"final_checkpoint": checkpoint_path(checkpoint), **tags})
    if metrics:
        t.log_metrics(metrics, step)
    for path in artifacts:
        t.log_artifact(path)
    t.finish("FINISHED")
    return dict(t.client.get_run(run_id).data.metrics)
