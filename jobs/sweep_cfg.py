"""Sweep CFG scales (and optionally CFG interval, temperature, top-k) of one trained GPT + tokenizer on Ray Tune.

    python jobs/sweep_cfg.py --gpt runs/ar-tiny/gpt_step600.pt --tokenizer runs/tiny/tokenizer_step600.pt \\
        --reference data/synthetic/val --name cfg-tiny --storage-path runs/sweeps --cfg-scales 1.0 1.75 2.5 \\
        --per-class 8 --gpus-per-trial 0 --classifier-data data/synthetic --classifier-kind cnn  # + class accuracy
    ray job submit --working-dir . -- python jobs/sweep_cfg.py --gpt /shared/gpt_B.pt --tokenizer /shared/ideal.pt \\
        --reference /refs/VIRTUAL_imagenet256_labeled.npz --name cfg-B --storage-path /shared/sweeps \\
        --cfg-scales 1.0:3.0:0.25 --per-class 50 --gpus-per-trial 0.5 --cache-dir /shared/fid_refs

Each trial samples --per-class images of every class on its GPU share and reports gFID / sFID / precision / recall
(+ IS when the Inception weights have logits; with --classifier-data the class accuracy of the samples under a
classifier fitted on real images of that data set's train split); one MLflow child run per trial under the sweep's parent run
($MLFLOW_TRACKING_URI or <storage-path>/<name>/mlflow.db). The table (sorted by gFID), FID-vs-CFG and IS-vs-FID
plots and the best config are written to <storage-path>/<name>/report/ and logged to the parent run. Rerunning the
same --name resumes an interrupted sweep without rerunning finished trials. Compare sweeps with jobs/compare.py.
"""
import argparse
import contextlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ideal_ray.cli import (INTERRUPTED, add_checkpoint_args, add_classifier_args, check_checkpoints,  # noqa: E402
                           outcome, parse_classes, require_durable_paths, require_existing)
from ideal_ray.console import job_console, say  # noqa: E402


def _scales(values):
    """``1.0 1.5 2.0`` or ``START:STOP:STEP`` (inclusive) -> floats."""
    out = []
    for v in values:
        if ":" in v:
            try:
                start, stop, step = (float(x) for x in v.split(":"))
            except ValueError:
                raise argparse.ArgumentTypeError(f"--cfg-scales range '{v}' must be START:STOP:STEP like 1.0:3.0:0.25.")
            if step <= 0 or stop < start:
                raise argparse.ArgumentTypeError(f"--cfg-scales range '{v}' needs STEP > 0 and STOP >= START.")
            n = int(round((stop - start) / step))
            out += [round(start + i * step, 6) for i in range(n + 1)]
        else:
            try:
                out.append(float(v))
            except ValueError:
                raise argparse.ArgumentTypeError(f"--cfg-scales value '{v}' is not a number.")
    return out


def _interval(text: str):
    try:
        start, end = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--cfg-intervals '{text}' must be START,END like 0,1 or 0.5,1.")
    return [start, end]


def main(argv=None) -> int:
    from ideal_ray.tune.cfg_sweep import EXPERIMENT

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(p, gpt=True)
    p.add_argument("--reference", required=True, help="ADM reference npz or a folder of reference images")
    p.add_argument("--name", required=True, help="the sweep's folder name under --storage-path (rerun to resume)")
    p.add_argument("--storage-path", default="runs/sweeps")
    p.add_argument("--cfg-scales", nargs="+", required=True, help="values, or START:STOP:STEP (inclusive)")
    p.add_argument("--cfg-intervals", nargs="+", type=_interval, default=None, help="START,END pairs to sweep")
    p.add_argument("--temperatures", nargs="+", type=float, default=None)
    p.add_argument("--top-ks", nargs="+", type=int, default=None, help="0 = off")
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--classes", type=parse_classes, default=None, help="comma-separated class ids (default: all)")
    p.add_argument("--batch-size", type=int, default=64, help="sampling batch per trial")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-size", type=int, default=256)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--gpus-per-trial", type=float, default=None,
                   help="GPU share per trial, fractions share a GPU (default: 1 if the cluster has GPUs, else 0)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--max-concurrent-trials", type=int, default=None)
    p.add_argument("--inception-weights", default="", help="FID Inception weights file (torch-fidelity format)")
    p.add_argument("--cache-dir", default="", help="reference statistics cache shared by the trials "
                                                   "(default $IDEAL_RAY_FID_REFS or ~/.cache/ideal_ray/fid_refs)")
    p.add_argument("--eval-batch-size", type=int, default=50)
    add_classifier_args(p, "every trial's samples")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default $MLFLOW_TRACKING_URI or "
                                                        "<storage-path>/<name>/mlflow.db)")
    p.add_argument("--experiment", default=EXPERIMENT)
    p.add_argument("--quiet", action="store_true", help="no Tune progress table, no trial logs")
    args = p.parse_args(argv)
    require_durable_paths(**{"--storage-path": args.storage_path})  # in a `--working-dir` job: absolute only
    require_existing(**{"--reference": args.reference, "--classifier-data": args.classifier_data,
                        "--inception-weights": args.inception_weights})
    check_checkpoints(gpt=args.gpt, tokenizer=args.tokenizer, classes=args.classes)  # before torch and Ray
    try:
        scales = _scales(args.cfg_scales)
    except argparse.ArgumentTypeError as e:
        p.error(str(e))

    with job_console(os.path.join(args.storage_path, args.name)):  # the console: results; the rest: the log
        return _sweep(args, scales)


def _sweep(args, scales) -> int:
    from ideal_ray.tune.cfg_sweep import sweep_cfg

    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    with outcome("rerun the same command to resume (finished trials are kept)"):
        with contextlib.redirect_stdout(sys.stderr):  # Tune's progress output: stdout keeps the table and summary
            out = sweep_cfg(args.gpt, args.tokenizer, args.reference, args.name, args.storage_path, scales,
                            args.cfg_intervals, args.temperatures, args.top_ks, per_class=args.per_class,
                            classes=args.classes, batch_size=args.batch_size, seed=args.seed, out_size=args.out_size,
                            precision=args.precision, gpus_per_trial=args.gpus_per_trial,
                            cpus_per_trial=args.cpus_per_trial, max_concurrent_trials=args.max_concurrent_trials,
                            inception_weights=args.inception_weights, cache_dir=args.cache_dir,
                            eval_batch_size=args.eval_batch_size, classifier_data=args.classifier_data,
                            classifier_split=args.classifier_split,
                            classifier_per_class=args.classifier_per_class,
                            classifier_kind=args.classifier_kind, tracking_uri=args.tracking_uri,
                            experiment=args.experiment, verbose=0 if args.quiet else 1, log=log)
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
