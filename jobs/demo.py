"""The demo: the whole pipeline (``jobs/pipeline.py``'s chain) at tiny scale on one local Ray cluster (2 CPU
workers), on a synthetic ImageNet-layout set, everything tracked in one MLflow store:

tokenizer (Ray Train + DeepSpeed) -> token extraction (Ray Data actor pools, center + flip views) -> class-conditional
GPT (Ray Train + DeepSpeed) -> sample grid (Ray actor pool) -> evaluation (rFID/PSNR/usage, gFID) -> CFG sweep (Ray
Tune), then one table: per stage its seconds, headline numbers and artifacts.

The run folder is fixed (``runs/ideal-demo``): a rerun skips the finished stages (one line each) and resumes an
interrupted one; ``name=...`` starts another run. What is demo-specific is here: the synthetic set and the report.

    python jobs/demo.py                       # every stage (a rerun skips what is done)
    python jobs/demo.py --tokenizer-only      # the tokenizer stage only
    python jobs/demo.py --in-process          # the tokenizer in this process, no Ray (the same stage, loop and
                                              # export), then PSNR / usage of the untrained and the trained model
    python jobs/demo.py --in-process dist.engine=torch   # ... on plain torch AdamW: the quick CPU option
    python jobs/demo.py name=demo-600 schedule.steps=600   # a.b=c overrides of the tokenizer config, in a new
                                                           # run (ideal-demo's finished stages would be skipped)
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ideal_ray.cli import add_config_args, config_from_args, outcome  # noqa: E402
from ideal_ray.console import job_console, say  # noqa: E402

RUN_NAME = "ideal-demo"  # runs/ideal-demo: fixed, so a rerun resumes (an in-process run gets its own folder)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, default_preset="tiny")
    parser.add_argument("--in-process", action="store_true",
                        help="the tokenizer only, trained in this process (no Ray): one rank of the same stage and "
                             "loop, checkpoints, MLflow and export (dist.use_gpu=true for a GPU, dist.engine=torch "
                             "for plain torch AdamW)")
    parser.add_argument("--tokenizer-only", action="store_true", help="run the tokenizer stage only")
    args = parser.parse_args(argv)
    name = f"{RUN_NAME}-in-process" if args.in_process else RUN_NAME  # a run resumes only the way it started
    args.overrides = [f"name={name}"] + args.overrides  # a name= of the user's comes later and wins
    cfg = config_from_args(args, in_process=args.in_process, needs_data=True)
    resume = "rerun the same command: finished stages are kept and skipped, the current one resumes"
    with job_console(os.path.join(cfg.output_dir, cfg.name)), outcome(resume):  # console: stage lines; log: the rest
        return _demo(args, cfg)


def _demo(args, cfg) -> int:
    if args.in_process:
        before, after = _tokenizer_demo(cfg)
        better = after["psnr"] > before["psnr"] and after["usage"] >= before["usage"]
        say(f"[ideal-ray] trained tokenizer beats the untrained one: {'yes' if better else 'NO'}")
        return 0 if better else 1

    from ideal_ray.cli import ray_job
    from ideal_ray.pipeline import pipeline_report, run_pipeline
    from ideal_ray.train.ray_trainer import prepare_data

    prepare_data(cfg)  # the synthetic set under data.root, made on the first run (listed before any stage)
    state, tracking_uri = run_pipeline(cfg, only=["tokenizer"] if args.tokenizer_only else None,
                                       meta={"ray_job": ray_job(), "argv": sys.argv[1:]})
    say(pipeline_report(state, tracking_uri))
    return 0


def _tokenizer_demo(cfg):
    """``--in-process``: train the tokenizer in this process, then PSNR / usage on the val split of the untrained
    model and of the export (EMA weights)."""
    import torch
    from torch.utils.data import DataLoader

    from ideal_ray.checkpoint import load_tokenizer
    from ideal_ray.data.folder import ImageFolderDataset
    from ideal_ray.data.transforms import eval_transform
    from ideal_ray.models.tokenizer import IdealTokenizer
    from ideal_ray.train.ray_trainer import train_tokenizer
    from ideal_ray.train.tokenizer_step import evaluate_reconstruction

    result = train_tokenizer(cfg, in_process=True)
    d = cfg.data
    val_loader = DataLoader(ImageFolderDataset(d.root, "val", eval_transform(d.image_size), class_index=d.class_index),
                            batch_size=d.global_batch)
    torch.manual_seed(cfg.optim.seed)  # the trained run's initial weights
    before = evaluate_reconstruction(IdealTokenizer(cfg.model), val_loader)
    after = evaluate_reconstruction(load_tokenizer(result["export"]), val_loader)
    say(f"[ideal-ray] {'':14s} {'PSNR (dB)':>10s} {'usage':>8s} {'entropy':>8s}")
    for name, r in (("untrained", before), ("trained (EMA)", after)):
        say(f"[ideal-ray] {name:14s} {r['psnr']:10.2f} {r['usage']:8.1%} {r['entropy']:8.2f}")
    say(f"[ideal-ray] checkpoints and MLflow run: {result['run_path']} ({result['tracking_uri']})\n"
          f"[ideal-ray] inference export: {result['export']}\n"
          f"[ideal-ray] compare runs: mlflow ui --backend-store-uri {result['tracking_uri']}")
    return before, after


if __name__ == "__main__":
    sys.exit(main())
