"""Shared command-line handling for jobs/: a preset name plus ``a.b=c`` overrides, nothing more."""
from __future__ import annotations

import argparse
import sys

from ideal_ray.config import ConfigError, TokenizerTrainConfig, load_config, preset_names


def add_config_args(parser: argparse.ArgumentParser, default_preset: str = "tiny") -> None:
    parser.add_argument("--preset", default=default_preset,
                        help=f"base preset, optionally with ablation variants joined by '+' (e.g. paper+fusion-none). "
                             f"Known: {', '.join(preset_names()[:6])}, ...")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted config overrides, e.g. optim.lr=2e-4 data.root=/datasets/imagenet")


def config_from_args(args: argparse.Namespace) -> TokenizerTrainConfig:
    """Build and validate the config; a wrong value exits with its one-sentence message (no traceback)."""
    try:
        return load_config(args.preset, args.overrides)
    except ConfigError as e:
        sys.exit(f"config error: {e}")


def parse_classes(text: str):
    """``--classes`` of the sampling jobs: ``all`` (or empty) -> None, ``0,1,2`` -> [0, 1, 2]."""
    if not text or text == "all":
        return None
    try:
        return [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--classes '{text}' must be comma-separated integers like 0,1,2 or 'all'.")
