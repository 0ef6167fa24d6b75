"""Train the Ideal tokenizer on Ray Train + DeepSpeed, tracked in MLflow.

Laptop (starts a local Ray cluster, CPU workers):
    python jobs/train_tokenizer.py --preset tiny --num-workers 2
In this process, no Ray (one rank of the same stage and loop: checkpoints, resume, MLflow, export):
    python jobs/train_tokenizer.py --in-process --preset tiny                      # DeepSpeed engine
    python jobs/train_tokenizer.py --in-process --preset tiny dist.engine=torch    # plain torch AdamW: quickest on CPU
Cluster (from a machine that can reach the head node's dashboard):
    RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/train_tokenizer.py --preset paper --num-workers 8 --gpus \\
        data.root=/shared/imagenet output_dir=/shared/runs dist.storage_path=s3://bucket/ideal-runs
    (inside a --working-dir job every output path must be absolute: relative ones are refused)

The frozen VFM runs inside each train worker by default; ``dist.vfm_placement=data`` runs it in a Ray Data actor
pool instead (``dist.vfm_actors`` per worker, one GPU each with ``--gpus``), so the trainers' GPUs skip its forward
at the cost of shipping its features through the object store (paper: 2.4 MB per image vs 0.44 MB of pixels).

A rerun with the same name (``name=...``) resumes from the latest checkpoint, the same way it started (Ray or
``--in-process``). Results: checkpoints under ``dist.storage_path/<name>``, the MLflow run
(``MLFLOW_TRACKING_URI``, default ``<output_dir>/<name>/mlflow.db``), and the single-file inference export
``<output_dir>/<name>/tokenizer_step<N>.pt`` (with an object-store ``dist.storage_path`` also copied next to the
checkpoints). An ``s3://bucket/path`` storage path takes its endpoint
(``AWS_ENDPOINT_URL_S3`` for an S3-compatible store) and credentials from the environment and is tried (one test
object written and deleted) before Ray starts: a wrong bucket, no credentials or an unreachable endpoint exit 2.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ideal_ray.cli import add_config_args, config_from_args, outcome, refuse  # noqa: E402
from ideal_ray.console import job_console, say  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, default_preset="tiny", workers=True)
    parser.add_argument("--in-process", action="store_true",
                        help="train in this process as one rank, no Ray (--gpus: on this machine's GPU)")
    args = parser.parse_args(argv)
    if args.in_process and args.num_workers not in (None, 1):
        refuse("config error: --in-process trains one rank in this process; drop --num-workers (or run on Ray).")
    cfg = config_from_args(args, in_process=args.in_process, needs_data=True)
    from ideal_ray.train.ray_trainer import train_tokenizer

    resume = f"rerun the same command to resume from the latest checkpoint of run {cfg.name}"
    with job_console(os.path.join(cfg.output_dir, cfg.name)), outcome(resume):  # console: the step bar; log: the rest
        result = train_tokenizer(cfg, in_process=args.in_process)
        copy = f" (a copy in {result['export_uri']})" if result.get("export_uri") else ""
        say(f"[ideal-ray] done: {result['steps']} steps; inference export {result['export']}{copy}, checkpoint "
            f"{result['checkpoint']}, MLflow {result['tracking_uri']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
