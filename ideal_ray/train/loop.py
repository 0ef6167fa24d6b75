"""The one training loop every stage shares (tokenizer now, AR next).

The stage supplies its step (:class:`Stage`); the loop owns what every stage needs the same way: the EMA of the
stage's model, the logging cadence (all-reduced values, logged from rank 0), checkpoint/resume, the NaN guard and
throughput. Where it runs is a :class:`Session` (Ray Train workers, or one local process), so the loop itself is
tested in-process.

Checkpoint layout (one directory, written by every rank, then reported as one checkpoint):
    <dir>/loop_state.json    step, counters, tracker run id            (rank 0)
    <dir>/ema.pt             EMA of the stage's trainable parameters   (rank 0)
    <dir>/...                whatever the stage saves (DeepSpeed shards of every rank, small extra state)
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, Optional, Protocol

import torch
import torch.nn as nn

from ideal_ray.train.ema import EMA

LOOP_STATE = "loop_state.json"
EMA_FILE = "ema.pt"
CONFIG_FILE = "config.json"  # the stage config a checkpoint was written under (each stage's save_extra writes it)


class NonFiniteLossError(RuntimeError):
    """Too many non-finite steps in a row: the run stops, the last good checkpoint stays the latest."""


@dataclass
class LoopConfig:
    total_steps: int
    log_every: int = 50
    ckpt_every: int = 1000
    vis_every: int = 5000
    max_bad_steps: int = 10  # stop after this many non-finite steps in a row
    ema_decay: float = 0.9999


@dataclass
class StepResult:
    metrics: Dict[str, Any]  # detached scalar tensors or floats
    samples: int  # images/sequences this rank consumed
    skipped: bool = False  # a non-finite loss: no parameter was updated on any rank


@dataclass
class LoopState:
    step: int = 0  # steps done, skipped ones included (the data position and the lr follow from it)
    bad_in_a_row: int = 0
    bad_total: int = 0
    tracker_run_id: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)


class Stage(Protocol):
    def ema_module(self) -> nn.Module: ...

    # all_finite(value) is the session's cross-rank flag; bool() of it reads it (train.step.guarded_update)
    def train_step(self, batch: Any, step: int, all_finite: Callable[[torch.Tensor], Any]) -> StepResult: ...

    def save(self, ckpt_dir: str) -> None: ...  # called on every rank

    def load(self, ckpt_dir: str) -> None: ...  # called on every rank

    def visualize(self, batch: Any, out_dir: str, step: int) -> Optional[str]: ...  # rank 0: a PNG path


class Session(Protocol):
    rank: int
    world_size: int

    def all_finite(self, value: torch.Tensor) -> Any: ...  # a flag read lazily by bool() (sessions.FiniteFlag)

    def mean(self, values: Dict[str, float]) -> Dict[str, float]: ...

    def report(self, metrics: Dict[str, float], ckpt_dir: Optional[str]) -> None: ...

    def latest_checkpoint(self):  # context manager yielding a local directory or None
        ...


def _floats(metrics: Dict[str, Any]) -> Dict[str, float]:
    return {k: (float(v.item()) if torch.is_tensor(v) else float(v)) for k, v in metrics.items()}


def restore(stage: Stage, ema: EMA, session: Session) -> LoopState:
    """Load the latest checkpoint, if any, into the stage and the EMA; return the loop state it recorded."""
    with session.latest_checkpoint() as ckpt_dir:
        if ckpt_dir is None:
            return LoopState()
        with open(os.path.join(ckpt_dir, LOOP_STATE)) as f:
            state = LoopState(**json.load(f))
        stage.load(ckpt_dir)
        ema.load_state_dict(torch.load(os.path.join(ckpt_dir, EMA_FILE), map_location="cpu", weights_only=True))
        return state


def save_checkpoint(stage: Stage, ema: EMA, session: Session, state: LoopState, metrics: Dict[str, float]) -> None:
    """Every rank writes its part into a fresh temporary directory, then reports it; Ray registers the checkpoint
    only once every rank's upload is complete, so an interrupted write never becomes the latest checkpoint."""
    with tempfile.TemporaryDirectory(prefix="ideal-ckpt-") as d:
        stage.save(d)
        if session.rank == 0:
            torch.save(ema.state_dict(), os.path.join(d, EMA_FILE))
            with open(os.path.join(d, LOOP_STATE), "w") as f:
                json.dump(state.__dict__, f)
        session.report({**metrics, "step": state.step}, d)


def take_step(stage: Stage, ema: EMA, batch: Any, step: int, session: Session) -> StepResult:
    """One step as the loop takes it: the stage's ``train_step``, then the EMA unless the step was skipped. (The
    benchmarks time exactly this.)"""
    result = stage.train_step(batch, step, session.all_finite)
    if not result.skipped:
        ema.update(stage.ema_module())
    return result


def run_loop(stage: Stage, batches: Iterator[Any], session: Session, cfg: LoopConfig,
             make_tracker: Callable[[Optional[str]], Any], log: Callable[[str], None] = print,
             progress: Optional[Callable[[int, int], Any]] = None) -> LoopState:
    """Train until ``cfg.total_steps``; resumes from the session's latest checkpoint. Returns the final state.

    ``make_tracker(run_id)`` returns the experiment tracker (an MLflow run on rank 0, a no-op elsewhere), resuming
    ``run_id`` when the run continues from a checkpoint. ``progress(done, total)``, if given, makes rank 0's step bar
    (:class:`ideal_ray.console.Progress`): one tick a step, the log step's values beside it.
    """
    ema = EMA(stage.ema_module(), cfg.ema_decay)
    state = restore(stage, ema, session)
    tracker = make_tracker(state.tracker_run_id)
    state.tracker_run_id = getattr(tracker, "run_id", None) if session.rank == 0 else state.tracker_run_id
    if state.step:
        log(f"[ideal-ray] resumed at step {state.step}")
    last_ckpt_step = state.step
    window_samples, window_start, last = 0, time.perf_counter(), {}
    bar = progress(state.step, cfg.total_steps) if progress is not None and session.rank == 0 else None

    while state.step < cfg.total_steps:
        batch = next(batches)
        step = state.step + 1
        result = take_step(stage, ema, batch, step, session)
        state.step = step  # a skipped step still consumes its batch: the data position always follows the step
        if bar is not None:
            bar.update(1)
        if result.skipped:
            state.bad_in_a_row += 1
            state.bad_total += 1
            log(f"[ideal-ray] step {step}: non-finite loss, step skipped ({state.bad_in_a_row} in a row, "
                f"{state.bad_total} in total)")
            if state.bad_in_a_row >= cfg.max_bad_steps:
                tracker.set_tags({"stopped": f"{state.bad_in_a_row} non-finite steps in a row at step {step}"})
                tracker.finish("FAILED")
                if bar is not None:
                    bar.close()
                raise NonFiniteLossError(
                    f"{state.bad_in_a_row} non-finite losses in a row (steps {step - state.bad_in_a_row + 1}-{step}); "
                    f"stopped. The latest good checkpoint (step {last_ckpt_step}) is kept; lower the learning rate "
                    f"or check the data, then rerun the same run name to resume from it.")
            continue
        state.bad_in_a_row = 0
        window_samples += result.samples

        if step % cfg.log_every == 0 or step == cfg.total_steps:
            elapsed = time.perf_counter() - window_start
            values = session.mean(_floats(result.metrics))
            values["samples_per_s"] = window_samples * session.world_size / max(elapsed, 1e-9)
            values["nonfinite_steps"] = float(state.bad_total)
            tracker.log_metrics(values, step)
            if session.rank == 0:
                shown = " ".join(f"{k} {v:.4g}" for k, v in values.items() if k in _SHOWN)
                log(f"[ideal-ray] step {step}/{cfg.total_steps} {shown}")
                if bar is not None:
                    bar.note(values)
            last = values
            window_samples, window_start = 0, time.perf_counter()

        if session.rank == 0 and (step % cfg.vis_every == 0 or step == cfg.total_steps):
            with tempfile.TemporaryDirectory() as d:
                png = stage.visualize(batch, d, step)
                if png:
                    tracker.log_image(png, "reconstructions")

        if step % cfg.ckpt_every == 0 or step == cfg.total_steps:
            save_checkpoint(stage, ema, session, state, last)
            last_ckpt_step = step

    if bar is not None:
        bar.close()
    tracker.finish("FINISHED")
    return state


_SHOWN = ("g_loss", "d_loss", "rec_mse", "deep_cos", "usage", "lr", "grad_norm_g", "samples_per_s")


def is_finite(value: torch.Tensor) -> bool:
    return bool(torch.isfinite(value).all()) if torch.is_tensor(value) else math.isfinite(value)
