"""What a job shows: a few lines and progress bars on the console; everything else in a log file.

Every job in ``jobs/`` runs inside :func:`job_console`. From its first line to its last, the process's file
descriptors 1 and 2 point at ``<folder>/console.log``: whatever Ray (its own logs and every worker line it forwards
to the driver), Ray Train, Ray Data, Tune, DeepSpeed, MLflow, open_clip, Python warnings and C++ code print lands
there, unfiltered, while the terminal gets only what :func:`say` writes (a stage's start and result lines, the job's
result) and the bars of :func:`progress`. The first console line names the log. An exception that leaves the job is
written to the log and, once the terminal is back, printed there as usual: a failure is never hidden.

Outside a job console (a library call, a test, a notebook) :func:`say` is ``print`` and bars go to stderr.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import traceback
import types
from typing import Any, Dict, Iterator, Optional

LOG_FILE = "console.log"

_state: Dict[str, Any] = {"out": None, "err": None, "log": None}


def log_path() -> Optional[str]:
    """The log file of the job console in effect (None outside one)."""
    return _state["log"]


def say(line: str, err: bool = False) -> None:
    """One line for the user: on the console (stderr with ``err``) and in the log; ``print`` outside a job console."""
    term = _state["err" if err else "out"]
    if term is None:
        print(line, file=sys.stderr if err else sys.stdout, flush=True)
        return
    from tqdm import tqdm

    tqdm.write(line, file=term)  # above the progress bars, which are redrawn below it
    print(line, file=sys.stderr if err else sys.stdout, flush=True)  # the log tells the whole story


def _owns_std_fds() -> bool:
    """Whether ``sys.stdout`` / ``sys.stderr`` write to file descriptors 1 and 2 (not so under pytest's capture or
    in a notebook, where the caller's streams are left alone)."""
    try:
        return sys.stdout.fileno() == 1 and sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return False


@contextlib.contextmanager
def job_console(folder: str, name: str = LOG_FILE) -> Iterator[Optional[str]]:
    """Run a job's body with its library output in ``<folder>/<name>`` (appended to) and the console kept for
    :func:`say` and :func:`progress`; yields the log's path. Nested use, or streams that are not the process's
    file descriptors 1 and 2, leave everything as it is (yields None). Ray, when this block started it, is shut down
    before the descriptors are restored, so its last worker lines still go to the log."""
    if _state["out"] is not None or not _owns_std_fds():
        yield None
        return
    os.makedirs(folder, exist_ok=True)
    path = os.path.abspath(os.path.join(folder, name))
    _quiet_libraries()
    ray_was_up = _ray_up()
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    out = os.fdopen(os.dup(saved[0]), "w", buffering=1)
    err = os.fdopen(os.dup(saved[1]), "w", buffering=1)
    _state.update(out=out, err=err, log=path)
    _draw_ray_bars_on(out)
    try:
        rel = os.path.relpath(path)
        say(f"[ideal-ray] log (Ray, DeepSpeed, Tune, MLflow output): {path if rel.startswith('..') else rel}")
        yield path
    except BaseException as e:
        if isinstance(e, SystemExit):
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        else:  # to the log here; on the console once the terminal is back (re-raised)
            traceback.print_exc()
        raise
    finally:
        try:
            if not ray_was_up and _ray_up():
                import ray

                ray.shutdown()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for f in saved:
                os.close(f)
            _draw_ray_bars_on(None)
            _state.update(out=None, err=None, log=None)
            out.close()
            err.close()


def _ray_up() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def _quiet_libraries() -> None:
    """Settings that keep library output from reaching the console through other paths than the log:

    * ``RAY_TQDM_PATCH_PRINT=0``: the driver's tqdm_ray would replace ``print`` with one that clears and redraws
      the bars around every print, and nearly every print goes to the log here;
    * ``RAY_DATA_DISABLE_PROGRESS_BARS=1``: Ray Data draws one bar per operator on stderr (the log); the stages
      draw their own image bars (:func:`progress`)."""
    os.environ.setdefault("RAY_TQDM_PATCH_PRINT", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def _draw_ray_bars_on(term) -> None:
    """Ray draws the tqdm_ray bars of workers and actors in the driver with tqdm's default file, ``sys.stderr``:
    the log inside a job console. Point them at the console (``term``; None restores the default)."""
    try:
        from ray.experimental import tqdm_ray
    except ImportError:
        return
    import tqdm.auto

    tqdm_ray.real_tqdm = tqdm.auto if term is None else types.SimpleNamespace(
        tqdm=functools.partial(tqdm.auto.tqdm, file=term))


class Progress:
    """A progress bar of ``total`` ``unit``s, ``initial`` done: tqdm on the console in this process, or, with
    ``remote`` (in a Ray worker or actor), a ``ray.experimental.tqdm_ray`` bar, which Ray draws in the driver.
    :meth:`note` shows live numbers beside it (a training stage: loss and samples/s)."""

    def __init__(self, total: int, desc: str, unit: str = "it", initial: int = 0, remote: bool = False,
                 samples: str = "samples"):
        self.desc, self.samples = desc, samples
        if remote:
            from ray.experimental import tqdm_ray

            self.bar = tqdm_ray.tqdm(total=total, desc=desc, unit=unit)
            self.bar.n = initial
        else:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, file=_state["out"] or sys.stderr,
                            dynamic_ncols=True, mininterval=0.5)
        self.remote = remote

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def note(self, values: Dict[str, float]) -> None:
        """Losses (``loss``, ``g_loss``) and ``samples_per_s`` of a log step, beside the bar."""
        parts = [f"{k} {values[k]:.4g}" for k in ("loss", "g_loss") if k in values]
        if "samples_per_s" in values:
            parts.append(f"{values['samples_per_s']:.1f} {self.samples}/s")
        text = ", ".join(parts)
        if self.remote:  # tqdm_ray has no postfix
            self.bar.set_description(f"{self.desc} ({text})")
        else:
            self.bar.set_postfix_str(text)

    def close(self) -> None:
        self.bar.close()


def progress(total: int, desc: str, unit: str = "it", initial: int = 0, remote: bool = False,
             samples: str = "samples") -> Progress:
    """A :class:`Progress` bar (see there)."""
    return Progress(total, desc, unit, initial=initial, remote=remote, samples=samples)
