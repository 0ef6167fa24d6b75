"""Sample class-conditional images from a trained GPT: a Ray actor pool over every GPU (default) or one process.

    python jobs/sample.py --gpt runs/ar-tiny/gpt_step600.pt --tokenizer runs/tiny/tokenizer_step600.pt \\
        --out runs/samples-tiny --per-class 8 --cfg-scale 1.75 --mlflow
    ray job submit --working-dir . -- python jobs/sample.py --gpt /shared/runs/ar-B/gpt.pt --tokenizer /shared/ideal.pt \\
        --out /shared/samples-B-cfg1.75 --per-class 50 --batch-size 256     # 50k images for FID, every GPU
    python jobs/sample.py ... --in-process --device cuda                   # one process, one device

Writes ``<out>/samples.npz`` (ADM format: ``arr_0`` uint8 (N, 256, 256, 3), ``labels``) and ``<out>/grid.png``
(rows = classes, the first 8 samples of each); refuses an --out that already holds them. Sample i of class c
always uses the same seed, so a (class, seed) pair gives the same image in any run. Prints a JSON summary.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ideal_ray.cli import (add_checkpoint_args, check_checkpoints, outcome, parse_classes, refuse,  # noqa: E402
                           require_durable_paths)
from ideal_ray.console import job_console, say  # noqa: E402


def main(argv=None) -> int:
    from ideal_ray.config import ConfigError, SampleConfig, validate_sample

    d = SampleConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(parser, gpt=True)
    parser.add_argument("--out", required=True, help="output folder for samples.npz and grid.png (must not hold them)")
    parser.add_argument("--cfg-scale", type=float, default=d.cfg_scale, help="classifier-free guidance; 1 = off")
    parser.add_argument("--cfg-interval", type=float, nargs=2, default=list(d.cfg_interval), metavar=("START", "END"),
                        help="guide only tokens whose fraction of the sequence is in [START, END)")
    parser.add_argument("--per-class", type=int, default=d.per_class)
    parser.add_argument("--classes", type=parse_classes, default=None, help="comma-separated class ids (default: all)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--temperature", type=float, default=d.temperature)
    parser.add_argument("--top-k", type=int, default=d.top_k, help="0 = off")
    parser.add_argument("--top-p", type=float, default=d.top_p, help="1.0 = off")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--out-size", type=int, default=d.out_size, help="saved image size (bicubic resize)")
    parser.add_argument("--device", default=None,
                        help="Ray: auto (default; GPUs if the cluster has them), cuda or cpu; --in-process: cpu "
                             "(default), cuda, cuda:1, ...")
    parser.add_argument("--num-samplers", type=int, default=None, help="Ray: sampler actors (default: every GPU / 1)")
    parser.add_argument("--in-process", action="store_true", help="no Ray: sample in this process on --device")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="GPT dtype (auto: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--mlflow", action="store_true", help="log params, speed and the grid to MLflow "
                        "($MLFLOW_TRACKING_URI or <out>/mlflow.db)")
    args = parser.parse_args(argv)
    require_durable_paths(**{"--out": args.out})  # under `ray job submit --working-dir`: absolute only
    check_checkpoints(gpt=args.gpt, tokenizer=args.tokenizer, classes=args.classes)  # before torch and Ray

    cfg = SampleConfig(cfg_scale=args.cfg_scale, cfg_interval=tuple(args.cfg_interval), temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, per_class=args.per_class, batch_size=args.batch_size,
                       seed=args.seed, out_size=args.out_size)
    try:
        validate_sample(cfg)  # before torch and Ray
    except ConfigError as e:
        refuse(f"config error: {e}")
    from ideal_ray.tracking import default_tracking_uri

    with job_console(args.out):  # the console: the image bar and the summary; the rest: <out>/console.log
        return _sample(args, cfg, default_tracking_uri(args.out) if args.mlflow else None)


def _sample(args, cfg, uri) -> int:
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    with outcome(f"nothing was written to {args.out} (samples are written at the end); run the same command again"):
        if args.in_process:
            from ideal_ray.pipelines.sample_local import sample_images

            summary = sample_images(args.gpt, args.tokenizer, cfg, args.classes, args.out,
                                    device=args.device or "cpu", log=log, tracking_uri=uri, precision=args.precision)
        else:
            from ideal_ray.pipelines.sample_ray import sample_images_ray

            summary = sample_images_ray(args.gpt, args.tokenizer, cfg, args.classes, args.out,
                                        device=args.device or "auto", num_samplers=args.num_samplers,
                                        precision=args.precision, tracking_uri=uri, log=log)
    say(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
