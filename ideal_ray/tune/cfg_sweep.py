"""CFG sweep on Ray Tune: one trained GPT + tokenizer, a grid over CFG scale (and optionally CFG interval,
temperature, top-k); each trial samples and scores its images. The settings are a ``CfgSweepConfig``
(``ideal_ray.config``).

    trial (a Tune function trainable, its own CPU or GPU share via tune.with_resources)
        sample_images        sample.per_class images of every class, in-process on the trial's device (its own
                             Sampler; a SampleJobConfig of the sweep's settings and the trial's swept values)
        -> evaluate_gen      gFID / sFID / precision / recall (+ IS when the Inception weights have logits)
                             against ``reference``, and with ``classifier.data`` the class accuracy of the samples
                             (a classifier fitted on real images of that data set); the reference statistics and the
                             classifier are computed once before the trials (one Ray task) into one cache folder
                             that every trial reads
        -> tune.report       the metrics: one MLflow child run per trial (params = the trial's CFG settings)

Folder ``<storage_path>/<name>``: Tune's experiment state and trial folders, ``sweep.json`` (the settings),
``trial_outputs/<cfg_scale=..>/`` (``samples.npz``, ``grid.png``, ``eval/result.json`` of each trial) and ``report/``
(``cfg_table.md`` / ``.csv`` sorted by gFID, ``fid_vs_cfg.png`` -- gFID and, when measured, class accuracy against the
CFG scale --, ``is_vs_fid.png`` -- or ``precision_vs_recall.png`` when there is no IS -- and ``best.json``), all also
logged to the sweep's parent MLflow run.

Resumable: running the same name again restores the Tuner (``common.run_tuner``): finished trials are kept, the
others run. A trial that was interrupted after its samples were written reuses them (the per-sample seeds make
them identical). Changing the settings of an existing sweep is refused: choose a new name.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from ideal_ray import storage
from ideal_ray.config import CfgSweepConfig, ConfigError, validate_stage
from ideal_ray.io import record_settings
from ideal_ray.tune import common

__all__ = ["sweep_cfg", "cfg_trial", "param_space", "fixed_sample", "trial_key", "EXPERIMENT", "KIND", "SWEPT"]

EXPERIMENT = "ideal-sweep-cfg"
KIND = "cfg"
SWEPT = ("cfg_scale", "cfg_interval", "temperature", "top_k")  # the keys a trial's config may hold
METRICS = ("gfid", "class_accuracy", "sfid", "is", "precision", "recall")
EXTRA = ("is_std", "class_chance", "class_accuracy_real")  # reported with the trial's metrics, not in the table
SETTINGS_FILE = "sweep.json"
OUTPUTS = "trial_outputs"
REPORT = "report"


# ---------------------------------------------------------------------------------------------- the grid
def _values(name: str, values: Optional[Sequence[Any]], cast: Callable[[Any], Any]) -> Optional[List[Any]]:
    if values is None:
        return None
    if isinstance(values, np.ndarray):
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
        raise ValueError(f"{name}={values!r} must be a non-empty list of values (or None to keep the default).")
    try:
        out = [cast(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"{name}={list(values)!r} holds a value that is not a valid {name[:-1]}; pass numbers.")
    if len(set(map(str, out))) != len(out):
        raise ValueError(f"{name}={out} lists a value twice; list each value once.")
    return out


def _int(v: Any) -> int:
    if float(v) != int(float(v)):
        raise ValueError(f"{v} is not an integer")
    return int(float(v))


def _interval(v: Any) -> List[float]:
    start, end = (float(x) for x in v)  # raises on anything but a pair of numbers
    return [start, end]


def param_space(cfg_scales: Sequence[float], cfg_intervals: Optional[Sequence[Sequence[float]]] = None,
                temperatures: Optional[Sequence[float]] = None, top_ks: Optional[Sequence[int]] = None
                ) -> Dict[str, Any]:
    """The Tune grid: one ``tune.grid_search`` per given list (cfg_scale always); a list that is None is not swept
    and keeps :class:`~ideal_ray.config.SampleConfig`'s default. Every value is checked here."""
    from ray import tune

    from ideal_ray.config import SampleConfig
    from ideal_ray.sampling import validate_sample_config

    lists = {"cfg_scale": _values("cfg_scales", cfg_scales, float),
             "cfg_interval": _values("cfg_intervals", cfg_intervals, _interval),
             "temperature": _values("temperatures", temperatures, float),
             "top_k": _values("top_ks", top_ks, _int)}
    for s in lists["cfg_scale"]:
        if not math.isfinite(s) or s < 0:
            raise ValueError(f"cfg_scales holds {s}; CFG scales must be finite and >= 0 (1.0 = no guidance).")
    for key, vals in lists.items():
        for v in vals or []:
            validate_sample_config(_sample_config({key: v}, SampleConfig()))
    return {k: tune.grid_search(v) for k, v in lists.items() if v is not None}


def _sample_config(config: Dict[str, Any], base):
    """``base`` (a SampleConfig) with a trial's swept values."""
    import dataclasses

    over = {k: (tuple(v) if k == "cfg_interval" else v) for k, v in config.items() if k in SWEPT}
    return dataclasses.replace(base, **over)


def trial_key(config: Dict[str, Any]) -> str:
    """The trial's output folder name, a pure function of its swept values: ``cfg_scale=1.5,top_k=100``."""
    def text(v: Any) -> str:
        return "-".join(f"{x:.10g}" for x in v) if isinstance(v, (list, tuple)) else f"{v:.10g}"

    return ",".join(f"{k}={text(config[k])}" for k in SWEPT if k in config)


# ---------------------------------------------------------------------------------------------- one trial
def cfg_trial(config: Dict[str, Any], settings: Dict[str, Any]) -> None:
    """Tune trainable: sample with this trial's CFG settings, evaluate, report (module notes).

    ``settings``: the sweep's fixed settings (:func:`sweep_cfg` builds them): gpt, tokenizer, reference, outputs,
    sample (SampleConfig fields: :func:`fixed_sample`), classes, device, precision, inception_weights, cache_dir,
    eval_batch_size, classifier (None, or the class-accuracy classifier's root / split / per_class / kind), verbose.
    The trial's sampling is a ``SampleJobConfig`` (in this process, on the trial's device, no MLflow run of its own)
    and its evaluation a ``GenEvalConfig``."""
    from ray import tune

    from ideal_ray.config import ClassifierConfig, FIDConfig, GenEvalConfig, RunConfig, SampleConfig, SampleJobConfig
    from ideal_ray.pipelines.evaluate import evaluate_gen
    from ideal_ray.pipelines.sample_local import SAMPLES_FILE, sample_images

    key = trial_key(config)
    out = os.path.join(settings["outputs"], key)
    log = (lambda m: print(f"[{key}] {m}", flush=True)) if settings["verbose"] else (lambda m: None)
    sample_cfg = _sample_config(config, SampleConfig(**settings["sample"]))
    device = settings["device"]
    report: Dict[str, float] = {}
    npz = os.path.join(out, SAMPLES_FILE)
    if os.path.isfile(npz):  # an earlier attempt of this trial wrote them (atomically): same seeds, same images
        log(f"reusing {npz}")
    else:
        job = SampleJobConfig(gpt=settings["gpt"], tokenizer=settings["tokenizer"], out=out, sample=sample_cfg,
                              classes=tuple(settings["classes"] or ()), tracking_uri="",
                              run=RunConfig(in_process=True, device=device, precision=settings["precision"]))
        s = sample_images(job, log=log)
        report.update(images_per_s=s["images_per_s"], sample_seconds=s["seconds"])
    eval_dir = os.path.join(out, "eval")
    result_file = os.path.join(eval_dir, "result.json")
    if os.path.isfile(result_file):
        with open(result_file) as f:
            result = json.load(f)
    else:
        cls = settings.get("classifier") or {}
        gen = GenEvalConfig(
            samples=npz, reference=settings["reference"], out=eval_dir, device=device, tracking_uri="",
            fid=FIDConfig(inception_weights=settings["inception_weights"], cache_dir=settings["cache_dir"],
                          batch_size=settings["eval_batch_size"]),
            classifier=ClassifierConfig(data=cls.get("root", ""), split=cls.get("split", "train"),
                                        per_class=cls.get("per_class"), kind=cls.get("kind", "probe")))
        result = evaluate_gen(gen, log_fn=log)
        report["eval_seconds"] = result["seconds"]
    report.update({k: float(result[k]) for k in METRICS + EXTRA if k in result})
    report["num_images"] = float(result["n"])
    tune.report(report)


# ---------------------------------------------------------------------------------------------- checks
def _check_settings(path: str, settings: Dict[str, Any]) -> None:
    """Record the sweep's settings; refuse to restore a sweep whose stored settings differ (Tune would silently keep
    the old grid). Compared only when Tune can restore the sweep: a folder it never saved starts afresh."""
    from ray import tune

    record_settings(os.path.join(path, SETTINGS_FILE), settings, f"CFG sweep {os.path.basename(path)}",
                    "rerun it unchanged to resume it, or choose a new name.", compare=tune.Tuner.can_restore(path))


def _check_precision(precision: str, gpus_per_trial: float) -> None:
    """The trials sample in bf16 only on a GPU share (``RunConfig``'s rule)."""
    if precision == "bf16" and gpus_per_trial == 0:
        raise ConfigError("precision=bf16 runs on CUDA only and these trials run on CPU (gpus_per_trial=0, or a "
                          "cluster without GPUs); use precision=auto or fp32.")


def _init_ray(gpus_per_trial: Optional[float]) -> float:
    """Start (or join, ``$RAY_ADDRESS``) Ray; the GPUs per trial (None: 1 when the cluster has GPUs, else 0)."""
    import ray

    from ideal_ray.cluster import init_ray

    init_ray(0)  # join $RAY_ADDRESS, or a local cluster of this machine's CPUs
    gpus = float(ray.cluster_resources().get("GPU", 0))
    if gpus_per_trial is None:
        return 1.0 if gpus else 0.0
    if gpus_per_trial > 0 and gpus == 0:
        raise RuntimeError(f"gpus_per_trial={gpus_per_trial} but the Ray cluster has no GPUs; pass "
                           f"gpus_per_trial=0 to sample on CPU.")
    return float(gpus_per_trial)


def _warm_reference(reference: str, size: int, settings: Dict[str, Any], resources: Dict[str, float]) -> Dict:
    """Compute (or find) the reference statistics and the class-accuracy classifier once -- on GPU as one Ray task
    with a trial's resources, on CPU here -- so the trials only read the cache. Both are built exactly as
    ``evaluate_gen`` builds them, so the cache keys agree."""
    import ray

    def warm(device: str) -> Dict[str, Any]:
        from ideal_ray.eval import reference as ref_mod
        from ideal_ray.eval.inception import load_inception

        source = ref_mod.reference_source(reference, size)
        extractor = load_inception(settings["inception_weights"], device=device)
        stats = ref_mod.reference_stats(source, extractor, settings["cache_dir"],
                                        batch_size=settings["eval_batch_size"])
        out = {"from_cache": bool(stats.from_cache), "images": int(stats.protocol["num_reference_images"])}
        cls = settings.get("classifier")
        if cls:  # built as evaluate_gen builds it (same selection, crop size, evaluator): the same cache entry
            from ideal_ray.eval import class_accuracy as ca

            clf = ca.real_classifier(ca.classifier_data(cls["root"], cls["split"], cls["per_class"],
                                                        kind=cls.get("kind", "probe")), size,
                                     extractor, settings["cache_dir"], batch_size=settings["eval_batch_size"])
            out["classifier"] = {"from_cache": clf.from_cache, "images": clf.protocol["real_images"]["num_images"],
                                 "real_top1": clf.real_top1}
        return out

    if resources["gpu"] == 0:
        return warm("cpu")
    task = ray.remote(num_cpus=resources["cpu"], num_gpus=resources["gpu"])(warm)
    return ray.get(task.remote(settings["device"]))


# ---------------------------------------------------------------------------------------------- the sweep
def fixed_sample(cfg: CfgSweepConfig) -> Dict[str, Any]:
    """The trials' sampling settings that are not swept (``cfg.sample``), as ``sweep.json`` records them: per_class,
    batch_size, seed, out_size and top_p always; cfg_interval, temperature and top_k when they are not swept and
    differ from :class:`~ideal_ray.config.SampleConfig`'s defaults (so a sweep at the defaults records what it always
    recorded). ``sample.cfg_scale`` is always swept (``cfg_scales``)."""
    from ideal_ray.config import SampleConfig

    s, default = cfg.sample, SampleConfig()
    out: Dict[str, Any] = {"per_class": int(s.per_class), "batch_size": int(s.batch_size), "seed": int(s.seed),
                           "out_size": int(s.out_size), "top_p": float(s.top_p)}
    for key, swept in (("cfg_interval", cfg.cfg_intervals), ("temperature", cfg.temperatures),
                       ("top_k", cfg.top_ks)):
        if not swept and getattr(s, key) != getattr(default, key):
            out[key] = getattr(s, key)
    return out


def sweep_cfg(cfg: CfgSweepConfig, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run (or resume) the CFG sweep ``cfg.name`` under ``cfg.storage_path`` and report it (module notes).

    The grid: ``cfg_scales`` (always), ``cfg_intervals`` (start,end pairs, flattened), ``temperatures`` and
    ``top_ks``; an empty one is not swept and every trial keeps ``cfg.sample``'s value, as it keeps per_class,
    batch_size, seed, out_size and top_p. ``gpus_per_trial``: a GPU share per trial (fractions let trials share a
    GPU; None = 1 when the cluster has GPUs, else 0 = CPU). ``fid.cache_dir``: the reference statistics cache every
    trial reads (default ``$IDEAL_RAY_FID_REFS`` or ``~/.cache/ideal_ray/fid_refs``; on a multi-node cluster pass a
    shared folder); ``fid.batch_size``: images per Inception batch. ``classifier.data`` (a data set root; '' = off):
    every trial also reports the samples' class accuracy under a classifier of ``classifier.kind`` (``probe`` or
    ``cnn``) fitted on ``classifier.per_class`` real images per class (default 50, 0 = all) of its
    ``classifier.split`` (``ideal_ray.eval.class_accuracy``); the GPT's classes must be classes of that data set.
    ``tracking_uri``: the MLflow store (None or "" = ``$MLFLOW_TRACKING_URI`` or ``<sweep>/mlflow.db``). ``verbose``
    0 silences Tune's progress table and the trials' logs.

    Returns ``{path, tracking_uri, parent_run_id, best: {trial, config, metrics} or None, trials: [{config,
    metrics}] of the finished trials (config values as MLflow params: strings), table (Markdown), files, finished,
    errored, unfinished, errors, interrupted}``.
    """
    from ray import tune

    from ideal_ray.checkpoint import GPT, check_models
    from ideal_ray.eval.inception import resolve_inception_weights
    from ideal_ray.pipelines.sample_local import _resolve_classes
    from ideal_ray.eval.reference import default_cache_dir, reference_source
    from ideal_ray.tracking import default_tracking_uri

    validate_stage(cfg)  # the values and sample settings (per_class, batch sizes, top_p ...), precision, resources
    if cfg.gpus_per_trial == 0:
        _check_precision(cfg.precision, 0.0)
    gpt, tokenizer, reference, name = cfg.gpt, cfg.tokenizer, cfg.reference, cfg.name
    classes = list(cfg.classes) or None
    per_class, out_size = cfg.sample.per_class, cfg.sample.out_size
    clf_cfg, iv = cfg.classifier, cfg.cfg_intervals
    path = common.sweep_path(cfg.storage_path, name)
    space = param_space(list(cfg.cfg_scales), [iv[i: i + 2] for i in range(0, len(iv), 2)] or None,
                        list(cfg.temperatures) or None, list(cfg.top_ks) or None)
    reference_source(reference, out_size)  # there (a local path or an object-store URI), else one sentence
    num_classes = check_models(gpt, tokenizer, classes)[GPT].num_classes
    if classes is not None:
        _resolve_classes(classes, num_classes)  # none, or one listed twice
    if per_class * (len(classes) if classes is not None else num_classes) < 2:
        raise ValueError(f"sample.per_class={per_class} over {num_classes if classes is None else len(classes)} "
                         f"class(es) gives fewer than 2 images; FID needs at least 2.")
    weights = resolve_inception_weights(cfg.fid.inception_weights)  # MissingWeightsError says how to get them
    classifier = None
    if clf_cfg.data:
        from ideal_ray.eval.class_accuracy import classifier_data as list_classifier_data

        # a clear error if missing
        data = list_classifier_data(clf_cfg.data, clf_cfg.split, clf_cfg.per_class, kind=clf_cfg.kind)
        wanted = list(classes) if classes is not None else list(range(num_classes))
        if max(wanted) >= data.num_classes:
            raise ValueError(f"the GPT samples classes up to {max(wanted)} but {data.where} has {data.num_classes} "
                             f"classes; pass the data set the GPT was trained on as classifier.data.")
        classifier = {"root": data.listing.root, "split": clf_cfg.split, "per_class": data.per_class,
                      "kind": data.kind}

    sample = fixed_sample(cfg)
    grid = {k: v["grid_search"] for k, v in space.items()}
    fixed = {"gpt": os.path.abspath(gpt), "tokenizer": os.path.abspath(tokenizer),
             "reference": storage.absolute(reference), "classes": None if classes is None else [int(c) for c in classes],
             "sample": sample, "precision": cfg.precision, "inception_weights": os.path.abspath(weights),
             "cache_dir": os.path.abspath(os.path.expanduser(cfg.fid.cache_dir or default_cache_dir())),
             "eval_batch_size": int(cfg.fid.batch_size), "classifier": classifier}
    _check_settings(path, {"grid": grid, **fixed})

    gpus = _init_ray(cfg.gpus_per_trial)
    _check_precision(cfg.precision, gpus)  # a cluster without GPUs
    resources = {"cpu": float(cfg.cpus_per_trial), "gpu": gpus}
    settings = dict(fixed, outputs=os.path.join(path, OUTPUTS), device="cuda" if gpus > 0 else "cpu",
                    verbose=int(cfg.verbose))
    uri = cfg.tracking_uri or default_tracking_uri(path)
    params = {**{f"sample.{k}": v for k, v in sample.items()}, **{k: v for k, v in fixed.items() if k != "sample"},
              **{f"grid.{k}": v for k, v in grid.items()}, "gpus_per_trial": gpus, "cpus_per_trial": cfg.cpus_per_trial}
    parent = common.parent_run(uri, cfg.experiment, path, KIND, common.flat_params(params))
    n_trials = int(np.prod([len(v) for v in grid.values()]))
    log(f"CFG sweep {name}: {n_trials} trial(s) of {per_class} images x "
        f"{num_classes if classes is None else len(classes)} classes on {settings['device']} "
        f"({resources['gpu']:g} GPU, {resources['cpu']:g} CPU each); folder {path}; MLflow {uri} run {parent}")
    try:
        warm = _warm_reference(fixed["reference"], int(out_size), settings, resources)
        log(f"reference statistics: {warm['images']} images, {'cached' if warm['from_cache'] else 'computed'}")
        if "classifier" in warm:
            c = warm["classifier"]
            log(f"class-accuracy classifier: {c['images']} real images, {'cached' if c['from_cache'] else 'fitted'}")
        trainable = tune.with_resources(tune.with_parameters(cfg_trial, settings=settings), resources)
        results, interrupted = common.run_tuner(
            trainable, space,
            tune.TuneConfig(metric="gfid", mode="min", max_concurrent_trials=cfg.max_concurrent_trials),
            path, callbacks=[common.mlflow_callback(uri, cfg.experiment, parent)], verbose=cfg.verbose)
    except KeyboardInterrupt:
        common.finish_parent(uri, parent, "KILLED")
        raise
    except BaseException:
        common.finish_parent(uri, parent, "FAILED")
        raise
    return dict(_report(results, path, uri, cfg.experiment, parent, list(space), n_trials, log),
                interrupted=interrupted)


def _report(results, path: str, uri: str, experiment: str, parent: str, swept: List[str], n_trials: int,
            log: Callable[[str], None]) -> Dict[str, Any]:
    """Tables, plots and the best config from the trials' MLflow runs; logged to the parent, which is closed
    FINISHED (every trial done), FAILED (a trial errored) or KILLED (interrupted: rerun to resume)."""
    from ideal_ray.tracking import Tracker
    from ideal_ray.tune import compare as cmp

    finished = [r for r in results if r.error is None and r.metrics and "gfid" in r.metrics]
    errors = [str(r.error).strip().splitlines()[-1][:300] for r in results if r.error is not None]
    unfinished = n_trials - len(finished) - len(errors)
    _, rows = cmp.load_runs(uri, parent_run_id=parent)
    rows = [r for r in rows if r.status == "FINISHED" and "gfid" in r.metrics]
    out = os.path.join(path, REPORT)
    os.makedirs(out, exist_ok=True)
    files: Dict[str, str] = {}
    table = ""
    best = None
    if rows:
        metrics = [m for m in METRICS if any(m in r.metrics for r in rows)]
        table_obj = cmp.build_comparison(rows, f"CFG sweep {os.path.basename(path)}", params=swept, metrics=metrics,
                                         sort_by="gfid")
        table = table_obj.markdown()
        files["table_md"] = cmp.write_text(os.path.join(out, "cfg_table.md"), table)
        files["table_csv"] = cmp.write_text(os.path.join(out, "cfg_table.csv"), table_obj.csv())
        acc = "class_accuracy" if "class_accuracy" in metrics else None
        chance = next((r.metrics["class_chance"] for r in rows if "class_chance" in r.metrics), None)
        files["fid_vs_cfg"] = cmp.plot_fid_vs_cfg(rows, os.path.join(out, "fid_vs_cfg.png"), second=acc,
                                                  chance=chance)
        has_is = any("is" in r.metrics for r in rows)
        second = "is_vs_fid.png" if has_is else "precision_vs_recall.png"
        files["is_vs_fid" if has_is else "precision_vs_recall"] = cmp.plot_is_vs_fid(rows, os.path.join(out, second))
        if not has_is:
            log("no IS (the Inception weights have no logits): plotted precision vs recall instead of IS vs FID")
        top = table_obj.rows[0]
        best = {"trial": top.name, "run_id": top.run_id, "config": {k: top.params.get(k) for k in swept},
                "metrics": {k: top.metrics[k] for k in metrics + list(EXTRA) if k in top.metrics}}
        files["best"] = cmp.write_text(os.path.join(out, "best.json"), json.dumps(best, indent=1))
    status = "KILLED" if unfinished else "FAILED" if errors else "FINISHED"
    with Tracker(uri, experiment, run_name=os.path.basename(path), run_id=parent) as tr:
        for f in files.values():
            tr.log_artifact(f, "sweep")
        if best is not None:
            tr.log_metrics({f"best_{k}": v for k, v in best["metrics"].items()}, step=0)
            tr.set_tags({"ideal.best_trial": best["trial"],
                         **{f"ideal.best.{k}": v for k, v in best["config"].items()}})
        tr.finish(status)
    if unfinished:
        log(f"sweep interrupted: {len(finished)} of {n_trials} trials finished; rerun the same command to resume.")
    for e in errors:
        log(f"trial failed: {e}")
    trials = [{"config": {k: r.params.get(k) for k in swept}, "metrics": dict(r.metrics)} for r in rows]
    return {"path": path, "tracking_uri": uri, "parent_run_id": parent, "best": best, "trials": trials,
            "table": table, "files": files, "finished": len(finished), "errored": len(errors),
            "unfinished": unfinished, "errors": errors}
