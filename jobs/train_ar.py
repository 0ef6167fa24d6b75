"""Train a class-conditional GPT (AR-B/L/XXL/3B) on token shards, on Ray Train + DeepSpeed, tracked in MLflow.

Laptop (tiny GPT on the tiny tokenizer's shards, 2 CPU workers):
    python jobs/extract_tokens.py --preset tiny --tokenizer runs/ideal-tokenizer-tiny/tokenizer_step600.pt \\
        --data-root data/synthetic --out data/tokens-tiny
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

from ideal_ray.cli import add_config_args, config_from_args, outcome  # noqa: E402
from ideal_ray.console import job_console, say  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, default_preset="ar-tiny", ar=True, workers=True)
    cfg = config_from_args(parser.parse_args(argv), needs_data=True, ar=True)  # the shards fit, before torch or Ray
    from ideal_ray.train.ar_stage import train_ar

    resume = f"rerun the same command to resume from the latest checkpoint of run {cfg.name}"
    with job_console(os.path.join(cfg.output_dir, cfg.name)), outcome(resume):  # console: the step bar; log: the rest
        result = train_ar(cfg)
        copy = f" (a copy in {result['export_uri']})" if result.get("export_uri") else ""
        say(f"[ideal-ray] done: {result['steps']} steps; inference export {result['export']}{copy}, checkpoint "
            f"{result['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
