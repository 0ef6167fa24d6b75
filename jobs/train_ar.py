"""Train a class-conditional GPT (AR-B/L/XXL/3B) on token shards, on Ray Train + DeepSpeed, tracked in MLflow.

Laptop (tiny GPT on the tiny tokenizer's shards, 2 CPU workers):
    python jobs/extract_tokens.py --tokenizer runs/ideal-tokenizer-tiny/tokenizer_step600.pt \\
        --data-root data/synthetic --out data/tokens-tiny --views release
    python jobs/train_ar.py --preset ar-tiny model.num_classes=10
Cluster:
    RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/train_ar.py --preset ar-B --num-workers 8 --gpus data.shards=/shared/tokens output_dir=/shared/runs

A rerun with the same name resumes from the latest checkpoint. Results: Ray checkpoints under
``dist.storage_path/<name>``, the MLflow run (experiment ``ideal-ar``), and ``<output_dir>/<name>/gpt_step<N>.pt``
(EMA weights + config).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ideal_ray.cli import outcome, refuse, require_durable_paths, require_usable_output  # noqa: E402
from ideal_ray.console import job_console, say  # noqa: E402
from ideal_ray.config import AR_PRESETS, ConfigError, load_ar_config, validate_ar  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="ar-tiny", choices=sorted(AR_PRESETS))
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    parser.add_argument("--num-workers", type=int, default=None, help="Ray Train workers (dist.num_workers)")
    parser.add_argument("--gpus", action="store_true", default=None, help="one GPU per worker (dist.use_gpu=true)")
    parser.add_argument("--cpu", dest="gpus", action="store_false", help="CPU workers (dist.use_gpu=false)")
    args = parser.parse_args(argv)
    try:
        cfg = load_ar_config(args.preset, args.overrides)
        if args.num_workers is not None:
            cfg.dist.num_workers = args.num_workers
        if args.gpus is not None:
            cfg.dist.use_gpu = args.gpus
        validate_ar(cfg)
    except ConfigError as e:
        refuse(f"config error: {e}")
    require_durable_paths(output_dir=cfg.output_dir, **{"dist.storage_path": cfg.dist.storage_path,
                                                         "data.shards": cfg.data.shards})
    require_usable_output(cfg.output_dir, cfg.name, **{"dist.storage_path": cfg.dist.storage_path})
    from ideal_ray.data.tokens import check_shards

    try:
        check_shards(cfg)  # the shards are there and fit the model, before torch or Ray
    except ConfigError as e:
        refuse(f"config error: {e}")
    from ideal_ray.train.ar_stage import train_ar

    resume = f"rerun the same command to resume from the latest checkpoint of run {cfg.name}"
    with job_console(os.path.join(cfg.output_dir, cfg.name)), outcome(resume):  # console: the step bar; log: the rest
        result = train_ar(cfg)
        say(f"[ideal-ray] done: {result['steps']} steps; inference export {result['export']}, checkpoint "
            f"{result['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
