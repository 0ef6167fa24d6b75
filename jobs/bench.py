"""Benchmarks that run the model/step code directly (no Ray), on any single CPU or GPU box.

    python jobs/bench.py params --preset paper            # <module> <trainable> <frozen>, then total
    python jobs/bench.py params --preset paper --discriminator
    python jobs/bench.py tokenizer --preset tiny --batch 8 --steps 10
    python jobs/bench.py tokenizer --preset paper --batch 32 --steps 20   # on a GPU: img/s, memory, TFLOP/s
    python jobs/bench.py ar-train --preset B --batch 64 --steps 20        # seq/s, tokens/s, TFLOP/s, MFU
    python jobs/bench.py sample --preset B --batch 64 --cfg-scale 1.75 --llamagen-dir third_party/LlamaGen
    python jobs/bench.py extract --preset paper --views llamagen --batch 512   # extraction vs VFM forward, decode/core

``params`` builds the model on the meta device (no weights, no memory). ``tokenizer`` times one full training step
(G forward/backward/step, EMA, D forward/backward/step) with random weights: warm-up steps first, then the median of
the timed steps; FLOPs are counted once with torch's FlopCounterMode.

``ar-train`` times one GPT training step (forward, cross-entropy, backward, clip 1.0, AdamW -- fused on GPU -- with
bf16 autocast on GPU, fp32 on CPU) on random tokens. FLOPs per sequence are the performance.md formula
``6 N T + 12 L D T^2`` (N parameters, T tokens, L layers, D width); MFU is against ``--peak-tflops``.
``extract`` sizes token extraction (issue 5): in one process it times the frozen VFM's own forward on B views
(the ceiling), the extraction encoder exactly as each GPU actor runs it (uint8 ADM squares from host memory -> copy
-> cut the views on the device -> VFM + fusion + quantizer -> uint16 codes back on the host) on the same number of
views, and the CPU side on one core (JPEG decode + the view set's ADM squares, on ImageNet-sized JPEGs), then prints
the encoder's share of the VFM throughput (goal >= 60%) and the decode cores one encoder needs.
``sample`` times ``ideal_ray.sampling.Sampler`` for a batch at a CFG scale (images/s = tokens per second / tokens
per image); with ``--llamagen-dir`` (a local, git-ignored LlamaGen checkout) it also times LlamaGen's eager
``generate`` on the same weights, batch and CFG, in the same process, and prints the speed ratio.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from ideal_ray.cli import add_config_args, config_from_args  # noqa: E402
from ideal_ray.models.gpt import to_llamagen_state_dict  # noqa: E402


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
    device = _device(args.device)
    cfg.data.global_batch = args.batch
    # time the full step: discriminator and adversarial terms on from the first step
    cfg.loss.disc_start = 0
    trainer = LocalTrainer(cfg, device=device, total_steps=10**9, load_weights=False)
    g = torch.Generator().manual_seed(0)
    size = cfg.model.image_size
    batches = [torch.rand(args.batch, 3, size, size, generator=g) * 2 - 1 for _ in range(2)]
    batches = [b.to(device) for b in batches]

    with FlopCounterMode(display=False) as fc:  # one counted step, not timed
        trainer.train_step(batches[0])
    flops = fc.get_total_flops()
    med = _median_seconds(lambda i: trainer.train_step(batches[i % 2]), device, args.warmup, args.steps)
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    name = _device_name(device)
    _profile(lambda: trainer.train_step(batches[0]), device, args.profile)
    print(f"| preset | device | batch | precision | step s (median of {args.steps}) | img/s | TFLOP/step | "
          f"TFLOP/s | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {cfg.preset} | {name} | {args.batch} | {cfg.optim.precision if device.type == 'cuda' else 'fp32'} | "
          f"{med:.4f} | {args.batch / med:.3g} | {flops / 1e12:.4f} | {flops / med / 1e12:.2f} | {mem:.1f} |")


# ------------------------------------------------------------------------------------------ AR stage
def _device(arg):
    return torch.device(arg or ("cuda" if torch.cuda.is_available() else "cpu"))


def _device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _profile(fn, device, rows: int) -> None:
    """With ``rows`` > 0: profile two calls of ``fn`` and print the ``rows`` ops with the most device self time."""
    if rows <= 0:
        return
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(2):
            fn()
        _sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60))


def _median_seconds(fn, device, warmup: int, iters: int) -> float:
    """Call ``fn(i)`` ``warmup`` times, reset the peak-memory counter, then time ``iters`` calls with the device
    synchronized around each; the median in seconds."""
    for i in range(warmup):
        fn(i)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        fn(i)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _gpt_cfg(args):
    from ideal_ray.config import gpt_config

    over = {}
    if args.vocab:
        over["vocab_size"] = args.vocab
    if args.grid:
        over["grid"] = args.grid
    return gpt_config(args.preset, **over)


def ar_train_flops_per_seq(n_params: int, n_layer: int, dim: int, tokens: int) -> float:
    """performance.md: 6 N T (matmuls, forward + backward) + 12 L D T^2 (attention scores and values)."""
    return 6.0 * n_params * tokens + 12.0 * n_layer * dim * tokens ** 2


def cmd_ar_train(args) -> None:
    import torch.nn.functional as F

    from ideal_ray.models.gpt import GPT

    device = _device(args.device)
    cfg = _gpt_cfg(args)
    torch.manual_seed(0)
    model = GPT(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05,
                            fused=device.type == "cuda")
    bf16 = device.type == "cuda"
    n, b = cfg.num_tokens, args.batch
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (b, n), generator=g).to(device)  # (B, N)
    labels = torch.randint(0, cfg.num_classes, (b,), generator=g).to(device)  # (B,)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(tokens, labels)  # (B, N, V) float32
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    med = _median_seconds(lambda i: step(), device, args.warmup, args.steps)
    _profile(step, device, args.profile)
    n_params = model.num_params()
    flops = ar_train_flops_per_seq(n_params, cfg.n_layer, cfg.dim, n) * b
    tflops = flops / med / 1e12
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    print(f"FLOPs/seq = 6 x N_params x T + 12 x layers x width x T^2 = {flops / b / 1e12:.4g} TFLOP "
          f"(N_params {n_params:,}, T {n}); MFU against {args.peak_tflops:g} TFLOP/s")
    print(f"| preset | device | batch | precision | step s (median of {args.steps}) | seq/s | tokens/s | "
          f"TFLOP/s | MFU % | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| GPT-{cfg.size} | {_device_name(device)} | {b} | {'bf16 autocast' if bf16 else 'fp32'} | {med:.4f} | "
          f"{b / med:.4g} | {b * n / med:.4g} | {tflops:.4g} | {100 * tflops / args.peak_tflops:.3g} | {mem:.1f} |")


def _llamagen_model(llamagen_dir: str, cfg, state, device, dtype):
    """LlamaGen's c2i Transformer with the same sizes, loaded with our weights."""
    root = os.path.abspath(llamagen_dir)
    if not os.path.isfile(os.path.join(root, "autoregressive", "models", "gpt.py")):
        raise SystemExit(f"--llamagen-dir {llamagen_dir} is not a LlamaGen checkout (no autoregressive/models/gpt.py);"
                         f" clone FoundationVision/LlamaGen into third_party/LlamaGen.")
    sys.path.insert(0, root)
    from autoregressive.models.generate import generate
    from autoregressive.models.gpt import ModelArgs, Transformer

    args = ModelArgs(dim=cfg.dim, n_layer=cfg.n_layer, n_head=cfg.n_head, multiple_of=cfg.multiple_of,
                     ffn_dim_multiplier=cfg.ffn_dim_multiplier or None, rope_base=cfg.rope_base,
                     norm_eps=cfg.norm_eps, vocab_size=cfg.vocab_size, num_classes=cfg.num_classes,
                     cls_token_num=cfg.cls_token_num, block_size=cfg.num_tokens, class_dropout_prob=0.1,
                     token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0, model_type="c2i")
    theirs = Transformer(args)
    missing, unexpected = theirs.load_state_dict(to_llamagen_state_dict(state), strict=False)
    if missing or unexpected:
        raise SystemExit(f"LlamaGen's Transformer does not match our GPT: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}.")
    return theirs.to(device=device, dtype=dtype).eval(), generate


def cmd_sample(args) -> None:
    from ideal_ray.config import SampleConfig
    from ideal_ray.models.gpt import GPT
    from ideal_ray.sampling import Sampler

    device = _device(args.device)
    cfg = _gpt_cfg(args)
    torch.manual_seed(0)
    model = GPT(cfg)
    for p in model.head.parameters():  # the zero-init head gives uniform logits; random weights are more typical
        torch.nn.init.normal_(p, std=cfg.initializer_range)
    dtype = torch.bfloat16 if device.type == "cuda" and args.precision != "fp32" else torch.float32
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model = model.to(device=device, dtype=dtype).eval()
    sc = SampleConfig(cfg_scale=args.cfg_scale, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    b, n = args.batch, cfg.num_tokens
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, cfg.num_classes, (b,), generator=g).to(device)
    compile_ = None if args.compile == "auto" else args.compile == "on"

    def timed(fn):
        return _median_seconds(lambda i: fn(), device, args.warmup, args.iters)

    t_build = time.perf_counter()
    sampler = Sampler(model, b, sc, compile=compile_)
    seeds = list(range(b))
    sampler(labels, seeds)  # first call: compile / graph capture
    _sync(device)
    t_build = time.perf_counter() - t_build
    ours = timed(lambda: sampler(labels, seeds))
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    rows = [("ideal_ray Sampler" + (" (compiled" + (" + CUDA graph)" if sampler.use_graph else ")")
                                    if sampler.use_compile else " (eager)"), ours, mem)]
    ratio = None
    if args.llamagen_dir:
        theirs, generate = _llamagen_model(args.llamagen_dir, cfg, state, device, dtype)
        kw = dict(cfg_scale=args.cfg_scale, cfg_interval=-1, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, sample_logits=True)
        t_theirs = timed(lambda: generate(theirs, labels, n, **kw))
        mem_t = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        rows.append(("LlamaGen generate (eager)", t_theirs, mem_t))
        ratio = t_theirs / ours
        # same weights, same model: greedy decoding with the same CFG must give (nearly) the same tokens
        greedy = dataclasses.replace(sc, temperature=0.0, top_k=0, top_p=1.0)
        mine = Sampler(model, b, greedy, compile=False, cuda_graph=False)(labels, seeds)  # (B, N)
        kw.update(top_k=0, top_p=1.0, sample_logits=False)
        other = generate(theirs, labels, n, **kw).long()  # (B, N)
        agree = (mine == other).float().mean().item()
    print(f"GPT-{cfg.size} ({model.num_params():,} params, {n} tokens/image), batch {b}, CFG {args.cfg_scale} "
          f"({'doubled batch' if args.cfg_scale != 1.0 else 'no guidance'}), {str(dtype).replace('torch.', '')}, "
          f"{_device_name(device)}; first call (build + compile/capture) {t_build:.2f} s")
    print(f"| sampler | batch s (median of {args.iters}) | tokens/s | images/s (= tokens/s / {n}) | peak GiB |")
    print("|---|---|---|---|---|")
    for name, t, m in rows:
        print(f"| {name} | {t:.4f} | {b * n / t:.4g} | {b * n / t / n:.4g} | {m:.1f} |")
    if ratio is not None:
        print(f"same weights check: greedy tokens equal to LlamaGen's for {100 * agree:.1f}% of positions")
        print(f"speedup over LlamaGen eager generate: {ratio:.2f}x")


def _bench_jpegs(n: int, width: int = 500, height: int = 375, quality: int = 90) -> list[bytes]:
    """``n`` ImageNet-sized JPEGs (500x375, the set's median shape) of the synthetic classes, encoded in memory."""
    import io

    import numpy as np
    from PIL import Image

    from ideal_ray.data.synthetic import render_image

    out = []
    for i in range(n):
        arr = render_image(i % 16, width, np.random.default_rng(i))  # (W, W, 3) uint8
        buf = io.BytesIO()
        Image.fromarray(arr).resize((width, height), Image.BICUBIC).save(buf, "JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def cmd_extract(args) -> None:
    import numpy as np

    from ideal_ray.data import crops, sources
    from ideal_ray.models.tokenizer import IdealTokenizer
    from ideal_ray.pipelines.extract_common import ViewEncoder

    cfg = config_from_args(args)
    device = _device(args.device)
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    amp = torch.bfloat16 if precision == "bf16" else None
    size, views, nv = cfg.model.image_size, args.views, crops.num_views(args.views)
    torch.manual_seed(0)
    tok = IdealTokenizer(cfg.model, load_weights=False).to(device).eval()
    encoder = ViewEncoder(tok, views, size, device, precision, max_views=args.batch)
    per_call = max(1, args.batch // nv)  # images per encoder call
    n_views = per_call * nv  # both sides encode the same number of views per call

    # CPU side first: one core, decode + squares of real JPEG bytes
    jpegs = _bench_jpegs(args.decode_images)
    t0 = time.perf_counter()
    decoded = [sources.decode_bytes(b) for b in jpegs]
    t_decode = (time.perf_counter() - t0) / len(jpegs)
    t0 = time.perf_counter()
    squares = [crops.make_squares(img, views, size) for img in decoded]
    t_squares = (time.perf_counter() - t0) / len(jpegs)
    batch_sq = [np.stack([sq[k] for sq in (squares * per_call)[:per_call]]) for k in range(len(squares[0]))]
    mb_per_image = sum(s[0].nbytes for s in batch_sq) / 2**20

    g = torch.Generator().manual_seed(0)
    x = (torch.rand(n_views, 3, size, size, generator=g) * 2 - 1).to(device)  # (B, 3, S, S)

    @torch.inference_mode()
    def vfm_forward():
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            tok.vfm(x)

    t_vfm = _median_seconds(lambda i: vfm_forward(), device, args.warmup, args.iters)
    t_enc = _median_seconds(lambda i: encoder(batch_sq), device, args.warmup, args.iters)
    vfm_rate, enc_rate = n_views / t_vfm, n_views / t_enc  # views/s
    enc_images = enc_rate / nv
    decode_rate = 1.0 / (t_decode + t_squares)  # images/s on one core
    print(f"extraction, preset {cfg.preset} ({size}px, views '{views}' = {nv}/image, {n_views} views per call), "
          f"{precision}, {_device_name(device)}")
    print(f"| stage | views/s | images/s | ms per call (median of {args.iters}) |")
    print("|---|---|---|---|")
    print(f"| VFM forward alone (ceiling) | {vfm_rate:.4g} | {vfm_rate / nv:.4g} | {1e3 * t_vfm:.2f} |")
    print(f"| extraction encoder (copy + views + VFM + fusion + VQ) | {enc_rate:.4g} | {enc_images:.4g} | "
          f"{1e3 * t_enc:.2f} |")
    print(f"| CPU: JPEG decode, 1 core | | {1 / t_decode:.4g} | |")
    print(f"| CPU: decode + ADM squares, 1 core | | {decode_rate:.4g} | |")
    print(f"encoder / VFM forward: {100 * enc_rate / vfm_rate:.1f}% (goal >= 60%); object store per image "
          f"{mb_per_image:.2f} MiB of squares; decode cores per encoder: {enc_images / decode_rate:.1f}")


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
    t.add_argument("--profile", type=int, default=0, help="print the N ops with most device time")
    t.add_argument("--device", default=None)
    t.set_defaults(fn=cmd_tokenizer)
    presets = ["B", "L", "XXL", "3B", "tiny"]
    a = sub.add_parser("ar-train", help="time a GPT training step (fwd + bwd + AdamW): seq/s, tokens/s, MFU")
    a.add_argument("--preset", default="tiny", choices=presets)
    a.add_argument("--batch", type=int, default=8)
    a.add_argument("--steps", type=int, default=10)
    a.add_argument("--warmup", type=int, default=3)
    a.add_argument("--peak-tflops", type=float, default=790.0, help="MFU denominator (790 = measured H200 bf16)")
    a.add_argument("--vocab", type=int, default=0, help="override the preset's vocab size")
    a.add_argument("--grid", type=int, default=0, help="override the preset's token grid")
    a.add_argument("--profile", type=int, default=0, help="print the N ops with most device time")
    a.add_argument("--device", default=None)
    a.set_defaults(fn=cmd_ar_train)
    s = sub.add_parser("sample", help="time class-conditional sampling (images/s), optionally vs LlamaGen")
    s.add_argument("--preset", default="tiny", choices=presets)
    s.add_argument("--batch", type=int, default=8)
    s.add_argument("--cfg-scale", type=float, default=1.75)
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--iters", type=int, default=3)
    s.add_argument("--warmup", type=int, default=1)
    s.add_argument("--precision", default="auto", choices=["auto", "fp32"], help="auto: bf16 on CUDA, fp32 on CPU")
    s.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help="Sampler compile (auto: the Sampler default, off)")
    s.add_argument("--llamagen-dir", default="", help="local LlamaGen checkout to time its eager generate too")
    s.add_argument("--vocab", type=int, default=0, help="override the preset's vocab size")
    s.add_argument("--grid", type=int, default=0, help="override the preset's token grid")
    s.add_argument("--device", default=None)
    s.set_defaults(fn=cmd_sample)
    e = sub.add_parser("extract", help="time the extraction encoder vs the VFM forward, and the CPU decode per core")
    add_config_args(e, default_preset="tiny")
    e.add_argument("--views", default="llamagen", choices=list(crops_view_sets()))
    e.add_argument("--batch", type=int, default=64, help="views per encoder call")
    e.add_argument("--iters", type=int, default=5)
    e.add_argument("--warmup", type=int, default=2)
    e.add_argument("--decode-images", type=int, default=32, help="JPEGs for the CPU decode rate")
    e.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 on CUDA")
    e.add_argument("--device", default=None)
    e.set_defaults(fn=cmd_extract)
    args = parser.parse_args(argv)
    args.fn(args)


def crops_view_sets():
    from ideal_ray.data.crops import VIEW_SETS

    return VIEW_SETS


if __name__ == "__main__":
    main()
