"""Encode a dataset split into token shards for the AR stage: Ray Data actor pools (default) or one process.

    python jobs/extract_tokens.py --preset tiny --tokenizer runs/tiny/tokenizer_step600.pt \\
        --data-root data/synthetic --out data/tokens-tiny                      # local Ray cluster, CPU
    ray job submit --working-dir . -- python jobs/extract_tokens.py --tokenizer /ckpt/ideal.pt \\
        --data-root /datasets/imagenet --out /shared/tokens               # every GPU of the cluster, bf16
    python jobs/extract_tokens.py ... --in-process run.device=cuda num_workers=16   # one process, one device

The settings are an ``ExtractConfig`` (``ideal_ray.config``): ``--preset paper`` (default: every GPU, the paper's
views) or ``tiny`` (the demo's: CPU, 2 views), the flags below, then ``a.b=c`` overrides of any field, e.g.
``views=release``, ``data.split=val``, ``data.format=parquet``, ``batch_size=256``, ``shard_images=1024``,
``run.num_actors=4``, ``max_shards=2``, ``verify=false``, ``tracking_uri=`` (no MLflow).
Inputs (``data.format``, default auto): an ImageNet folder (``split/<wnid>/*``), the official flat val folder with
``data.labels_file`` (LOC_val_solution.csv or ``name label`` lines), Parquet shards of encoded images, WebDataset
tars. Views: ``llamagen`` = ten-crop at 1.1x and at 1.05x (20 views per image, the paper), ``release`` = center crop
+ its horizontal flip (2 views). Output: ``tokens-*.parquet`` + ``manifest.json`` (see ideal_ray/data/tokens.py) +
``skipped.tsv`` (undecodable files, also an MLflow artifact). A rerun with the same settings resumes: finished
shards are kept, the rest redone. ``--out`` may be an object-store URI (``s3://bucket/tokens/x``, endpoint and
credentials from the AWS_* environment): each shard is uploaded whole, and this machine keeps the log (and the
default MLflow store) in a staging folder it names. Prints a JSON summary (images/s, skipped files, the final row check).
"""
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ideal_ray.cli import add_stage_args, check_checkpoints, outcome, stage_config_from_args  # noqa: E402
from ideal_ray.console import job_console, say  # noqa: E402
from ideal_ray.storage import is_uri, staging_dir  # noqa: E402

SHORTHANDS = [
    ("--tokenizer", "tokenizer", "tokenizer: our export (tokenizer_step<N>.pt) or the authors' release file"),
    ("--data-root", "data.root", "the data set (holds <split>/ and class_index.json, or shards)"),
    ("--out", "out", "output folder of the shards and manifest.json"),
    ("--in-process", "run.in_process", "no Ray: decode and encode in this process", {"action": "store_true"}),
]


def main(argv=None) -> int:
    import argparse

    from ideal_ray.config import ExtractConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_stage_args(parser, ExtractConfig, SHORTHANDS)
    cfg = stage_config_from_args(ExtractConfig, parser.parse_args(argv), SHORTHANDS)
    check_checkpoints(tokenizer=cfg.tokenizer)  # before torch and Ray
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # the console: the image bar and the summary; the rest: <out>/console.log (a URI out: its local staging folder's)
    with job_console(staging_dir(cfg.out) if is_uri(cfg.out) else cfg.out):
        return _extract(cfg)


def _extract(cfg) -> int:
    from ideal_ray.data.tokens import TokenShardError

    with outcome(f"rerun the same command to resume: the finished shards in {cfg.out} are kept"):
        try:
            if cfg.run.in_process:
                from ideal_ray.pipelines.extract_local import extract_tokens_local as extract
            else:
                from ideal_ray.pipelines.extract_ray import extract_tokens_ray as extract
            summary = extract(cfg)
        except TokenShardError as e:  # the verification's findings, then its sentence
            say(json.dumps(e.summary, indent=1), err=True)
            raise
    shown = dict(summary, skipped=summary["skipped"][:20])
    if len(summary["skipped"]) > 20:
        shown["skipped_more"] = len(summary["skipped"]) - 20
    say(json.dumps(shown, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
