"""What every sweep shares: one MLflow parent run per sweep, one child per trial, and resumable Tuners.

* :func:`parent_run` creates (or, for a resumed sweep, finds again by its ``ideal.sweep`` tag) the sweep's parent
  run in ``experiment`` and logs the sweep's fixed settings as its params.
* :func:`mlflow_callback` is Ray's own ``MLflowLoggerCallback`` with the parent's id as ``mlflow.parentRunId`` tag,
  so every trial becomes a child run (params = the trial's config, metrics = what it reports). A trial resumed
  after an interruption or an error logs into its existing child run (found by its ``trial_name`` tag) instead of
  starting a second one; Ray's callback alone would leave the first RUNNING or FAILED beside a new one.
* :func:`run_tuner` starts a new ``Tuner`` at ``storage_path/name`` or, when that folder holds an interrupted sweep,
  ``Tuner.restore`` it: finished trials are kept (not rerun), unfinished and errored ones are resumed.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

from ideal_ray.tracking import Tracker, param_value

SWEEP_TAG = "ideal.sweep"  # the parent run's tag naming its sweep (storage_path/name), for resume
KIND_TAG = "ideal.sweep_kind"


def sweep_path(storage_path: str, name: str) -> str:
    """The Tuner's experiment folder: ``<abs storage_path>/<name>``."""
    if not name or "/" in name:
        raise ValueError(f"sweep name {name!r} must be a non-empty folder name (no '/').")
    return os.path.join(os.path.abspath(os.path.expanduser(storage_path)), name)


def parent_run(tracking_uri: str, experiment: str, path: str, kind: str, params: Dict[str, Any]) -> str:
    """The sweep's parent MLflow run id: the existing one tagged with ``path`` (a resumed sweep) or a new one."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        found = client.search_runs([exp.experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{path}'",
                                   max_results=1)
        if found:
            client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
    tr = Tracker(tracking_uri, experiment, run_name=os.path.basename(path),
                 tags={SWEEP_TAG: path, KIND_TAG: kind})
    tr.log_params(params)
    return tr.run_id


def finish_parent(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri).set_terminated(run_id, status=status)


def mlflow_callback(tracking_uri: str, experiment: str, parent_run_id: str):
    """Ray's MLflow logger: one child run per trial under ``parent_run_id`` (config as params, reports as
    metrics), reused when the trial is resumed."""
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    class ResumableMLflowLogger(MLflowLoggerCallback):
        def log_trial_start(self, trial) -> None:
            if trial not in self._trial_runs:  # Ray's own map (set in setup()): trial -> run id
                found = _trial_run(self.tracking_uri, parent_run_id, str(trial))
                if found is not None:
                    self._trial_runs[trial] = found
            super().log_trial_start(trial)

    return ResumableMLflowLogger(tracking_uri=tracking_uri, experiment_name=experiment,
                                 tags={"mlflow.parentRunId": parent_run_id}, save_artifact=False)


def _trial_run(tracking_uri: str, parent_run_id: str, trial_name: str) -> Optional[str]:
    """The id of the child run of ``parent_run_id`` that Ray's logger made for ``trial_name`` (set RUNNING again),
    or None."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp_id = client.get_run(parent_run_id).info.experiment_id
    found = client.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and "
                                                       f"tags.trial_name = '{trial_name}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    if not found:
        return None
    client.update_run(found[0].info.run_id, status="RUNNING")
    return found[0].info.run_id


def child_runs(tracking_uri: str, parent_run_id: str) -> List[Dict[str, Any]]:
    """The parent's child runs (trials), oldest first: ``{run_id, run_name, status, params, metrics}``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                              order_by=["attributes.start_time ASC"], max_results=5000)
    return [{"run_id": r.info.run_id, "run_name": r.info.run_name, "status": r.info.status,
             "params": dict(r.data.params), "metrics": dict(r.data.metrics)} for r in runs]


def _fit_noting_interrupt(fit: Callable[[], Any]) -> Tuple[Any, bool]:
    """``fit()`` (a Tuner's) and whether Ctrl-C interrupted it. On SIGINT Tune saves the sweep's state, returns
    normally and marks the unfinished trials TERMINATED in memory, so its results cannot tell; but its handler puts
    back the SIGINT handler it replaced when it fires (Ray 2.60), so a marker installed here shows it fired."""
    if threading.current_thread() is not threading.main_thread():  # no signal handlers here; Tune installs none
        return fit(), False
    before = signal.getsignal(signal.SIGINT)

    def marker(sig, frame) -> None:
        if callable(before):
            before(sig, frame)
        elif before != signal.SIG_IGN:
            signal.default_int_handler(sig, frame)

    signal.signal(signal.SIGINT, marker)
    try:
        result = fit()
        return result, signal.getsignal(signal.SIGINT) is marker
    finally:
        signal.signal(signal.SIGINT, before)


def run_tuner(trainable: Callable, param_space: Dict[str, Any], tune_config, path: str,
              callbacks: Optional[list] = None, max_failures: int = 0, verbose: Optional[int] = None):
    """Fit a new Tuner at ``path`` or restore the interrupted one there (finished trials are not rerun); returns
    ``(results, interrupted)``, the second True when Ctrl-C stopped the sweep (rerun to resume).

    A restored Tuner keeps the tune_config, callbacks and verbosity it was created with (Tune stores them)."""
    from ray import tune

    if tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True,
                                   param_space=param_space)
    else:
        run_config = tune.RunConfig(name=os.path.basename(path), storage_path=os.path.dirname(path),
                                    callbacks=callbacks or [],
                                    failure_config=tune.FailureConfig(max_failures=max_failures),
                                    verbose=verbose)
        tuner = tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)
    # mlflow.set_tracking_uri (called by Ray's MLflow logger in this process) also sets $MLFLOW_TRACKING_URI, which
    # would send every later run of this process (the next pipeline stage, the next test) into the sweep's store.
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        return _fit_noting_interrupt(tuner.fit)
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def flat_params(d: Dict[str, Any]) -> Dict[str, str]:
    """A sweep's fixed settings as MLflow param strings."""
    return {k: param_value(v) for k, v in d.items()}
