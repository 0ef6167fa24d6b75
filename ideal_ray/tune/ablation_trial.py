"""One trial of an ablation sweep (``ideal_ray.tune.ablation``): the Tune function trainable :func:`run_trial`.

A trial holds 1 CPU; ``train_tokenizer`` (Ray Train + DeepSpeed, its own run ``<name>.<variant>`` under
``<sweep>/train``) runs in a thread while the trial's thread forwards each logged training step (``train_<key>`` +
``step``) from the run's MLflow history to Tune (:class:`TrainingHistory`), so ASHA can stop it early. A trial that
finishes training evaluates its export with ``evaluate_recon`` on the val split (``<sweep>/eval/<variant>``,
:func:`evaluate_trial`) and reports rFID, rIS (when the Inception weights have logits), PSNR, SSIM, usage, entropy
(+ linear-probe top-1 for single-layer variants) as its final result.

The training loop reports to Ray Train only at checkpoints, and ``run_stage`` builds its ``TorchTrainer`` without
callbacks, so Ray's ``TuneReportCallback`` would see checkpoint steps only; the run's MLflow history holds every
logged step, and reading it back is what forwards them.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from ideal_ray.config import FIDConfig, ReconEvalConfig, RunConfig, SourceConfig, TokenizerTrainConfig

if TYPE_CHECKING:
    from ideal_ray.tune.ablation import AblationPlan

TRAIN_EXPERIMENT = "ideal-tokenizer"  # where train_tokenizer logs each trial's training run
TRAIN_PREFIX = "train_"  # forwarded training metrics; unprefixed names are the evaluation's
STEP_KEY = "samples_per_s"  # the loop logs it at every log step, in the same batch as every other metric
POLL_S = 5.0  # seconds between reads of a trial's training history


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
    eval_cfg = ReconEvalConfig(
        preset=plan.base_preset, tokenizer=export, out=out_dir,
        data=SourceConfig(root=cfg.data.root, split="val", class_index=cfg.data.class_index),
        num_images=plan.eval_images, batch_size=plan.eval_batch_size,
        run=RunConfig(device="cuda" if plan.gpus_per_worker else "cpu", num_actors=1, decode_actors=plan.decode_actors),
        zero_shot=plan.zero_shot, probe_train_images=plan.probe_train_images, grid=False,
        fid=FIDConfig(inception_weights=plan.inception_weights, cache_dir=plan.fid_cache_dir))
    result = evaluate_recon(eval_cfg, run_name=f"{plan.name}.{variant}", log_fn=log)
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
