"""Shared command-line handling for jobs/: a preset name plus ``a.b=c`` overrides, and the exit-code rule.

Every job ends with 0 when it did its work, 2 when it refused its input or config (one sentence on stderr naming
the file or key and what to do: :func:`refuse`), 130 when interrupted, and 1 only for a bug, with its traceback.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import NoReturn, Optional

from ideal_ray.config import ConfigError, TokenizerTrainConfig, load_config, preset_names

REFUSED = 2  # the exit code of refused input or config


def refuse(sentence: str) -> NoReturn:
    """Refuse the job's input or config: ``sentence`` on stderr (and in the job's log) and exit code 2."""
    from ideal_ray.console import say

    say(sentence, err=True)
    raise SystemExit(REFUSED)


def add_config_args(parser: argparse.ArgumentParser, default_preset: str = "tiny") -> None:
    parser.add_argument("--preset", default=default_preset,
                        help=f"base preset, optionally with ablation variants joined by '+' (e.g. paper+fusion-none). "
                             f"Known: {', '.join(preset_names()[:6])}, ...")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted config overrides, e.g. optim.lr=2e-4 data.root=/datasets/imagenet")


def config_from_args(args: argparse.Namespace, in_process: bool = False) -> TokenizerTrainConfig:
    """Build and validate the config; a wrong value exits (code 2) with its one-sentence message, and so
    does a relative path inside a Ray job (:func:`require_durable_paths`). ``in_process``: the config of a run in
    this process, one rank (``dist.num_workers=1`` before the overrides, so e.g. ``dist.engine=torch`` validates)."""
    try:
        cfg = load_config(args.preset, (["dist.num_workers=1"] if in_process else []) + list(args.overrides))
    except ConfigError as e:
        refuse(f"config error: {e}")
    require_durable_paths(output_dir=cfg.output_dir, **{"dist.storage_path": cfg.dist.storage_path,
                                                         "data.root": cfg.data.root})
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
