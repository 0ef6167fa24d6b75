"""Sweep CFG scales (and optionally CFG interval, temperature, top-k) of one trained GPT + tokenizer on Ray Tune.

    python jobs/sweep_cfg.py --preset tiny --gpt runs/ar-tiny/gpt_step600.pt \\
        --tokenizer runs/tiny/tokenizer_step600.pt --reference data/synthetic/val --name cfg-tiny \\
        --cfg-scales 1.0,1.75,2.5 sample.per_class=8 classifier.data=data/synthetic      # + class accuracy
    ray job submit --working-dir . -- python jobs/sweep_cfg.py --gpt /shared/gpt_B.pt --tokenizer /shared/ideal.pt \\
        --reference /refs/VIRTUAL_imagenet256_labeled.npz --name cfg-B --storage-path /shared/sweeps \\
        --cfg-scales 1.0:3.0:0.25 gpus_per_trial=0.5 fid.cache_dir=/shared/fid_refs

The settings are a ``CfgSweepConfig`` (``ideal_ray.config``): ``--preset paper`` (default: 50 images per class,
a GPU per trial, the linear-probe classifier) or ``tiny`` (the demo's: 2 scales, 4 images per class, CPU trials, the
convnet classifier), the flags below, then ``a.b=c`` overrides of any field, e.g. ``cfg_intervals=0,1,0.5,1``
(start,end pairs), ``temperatures=0.9,1.0``, ``top_ks=0,100``, ``sample.per_class=8``, ``sample.batch_size=64``,
``sample.seed=1``, ``sample.out_size=256``, ``sample.top_p=0.95``, ``classes=0,1``, ``precision=fp32``,
``gpus_per_trial=0``, ``cpus_per_trial=2``, ``max_concurrent_trials=2``, ``fid.inception_weights=FILE``,
``fid.cache_dir=DIR``, ``fid.batch_size=50``, ``classifier.data=DIR``, ``classifier.kind=cnn``,
``classifier.per_class=0``, ``tracking_uri=URI``, ``experiment=NAME``, ``verbose=0`` (no Tune table or trial logs).

Each trial samples sample.per_class images of every class on its GPU share and reports gFID / sFID / precision /
recall (+ IS when the Inception weights have logits; with classifier.data the class accuracy of the samples under a
classifier fitted on real images of that data set's train split); one MLflow child run per trial under the sweep's
parent run ($MLFLOW_TRACKING_URI or <storage-path>/<name>/mlflow.db). The table (sorted by gFID), FID-vs-CFG and
IS-vs-FID plots and the best config are written to <storage-path>/<name>/report/ and logged to the parent run.
Rerunning the same --name resumes an interrupted sweep without rerunning finished trials. Compare sweeps with
jobs/compare.py.
"""
import argparse
import contextlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ideal_ray.cli import (INTERRUPTED, add_stage_args, check_checkpoints, outcome,  # noqa: E402
                           stage_config_from_args)
from ideal_ray.console import job_console, say  # noqa: E402


def scales(text: str) -> str:
    """``--cfg-scales``: comma-separated values and ``START:STOP:STEP`` ranges (inclusive), e.g. ``1.0,1.5,2.0`` or
    ``1.0:3.0:0.25`` -> the override value ``1.0,1.25,...,3.0``."""
    out = []
    for v in (p.strip() for p in text.split(",")):
        if not v:
            continue
        if ":" in v:
            try:
                start, stop, step = (float(x) for x in v.split(":"))
            except ValueError:
                raise argparse.ArgumentTypeError(f"range '{v}' must be START:STOP:STEP like 1.0:3.0:0.25.")
            if step <= 0 or stop < start:
                raise argparse.ArgumentTypeError(f"range '{v}' needs STEP > 0 and STOP >= START.")
            n = int(round((stop - start) / step))
            out += [round(start + i * step, 6) for i in range(n + 1)]
        else:
            try:
                out.append(float(v))
            except ValueError:
                raise argparse.ArgumentTypeError(f"value '{v}' is not a number; pass scales like 1.0,1.75,2.5 or a "
                                                 f"range like 1.0:3.0:0.25.")
    return ",".join(f"{s:.10g}" for s in out)


SHORTHANDS = [
    ("--gpt", "gpt", "GPT: our export (gpt_step<N>.pt), a LlamaGen c2i file or the authors' release GPT checkpoint"),
    ("--tokenizer", "tokenizer", "tokenizer: our export (tokenizer_step<N>.pt) or the authors' release file"),
    ("--reference", "reference", "ADM reference npz or a folder of reference images"),
    ("--name", "name", "the sweep's folder name under --storage-path (rerun to resume)", {"metavar": "NAME"}),
    ("--storage-path", "storage_path", "the sweeps' folder (default runs/sweeps)"),
    ("--cfg-scales", "cfg_scales", "the CFG scales: comma-separated values and START:STOP:STEP ranges (inclusive), "
     "e.g. 1.0,1.75,2.5 or 1.0:3.0:0.25", {"type": scales, "metavar": "SCALES"}),
]


def main(argv=None) -> int:
    from ideal_ray.config import CfgSweepConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_stage_args(p, CfgSweepConfig, SHORTHANDS)
    cfg = stage_config_from_args(CfgSweepConfig, p.parse_args(argv), SHORTHANDS)
    check_checkpoints(gpt=cfg.gpt, tokenizer=cfg.tokenizer, classes=list(cfg.classes) or None)  # before torch, Ray

    with job_console(os.path.join(cfg.storage_path, cfg.name)):  # the console: results; the rest: the log
        return _sweep(cfg)


def _sweep(cfg) -> int:
    from ideal_ray.tune.cfg_sweep import sweep_cfg

    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    with outcome("rerun the same command to resume (finished trials are kept)"):
        with contextlib.redirect_stdout(sys.stderr):  # Tune's progress output: stdout keeps the table and summary
            out = sweep_cfg(cfg, log=log)
    say(out["table"] or "(no finished trial yet)")
    say(json.dumps({k: out[k] for k in ("path", "tracking_uri", "parent_run_id", "best", "files", "finished",
                                        "errored", "unfinished")}, indent=1))
    if out["errored"] or out["unfinished"]:
        say(f"sweep not finished: {out['finished']} trial(s) finished, {out['errored']} failed, {out['unfinished']} "
            f"not run; rerun the same command to resume (finished trials are kept).", err=True)
        return INTERRUPTED if out["interrupted"] else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
