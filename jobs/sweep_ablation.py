"""The paper's ablations as one Ray Tune sweep: each trial trains the tokenizer (Ray Train + DeepSpeed) for a step
budget and evaluates it (rFID, rIS, PSNR, SSIM, usage; + linear-probe top-1 for the layer study).

    # laptop: the fusion study (Table 7a) at tiny scale on a local Ray cluster, one trial at a time
    python jobs/sweep_ablation.py --preset tiny --study fusion --name fusion-tiny --steps 200
    # cluster: the layer study (Table 1), 8 GPUs per trial, ASHA on the training reconstruction MSE
    RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/sweep_ablation.py --preset paper --study layer --name layers --storage /shared/sweeps \\
        --steps 20000 --scheduler asha --workers-per-trial 8 --gpus --eval-images 10000 data.root=/datasets/imagenet
    # any combination of config.ABLATIONS variants
    python jobs/sweep_ablation.py --preset tiny --study custom --name mix --steps 200 \\
        --variants fusion-linear,fusion-linear+shallow-align-off

Studies: fusion {attention, linear, none}, shallow-align {on, off}, backbone {siglip2, dinov2, dinov3}, layer {8, 12,
16, 20, 24} (paper scale), custom (--variants). Every variant, its pretrained files and the data are checked before
any trial starts. Rerunning the same --name resumes the sweep: finished trials are not rerun.

Results: ``<storage>/<name>/`` (Tune state, ``train/<name>.<variant>`` runs and exports,
``eval/<variant>/result.json``), one MLflow parent run per sweep with a child run per trial (experiment
``ideal-ablation`` in $MLFLOW_TRACKING_URI, default ``<storage>/<name>/mlflow.db``), and the table printed at the end.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ideal_ray.cli import INTERRUPTED, outcome, refuse, require_durable_paths  # noqa: E402
from ideal_ray.config import ConfigError, check_data_root, load_config  # noqa: E402
from ideal_ray.console import job_console, say  # noqa: E402

from ideal_ray.tune.ablation import STUDIES  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="base preset (tiny, paper)")
    parser.add_argument("--study", required=True, choices=sorted(STUDIES) + ["custom"])
    parser.add_argument("--variants", default="", help="custom study: comma-separated variants (v or v1+v2)")
    parser.add_argument("--name", required=True, help="sweep name; rerunning it resumes the sweep")
    parser.add_argument("--storage", default="runs/sweeps", help="folder of the sweeps (local disk or NFS)")
    parser.add_argument("--steps", type=int, default=None, help="every trial's step budget (default: the preset's)")
    parser.add_argument("--scheduler", default="grid", choices=["grid", "asha"])
    parser.add_argument("--asha", default="train_rec_mse:min", metavar="METRIC:MODE[:GRACE[:FACTOR]]",
                        help="ASHA's training metric, mode, grace period (steps) and reduction factor")
    parser.add_argument("--workers-per-trial", type=int, default=1, help="Ray Train workers per trial")
    parser.add_argument("--gpus", action="store_true", help="one GPU per train worker (and for the evaluation)")
    parser.add_argument("--max-concurrent-trials", type=int, default=None,
                        help="default: as many as the cluster holds (one on a CPU-only local cluster)")
    parser.add_argument("--eval-images", type=int, default=None, help="evenly spaced val images (default: all)")
    parser.add_argument("--probe-train-images", type=int, default=None,
                        help="linear-probe training images (default: 10000 for single-layer variants, else 0)")
    parser.add_argument("--zero-shot", action="store_true", help="also zero-shot top-1/5 (siglip2/tiny backbones)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow store of the parent and child runs")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every trial")
    args = parser.parse_args(argv)
    require_durable_paths(**{"--storage": args.storage})  # under `ray job submit --working-dir`: absolute only
    try:  # the trials' base config: its values and data.root, before Ray starts
        check_data_root(load_config(args.preset, args.overrides))
    except ConfigError as e:
        refuse(f"config error: {e}")

    asha = args.asha.split(":")
    if len(asha) < 2 or len(asha) > 4 or not all(p.isdigit() for p in asha[2:]):
        parser.error(f"--asha {args.asha} must be METRIC:MODE[:GRACE[:FACTOR]], e.g. train_rec_mse:min:100:3.")

    with job_console(os.path.join(args.storage, args.name)):  # the console: results; the rest: the log
        return _sweep(args, asha)


def _sweep(args, asha) -> int:
    from ideal_ray.tune.ablation import format_table, sweep_ablation

    with outcome("rerun the same command to resume (finished trials are kept)"):
        summary = sweep_ablation(
            args.preset, args.study, args.name, args.storage,
            variants=[v for v in args.variants.split(",") if v] or None, overrides=args.overrides, steps=args.steps,
            scheduler=args.scheduler, asha_metric=asha[0], asha_mode=asha[1],
            grace_period=int(asha[2]) if len(asha) > 2 else None, reduction_factor=int(asha[3]) if len(asha) > 3 else 3,
            num_workers_per_trial=args.workers_per_trial, gpus_per_worker=int(args.gpus),
            max_concurrent_trials=args.max_concurrent_trials, eval_images=args.eval_images,
            probe_train_images=args.probe_train_images, zero_shot=args.zero_shot, tracking_uri=args.tracking_uri)
    say(format_table(summary))
    say(f"sweep {summary['path']}, MLflow {summary['tracking_uri']} (parent run {summary['parent_run_id']})")
    if summary["interrupted"]:
        say("interrupted: rerun the same command to resume (finished trials are kept)", err=True)
        return INTERRUPTED
    return 1 if any(t["error"] for t in summary["trials"]) else 0


if __name__ == "__main__":
    sys.exit(main())
