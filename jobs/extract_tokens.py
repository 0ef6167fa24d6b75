"""Encode a dataset split into token shards for the AR stage: Ray Data actor pools (default) or one process.

    python jobs/extract_tokens.py --tokenizer runs/tiny/tokenizer_step600.pt --data-root data/synthetic \\
        --out data/tokens-tiny --views llamagen                       # local Ray cluster, CPU
    ray job submit --working-dir . -- python jobs/extract_tokens.py --tokenizer /ckpt/ideal.pt \\
        --data-root /datasets/imagenet --out /shared/tokens --views llamagen   # every GPU of the cluster, bf16
    python jobs/extract_tokens.py ... --in-process --device cuda --num-workers 16   # one process, one device

Inputs (``--format``, default auto): an ImageNet folder (``split/<wnid>/*``), the official flat val folder with
``--labels-file`` (LOC_val_solution.csv or ``name label`` lines), Parquet shards of encoded images, WebDataset tars.
Views: ``llamagen`` = ten-crop at 1.1x and at 1.05x (20 views per image, the paper), ``release`` = center crop +
its horizontal flip (2 views). Output: ``tokens-*.parquet`` + ``manifest.json`` (see ideal_ray/data/tokens.py) +
``skipped.tsv`` (undecodable files, also an MLflow artifact). A rerun with the same arguments resumes: finished
shards are kept, the rest redone. Prints a JSON summary (images/s, skipped files, the final row check).
"""
import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ideal_ray.cli import (add_checkpoint_args, check_checkpoints, outcome, require_durable_paths,  # noqa: E402
                           require_existing)
from ideal_ray.console import job_console, say  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(parser)
    parser.add_argument("--data-root", required=True, help="dataset root (holds <split>/ and class_index.json)")
    parser.add_argument("--out", required=True, help="output folder for the shards and manifest.json")
    parser.add_argument("--views", default="llamagen", choices=["llamagen", "release"])
    parser.add_argument("--image-size", type=int, default=None, help="crop size (default: the tokenizer's)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="views per encoder forward (default: 512 on GPU, 64 on CPU)")
    parser.add_argument("--device", default=None,
                        help="Ray: auto (default; GPUs if the cluster has them), cuda or cpu; --in-process: cpu, "
                             "cuda, cuda:1 ...")
    parser.add_argument("--split", default="train")
    parser.add_argument("--class-index", default="", help="class_index.json (default: <data-root>/class_index.json)")
    parser.add_argument("--format", default="auto", choices=["auto", "folder", "flat", "parquet", "webdataset"])
    parser.add_argument("--labels-file", default="", help="labels of a flat folder (LOC_val_solution.csv, or txt)")
    parser.add_argument("--shard-images", type=int, default=4096, help="images per Parquet shard")
    parser.add_argument("--row-group-images", type=int, default=4, help="images per Parquet row group")
    parser.add_argument("--precision", default=None, choices=["fp32", "bf16"], help="default: bf16 on GPU, else fp32")
    parser.add_argument("--max-shards", type=int, default=None, help="stop after writing this many shards")
    parser.add_argument("--max-skip-fraction", type=float, default=0.05,
                        help="stop when more than this fraction of a shard's images (and > 10) cannot be read")
    parser.add_argument("--no-verify", dest="verify", action="store_false", help="skip the final verification")
    ray_opts = parser.add_argument_group("Ray (default)")
    ray_opts.add_argument("--num-encoders", type=int, default=None, help="encoder actors (default: every GPU / 1)")
    ray_opts.add_argument("--decode-actors", type=int, default=None, help="max CPU decode actors (default: CPUs-1)")
    ray_opts.add_argument("--decode-batch", type=int, default=8, help="images per decode task")
    ray_opts.add_argument("--tracking-uri", default=None,
                          help="MLflow store (default: $MLFLOW_TRACKING_URI or <out>/mlflow.db; '' disables)")
    local = parser.add_argument_group("one process")
    local.add_argument("--in-process", action="store_true", help="no Ray: decode and encode in this process")
    local.add_argument("--num-workers", type=int, default=0, help="decode worker processes (--in-process)")
    args = parser.parse_args(argv)
    require_durable_paths(**{"--out": args.out})  # under `ray job submit --working-dir`: absolute only
    require_existing(**{"--data-root": args.data_root, "--class-index": args.class_index,
                        "--labels-file": args.labels_file})
    check_checkpoints(tokenizer=args.tokenizer)  # before torch and Ray
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    common = dict(views=args.views, image_size=args.image_size, split=args.split, class_index=args.class_index,
                  fmt=args.format, labels_file=args.labels_file, shard_images=args.shard_images,
                  row_group_images=args.row_group_images, verify=args.verify, max_shards=args.max_shards,
                  max_skip_fraction=args.max_skip_fraction)
    with job_console(args.out):  # the console: the image bar and the summary; the rest: <out>/console.log
        return _extract(args, common)


def _extract(args, common) -> int:
    from ideal_ray.data.tokens import TokenShardError

    with outcome(f"rerun the same command to resume: the finished shards in {args.out} are kept"):
        try:
            summary = _run(args, common)
        except TokenShardError as e:  # the verification's findings, then its sentence
            say(json.dumps(e.summary, indent=1), err=True)
            raise
    shown = dict(summary, skipped=summary["skipped"][:20])
    if len(summary["skipped"]) > 20:
        shown["skipped_more"] = len(summary["skipped"]) - 20
    say(json.dumps(shown, indent=1))
    return 0


def _run(args, common) -> dict:
    if args.in_process:
        from ideal_ray.pipelines.extract_local import extract_tokens_local

        return extract_tokens_local(
            args.tokenizer, args.data_root, args.out, batch_size=args.batch_size or 64,
            device=args.device or "cpu", num_workers=args.num_workers, precision=args.precision or "fp32", **common)
    from ideal_ray.pipelines.extract_ray import extract_tokens_ray

    return extract_tokens_ray(
        args.tokenizer, args.data_root, args.out, batch_size=args.batch_size, device=args.device or "auto",
        precision=args.precision, num_encoders=args.num_encoders, decode_actors=args.decode_actors,
        decode_batch=args.decode_batch, tracking_uri=args.tracking_uri, **common)


if __name__ == "__main__":
    sys.exit(main())
