"""Write our single-file export from an official checkpoint: the authors' release tokenizer (exported weights or a
training checkpoint) or a LlamaGen-layout GPT (LlamaGen's c2i files, the authors' release GPT checkpoint).

    python jobs/convert.py --src ckpts/ideal_tokenizer.pth --out ckpts/tokenizer-release.pt
    python jobs/convert.py --src ckpts/c2i_B_256.pt --out ckpts/gpt-B-llamagen.pt --grid 16

Every job that takes ``--tokenizer`` or ``--gpt`` also reads these files directly (the layout is detected); the
export makes them start faster (no layout search) and carries the config, so it is what to keep. The kind of model
is detected from the file; EMA weights are taken when present unless ``--no-ema``. ``--out`` must not exist.
Prints a JSON summary.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ideal_ray.cli import outcome, refuse  # noqa: E402
from ideal_ray.console import say  # noqa: E402


def main(argv=None) -> int:
    from ideal_ray.checkpoint import inspect_checkpoint

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="the release or LlamaGen file (or one of our exports)")
    parser.add_argument("--out", required=True, help="the export to write (must not exist)")
    parser.add_argument("--grid", type=int, default=None,
                        help="GPT token grid (tokens per side), for LlamaGen files that do not carry their training "
                             "args (e.g. 16 for 256 px with a 16x tokenizer, 24 for Ideal's 576 tokens)")
    parser.add_argument("--no-ema", dest="prefer_ema", action="store_false",
                        help="take the trained weights even where the file has EMA weights")
    args = parser.parse_args(argv)
    if os.path.exists(args.out):
        refuse(f"error: {args.out} exists; choose a new --out (nothing is overwritten).")
    if args.grid is not None and args.grid < 1:
        refuse(f"error: --grid {args.grid} must be at least 1.")
    with outcome(f"{args.out} was not written (it is written whole at the end); run the same command again"):
        info = inspect_checkpoint(args.src, prefer_ema=args.prefer_ema)  # before torch: a bad file costs no time
        if info.kind == "gpt" and not info.tokens and not args.grid:
            refuse(f"error: {args.src} is a LlamaGen-layout GPT that does not say its token grid; pass --grid "
                   f"(tokens per side).")
        say(f"[ideal-ray] convert: {args.src}: {info.describe()} -> {args.out}")
        from ideal_ray.checkpoint import convert_checkpoint

        summary = convert_checkpoint(args.src, args.out, grid=args.grid, prefer_ema=args.prefer_ema)
    say(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
