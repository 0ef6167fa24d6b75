"""The demo: synthetic ImageNet-layout set -> tiny Ideal tokenizer trained in-process -> PSNR and codebook usage.

    python jobs/demo.py                     # tiny preset, ~300 steps on CPU
    python jobs/demo.py schedule.steps=100  # any a.b=c override
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ideal_ray.checkpoint import unique_dir  # noqa: E402
from ideal_ray.cli import add_config_args, config_from_args  # noqa: E402
from ideal_ray.train.local import train_tokenizer_local  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, default_preset="tiny")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    cfg.output_dir = os.path.dirname(unique_dir(os.path.join(cfg.output_dir, cfg.name)))
    cfg.name = os.path.basename(unique_dir(os.path.join(cfg.output_dir, cfg.name)))
    result = train_tokenizer_local(cfg, device=args.device)
    better = (result["after_ema"]["psnr"] > result["before"]["psnr"]
              and result["after_ema"]["usage"] >= result["before"]["usage"])
    print(f"[ideal-ray] trained tokenizer beats the untrained one: {'yes' if better else 'NO'}")
    return 0 if better else 1


if __name__ == "__main__":
    sys.exit(main())
