"""Compare MLflow runs as the paper's tables: one row per trial, the swept params, then the metrics.

Runs come from one sweep (its parent run, found by sweep name or path, or given by id: the children are the
trials) or from a whole experiment (every run but sweep parents). The table's columns are the params whose values
differ between the rows (what was swept) and the chosen metrics -- by default every numeric metric the finished
rows share, gFID / rFID first, without Ray Tune's bookkeeping (``time_total_s``, ``config/...``). A trial resumed
after an error may have left an older run with the same ``trial_name`` tag: the latest finished one is kept.

The plot follows the kind of sweep:

* a CFG sweep (param ``cfg_scale`` takes several values): FID vs CFG scale, one line per setting of the other
  swept params;
* a layer study (a layer index in a swept param -- ``layer=12``, ``variant=layer-12`` or
  ``overrides=model.vfm.deep_layer=12`` -- and metrics ``rfid`` and a probe top-1): Figure 1's trade-off, rFID vs
  probe top-1, points labelled by layer and joined in layer order;
* anything else: the first metric per row as bars.

Matplotlib draws through its object API (``Figure`` + Agg canvas), never pyplot's global state.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ideal_ray.tune.common import KIND_TAG, SWEEP_TAG

__all__ = ["RunRow", "Comparison", "tracking_uri_for", "find_sweep", "load_runs", "swept_params", "shared_metrics",
           "higher_is_better", "arrow", "build_comparison", "plot_comparison", "plot_fid_vs_cfg", "plot_is_vs_fid",
           "plot_layer_tradeoff", "layer_index", "write_text", "write_comparison", "compare_runs"]

# Ray Tune's own result fields (logged as metrics by its MLflow callback): never compared
TUNE_FIELDS = frozenset({"done", "pid", "timestamp", "time_this_iter_s", "time_total_s", "time_since_restore",
                         "training_iteration", "iterations_since_restore", "timesteps_total",
                         "timesteps_since_restore", "episodes_total", "nonfinite_metrics"})
FIRST_METRICS = ("gfid", "rfid", "sfid", "rsfid", "is", "ris", "precision", "recall", "probe_recon_top1",
                 "psnr", "ssim", "usage")
HIGHER_BETTER = re.compile(r"^(is|ris|precision|recall|psnr|ssim|usage|entropy)$|top\d|_is$|accuracy|per_s$")
LOWER_BETTER = re.compile(r"fid|loss|error|seconds")
LAYER_VALUE = re.compile(r"(?:^|[^a-z0-9])layer[-_ =]?(\d+)$", re.IGNORECASE)
FILES = {"markdown": "comparison.md", "csv": "comparison.csv", "plot": "comparison.png"}


@dataclass
class RunRow:
    """One MLflow run: a trial of a sweep or a run of an experiment."""

    name: str
    run_id: str
    status: str
    params: Dict[str, str]
    metrics: Dict[str, float]
    start_time: int = 0


def _number(text: Any) -> Optional[float]:
    try:
        v = float(text)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def higher_is_better(metric: str) -> bool:
    """IS, precision/recall, PSNR/SSIM, usage, top-k accuracies and throughputs; the rest sorts ascending."""
    return bool(HIGHER_BETTER.search(metric))


def arrow(metric: str) -> str:
    """`` ↑`` / `` ↓`` after a metric whose better direction is known (the paper's table headers), else ``""``."""
    if higher_is_better(metric):
        return " ↑"
    return " ↓" if LOWER_BETTER.search(metric) else ""


# ---------------------------------------------------------------------------------------------- loading
def tracking_uri_for(tracking_uri: Optional[str], sweep: Optional[str] = None) -> str:
    """``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``<sweep folder>/mlflow.db`` when ``sweep`` is a folder
    holding one."""
    if tracking_uri:
        return tracking_uri
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    if sweep and os.path.isfile(os.path.join(sweep, "mlflow.db")):
        return f"sqlite:///{os.path.abspath(os.path.join(sweep, 'mlflow.db'))}"
    raise ValueError("no MLflow store given: pass --tracking-uri (e.g. sqlite:///runs/sweeps/mlflow.db) or set "
                     "MLFLOW_TRACKING_URI.")


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri)


def _search(client, experiment_ids: List[str], filter_string: str = "") -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=1000,
                                  order_by=["attributes.start_time ASC"], page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def find_sweep(tracking_uri: str, sweep: str) -> str:
    """The parent run id of the sweep named ``sweep`` (its folder name) or stored at ``sweep`` (its folder path)."""
    client = _client(tracking_uri)
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    if os.sep in sweep or os.path.isdir(sweep):
        flt = f"tags.`{SWEEP_TAG}` = '{os.path.abspath(os.path.expanduser(sweep))}'"
    else:
        flt = f"tags.`{SWEEP_TAG}` LIKE '%/{sweep}'"
    found = _search(client, exp_ids, flt) if exp_ids else []
    found = [r for r in found if os.sep in sweep or os.path.basename(r.data.tags[SWEEP_TAG]) == sweep]  # LIKE: _ %
    paths = sorted({r.data.tags[SWEEP_TAG] for r in found})
    if not found:
        raise ValueError(f"no sweep '{sweep}' in the MLflow store {tracking_uri}; pass the sweep's name or folder "
                         f"as given to the sweep job, or --parent-run-id.")
    if len(paths) > 1:
        raise ValueError(f"sweep name '{sweep}' matches {len(paths)} sweeps ({', '.join(paths)}); pass the full "
                         f"folder path instead.")
    return found[-1].info.run_id


def _rows(runs: list) -> List[RunRow]:
    """Runs -> rows, one per trial: of several runs with the same ``trial_name`` tag the latest FINISHED one."""
    by_trial: Dict[str, Any] = {}
    for r in runs:  # oldest first
        key = r.data.tags.get("trial_name") or r.info.run_id
        old = by_trial.get(key)
        if old is None or r.info.status == "FINISHED" or old.info.status != "FINISHED":
            by_trial[key] = r
    return [RunRow(name=r.info.run_name or r.info.run_id[:8], run_id=r.info.run_id, status=r.info.status,
                   params=dict(r.data.params), metrics=dict(r.data.metrics), start_time=r.info.start_time or 0)
            for r in by_trial.values()]


def load_runs(tracking_uri: str, *, sweep: Optional[str] = None, parent_run_id: Optional[str] = None,
              experiment: Optional[str] = None) -> Tuple[str, List[RunRow]]:
    """(a title, the rows) of one sweep's trials (``sweep`` or ``parent_run_id``) or of an ``experiment``'s runs."""
    if sum(x is not None for x in (sweep, parent_run_id, experiment)) != 1:
        raise ValueError("choose the runs with exactly one of sweep, parent_run_id or experiment.")
    client = _client(tracking_uri)
    if experiment is not None:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            known = sorted(e.name for e in client.search_experiments())
            raise ValueError(f"no MLflow experiment '{experiment}' in {tracking_uri}; known: {known}.")
        runs = [r for r in _search(client, [exp.experiment_id]) if KIND_TAG not in r.data.tags]
        return f"experiment {experiment}", _rows(runs)
    if parent_run_id is None:
        parent_run_id = find_sweep(tracking_uri, sweep)
    from mlflow.exceptions import MlflowException

    try:
        parent = client.get_run(parent_run_id)
    except MlflowException as err:
        raise ValueError(f"no MLflow run {parent_run_id} in {tracking_uri}; pass a sweep's parent run id.") from err
    runs = _search(client, [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    title = f"sweep {parent.info.run_name} ({parent.data.tags.get(KIND_TAG, 'runs')}, parent run {parent_run_id})"
    return title, _rows(runs)


# ---------------------------------------------------------------------------------------------- the table
@dataclass
class Comparison:
    """What a table shows: ``params`` and ``metrics`` columns over ``rows`` (already sorted)."""

    title: str
    params: List[str]
    metrics: List[str]
    rows: List[RunRow]

    @property
    def show_status(self) -> bool:
        return any(r.status != "FINISHED" for r in self.rows)

    def header(self, arrows: bool = False) -> List[str]:
        names = [k + arrow(k) for k in self.metrics] if arrows else list(self.metrics)
        return ["run"] + self.params + names + (["status"] if self.show_status else [])

    def cells(self, row: RunRow, fmt: Callable[[Any], str]) -> List[str]:
        out = [row.name] + [row.params.get(p, "-") for p in self.params]
        out += [fmt(row.metrics.get(k)) for k in self.metrics]
        return out + ([row.status] if self.show_status else [])

    def markdown(self) -> str:
        head = self.header(arrows=True)
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(self.cells(r, _fmt)) + " |" for r in self.rows]
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(self.header())
        for r in self.rows:
            w.writerow(self.cells(r, lambda v: "" if v is None else repr(float(v))))
        return buf.getvalue()


def swept_params(rows: Sequence[RunRow]) -> List[str]:
    """The params whose values differ between rows (a param missing from a row counts as a value)."""
    keys = sorted({k for r in rows for k in r.params})
    return [k for k in keys if len({r.params.get(k) for r in rows}) > 1]


def shared_metrics(rows: Sequence[RunRow]) -> List[str]:
    """The metrics every row with metrics has, Tune's bookkeeping left out, the usual headline metrics first."""
    have = [set(r.metrics) for r in rows if r.metrics]
    if not have:
        return []
    common = {k for k in set.intersection(*have) if k not in TUNE_FIELDS and not k.startswith("config/")}
    return [k for k in FIRST_METRICS if k in common] + sorted(common - set(FIRST_METRICS))


def _param_key(row: RunRow, params: Sequence[str]) -> tuple:
    out = []
    for p in params:
        v = row.params.get(p)
        n = _number(v)
        out.append((0, n, "") if n is not None else (1, 0.0, str(v)))
    return tuple(out) + ((1, 0.0, row.name),)


def build_comparison(rows: Sequence[RunRow], title: str = "", params: Optional[Sequence[str]] = None,
                     metrics: Optional[Sequence[str]] = None, sort_by: Optional[str] = None) -> Comparison:
    """The table: ``params`` (default: the swept ones) and ``metrics`` (default: the shared ones) columns, rows
    sorted best first by ``sort_by`` (a metric; rows without it last) or else by the param values."""
    if not rows:
        raise ValueError(f"no runs to compare in {title or 'the selection'}; check the sweep name or experiment.")
    params = list(swept_params(rows) if params is None else params)
    if metrics is None:
        metrics = shared_metrics(rows)
    else:
        known = sorted({k for r in rows for k in r.metrics})
        missing = [m for m in metrics if m not in known]
        if missing:
            raise ValueError(f"metrics {missing} are in none of the runs; choose from {known}.")
        metrics = list(metrics)
    if sort_by is not None:
        if sort_by not in {k for r in rows for k in r.metrics}:
            raise ValueError(f"sort_by '{sort_by}' is in none of the runs; choose one of the metrics {metrics}.")
        sign = -1.0 if higher_is_better(sort_by) else 1.0

        def key(r: RunRow):
            v = r.metrics.get(sort_by)
            ok = v is not None and math.isfinite(v)
            return (0, sign * v) if ok else (1, 0.0)

        ordered = sorted(rows, key=key)
    else:
        ordered = sorted(rows, key=lambda r: _param_key(r, params))
    return Comparison(title, params, metrics, list(ordered))


# ---------------------------------------------------------------------------------------------- plots
def _figure(width: float = 5.0, height: float = 3.6):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig, path: str) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    return path


def _fid_metric(metrics: Sequence[str]) -> Optional[str]:
    if "gfid" in metrics:
        return "gfid"
    return next((m for m in metrics if "fid" in m and "sfid" not in m), None)


def plot_fid_vs_cfg(rows: Sequence[RunRow], path: str, fid: str = "gfid", title: str = "",
                    second: Optional[str] = None, chance: Optional[float] = None) -> str:
    """FID vs CFG scale, one line per setting of the other swept params (rows lacking either value are left out).
    ``second`` (e.g. ``class_accuracy``): that metric too, on a right-hand axis (dashed, squares), with ``chance``
    as a dotted level line."""
    others = [p for p in swept_params(rows) if p != "cfg_scale"]

    def series(metric: str) -> Dict[str, List[Tuple[float, float]]]:
        lines: Dict[str, List[Tuple[float, float]]] = {}
        for r in rows:
            x, y = _number(r.params.get("cfg_scale")), r.metrics.get(metric)
            if x is not None and y is not None and math.isfinite(y):
                label = ", ".join(f"{p}={r.params.get(p, '-')}" for p in others)
                lines.setdefault(label, []).append((x, y))
        return {k: sorted(v) for k, v in sorted(lines.items())}

    lines = series(fid)
    fig, ax = _figure(5.6 if second else 5.0, 3.6)
    colours = [f"C{i}" for i in range(10)]
    for i, (label, pts) in enumerate(lines.items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colours[i % 10],
                label=f"{fid} {label}".strip() if second else (label or None))
    ax.set_xlabel("CFG scale")
    ax.set_ylabel(fid)
    ax.set_title(title or (f"{fid} and {second} vs CFG scale" if second else f"{fid} vs CFG scale"), fontsize=9)
    handles = ax.get_legend_handles_labels()
    extra = series(second) if second else {}
    if extra:
        ax2 = ax.twinx()
        for i, (label, pts) in enumerate(extra.items()):
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker="s", linestyle="--",
                     color=colours[(i + len(lines)) % 10],
                     label=f"{second} {label}".strip())
        if chance is not None and math.isfinite(chance):
            ax2.axhline(chance, color="grey", linestyle=":", linewidth=1, label=f"chance ({chance:.3g})")
        ax2.set_ylabel(f"{second} (dashed)")
        top = max([chance or 0.0] + [p[1] for pts in extra.values() for p in pts])
        ax2.set_ylim(0.0, max(1.0, top) * 1.05 if top <= 1.0 else top * 1.05)
        h2 = ax2.get_legend_handles_labels()
        handles = (handles[0] + h2[0], handles[1] + h2[1])
    if len(handles[0]) > 1:
        ax.legend(*handles, fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_is_vs_fid(rows: Sequence[RunRow], path: str, fid: str = "gfid", label_param: str = "cfg_scale") -> str:
    """IS vs FID, one point per row labelled by ``label_param``; without IS (Inception weights without logits)
    precision vs recall instead, and the title says so."""
    has_is = any("is" in r.metrics for r in rows)
    xk, yk = (fid, "is") if has_is else ("recall", "precision")
    fig, ax = _figure()
    for r in rows:
        x, y = r.metrics.get(xk), r.metrics.get(yk)
        if x is None or y is None or not (math.isfinite(x) and math.isfinite(y)):
            continue
        ax.scatter([x], [y], color="tab:blue")
        ax.annotate(f"{label_param} {r.params.get(label_param, '?')}", (x, y), textcoords="offset points",
                    xytext=(4, 4), fontsize=7)
    ax.set_xlabel(xk)
    ax.set_ylabel(yk)
    ax.set_title(f"IS vs {fid}" if has_is else "precision vs recall (no IS: the Inception weights have no logits)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def layer_index(row: RunRow, keys: Optional[Sequence[str]] = None) -> Optional[int]:
    """The tokenized layer a run studied: a ``*layer*`` param holding an integer, or a value like ``layer-12`` or
    ``model.vfm.deep_layer=12``; only the params ``keys`` (default: all) are looked at."""
    for k, v in sorted(row.params.items()):
        if keys is not None and k not in keys:
            continue
        if "layer" in k.lower() and re.fullmatch(r"\d+", str(v).strip()):
            return int(v)
        m = LAYER_VALUE.search(str(v).strip())
        if m:
            return int(m.group(1))
    return None


def _probe_metric(rows: Sequence[RunRow]) -> Optional[str]:
    names = sorted({k for r in rows for k in r.metrics})
    if "probe_recon_top1" in names:
        return "probe_recon_top1"
    return next((k for k in names if "probe" in k and "top1" in k), None)


def plot_layer_tradeoff(rows: Sequence[RunRow], path: str, probe: str, keys: Optional[Sequence[str]] = None) -> str:
    """Figure 1: rFID vs linear-probe top-1, one point per layer (:func:`layer_index` over ``keys``), joined in
    layer order."""
    pts = sorted((layer_index(r, keys), r.metrics["rfid"], r.metrics[probe]) for r in rows
                 if layer_index(r, keys) is not None and "rfid" in r.metrics and probe in r.metrics)
    fig, ax = _figure()
    ax.plot([p[1] for p in pts], [p[2] for p in pts], marker="o", color="tab:blue")
    for layer, x, y in pts:
        ax.annotate(f"layer {layer}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("rFID")
    ax.set_ylabel(f"{probe} (linear probe)")
    ax.set_title("reconstruction vs semantics by tokenized layer")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_comparison(cmp: Comparison, path: str) -> Optional[str]:
    """The plot that fits the sweep (module notes); returns its kind ("fid-vs-cfg", "layer-tradeoff", "bars") or
    None when there is no metric to draw."""
    rows = cmp.rows
    fid = _fid_metric(sorted({k for r in rows for k in r.metrics}))
    if fid and len({_number(r.params.get("cfg_scale")) for r in rows} - {None}) > 1:
        acc = "class_accuracy" if any("class_accuracy" in r.metrics for r in rows) else None
        chance = next((r.metrics["class_chance"] for r in rows if "class_chance" in r.metrics), None)
        plot_fid_vs_cfg(rows, path, fid, title=cmp.title[:70], second=acc, chance=chance)
        return "fid-vs-cfg"
    probe = _probe_metric(rows)
    layered = [r for r in rows if layer_index(r, cmp.params) is not None and "rfid" in r.metrics
               and probe in r.metrics]
    if probe and len({layer_index(r, cmp.params) for r in layered}) >= 2:
        plot_layer_tradeoff(layered, path, probe, cmp.params)
        return "layer-tradeoff"
    if not cmp.metrics:
        return None
    metric = cmp.metrics[0]
    vals = [(", ".join(r.params.get(p, "-") for p in cmp.params) or r.name, r.metrics.get(metric)) for r in rows]
    vals = [(k, v) for k, v in vals if v is not None and math.isfinite(v)]
    fig, ax = _figure(max(5.0, 0.6 * len(vals)), 3.6)
    ax.bar(range(len(vals)), [v for _, v in vals], color="tab:blue")
    ax.set_xticks(range(len(vals)))
    ax.set_xticklabels([k for k, _ in vals], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(metric)
    ax.set_title(cmp.title[:70], fontsize=9)
    _save(fig, path)
    return "bars"


# ---------------------------------------------------------------------------------------------- all of it
def write_text(path: str, text: str) -> str:
    """Write ``text`` to ``path`` atomically (:func:`ideal_ray.io.atomic_write`)."""
    from ideal_ray.io import atomic_write

    return atomic_write(path, text)


def write_comparison(cmp: Comparison, out_dir: str) -> Dict[str, Any]:
    """``comparison.md``, ``comparison.csv`` and ``comparison.png`` in ``out_dir`` (replaced if present)."""
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    os.makedirs(out_dir, exist_ok=True)
    files = {"markdown": write_text(os.path.join(out_dir, FILES["markdown"]), f"# {cmp.title}\n\n{cmp.markdown()}"),
             "csv": write_text(os.path.join(out_dir, FILES["csv"]), cmp.csv())}
    kind = plot_comparison(cmp, os.path.join(out_dir, FILES["plot"]))
    if kind is not None:
        files["plot"] = os.path.join(out_dir, FILES["plot"])
    return {"files": files, "plot_kind": kind}


def compare_runs(tracking_uri: str, out_dir: str, *, sweep: Optional[str] = None,
                 parent_run_id: Optional[str] = None, experiment: Optional[str] = None,
                 metrics: Optional[Sequence[str]] = None, sort_by: Optional[str] = None) -> Dict[str, Any]:
    """Load the runs, build the table, write it (Markdown, CSV, plot) to ``out_dir``. Returns ``{title, table (the
    :class:`Comparison`), markdown, csv, rows, params, metrics, files, plot_kind}``."""
    title, rows = load_runs(tracking_uri, sweep=sweep, parent_run_id=parent_run_id, experiment=experiment)
    cmp = build_comparison(rows, title, metrics=metrics, sort_by=sort_by)
    out = write_comparison(cmp, out_dir)
    return {"title": title, "table": cmp, "markdown": cmp.markdown(), "csv": cmp.csv(), "rows": len(cmp.rows),
            "params": cmp.params, "metrics": cmp.metrics, **out}
