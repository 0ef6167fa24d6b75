"""The demo: synthetic ImageNet-layout set -> tiny Ideal tokenizer trained on Ray Train + DeepSpeed (2 CPU workers),
tracked in MLflow -> reconstruction PSNR and codebook usage of the trained model against an untrained one.

    python jobs/demo.py                       # tiny preset, 300 steps, 2 CPU workers (a local Ray cluster)
    python jobs/demo.py --in-process          # the same training loop order in one process, no Ray
    python jobs/demo.py schedule.steps=100    # any a.b=c override
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ideal_ray.checkpoint import unique_dir  # noqa: E402
from ideal_ray.cli import add_config_args, config_from_args  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, default_preset="tiny")
    parser.add_argument("--in-process", action="store_true", help="train in this process (no Ray, no DeepSpeed)")
    parser.add_argument("--device", default=None, help="--in-process only: cpu or cuda")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    # a fresh run folder each time: a demo never resumes or overwrites an earlier one
    run_dir = unique_dir(os.path.join(cfg.output_dir, cfg.name))
    cfg.name = os.path.basename(run_dir)
    cfg.dist.storage_path = cfg.output_dir

    if args.in_process:
        from ideal_ray.train.local import train_tokenizer_local

        result = train_tokenizer_local(cfg, device=args.device)
        before, after = result["before"], result["after_ema"]
    else:
        before, after = _ray_demo(cfg)
    better = after["psnr"] > before["psnr"] and after["usage"] >= before["usage"]
    print(f"[ideal-ray] trained tokenizer beats the untrained one: {'yes' if better else 'NO'}")
    return 0 if better else 1


def _ray_demo(cfg):
    import torch

    from ideal_ray.checkpoint import load_tokenizer
    from ideal_ray.models.tokenizer import IdealTokenizer
    from ideal_ray.train.local import ensure_dataset, loaders
    from ideal_ray.train.ray_trainer import train_tokenizer
    from ideal_ray.train.tokenizer_step import evaluate_reconstruction

    ensure_dataset(cfg)
    result = train_tokenizer(cfg)
    _, val_loader = loaders(cfg)
    torch.manual_seed(cfg.optim.seed)  # the trained run's initial weights
    before = evaluate_reconstruction(IdealTokenizer(cfg.model), val_loader)
    after = evaluate_reconstruction(load_tokenizer(result["export"]), val_loader)
    print(f"[ideal-ray] {'':14s} {'PSNR (dB)':>10s} {'usage':>8s} {'entropy':>8s}")
    for name, r in (("untrained", before), ("trained (EMA)", after)):
        print(f"[ideal-ray] {name:14s} {r['psnr']:10.2f} {r['usage']:8.1%} {r['entropy']:8.2f}")
    print(f"[ideal-ray] Ray checkpoints and MLflow run: {result['run_path']} ({result['tracking_uri']})\n"
          f"[ideal-ray] inference export: {result['export']}\n"
          f"[ideal-ray] compare runs: mlflow ui --backend-store-uri {result['tracking_uri']}")
    return before, after


if __name__ == "__main__":
    sys.exit(main())
