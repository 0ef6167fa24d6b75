"""MLflow tracking for training runs (rank 0 logs, every other rank gets a no-op twin).

Why this module exists instead of calling ``mlflow.log_*``:

* Training runs inside Ray worker processes, so nothing here touches mlflow's global
  "active run" state; every call goes through an explicit :class:`mlflow.MlflowClient` and a run id.
* A restarted or resumed job continues the *same* MLflow run (the caller stores :attr:`Tracker.run_id`
  in its checkpoint and passes it back). MLflow forbids changing a param, so re-logging the config
  on resume skips values already logged and records a changed value as a tag
  (``param_changed.<key>``) with a warning instead of crashing the job.
* mlflow 3.17 refuses the ``./mlruns`` file store, so the default backend is a SQLite file in the
  run folder, and the experiment's artifacts go to ``mlartifacts/`` next to that file, never to a
  folder relative to whatever the worker's current directory happens to be.
* ``import mlflow`` costs seconds; it happens inside functions so ``import ideal_ray.tracking`` is cheap.

Metric policy: values are converted to float (tensors / numpy scalars via ``.item()``). Non-finite
values (NaN, +-inf) are *not* logged -- they wreck charts and run comparisons, and the training loop
already reports skipped steps. Each skipped value bumps a per-run counter that is logged as the metric
``nonfinite_metrics`` (cumulative, survives resume) at the step where it happened, and the first
skip of each key emits a warning.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional, Sequence
from urllib.parse import unquote, urlparse

from ideal_ray.errors import InputError

if TYPE_CHECKING:  # pragma: no cover - typing only, mlflow is imported lazily
    from mlflow import MlflowClient

# MLflow limits (mlflow.utils.validation, 3.17); repeated here so importing this module stays cheap.
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_VAL_LENGTH = 6000
MAX_TAG_VAL_LENGTH = 8000
TRUNCATION_MARKER = "...[truncated]"
NONFINITE_METRIC = "nonfinite_metrics"
CHANGED_PARAM_TAG_PREFIX = "param_changed."
STATUSES = ("FINISHED", "FAILED", "KILLED")
DB_NAME = "mlflow.db"
ARTIFACT_DIR_NAME = "mlartifacts"


class TrackingError(InputError, RuntimeError):
    """A tracking request cannot be honoured; the message says what is wrong and how to fix it."""


# ------------------------------------------------------------------------------------------ helpers
def default_tracking_uri(run_dir: str) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else a SQLite file ``<abs run_dir>/mlflow.db`` (run_dir is created)."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    path = Path(run_dir).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / DB_NAME}"  # abs path starts with "/", giving the 4-slash absolute form


def local_artifact_root(tracking_uri: str) -> Optional[str]:
    """``<dir of the db>/mlartifacts`` as a file URI for sqlite/file backends; None for servers/databases.

    A relative SQLite path (``sqlite:///mlflow.db``) is resolved against the current directory once,
    here, so the stored artifact location is absolute.
    """
    parsed = urlparse(tracking_uri)
    if parsed.scheme == "sqlite":
        # "sqlite:///rel.db" -> path "/rel.db" (relative); "sqlite:////abs.db" -> path "//abs.db" (absolute)
        raw = unquote(parsed.path)[1:]
        if raw in ("", ":memory:"):
            return None
        base = Path(raw).expanduser().resolve().parent
    elif parsed.scheme == "file":
        base = Path(unquote(parsed.path)).expanduser().resolve().parent
    elif parsed.scheme == "" and tracking_uri:  # a plain local path is a file store
        base = Path(tracking_uri).expanduser().resolve().parent
    else:  # http(s), databricks, postgresql, ...: the server decides where artifacts go
        return None
    return (base / ARTIFACT_DIR_NAME).as_uri()


def _truncate(value: str, limit: int) -> str:
    if len(value) <= limit:
        return value
    return value[: limit - len(TRUNCATION_MARKER)] + TRUNCATION_MARKER


def param_value(value: Any) -> str:
    """The string MLflow stores for a config value: ``str(value)`` (tuples, lists, None included), truncated."""
    return _truncate(str(value), MAX_PARAM_VAL_LENGTH)


def _tag_value(value: Any) -> str:
    return _truncate(str(value), MAX_TAG_VAL_LENGTH)


def _to_float(key: str, value: Any) -> float:
    if hasattr(value, "item") and callable(value.item):  # torch tensors, numpy scalars / arrays
        try:
            value = value.item()
        except (ValueError, RuntimeError) as exc:
            raise TypeError(
                f"Metric '{key}' is a tensor/array with more than one element; log a scalar (e.g. .mean())."
            ) from exc
    if isinstance(value, (bool, int, float)):
        return float(value)
    raise TypeError(f"Metric '{key}' has type {type(value).__name__}; log a number or a one-element tensor.")


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _client(tracking_uri: str) -> "MlflowClient":
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _is_missing(exc: Exception) -> bool:
    return getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


def _get_or_create_experiment(client: "MlflowClient", name: str, artifact_root: Optional[str]) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_root)
        except MlflowException as exc:  # another process created it between our get and create
            if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        raise TrackingError(
            f"MLflow experiment '{name}' is deleted; restore it (`mlflow experiments restore`) "
            "or choose another experiment name."
        )
    return exp.experiment_id


# ------------------------------------------------------------------------------------------ trackers
class Tracker:
    """One MLflow run, created or resumed, logged through an explicit client.

    Use as a context manager: leaving the block normally marks the run FINISHED, an exception marks
    it FAILED (KeyboardInterrupt: KILLED) and propagates.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        run_id: Optional[str] = None,
        tags: Optional[Mapping[str, Any]] = None,
        artifact_root: Optional[str] = None,
    ):
        from mlflow.exceptions import MlflowException

        self.tracking_uri = tracking_uri
        self.client = _client(tracking_uri)
        if artifact_root is None:
            artifact_root = local_artifact_root(tracking_uri)
        elif "://" not in artifact_root:
            artifact_root = Path(artifact_root).expanduser().resolve().as_uri()
        self.experiment_id = _get_or_create_experiment(self.client, experiment, artifact_root)
        self._finished = False
        self._warned_nonfinite: set = set()
        str_tags = {str(k): _tag_value(v) for k, v in (tags or {}).items()}

        if run_id is None:
            run = self.client.create_run(self.experiment_id, tags=str_tags, run_name=run_name)
            self.resumed = False
        else:
            try:
                run = self.client.get_run(run_id)
            except MlflowException as exc:
                if _is_missing(exc):
                    raise TrackingError(
                        f"MLflow run '{run_id}' does not exist at {tracking_uri}; pass run_id=None to start "
                        "a new run or point MLFLOW_TRACKING_URI at the store that holds it."
                    ) from exc
                raise
            if run.info.lifecycle_stage == "deleted":
                raise TrackingError(
                    f"MLflow run '{run_id}' is deleted; restore it (`mlflow runs restore --run-id {run_id}`) "
                    "or start a new run."
                )
            if run.info.experiment_id != self.experiment_id:
                warnings.warn(
                    f"Resumed MLflow run '{run_id}' belongs to experiment id {run.info.experiment_id}, "
                    f"not '{experiment}'; it keeps logging to its own experiment.",
                    stacklevel=2,
                )
                self.experiment_id = run.info.experiment_id
            self.client.update_run(run_id, status="RUNNING")
            self.resumed = True
            if str_tags:
                self._log_tags(run.info.run_id, str_tags)
        self._run_id: str = run.info.run_id
        self._params: Dict[str, str] = dict(run.data.params)
        self._nonfinite = int(run.data.metrics.get(NONFINITE_METRIC, 0))

    # -------------------------------------------------------------------------------------- basics
    @property
    def run_id(self) -> str:
        return self._run_id

    @property
    def artifact_uri(self) -> str:
        return self.client.get_run(self._run_id).info.artifact_uri

    def _log_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, v) for k, v in tags.items()]
        for chunk in _chunks(items, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, tags=list(chunk))

    # -------------------------------------------------------------------------------------- params
    def log_params(self, flat: Mapping[str, Any]) -> None:
        """Log a flat ``{dotted.key: value}`` config; values become ``str(value)``, truncated to MLflow's limit.

        Keys already logged with the same value are skipped (resume). A key whose value differs from the
        logged one cannot be changed in MLflow: it is recorded as tag ``param_changed.<key>`` and warned about.
        """
        from mlflow.entities import Param

        new: Dict[str, str] = {}
        changed: Dict[str, str] = {}
        for key, value in flat.items():
            key, sval = str(key), param_value(value)
            old = self._params.get(key)
            if old is None:
                new[key] = sval
            elif old != sval:
                changed[key] = sval
        for chunk in _chunks(list(new.items()), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self._run_id, params=[Param(k, v) for k, v in chunk])
        self._params.update(new)
        if changed:
            self._log_tags(self._run_id, {CHANGED_PARAM_TAG_PREFIX + k: _tag_value(v) for k, v in changed.items()})
            desc = ", ".join(f"{k}: {self._params[k]!r} -> {v!r}" for k, v in changed.items())
            warnings.warn(
                f"MLflow run {self._run_id} already has different values for params ({desc}); MLflow params "
                f"cannot change, so the new values are recorded as tags '{CHANGED_PARAM_TAG_PREFIX}<key>'.",
                stacklevel=2,
            )

    # ------------------------------------------------------------------------------------- metrics
    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log scalar metrics at ``step``; non-finite values are skipped and counted (see module doc)."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        step = int(step)
        out: List[Metric] = []
        skipped: List[str] = []
        for key, value in metrics.items():
            key = str(key)
            v = _to_float(key, value)
            if math.isfinite(v):
                out.append(Metric(key, v, ts, step))
            else:
                skipped.append(key)
        if skipped:
            self._nonfinite += len(skipped)
            out.append(Metric(NONFINITE_METRIC, float(self._nonfinite), ts, step))
            fresh = [k for k in skipped if k not in self._warned_nonfinite]
            if fresh:
                self._warned_nonfinite.update(fresh)
                warnings.warn(
                    f"Non-finite metric values at step {step} were not logged: {fresh}; they are counted in "
                    f"the metric '{NONFINITE_METRIC}' (further skips of these keys are counted silently).",
                    stacklevel=2,
                )
        for chunk in _chunks(out, MAX_METRICS_PER_BATCH):
            self.client.log_batch(self._run_id, metrics=list(chunk))

    # ----------------------------------------------------------------------------------- artifacts
    def log_artifact(self, local_path: str, artifact_path: Optional[str] = None) -> str:
        """Upload a file (or a whole directory) under ``artifact_path``; returns its run-relative path."""
        path = Path(local_path)
        if not path.exists():
            raise FileNotFoundError(f"Cannot log artifact: '{local_path}' does not exist; write the file first.")
        if path.is_dir():
            self.client.log_artifacts(self._run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self._run_id, str(path), artifact_path)
        return f"{artifact_path}/{path.name}" if artifact_path else path.name

    def log_image(self, png_path: str, artifact_path: str = "reconstructions") -> str:
        """Upload an image file (e.g. a reconstruction grid PNG) under ``artifact_path``."""
        if Path(png_path).is_dir():
            raise ValueError(f"log_image expects an image file, got the directory '{png_path}'; use log_artifact.")
        return self.log_artifact(png_path, artifact_path)

    def log_dict(self, d: Mapping[str, Any], name: str) -> str:
        """Upload ``d`` as a JSON artifact ``name`` (``.json`` appended if missing; may contain ``dir/``).

        Values JSON cannot encode (paths, dtypes, ...) are written with ``str``.
        """
        rel = Path(name if name.endswith(".json") else f"{name}.json")
        with tempfile.TemporaryDirectory() as tmp:
            file = Path(tmp) / rel.name
            file.write_text(json.dumps(d, indent=2, sort_keys=True, default=str))
            parent = rel.parent.as_posix()
            return self.log_artifact(str(file), None if parent == "." else parent)

    # ---------------------------------------------------------------------------------- tags / end
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set (or overwrite) run tags; values become strings, truncated to MLflow's limit."""
        self._log_tags(self._run_id, {str(k): _tag_value(v) for k, v in tags.items()})

    def finish(self, status: str = "FINISHED") -> None:
        """Mark the run terminated with FINISHED, FAILED or KILLED; later calls do nothing."""
        if status not in STATUSES:
            raise ValueError(f"Run status '{status}' is not allowed; use one of {STATUSES}.")
        if self._finished:
            return
        self.client.set_terminated(self._run_id, status=status)
        self._finished = True

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.finish("FINISHED")
        else:
            self.finish("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")
        return False  # never swallow the exception

    def __repr__(self) -> str:
        return f"Tracker(run_id={self._run_id!r}, tracking_uri={self.tracking_uri!r})"


class NullTracker:
    """The same interface as :class:`Tracker`, doing nothing: what non-zero ranks get."""

    run_id = None
    artifact_uri = None
    resumed = False

    def log_params(self, flat: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        pass

    def log_artifact(self, local_path: str, artifact_path: Optional[str] = None) -> None:
        pass

    def log_image(self, png_path: str, artifact_path: str = "reconstructions") -> None:
        pass

    def log_dict(self, d: Mapping[str, Any], name: str) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        if status not in STATUSES:
            raise ValueError(f"Run status '{status}' is not allowed; use one of {STATUSES}.")

    def __enter__(self) -> "NullTracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        return False

    def __repr__(self) -> str:
        return "NullTracker()"


def make_tracker(rank: int, *args: Any, **kwargs: Any):
    """A :class:`Tracker` (same arguments) on rank 0, a :class:`NullTracker` on every other rank.

    Non-zero ranks never import mlflow nor open the store.
    """
    return Tracker(*args, **kwargs) if rank == 0 else NullTracker()


def run_tracker(tracking_uri: Optional[str], run_dir: str, experiment: str, run_name: str):
    """The tracker of a one-process job: ``""`` disables tracking (:class:`NullTracker`), None means
    :func:`default_tracking_uri` of ``run_dir``, anything else is the store to use."""
    if tracking_uri == "":
        return NullTracker()
    return Tracker(tracking_uri or default_tracking_uri(run_dir), experiment, run_name)


# ------------------------------------------------------------------------------------------- queries
def find_runs(tracking_uri: str, experiment: str) -> List[Dict[str, Any]]:
    """Every run of ``experiment``, oldest first, as plain dicts for tests and run comparisons.

    Each dict has ``run_id``, ``run_name``, ``status``, ``start_time``/``end_time`` (ms),
    ``artifact_uri``, ``params`` and ``tags`` (user tags; ``mlflow.*`` system tags left out) and
    ``metrics`` (the latest value of each metric). An unknown experiment is an error naming the known ones.
    """
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        known = sorted(e.name for e in client.search_experiments())
        raise TrackingError(f"No MLflow experiment '{experiment}' at {tracking_uri}; known experiments: {known}.")
    runs: List[Dict[str, Any]] = []
    token = None
    while True:
        page = client.search_runs(
            [exp.experiment_id], order_by=["attributes.start_time ASC"], max_results=1000, page_token=token
        )
        for r in page:
            runs.append(
                {
                    "run_id": r.info.run_id,
                    "run_name": r.info.run_name,
                    "status": r.info.status,
                    "start_time": r.info.start_time,
                    "end_time": r.info.end_time,
                    "artifact_uri": r.info.artifact_uri,
                    "params": dict(r.data.params),
                    "metrics": dict(r.data.metrics),
                    "tags": {k: v for k, v in r.data.tags.items() if not k.startswith("mlflow.")},
                }
            )
        token = page.token
        if not token:
            return runs
