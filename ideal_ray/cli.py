"""Shared command-line handling for jobs/: a preset name plus ``a.b=c`` overrides, and the exit-code rule.

Every job ends with 0 when it did its work, 2 when it refused its input or config (one sentence on stderr naming
the file or key and what to do: :func:`refuse`), 130 when interrupted, and 1 only for a bug, with its traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
from typing import Iterator, List, NoReturn, Optional, Sequence, Tuple

from ideal_ray.config import ConfigError, check_data_root, get_key, load_config, preset_names
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


def add_config_args(parser: argparse.ArgumentParser, default_preset: str = "tiny", ar: bool = False,
                    workers: bool = False) -> None:
    """``--preset`` and the ``a.b=c`` overrides of a training stage's config (the tokenizer's, or with ``ar`` the
    AR stage's); with ``workers`` also ``--num-workers`` and ``--gpus``/``--cpu``, shorthands for
    ``dist.num_workers`` and ``dist.use_gpu`` that win over the overrides. Read back with :func:`config_from_args`."""
    from ideal_ray.config import AR_PRESETS

    if ar:
        parser.add_argument("--preset", default=default_preset, choices=sorted(AR_PRESETS))
    else:
        parser.add_argument("--preset", default=default_preset,
                            help=f"base preset, optionally with ablation variants joined by '+' (e.g. "
                                 f"paper+fusion-none). Known: {', '.join(preset_names()[:6])}, ...")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted config overrides, e.g. optim.lr=2e-4 data.root=/datasets/imagenet")
    if workers:
        parser.add_argument("--num-workers", type=int, default=None, help="Ray Train workers (dist.num_workers)")
        parser.add_argument("--gpus", action="store_true", default=None, help="one GPU per worker (dist.use_gpu=true)")
        parser.add_argument("--cpu", dest="gpus", action="store_false", help="CPU workers (dist.use_gpu=false)")


def config_from_args(args: argparse.Namespace, in_process: bool = False, needs_data: bool = False,
                     ar: bool = False):
    """Build and validate a training stage's config (the tokenizer's, or with ``ar`` the AR stage's) from
    :func:`add_config_args`' arguments; a wrong value exits (code 2) with its one-sentence message, and so does a
    relative path inside a Ray job (:func:`require_durable_paths`) or an output folder that cannot be made.
    ``in_process``: the config of a run in this process, one rank (``dist.num_workers=1`` before the overrides, so
    e.g. ``dist.engine=torch`` validates). ``needs_data``: the job trains, so its data must be there: the images
    at ``data.root`` (or where the synthetic set is made: :func:`ideal_ray.config.check_data_root`), or the token
    shards at ``data.shards`` (:func:`ideal_ray.data.tokens.check_shards`: they exist and fit the model)."""
    from ideal_ray.config import load_ar_config

    overrides = ((["dist.num_workers=1"] if in_process else []) + list(args.overrides)
                 + ([f"dist.num_workers={args.num_workers}"] if getattr(args, "num_workers", None) is not None else [])
                 + ([f"dist.use_gpu={str(args.gpus).lower()}"] if getattr(args, "gpus", None) is not None else []))
    data_key = "data.shards" if ar else "data.root"
    try:
        cfg = (load_ar_config if ar else load_config)(args.preset, overrides)
        require_durable_paths(output_dir=cfg.output_dir, **{"dist.storage_path": cfg.dist.storage_path,
                                                             data_key: get_key(cfg, data_key)})
        require_usable_output(cfg.output_dir, cfg.name, **{"dist.storage_path": cfg.dist.storage_path})
        if needs_data and ar:
            from ideal_ray.data.tokens import check_shards

            check_shards(cfg)
        elif needs_data:
            check_data_root(cfg)
    except ConfigError as e:
        refuse(f"config error: {e}")
    return cfg


def add_stage_args(parser: argparse.ArgumentParser, cls: type, shorthands: Sequence[tuple],
                   default_preset: str = "paper") -> None:
    """``--preset`` (``paper`` or ``tiny``: :data:`ideal_ray.config.STAGE_PRESETS`), the ``shorthands`` (each
    ``(flag, key, help[, argparse keywords])``: a flag for the override a user types most, mostly paths; a flag with a
    value sets its key, one with ``action='store_true'`` sets it to true) and the ``a.b=c`` overrides of the
    stage config ``cls``; read them back with :func:`stage_config_from_args`."""
    from ideal_ray.config import STAGE_PRESETS

    parser.add_argument("--preset", default=default_preset, choices=sorted(STAGE_PRESETS[cls]),
                        help="paper: a GPU cluster at the paper's settings; tiny: the demo's CPU settings")
    for flag, key, text, *kw in shorthands:
        extra = dict(kw[0]) if kw else {}
        if extra.get("action") == "store_true":
            extra.update(action="store_const", const="true")
        else:
            extra.setdefault("metavar", "PATH")
        parser.add_argument(flag, dest=_dest(key), default=None, help=f"{text} (the override {key}=...)", **extra)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help=f"overrides of the {cls.__name__} fields, e.g. " + ", ".join(_examples(cls)))


def _dest(key: str) -> str:
    return "set_" + key.replace(".", "__")


def _examples(cls: type) -> List[str]:
    """A few ``key=value`` overrides of ``cls`` with their default values (top-level fields first)."""
    import dataclasses

    from ideal_ray.config.overrides import _show

    def fields(node, prefix=""):
        subs = []
        for f in dataclasses.fields(node):
            v = getattr(node, f.name)
            if dataclasses.is_dataclass(v):
                subs.append((v, f"{prefix}{f.name}."))
            elif f.name != "preset" and v not in ("", None, ()):
                yield f"{prefix}{f.name}={_show(v)}"
        for v, p in subs:
            yield from fields(v, p)

    return list(fields(cls()))[:3]


def stage_config_from_args(cls: type, args: argparse.Namespace, shorthands: Sequence[tuple]):
    """The stage config of a job's arguments (:func:`add_stage_args`): the preset, then the shorthand flags given,
    then the overrides, validated; its output paths must be durable (:func:`require_durable_paths`) and its input
    paths must exist (:func:`require_existing`), its output folders must be folders or creatable
    (:func:`require_usable_folders`). A wrong value exits (code 2) with one sentence, naming the flag
    the user typed where there was one; nothing is imported or created."""
    from ideal_ray.config import get_key, load_stage_config

    given = {key: (flag, getattr(args, _dest(key))) for flag, key, *_ in shorthands
             if getattr(args, _dest(key)) is not None}
    overrides = [f"{key}={value}" for key, (_, value) in given.items()] + list(args.overrides)
    try:
        cfg = load_stage_config(cls, args.preset, overrides, complete=False)
    except ConfigError as e:
        refuse(f"config error: {e}")
    flags = {key: flag for key, (flag, _) in given.items()}
    name = lambda key: flags.get(key, key)  # noqa: E731
    short = {key: flag for flag, key, *_ in shorthands}
    for key in getattr(cls, "REQUIRED", ()):
        if not get_key(cfg, key):
            how = f"{short[key]} PATH (or {key}=PATH)" if key in short else f"{key}=PATH"
            refuse(f"config error: {key} is not set; pass {how}.")
    outputs = {name(k): get_key(cfg, k) for k in getattr(cls, "OUTPUTS", ())}
    require_durable_paths(**outputs)
    require_usable_folders(**outputs)
    require_existing(**{name(k): get_key(cfg, k) for k in getattr(cls, "INPUTS", ())})
    return cfg


def take_overrides(overrides: Sequence[str], first_keys: Sequence[str],
                   strip: bool = False) -> Tuple[List[str], List[str]]:
    """Split ``a.b=c`` overrides by their first key: (those whose first key is in ``first_keys``, the rest), each
    in the order given; with ``strip`` the first key is removed from the taken ones (``ar.dist.num_workers=2`` ->
    ``dist.num_workers=2``). A job whose command line carries overrides for several configs routes them so."""
    taken, rest = [], []
    for item in overrides:
        first, _, tail = item.partition(".")
        first = first.split("=", 1)[0]
        if first in first_keys:
            taken.append(tail if strip and tail else item)
        else:
            rest.append(item)
    return taken, rest


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
        _require_folder(run, key, f"the run folder {run} ({key}/name) exists and is not a folder; pass another name "
                                  f"or {key}, or move it away.", f"{key}={root} cannot hold the run folder {run}")


def require_usable_folders(**paths: Optional[str]) -> None:
    """Refuse (exit code 2, one sentence) the first of ``paths`` (a flag or key name -> an output folder) that cannot
    be a folder: it is a file, or its nearest existing ancestor is not a folder this user can write to. Empty values
    and URIs are skipped; nothing is created here."""
    for key, path in paths.items():
        if path and "://" not in path:
            _require_folder(os.path.expanduser(path), key, f"{key}={path} exists and is not a folder; pass a folder, or "
                                                           f"move the file away.", f"{key}={path} cannot be made")


def _require_folder(folder: str, key: str, is_a_file: str, cannot: str) -> None:
    """Refuse ``folder`` (set by ``key``) unless it is a folder or can be made: ``is_a_file`` when it is something
    else, ``cannot`` + why when its nearest existing ancestor (a relative path ends at the working directory) is
    not a folder this user can write to."""
    existing = folder
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing) or os.curdir
    if existing == folder and not os.path.isdir(folder):
        refuse(f"config error: {is_a_file}")
    if not os.path.isdir(existing):
        refuse(f"config error: {cannot}: {existing} exists and is not a folder; pass another {key}, or move "
               f"{existing} away.")
    if not os.access(existing, os.W_OK | os.X_OK):
        refuse(f"config error: {cannot}: {existing} is not writable by this user; pass a folder you can write to as "
               f"{key}.")


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
