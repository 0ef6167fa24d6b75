"""Shared command-line handling for jobs/: a preset name plus ``a.b=c`` overrides, and the exit-code rule.

Every job ends with 0 when it did its work, 2 when it refused its input or config (one sentence on stderr naming
the file or key and what to do: :func:`refuse`), 130 when interrupted, and 1 only for a bug, with its traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
from typing import Iterator, NoReturn, Optional

from ideal_ray.config import ConfigError, TokenizerTrainConfig, check_data_root, load_config, preset_names
from ideal_ray.errors import InputError

REFUSED = 2  # the exit code of refused input or config
INTERRUPTED = 130  # the exit code of Ctrl-C (128 + SIGINT), as shells report it
# refused input: the project's InputError, and the standard errors of a wrong argument or path. Ray re-raises an
# exception from a task or actor as an instance of its class, so errors raised on workers are refused the same way.
REFUSED_ERRORS = (InputError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                  PermissionError)


def refuse(sentence: str) -> NoReturn:
    """Refuse the job's input or config: ``sentence`` on stderr (and in the job's log) and exit code 2."""
    from ideal_ray.console import say

    say(sentence, err=True)
    raise SystemExit(REFUSED)


@contextlib.contextmanager
def outcome(resume: str) -> Iterator[None]:
    """The exit-code rule around a job's body: refused input (:data:`REFUSED_ERRORS`) exits 2 with its sentence,
    Ctrl-C exits 130 saying ``resume`` (where the work is kept and how to continue), and anything else propagates
    with its traceback (exit 1: a bug). Use inside :func:`ideal_ray.console.job_console`, so the line also reaches
    the job's log."""
    try:
        yield
    except KeyboardInterrupt:
        from ideal_ray.console import say

        say(f"interrupted: {resume}", err=True)
        raise SystemExit(INTERRUPTED) from None
    except REFUSED_ERRORS as e:
        refuse(f"{'config error' if isinstance(e, ConfigError) else 'error'}: {e}")


def add_config_args(parser: argparse.ArgumentParser, default_preset: str = "tiny") -> None:
    parser.add_argument("--preset", default=default_preset,
                        help=f"base preset, optionally with ablation variants joined by '+' (e.g. paper+fusion-none). "
                             f"Known: {', '.join(preset_names()[:6])}, ...")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted config overrides, e.g. optim.lr=2e-4 data.root=/datasets/imagenet")


def config_from_args(args: argparse.Namespace, in_process: bool = False,
                     needs_data: bool = False) -> TokenizerTrainConfig:
    """Build and validate the config; a wrong value exits (code 2) with its one-sentence message, and so
    does a relative path inside a Ray job (:func:`require_durable_paths`). ``in_process``: the config of a run in
    this process, one rank (``dist.num_workers=1`` before the overrides, so e.g. ``dist.engine=torch`` validates).
    ``needs_data``: the job trains, so ``data.root`` must hold the images (or be where the synthetic set is made:
    :func:`ideal_ray.config.check_data_root`)."""
    try:
        cfg = load_config(args.preset, (["dist.num_workers=1"] if in_process else []) + list(args.overrides))
        if needs_data:
            check_data_root(cfg)
    except ConfigError as e:
        refuse(f"config error: {e}")
    require_durable_paths(output_dir=cfg.output_dir, **{"dist.storage_path": cfg.dist.storage_path,
                                                         "data.root": cfg.data.root})
    require_usable_output(cfg.output_dir, cfg.name, **{"dist.storage_path": cfg.dist.storage_path})
    return cfg


def add_classifier_args(parser, samples: str = "the samples") -> None:
    """The class-accuracy flags of the jobs that score samples (``jobs/evaluate.py gen``, ``jobs/sweep_cfg.py``):
    ``--classifier-data/-split/-per-class/-kind`` (``ideal_ray.eval.class_accuracy``); ``samples`` names what is
    scored in the help text. ``parser``: an ``ArgumentParser`` or a subcommand's parser."""
    parser.add_argument("--classifier-data", default="",
                        help=f"class accuracy of {samples}: the root of the labelled data set their classes come "
                             f"from (a classifier is fitted once on real images of its --classifier-split, cached); "
                             f"default: off")
    parser.add_argument("--classifier-split", default="train")
    parser.add_argument("--classifier-per-class", type=int, default=None,
                        help="real images per class the classifier is fitted on (default 50; 0 = all)")
    # the kinds of ideal_ray.eval.class_accuracy.CLASSIFIER_KINDS (not imported here: it loads torch)
    parser.add_argument("--classifier-kind", choices=["probe", "cnn"], default="probe",
                        help="probe: linear classifier on Inception features (natural images, ImageNet); cnn: a "
                             "small convnet trained on the real pixels (data sets unlike ImageNet, e.g. the "
                             "synthetic set)")


def parse_classes(text: str):
    """``--classes`` of the sampling jobs: ``all`` (or empty) -> None, ``0,1,2`` -> [0, 1, 2]."""
    if not text or text == "all":
        return None
    try:
        return [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--classes '{text}' must be comma-separated integers like 0,1,2 or 'all'.")


def ray_job() -> Optional[dict]:
    """``{submission_id, working_dir}`` of the Ray job this process is the entrypoint of (``ray job submit``), else
    None. Ray passes the job's runtime env and metadata to the entrypoint in ``$RAY_JOB_CONFIG_JSON_ENV_VAR``."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        job = json.loads(raw)
        env, meta = job.get("runtime_env") or {}, job.get("metadata") or {}
    except (ValueError, AttributeError):
        return None
    if not isinstance(env, dict) or not isinstance(meta, dict):
        return None
    return {"submission_id": meta.get("job_submission_id"), "working_dir": env.get("working_dir") or None}


def job_working_dir() -> Optional[str]:
    """The ``working_dir`` of the Ray job this process is the entrypoint of (``--working-dir``), else None."""
    job = ray_job()
    return job["working_dir"] if job else None


def require_durable_paths(**paths: Optional[str]) -> None:
    """Under ``ray job submit --working-dir`` the entrypoint runs in a temporary copy of the working dir on the head
    node, which Ray deletes later; a relative output path would put checkpoints, shards and runs there (and training
    workers on other nodes would write to their own copies). Refuse (exit code 2) with one sentence naming the first
    such path.
    Outside a job (``python jobs/x.py``) relative paths are fine. Keyword names are shown as given (``a.b`` or
    ``--flag``); None / empty values and URIs (``s3://..``) are ignored."""
    if job_working_dir() is None:
        return
    for name, path in paths.items():
        if path and "://" not in path and not os.path.isabs(os.path.expanduser(path)):
            refuse(f"config error: {name}={path} is relative, and this job runs in Ray's temporary copy of the "
                     f"--working-dir, which is deleted later; pass an absolute path on shared storage (e.g. "
                     f"{name}=/shared/{path.lstrip('./')}).")


def require_usable_output(output_dir: str, name: str, **storage: Optional[str]) -> None:
    """Refuse (exit code 2, one sentence) a run whose folders cannot be made, before anything heavy starts: the run
    folder ``output_dir/name`` (and each local ``storage`` folder's ``<storage>/name``, e.g. ``dist.storage_path``;
    empty values and URIs are skipped) must be a folder or creatable as one, which needs its nearest existing
    ancestor to be a folder this user can write to. Nothing is created here."""
    folders = [("output_dir", output_dir)] + [(k, v) for k, v in storage.items() if v and "://" not in v]
    for key, root in folders:
        run = os.path.join(os.path.expanduser(root), name)
        existing = run
        while not os.path.lexists(existing):  # the nearest existing ancestor (a relative path ends at the cwd)
            existing = os.path.dirname(existing) or os.curdir
        if not os.path.isdir(existing) and existing == run:
            refuse(f"config error: the run folder {run} ({key}/name) exists and is not a folder; pass another name "
                   f"or {key}, or move it away.")
        if not os.path.isdir(existing):
            refuse(f"config error: {key}={root} cannot hold the run folder {run}: {existing} exists and is not a "
                   f"folder; pass another {key}, or move {existing} away.")
        if not os.access(existing, os.W_OK | os.X_OK):
            refuse(f"config error: {key}={root} cannot hold the run folder {run}: {existing} is not writable by "
                   f"this user; pass a folder you can write to as {key}.")


def add_checkpoint_args(parser, gpt: bool = False) -> None:
    """``--tokenizer`` (and with ``gpt``, ``--gpt``): the checkpoint flags of the jobs that load models, each taking
    our export or an official file (:mod:`ideal_ray.checkpoint`); check them with :func:`check_checkpoints`."""
    if gpt:
        parser.add_argument("--gpt", required=True, help="GPT: our export (gpt_step<N>.pt of jobs/train_ar.py), a "
                                                         "LlamaGen c2i file or the authors' release GPT checkpoint")
    parser.add_argument("--tokenizer", required=True, help="tokenizer: our export (tokenizer_step<N>.pt of "
                                                           "jobs/train_tokenizer.py) or the authors' release file")


def check_checkpoints(gpt: Optional[str] = None, tokenizer: Optional[str] = None, classes=None) -> dict:
    """A job's checkpoint arguments checked before anything heavy (no torch, no Ray): each file exists, is whole, is
    safe to load and holds the model its flag names, in our, the authors' release or LlamaGen's layout; a GPT and a
    tokenizer fit each other; ``classes`` are the GPT's. Refuses (exit code 2) with the file's one sentence; returns
    :func:`ideal_ray.checkpoint.check_models`' result."""
    from ideal_ray.checkpoint import CheckpointError, check_models

    try:
        return check_models(gpt, tokenizer, classes)
    except CheckpointError as e:
        refuse(f"error: {e}")


def require_existing(**paths: Optional[str]) -> None:
    """Refuse (exit code 2, one sentence) the first of ``paths`` (a flag or key name -> a local path) that does not
    exist: the inputs a job reads, checked before anything heavy starts or any output folder is made. Empty values
    and URIs (``s3://..``) are skipped."""
    for name, path in paths.items():
        if path and "://" not in path and not os.path.exists(os.path.expanduser(path)):
            refuse(f"error: {name} {path} does not exist; check the path.")
