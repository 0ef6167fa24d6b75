"""Every stage in order, resumable: tokenizer -> extract -> AR -> sample -> evaluate -> CFG sweep.

A pipeline run lives in ``<output_dir>/<name>/`` with ``pipeline.json``, rewritten atomically after every stage:
for each finished stage its outputs and seconds. A rerun of the same name skips every stage whose recorded outputs
are still there (and, for the extraction, whose manifest is complete), and runs the others -- each of which resumes
on its own (Ray Train checkpoints, finished token shards). A changed configuration under an existing name is refused
by the training stages themselves (``check_or_record_config``).

:func:`run_stages` is the generic runner (a list of :class:`Stage`); :func:`tokenizer_to_eval_stages` builds the
real chain from a tokenizer config and the chain's settings (:func:`pipeline_config`: the ``PipelineConfig`` preset
of the tokenizer preset's scale, with overrides);
:func:`run_pipeline` runs it in the run folder and :func:`pipeline_report` tells what it did. ``jobs/pipeline.py``
is the CLI; ``jobs/demo.py`` runs the same chain on the synthetic set.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ideal_ray.io import atomic_write_json

STATE_FILE = "pipeline.json"


@dataclass
class Stage:
    """One step: ``run(state) -> outputs`` (a JSON-able dict, paths included); ``done(outputs) -> bool`` says whether
    recorded outputs are still valid, so the stage can be skipped."""

    name: str
    run: Callable[[Dict[str, Any]], Dict[str, Any]]
    done: Callable[[Dict[str, Any]], bool]


def _read_state(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        return {"stages": {}}
    with open(path) as f:
        state = json.load(f)
    if not isinstance(state, dict) or not isinstance(state.get("stages"), dict):
        raise ValueError(f"{path} is not a pipeline state file (no 'stages'); move it away or choose another name.")
    return state


def _write_state(path: str, state: Dict[str, Any]) -> None:
    atomic_write_json(path, state, default=str)


def run_stages(run_dir: str, stages: List[Stage], log: Optional[Callable[[str], None]] = None,
               only: Optional[List[str]] = None, meta: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Run ``stages`` in order under ``run_dir``, skipping those recorded as done whose outputs are still valid.

    ``only``: run just these stage names (the stages before them must be done already; later ones are left).
    ``meta``: what to record about this invocation (e.g. the Ray job it is); appended to the state's ``runs``.
    Returns the final state; its
    ``stages[name]`` holds each stage's outputs, ``seconds`` and ``skipped`` (True when this run skipped it).
    ``log`` gets each stage's start and result line (default: the console, :func:`ideal_ray.console.say`).
    """
    from ideal_ray.console import say

    log = log or say
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"stage names {names} repeat; each stage needs its own name.")
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; the stages are {names}.")
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, STATE_FILE)
    state = _read_state(path)
    state.setdefault("runs", []).append({"started": time.strftime("%Y-%m-%dT%H:%M:%S"), **(meta or {})})
    last = max(names.index(n) for n in only) if only else len(stages) - 1
    for stage in stages[:last + 1]:  # with ``only``, nothing after the last requested stage runs
        rec = state["stages"].get(stage.name)
        if rec is not None and stage.done(rec["outputs"]):
            rec["skipped"] = True
            log(f"[pipeline] {stage.name}: done earlier, skipped ({rec['seconds']:.0f} s then)")
            continue
        if only is not None and stage.name not in only:
            raise RuntimeError(f"stage '{stage.name}' has not run yet but was not asked for; run it first (or drop "
                               f"--only).")
        log(f"[pipeline] {stage.name}: running")
        t0 = time.perf_counter()
        outputs = stage.run(state)
        state["stages"][stage.name] = {"outputs": outputs, "seconds": round(time.perf_counter() - t0, 2),
                                       "skipped": False, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        _write_state(path, state)
        log(f"[pipeline] {stage.name}: finished in {state['stages'][stage.name]['seconds']:.0f} s: "
            f"{_headline(stage.name, outputs)[0]}")
    _write_state(path, state)  # the file says what this run did, skipped stages included
    return state


# ------------------------------------------------------------------------------------- the real chain
def _files_exist(*keys: str) -> Callable[[Dict[str, Any]], bool]:
    return lambda out: all(isinstance(out.get(k), str) and os.path.exists(out[k]) for k in keys)


def _extraction_complete(out: Dict[str, Any]) -> bool:
    from ideal_ray.data import tokens as tk

    try:
        return bool(tk.read_manifest(out["shards"]).get("complete"))
    except (FileNotFoundError, ValueError, KeyError):
        return False


def pipeline_config(tok_cfg, overrides: Sequence[str] = ()):
    """The chain's settings for ``tok_cfg``: the :class:`~ideal_ray.config.PipelineConfig` preset of its scale
    (``tiny``: the demo's CPU run on the synthetic set; anything else ``paper``: a GPU cluster at the paper's
    settings) with ``a.b=c`` overrides (``extract.views=llamagen``, ``sampling.sample.per_class=50``, ...)."""
    from ideal_ray.config import PipelineConfig, load_stage_config

    scale = "tiny" if tok_cfg.preset.split("+")[0] == "tiny" else "paper"
    return load_stage_config(PipelineConfig, scale, overrides, complete=False)


def _filled(cfg, tracking_uri: Optional[str], **values: Any):
    """A copy of a stage config logging to the chain's ``tracking_uri``, with each of its fields named in
    ``values`` (``data__root`` for ``data.root``) that is empty set to the value given (a path one stage hands the
    next, or the chain's default)."""
    out = copy.deepcopy(cfg)
    out.tracking_uri = tracking_uri
    for key, value in values.items():
        *parents, name = key.split("__")
        node = out
        for part in parents:
            node = getattr(node, part)
        if getattr(node, name) in ("", None):
            setattr(node, name, value)
    return out


def tokenizer_to_eval_stages(tok_cfg, run_dir: str, pcfg=None, *, tracking_uri: Optional[str] = None,
                             log: Callable[[str], None] = print) -> List[Stage]:
    """The chain for one tokenizer config: train it, extract its codes, train the ``pcfg.ar_preset`` GPT on them,
    sample, evaluate reconstruction and generation, then sweep the CFG scale on Ray Tune (no sweep stage when
    ``pcfg.sweep.cfg_scales`` is empty). ``pcfg``: a :class:`~ideal_ray.config.PipelineConfig` (default
    :func:`pipeline_config`); the chain fills in the paths one stage hands the next and, where ``pcfg`` leaves them
    empty, the run folder's outputs, the tokenizer's ``data.root`` as every stage's data set (and the classifier's:
    the data set the GPT's classes come from), ``<data.root>/val`` as the FID reference and ``<run_dir>/fid_refs``
    as the reference statistics' cache (computed once, read by the evaluation and every sweep trial; on a cluster
    a shared folder). Every stage writes under ``run_dir`` and logs to ``tracking_uri``. The AR config is built
    (and checked) here, before any stage runs."""
    from ideal_ray.config import load_ar_config

    pcfg = pcfg or pipeline_config(tok_cfg)
    root = tok_cfg.data.root
    gen_cfg = _filled(pcfg.gen, tracking_uri, out=os.path.join(run_dir, "eval-gen"),
                      reference=os.path.join(root, "val"), fid__cache_dir=os.path.join(run_dir, "fid_refs"),
                      classifier__data=root)
    shards = os.path.join(run_dir, "tokens")
    extract_cfg = _filled(pcfg.extract, tracking_uri, out=shards, data__root=root)
    q = tok_cfg.model
    # the tiny GPT learns the synthetic set's classes (the data set its classes come from)
    classes = [f"model.num_classes={tok_cfg.data.synthetic_classes}"] if pcfg.ar_preset == "ar-tiny" else []
    ar_cfg = load_ar_config(pcfg.ar_preset, [f"data.shards={shards}", f"model.vocab_size={q.quantizer.codebook_size}",
                                             f"model.grid={q.vfm.grid}", f"name={tok_cfg.name}-ar",
                                             f"output_dir={tok_cfg.output_dir}",
                                             f"dist.storage_path={tok_cfg.dist.storage_path}", *classes,
                                             *pcfg.ar_overrides])
    from ideal_ray.train.run_storage import check_storage

    for c in (tok_cfg, ar_cfg):  # an object-store dist.storage_path is tried now, before Ray starts
        check_storage(c)
    _check_reference(tok_cfg, gen_cfg.reference, pcfg.gen.reference)

    def exports(state):
        return state["stages"]["tokenizer"]["outputs"]["export"], state["stages"].get("ar", {}).get(
            "outputs", {}).get("export")

    def on_ray(run):
        """Every stage runs on one Ray cluster: the first stage that runs (a resumed pipeline may start anywhere)
        joins ``dist.ray_address`` / ``$RAY_ADDRESS`` or starts a local cluster sized for both training stages,
        and the later ones find it."""
        def run_on_ray(state):
            from ideal_ray.train.ray_trainer import init_ray

            init_ray(tok_cfg, ar_cfg)
            return run(state)

        return run_on_ray

    def published(r):  # the export's copy next to the checkpoints, when they are on an object store
        return {"export_uri": r["export_uri"]} if r.get("export_uri") else {}

    def tokenizer(state):
        from ideal_ray.train.ray_trainer import train_tokenizer

        r = train_tokenizer(tok_cfg, log=log, tracking_uri=tracking_uri)
        return {"export": r["export"], "checkpoint": r["checkpoint"], "steps": r["steps"], **published(r),
                **{k: r["metrics"][k] for k in ("g_loss", "rec_mse", "usage") if k in r["metrics"]}}

    def extract(state):
        from ideal_ray.pipelines.extract_ray import extract_tokens_ray

        s = extract_tokens_ray(dataclasses.replace(extract_cfg, tokenizer=exports(state)[0]))
        return {"shards": shards, "images": s["images"], "rows": s["rows"], "skipped": len(s["skipped"]),
                "images_per_s": s["images_per_s"]}

    def ar(state):
        from ideal_ray.train.ar_stage import train_ar

        r = train_ar(ar_cfg, log=log, tracking_uri=tracking_uri)
        return {"export": r["export"], "checkpoint": r["checkpoint"], "steps": r["steps"], **published(r),
                "loss": r["metrics"].get("loss")}

    def sample(state):
        from ideal_ray.pipelines.sample_ray import sample_images_ray

        tok, gpt = exports(state)
        cfg = _filled(pcfg.sampling, tracking_uri, gpt=gpt, tokenizer=tok, out=os.path.join(run_dir, "samples"))
        s = sample_images_ray(cfg, log=log)
        return {"samples": s["samples"], "grid": s["grid"], "num_images": s["num_images"],
                "images_per_s": s["images_per_s"]}

    def evaluate(state):
        from ideal_ray.pipelines.evaluate import evaluate_gen, evaluate_recon

        recon_cfg = _filled(pcfg.recon, tracking_uri, tokenizer=exports(state)[0], data__root=root,
                            out=os.path.join(run_dir, "eval-recon"))
        rec = _finished_recon(recon_cfg.out, recon_cfg.tokenizer) or evaluate_recon(recon_cfg, log_fn=log)
        gen = evaluate_gen(dataclasses.replace(gen_cfg, samples=state["stages"]["sample"]["outputs"]["samples"]),
                           log_fn=log)
        return {"recon": os.path.join(rec["out_dir"], "result.json"),
                "gen": os.path.join(gen["out_dir"], "result.json"),
                "rfid": rec["rfid"], "psnr": rec["psnr"], "usage": rec["usage"], "gfid": gen["gfid"],
                **{k: gen[k] for k in ("class_accuracy", "class_chance", "class_accuracy_real") if k in gen}}

    def sweep(state):
        from ideal_ray.tune.cfg_sweep import sweep_cfg

        tok, gpt = exports(state)
        cfg = _filled(pcfg.sweep, tracking_uri, gpt=gpt, tokenizer=tok, reference=gen_cfg.reference,
                      fid__cache_dir=gen_cfg.fid.cache_dir, classifier__data=gen_cfg.classifier.data)
        s = sweep_cfg(dataclasses.replace(cfg, storage_path=os.path.join(run_dir, "sweeps"), verbose=0), log=log)
        if s["errored"] or s["unfinished"] or s["best"] is None:
            raise RuntimeError(f"the CFG sweep did not finish ({s['errored']} trial(s) failed, {s['unfinished']} "
                               f"unfinished: {s['errors'][:1]}); rerun to resume it.")
        return {"sweep": s["path"], "best": os.path.join(s["path"], "report", "best.json"),
                "parent_run_id": s["parent_run_id"], "best_cfg_scale": float(s["best"]["config"]["cfg_scale"]),
                "best_gfid": s["best"]["metrics"].get("gfid"),
                "gfid_by_cfg_scale": {t["config"]["cfg_scale"]: t["metrics"].get("gfid") for t in s["trials"]},
                "class_accuracy_by_cfg_scale": {t["config"]["cfg_scale"]: t["metrics"].get("class_accuracy")
                                                for t in s["trials"]},
                "class_chance": next((t["metrics"]["class_chance"] for t in s["trials"]
                                      if "class_chance" in t["metrics"]), None)}

    stages = [
        Stage("tokenizer", on_ray(tokenizer), _files_exist("export")),
        Stage("extract", on_ray(extract), _extraction_complete),
        Stage("ar", on_ray(ar), _files_exist("export")),
        Stage("sample", on_ray(sample), _files_exist("samples", "grid")),
        Stage("evaluate", on_ray(evaluate), _files_exist("recon", "gen")),
    ]
    if pcfg.sweep.cfg_scales:
        stages.append(Stage("sweep", on_ray(sweep), _files_exist("best")))
    return stages


def _finished_recon(out_dir: str, tokenizer: str) -> Optional[Dict[str, Any]]:
    """The reconstruction evaluation of ``tokenizer`` that an earlier attempt of the evaluate stage finished in
    ``out_dir`` (then its generation evaluation failed): the rerun goes on after it, as it goes on after a finished
    stage. None when there is none, or when it evaluated another file (``evaluate_recon`` then refuses to write over
    it)."""
    path = os.path.join(out_dir, "result.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        result = json.load(f)
    if result.get("protocol", {}).get("tokenizer") != os.path.abspath(tokenizer):
        return None
    return {**result, "out_dir": os.path.abspath(out_dir)}


def _check_reference(tok_cfg, reference: str, given: str) -> None:
    """The generation evaluation's reference (``given``, else the default ``<data.root>/val``), found before the
    first stage rather than after the training ones: a local path or an object-store URI, an ADM npz or a folder
    holding images (a Parquet or WebDataset split has none). ConfigError in one sentence otherwise. The default
    reference of a synthetic set the tokenizer stage is still to make is made with it."""
    from ideal_ray.config import ConfigError, check_data_root
    from ideal_ray.eval.reference import ImageFolderReference, reference_source

    if not given and not check_data_root(tok_cfg):  # (a missing data.root: its own sentence)
        return
    try:
        source = reference_source(reference, 256)  # the size does not matter here
    except FileNotFoundError:
        problem = "nothing is there"
    except ValueError:
        problem = "the file is not an ADM reference npz (an npz archive holding arr_0)"
    else:
        try:
            if isinstance(source, ImageFolderReference):
                source.files()
            return
        except ValueError:
            problem = "the folder holds no image files"
    how = "set gen.reference to ADM's VIRTUAL_imagenet256_labeled.npz or a folder of reference images."
    if given:
        raise ConfigError(f"gen.reference={reference}: {problem}; {how}")
    raise ConfigError(f"data.root={tok_cfg.data.root} has no val folder of images to be the generation evaluation's FID "
                      f"reference (gen.reference defaults to <data.root>/val); {how}")


def run_pipeline(tok_cfg, pcfg=None, *, only: Optional[List[str]] = None, meta: Optional[Dict[str, Any]] = None,
                 log: Callable[[str], None] = print) -> Tuple[Dict[str, Any], str]:
    """The chain for ``tok_cfg`` in its run folder ``<output_dir>/<name>/``, every stage logging to one MLflow store
    (``$MLFLOW_TRACKING_URI``, else ``mlflow.db`` in the run folder). ``pcfg``: the chain's settings (default
    :func:`pipeline_config`); ``only`` and ``meta`` as in :func:`run_stages`. ``log``: the stages' own lines (in a
    job console, the log file); each stage's start and result line goes to the console. Returns the final state
    and the MLflow tracking URI."""
    from ideal_ray.tracking import default_tracking_uri

    run_dir = os.path.join(os.path.abspath(tok_cfg.output_dir), tok_cfg.name)
    tracking_uri = default_tracking_uri(run_dir)
    stages = tokenizer_to_eval_stages(tok_cfg, run_dir, pcfg, tracking_uri=tracking_uri, log=log)
    return run_stages(run_dir, stages, only=only, meta=meta), tracking_uri


# ------------------------------------------------------------------------------------------------- report
def _short(path: Optional[str]) -> str:
    """``path`` relative to the working directory when it lies inside it (what a user types), else as it is."""
    if not path:
        return "-"
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _num(value: Any, fmt: str = ".2f") -> str:
    return "n/a" if value is None else format(value, fmt)


def _headline(name: str, out: Dict[str, Any]) -> Tuple[str, str]:
    """(headline numbers, where the artifacts are) of one stage's recorded outputs (keys missing in a state file
    written before they were recorded read n/a)."""
    g = out.get
    if name == "tokenizer":
        return (f"{g('steps')} steps; last log: rec_mse {_num(g('rec_mse'), '.4f')}, usage {_num(g('usage'), '.1%')}",
                _short(g("export")))
    if name == "extract":
        return (f"{g('rows')} rows ({g('images')} images, {g('skipped')} skipped), "
                f"{_num(g('images_per_s'), '.1f')} images/s", _short(g("shards")))
    if name == "ar":
        return f"{g('steps')} steps; final loss {_num(g('loss'), '.3f')}", _short(g("export"))
    if name == "sample":
        return f"{g('num_images')} images, {_num(g('images_per_s'), '.1f')} images/s", _short(g("grid"))
    if name == "evaluate":
        acc = (f", class accuracy {_num(g('class_accuracy'), '.0%')} (chance {_num(g('class_chance'), '.0%')})"
               if g("class_accuracy") is not None else "")
        return (f"rFID {_num(g('rfid'))}, PSNR {_num(g('psnr'))} dB, usage {_num(g('usage'), '.1%')}, "
                f"gFID {_num(g('gfid'))}{acc}",
                f"{_short(os.path.dirname(g('recon') or ''))}, {_short(os.path.dirname(g('gen') or ''))}")
    if name == "sweep":
        by_scale = sorted((g("gfid_by_cfg_scale") or {}).items(), key=lambda kv: float(kv[0]))
        acc = g("class_accuracy_by_cfg_scale") or {}
        if any(v is not None for v in acc.values()):  # gFID / class accuracy per CFG scale
            per = ", ".join(f"{k}: {_num(v, '.1f')} / {_num(acc.get(k), '.0%')}" for k, v in by_scale) or "n/a"
            return (f"CFG scale: gFID / class accuracy (chance {_num(g('class_chance'), '.0%')}): {per}; "
                    f"best gFID at {g('best_cfg_scale')}", _short(os.path.dirname(g("best") or "")))
        per = ", ".join(f"{_num(v)} @ {k}" for k, v in by_scale) or "n/a"
        return f"gFID per CFG scale: {per}; best {g('best_cfg_scale')}", _short(os.path.dirname(g("best") or ""))
    return ", ".join(f"{k} {v}" for k, v in out.items()), "-"


def pipeline_report(state: Dict[str, Any], tracking_uri: str) -> str:
    """The run in one table: per stage its wall time (a skipped stage: 'skipped' and the seconds it took when it
    ran), its headline numbers and where its artifacts are; then how to browse the MLflow store."""
    rows, total = [], 0.0
    for name, rec in state["stages"].items():
        headline, where = _headline(name, rec["outputs"])
        if rec.get("skipped"):
            seconds = f"skipped ({rec['seconds']:.0f} s then)"
        else:
            seconds, total = f"{rec['seconds']:.0f}", total + rec["seconds"]
        rows.append((name, seconds, headline, where))
    rows.append(("total", f"{total:.0f}", "wall time of the stages run now", ""))
    header = ("stage", "seconds", "result", "artifacts")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in [header] + rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    if "://" in tracking_uri and not tracking_uri.startswith(("sqlite:", "file:")):
        lines.append(f"MLflow: {tracking_uri} (every stage's run, metrics and artifacts)")
    else:
        lines.append(f"browse every stage's MLflow run: mlflow ui --backend-store-uri {tracking_uri}")
    return "\n".join(lines)
