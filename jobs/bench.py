"""Benchmarks that run the model/step code directly (no Ray), on any single CPU or GPU box.

    python jobs/bench.py params --preset paper            # <module> <trainable> <frozen>, then total
    python jobs/bench.py params --preset paper --discriminator
    python jobs/bench.py tokenizer --preset tiny --batch 8 --steps 10
    python jobs/bench.py tokenizer --preset paper --batch 32 --steps 20   # on a GPU: img/s, memory, TFLOP/s

``params`` builds the model on the meta device (no weights, no memory). ``tokenizer`` times one full training step
(G forward/backward/step, EMA, D forward/backward/step) with random weights: warm-up steps first, then the median of
the timed steps; FLOPs are counted once with torch's FlopCounterMode.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from ideal_ray.cli import add_config_args, config_from_args  # noqa: E402


def param_table(cfg, discriminator: bool = False):
    """Rows (module, trainable, frozen) for the tokenizer (and optionally the discriminator), built on meta."""
    from ideal_ray.models.discriminator import DinoDiscriminator
    from ideal_ray.models.tokenizer import IdealTokenizer

    with torch.device("meta"):
        model = IdealTokenizer(cfg.model, load_weights=False)
        rows = [(name, r["trainable"], r["frozen"]) for name, r in model.param_groups_by_module().items()]
        if discriminator:
            d = DinoDiscriminator(cfg.discriminator, load_weights=False)
            rows.append(("discriminator", sum(p.numel() for p in d.parameters() if p.requires_grad),
                         sum(p.numel() for p in d.parameters() if not p.requires_grad)))
    return rows


def cmd_params(args) -> None:
    cfg = config_from_args(args)
    rows = param_table(cfg, args.discriminator)
    for name, tr, fr in rows:
        print(f"{name} {tr} {fr}")
    print(f"total {sum(r[1] for r in rows)} {sum(r[2] for r in rows)}")


def cmd_tokenizer(args) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from ideal_ray.train.tokenizer_step import LocalTrainer

    cfg = config_from_args(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg.data.global_batch = args.batch
    # time the full step: discriminator and adversarial terms on from the first step
    cfg.loss.disc_start = 0
    trainer = LocalTrainer(cfg, device=device, total_steps=10**9, load_weights=False)
    g = torch.Generator().manual_seed(0)
    size = cfg.model.image_size
    batches = [torch.rand(args.batch, 3, size, size, generator=g) * 2 - 1 for _ in range(2)]
    batches = [b.to(device) for b in batches]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for i in range(args.warmup):
        trainer.train_step(batches[i % 2])
    sync()
    with FlopCounterMode(display=False) as fc:
        trainer.train_step(batches[0])
    flops = fc.get_total_flops()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.steps):
        sync()
        t0 = time.perf_counter()
        trainer.train_step(batches[i % 2])
        sync()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    print(f"| preset | device | batch | precision | step s (median of {args.steps}) | img/s | TFLOP/step | "
          f"TFLOP/s | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {cfg.preset} | {name} | {args.batch} | {cfg.optim.precision if device.type == 'cuda' else 'fp32'} | "
          f"{med:.4f} | {args.batch / med:.3g} | {flops / 1e12:.4f} | {flops / med / 1e12:.2f} | {mem:.1f} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("params", help="parameter counts per module (meta device)")
    add_config_args(p, default_preset="paper")
    p.add_argument("--discriminator", action="store_true", help="also count the discriminator (after the tokenizer)")
    p.set_defaults(fn=cmd_params)
    t = sub.add_parser("tokenizer", help="time a full tokenizer training step (G + EMA + D)")
    add_config_args(t, default_preset="tiny")
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--steps", type=int, default=10)
    t.add_argument("--warmup", type=int, default=3)
    t.add_argument("--device", default=None)
    t.set_defaults(fn=cmd_tokenizer)
    args = parser.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
