"""Where a training run lives: its storage (``dist.storage_path``: a local or NFS folder, or ``s3://`` / ``gs://``
through pyarrow filesystems), checked before any worker starts (:func:`check_storage`: credentials found, one test
object written and deleted); the run record in the run folder, which refuses a rerun that would change the
experiment (:func:`check_or_record_config`); the latest checkpoint's step; and the inference exports published
into the run folder (:func:`publish_export`)."""
from __future__ import annotations

import json
import os
from typing import Optional

from ideal_ray.config import ConfigError, TokenizerTrainConfig
from ideal_ray.io import changed_keys, settings_changed
from ideal_ray.storage import StoreAccessError, check_store, filesystem

RUN_RECORD_FILE = "ideal_config.json"  # the run folder's record of its config and runner (a checkpoint's own
# stage config is train.loop.CONFIG_FILE)
# The run record also says where the run's checkpoints live: Ray Train's checkpoint index, or LocalSession's
# numbered folders. Neither reads the other's, so a run resumes only the way it started.
RUNNER_KEY = "runner"
RUNNERS = {"ray": "on Ray Train", "in-process": "in one process (in_process / --in-process)"}
# Fields a rerun of an existing run may change: how long, how often, on how many workers. Anything else (model,
# loss, optimizer, data) would silently mix two experiments in one run folder.
# The worker count and ZeRO stage cannot change: ZeRO optimizer shards are per rank.
# The VFM placement may change: the trunk's features are a pure function of the image wherever it runs (the
# trainer's autocast rule applies in the actors too), and the trunk's weights stay in the checkpoint either way.
RESUMABLE_CHANGES = ("schedule.", "dist.storage_path", "dist.max_failures", "dist.keep_checkpoints",
                     "dist.max_bad_steps", "dist.prefetch_batches", "dist.ray_address", "dist.cpus_per_worker",
                     "dist.vfm_placement", "dist.vfm_actors", "dist.placement_strategy", "dist.export_to_mlflow",
                     "output_dir", "preset", "data.loader_workers", "data.root")


# ----------------------------------------------------------------------------------------------- storage


def check_storage(cfg) -> None:
    """Refuse an object-store ``dist.storage_path`` this machine cannot use, before Ray or any worker starts
    (:func:`ideal_ray.storage.check_store` on the run folder: a query string, no AWS credentials, or a test object
    that cannot be written and deleted), as one ConfigError sentence naming the URI and what was tried. Local and NFS
    folders are checked where the jobs parse their paths (``cli.require_usable_output``)."""
    try:
        check_store("dist.storage_path", storage_uri(cfg), run_uri(cfg))
    except StoreAccessError as e:
        raise ConfigError(str(e)) from None


def publish_export(local_path: str, cfg) -> Optional[str]:
    """Copy a finished export into the run folder when ``dist.storage_path`` is an object store (the checkpoints'
    home; the local file stays where the next stage reads it) and return its URI; None for a local storage path. An
    object already there is kept (exports are never replaced silently); an upload cut off midway leaves no object (a
    multipart upload becomes visible only when complete)."""
    import pyarrow.fs

    if "://" not in storage_uri(cfg):
        return None
    uri = run_uri(cfg) + "/" + os.path.basename(local_path)
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
        pyarrow.fs.copy_files(local_path, path, source_filesystem=pyarrow.fs.LocalFileSystem(),
                              destination_filesystem=fs)
    return uri


def storage_uri(cfg: TokenizerTrainConfig) -> str:
    s = cfg.dist.storage_path or cfg.output_dir  # "" = next to the run's exports
    return s if "://" in s else os.path.abspath(s)


def run_uri(cfg: TokenizerTrainConfig) -> str:
    return storage_uri(cfg).rstrip("/") + "/" + cfg.name


def latest_checkpoint_step(run_path: str) -> int:
    """Step of the latest checkpoint Ray Train registered for this run (0 when there is none)."""
    from ray.train import Result  # Train V2's Result (V2 is the default in Ray 2.60)

    fs, path = filesystem(run_path)
    import pyarrow.fs

    if fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
        return 0
    try:
        result = Result.from_path(run_path)
    except RuntimeError:  # the folder exists but holds no checkpoint index yet
        return 0
    return int((result.metrics or {}).get("step", 0)) if result.checkpoint else 0


def check_or_record_config(cfg: TokenizerTrainConfig, runner: str = "ray") -> bool:
    """Record the config (and the runner, a key of :data:`RUNNERS`) in the run folder; on a rerun, refuse a config
    that changes the experiment, or the other runner.

    Returns True when the run folder already held this run (a resume)."""
    import pyarrow.fs

    fs, path = filesystem(run_uri(cfg))
    cfg_path = path.rstrip("/") + "/" + RUN_RECORD_FILE
    new = {**cfg.flat(), RUNNER_KEY: runner}
    if fs.get_file_info(cfg_path).type == pyarrow.fs.FileType.File:
        with fs.open_input_stream(cfg_path) as f:
            old = json.loads(f.read().decode())
        was = old.pop(RUNNER_KEY, "ray")  # records from before the in-process runner were Ray runs
        if was != runner:
            was = RUNNERS.get(was, was)
            raise ConfigError(f"Run '{cfg.name}' in {storage_uri(cfg)} was trained {was} and resumes only that "
                              f"way; rerun it {was}, or choose a new name.")
        changed = changed_keys(old, {k: new[k] for k in cfg.flat()}, ignore=RESUMABLE_CHANGES,
                               same=lambda a, b: _norm(a) == _norm(b), defaults=type(cfg)().flat())
        if changed:
            raise settings_changed(f"Run '{cfg.name}'", storage_uri(cfg), changed,
                                   "choose a new name or restore those values to resume it.")
        resumed = True
    else:
        resumed = False
    fs.create_dir(path, recursive=True)
    with fs.open_output_stream(cfg_path) as f:
        f.write(json.dumps(new, indent=1, sort_keys=True, default=str).encode())
    return resumed


def _norm(v):
    return list(v) if isinstance(v, tuple) else v
