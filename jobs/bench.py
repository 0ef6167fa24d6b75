"""Benchmarks of the product's own code on one CPU or GPU box (no Ray, no cluster): every number is of what runs.

    python jobs/bench.py params --preset paper            # <module> <trainable> <frozen>, then total
    python jobs/bench.py params --preset paper --discriminator
    python jobs/bench.py tokenizer --preset tiny --batch 8 --steps 10
    python jobs/bench.py tokenizer --preset paper --batch 32 --variants base,all --probe 48,64   # on a GPU
    python jobs/bench.py ar-train --preset B --batch 64 --variants base,default,all   # seq/s, TFLOP/s, MFU
    python jobs/bench.py precision tokenizer --preset paper --batch 4    # one step in bf16 vs fp32
    python jobs/bench.py sample --preset B --batch 64 --cfg-scale 1.75 --llamagen-dir third_party/LlamaGen
    python jobs/bench.py extract --preset paper --views llamagen --batch 512   # extraction vs VFM forward, decode/core

``params`` builds the model on the meta device (no weights, no memory).

``tokenizer`` and ``ar-train`` build the stage exactly as a Ray Train worker does (``TokenizerStage`` / ``ARStage``
on the engine of ``dist.engine``, DeepSpeed by default, at world size 1 over NCCL on a GPU or gloo on CPU; random
weights) and time the shared loop's step (``train.loop.take_step``: ``train_step`` + EMA): warm-up steps first, then
the median of the timed steps, per lever variant (``--variants``: ``base`` every ``perf.*`` lever off, ``all``,
``default`` the config's, ``cudagraphs``, or one lever alone), printing the engine, ZeRO stage and precision timed,
TFLOP/s and peak memory. The tokenizer's FLOPs are counted with FlopCounterMode on a separate uncompiled stage; the
GPT's are the performance.md formula ``6 N T + 12 L D T^2`` (MFU against ``--peak-tflops``). ``--probe`` tries larger
batches (one step each) for the largest that fits; ``--profile N`` prints the N ops with most device time and how
busy the GPU was.
``precision`` takes one step from the same weights and batch in fp32 (TF32 off) and in bf16 with the levers, and
prints the relative error of the loss, the updated weights and the update.
``extract`` sizes token extraction (issue 5): in one process it times the frozen VFM's own forward on B views
(the ceiling), the extraction encoder exactly as each GPU actor runs it (uint8 ADM squares from host memory -> copy
-> cut the views on the device -> VFM + fusion + quantizer -> uint16 codes back on the host) on the same number of
views, and the CPU side on one core (JPEG decode + the view set's ADM squares, on ImageNet-sized JPEGs), then prints
the encoder's share of the VFM throughput (goal >= 60%) and the decode cores one encoder needs.
``sample`` times ``ideal_ray.sampling.Sampler`` variants (``--variants``: full or bounded KV reads, compiled) for a
batch at a CFG scale; with ``--llamagen-dir`` (a local, git-ignored LlamaGen checkout) it also times LlamaGen's eager
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

from ideal_ray.cli import add_config_args, config_from_args, outcome, refuse  # noqa: E402
from ideal_ray.checkpoint import to_llamagen_state_dict  # noqa: E402


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


# ------------------------------------------------------------------------------------------ the stages' steps
# Every training benchmark builds the stage exactly as a worker does (TokenizerStage / ARStage on the engine of
# dist.engine, at world size 1: NCCL on a GPU, gloo on CPU) and times the loop's own step (train/loop.take_step:
# train_step + EMA). A variant is a set of perf.* levers: "base" has every lever off, a lever's name turns on that
# one alone, "all" turns every lever on, "default" keeps the config's defaults.
_LEVER_OVERRIDES = {
    "frozen_bf16": "perf.frozen_bf16",
    "channels_last": "perf.channels_last",
    "compile": "perf.compile",
    "nan_after": "perf.nan_check",
}
TOKENIZER_LEVERS = ("frozen_bf16", "channels_last", "compile", "nan_after")
AR_LEVERS = ("compile", "nan_after")


def variant_overrides(variant: str, levers) -> list:
    """``perf.*`` overrides of a benchmark variant (see the comment above)."""
    if variant == "default":
        return []
    if variant == "cudagraphs":  # every lever, the compiled regions captured as CUDA graphs
        return variant_overrides("all", levers) + ["perf.compile_mode=reduce-overhead"]
    if variant != "base" and variant != "all" and variant not in levers:
        refuse(f"unknown variant '{variant}'; choose base, all, default, cudagraphs or one of "
               f"{', '.join(levers)}.")
    on = set(levers) if variant == "all" else ({variant} if variant != "base" else set())
    out = []
    for lever in levers:
        key = _LEVER_OVERRIDES[lever]
        if lever == "nan_after":
            out.append(f"{key}={'after_backward' if lever in on else 'before_backward'}")
        else:
            out.append(f"{key}={'true' if lever in on else 'false'}")
    return out


def _free(device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


class _StepTimer:
    """One stage, its EMA and a one-process session; ``step(batch_size)`` takes the loop's next step."""

    def __init__(self, stage, make_batch, device):
        import tempfile

        from ideal_ray.train.ema import EMA
        from ideal_ray.train.sessions import LocalSession

        self.stage, self.make_batch, self.device = stage, make_batch, device
        self.ema = EMA(stage.ema_module(), 0.9999)
        self.session = LocalSession(tempfile.mkdtemp(prefix="ideal-bench-"))
        self.steps = self.skipped = 0

    def step(self, batch_size: int):
        from ideal_ray.train.loop import take_step

        self.steps += 1
        result = take_step(self.stage, self.ema, self.make_batch(self.steps, batch_size), self.steps, self.session)
        self.skipped += int(result.skipped)
        return result

    def flops(self, batch_size: int) -> float:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc:
            self.step(batch_size)
        return float(fc.get_total_flops())

    def probe(self, sizes) -> list:
        """(batch, peak GiB or 'OOM') for one step at each size, largest last; stops at the first that does not fit."""
        out = []
        for b in sizes:
            _free(self.device)
            try:
                self.step(b)
                _sync(self.device)
                out.append((b, torch.cuda.max_memory_allocated(self.device) / 2**30))
            except torch.OutOfMemoryError:
                out.append((b, "OOM"))
                break
        _free(self.device)
        return out


def _tokenizer_batches(size: int, seed: int = 0):
    """make_batch(step, batch) for the tokenizer: the pipeline's columns, random uint8 images (on the host, as
    Ray Data hands them over), two image sets per batch size taken in turn."""
    cache = {}

    def make(step: int, b: int):
        if b not in cache:
            g = torch.Generator().manual_seed(seed + b)
            cache[b] = [torch.randint(0, 256, (b, size, size, 3), dtype=torch.uint8, generator=g) for _ in range(2)]
        return {"image": cache[b][step % 2], "label": torch.zeros(b, dtype=torch.long),
                "step": torch.full((b,), step - 1, dtype=torch.long), "position": torch.arange(b)}

    return make


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _run_variants(args, levers, build, make_batch, per_sample_flops, unit: str):
    """Time every variant of ``args.variants``; returns the table rows and the probe of args.probe.

    ``per_sample_flops(device)`` counts a step's FLOPs per sample (its own uncompiled stage at a small batch, or a
    formula): never through a compiled variant, whose first step would then run under FlopCounterMode (a dispatch
    mode dynamo does not compile under; on torch 2.11 the regions then stayed eager for the whole run)."""
    from ideal_ray.train.sessions import init_local_process_group

    device = _device(args.device)
    init_local_process_group(device)
    flops_per_sample = per_sample_flops(device)
    rows, probe = [], []
    for variant in args.variants.split(","):
        _free(device)
        try:
            graphs_before = _compiled_graphs()
            stage, cfg = build(variant_overrides(variant, levers), device)
            timer = _StepTimer(stage, make_batch, device)
            med = _median_seconds(lambda i: timer.step(args.batch), device, args.warmup, args.steps)
            mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
            rate = args.batch / med
            applied = list(stage.levers)
            if "compile" in applied:  # say how many graphs dynamo made: 0 means the regions ran eagerly
                graphs = _compiled_graphs() - graphs_before
                applied[applied.index("compile")] = f"compile ({graphs} graphs)" if graphs else "compile (NOT APPLIED)"
            rows.append((variant, "+".join(applied) or "-", cfg.dist.engine, cfg.dist.zero_stage,
                         cfg.optim.precision if device.type == "cuda" else "fp32", med, rate,
                         rate * flops_per_sample / 1e12, mem, timer.skipped))
            if args.probe and not probe and "compile" not in stage.levers and device.type == "cuda":
                probe = timer.probe([int(b) for b in args.probe.split(",")])
            if args.profile and variant == args.variants.split(",")[-1]:
                _profile(lambda: timer.step(args.batch), device, args.profile)
            del stage, timer
        except Exception as e:  # one failing variant must not cost the others (one GPU run per session)
            import traceback

            traceback.print_exc()
            rows.append((variant, f"FAILED: {type(e).__name__}: {str(e)[:120]}",) + ("",) * 7 + (0,))
    _free(device)
    return rows, probe, flops_per_sample, device


def _print_rows(title: str, rows, unit: str, device, steps: int, extra_cols=None) -> None:
    print(title)
    head = (f"| variant | levers | engine | ZeRO | precision | step s (median of {steps}) | {unit} | TFLOP/s |"
            + (" MFU % |" if extra_cols else "") + " peak GiB | skipped |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        if not isinstance(r[5], float):
            print(f"| {r[0]} | {r[1]} |" + " |" * (head.count("|") - 3))
            continue
        mfu = f" {100 * r[7] / extra_cols:.3g} |" if extra_cols else ""
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]:.4f} | {r[6]:.4g} | {r[7]:.4g} |{mfu} "
              f"{r[8]:.1f} | {r[9]} |")


def _stage_builder(base, validate_fn, make_stage):
    """build(overrides, device) -> (stage, cfg): ``base`` with a variant's overrides, validated, as a worker builds it."""
    from ideal_ray.config import ConfigError, apply_overrides

    def build(overrides, device):
        try:
            cfg = apply_overrides(base, overrides)
            validate_fn(cfg)
        except ConfigError as e:
            refuse(f"config error: {e}")
        return make_stage(cfg, device), cfg

    return build


def cmd_tokenizer(args) -> None:
    from ideal_ray.config import validate
    from ideal_ray.train.tokenizer_stage import TokenizerStage

    # one rank of a run with the given per-GPU batch; discriminator and adversarial terms on from the first step
    args.overrides = [f"data.global_batch={args.batch}", "dist.num_workers=1", "loss.disc_start=0", *args.overrides]
    base = config_from_args(args)
    size = base.model.image_size

    build = _stage_builder(base, validate, lambda cfg, device: TokenizerStage(
        cfg, device, 0, 1, steps_per_epoch=10**6, load_weights=False))

    def flops_per_image(device, b: int = 2) -> float:  # a plain (base) stage at batch 2: FLOPs are linear in it
        stage, _ = build(variant_overrides("base", TOKENIZER_LEVERS), device)
        flops = _StepTimer(stage, _tokenizer_batches(size), device).flops(b) / b
        del stage
        _free(device)
        return flops

    rows, probe, flops, device = _run_variants(args, TOKENIZER_LEVERS, build, _tokenizer_batches(size),
                                               flops_per_image, "img/s")
    _print_rows(f"tokenizer step (TokenizerStage.train_step + EMA), preset {base.preset}, {_device_name(device)}, "
                f"per-GPU batch {args.batch}, {flops / 1e12:.3f} TFLOP/img (G + D, FlopCounterMode)",
                rows, "img/s", device, args.steps)
    if probe:
        print("largest batch: " + ", ".join(f"{b}: {m if isinstance(m, str) else f'{m:.1f} GiB'}" for b, m in probe))


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
    _sync(device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(2):
            fn()
        _sync(device)
    wall = (time.perf_counter() - t0) / 2
    events = prof.key_averages()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(events.table(sort_by=key, row_limit=rows, max_name_column_width=60))
    if device.type == "cuda":  # kernels' own time against the wall clock: how much of a step the GPU is busy
        from torch.autograd import DeviceType

        kernels = [e for e in events if e.device_type == DeviceType.CUDA]  # device-side rows only (ops would count twice)
        busy = sum(e.self_device_time_total for e in kernels) / 2 / 1e3  # ms per step
        print(f"profile: {1e3 * wall:.1f} ms per step (profiled), device kernels {busy:.1f} ms "
              f"({100 * busy / max(1e3 * wall, 1e-9):.0f}% busy)")


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


def _ar_batches(vocab: int, n: int, classes: int, seed: int = 0):
    cache = {}

    def make(step: int, b: int):
        if b not in cache:
            g = torch.Generator().manual_seed(seed + b)
            cache[b] = [(torch.randint(0, vocab, (b, n), generator=g), torch.randint(0, classes, (b,), generator=g))
                        for _ in range(2)]
        tokens, labels = cache[b][step % 2]
        return {"tokens": tokens, "label": labels, "step": torch.full((b,), step - 1, dtype=torch.long)}

    return make


def cmd_ar_train(args) -> None:
    from ideal_ray.config import ConfigError, apply_overrides, ar_preset, validate_ar
    from ideal_ray.train.ar_stage import ARStage

    base = ar_preset(args.preset)
    base.model = _gpt_cfg(args)
    base.data.global_batch, base.dist.num_workers = args.batch, 1
    base.dist.use_gpu = _device(args.device).type == "cuda"
    try:
        base = apply_overrides(base, args.overrides)
    except ConfigError as e:
        refuse(f"config error: {e}")
    n = base.model.num_tokens

    build = _stage_builder(base, validate_ar, lambda cfg, device: ARStage(cfg, device, 0, 1, steps_per_epoch=10**6))

    m = base.model
    n_params = sum(p.numel() for p in _meta_gpt(m).parameters())
    per_seq = ar_train_flops_per_seq(n_params, m.n_layer, m.dim, n)
    rows, probe, _, device = _run_variants(args, AR_LEVERS, build, _ar_batches(m.vocab_size, n, m.num_classes),
                                           lambda device: per_seq, "seq/s")
    print(f"FLOPs/seq = 6 x N_params x T + 12 x layers x width x T^2 = {per_seq / 1e12:.4g} TFLOP "
          f"(N_params {n_params:,}, T {n}); MFU against {args.peak_tflops:g} TFLOP/s")
    _print_rows(f"GPT-{m.size} step (ARStage.train_step + EMA), {_device_name(device)}, per-GPU batch {args.batch}",
                rows, "seq/s", device, args.steps, extra_cols=args.peak_tflops)
    if probe:
        print("largest batch: " + ", ".join(f"{b}: {m if isinstance(m, str) else f'{m:.1f} GiB'}" for b, m in probe))


def _meta_gpt(cfg):
    from ideal_ray.models.gpt import GPT

    with torch.device("meta"):
        return GPT(cfg)


# Dropout draws its masks per kernel, and the kernels differ between fp32 and bf16 tensors (and between eager and
# inductor code), so the precision check turns activation dropout off: what remains differs by rounding alone.
NO_DROPOUT_TOKENIZER = ("model.fusion.dropout=0", "model.feature_decoder.dropout=0")
NO_DROPOUT_AR = ("model.token_dropout=0", "model.resid_dropout=0", "model.ffn_dropout=0")


def cmd_precision(args) -> None:
    """One step of the stage from the same initial weights and batch, once in fp32 (TF32 off: the reference) and
    once in bf16 autocast with the levers of ``--variant``; prints the relative error of the loss, of the updated
    weights and of the update itself, and whether anything is non-finite. Activation dropout is off in both."""
    from ideal_ray.config import ConfigError, apply_overrides, ar_preset, load_config
    from ideal_ray.train.sessions import init_local_process_group

    device = _device(args.device)
    init_local_process_group(device)
    if args.stage == "tokenizer":
        from ideal_ray.train.tokenizer_stage import TokenizerStage

        def build(precision):
            over = [f"optim.precision={precision}", "dist.num_workers=1", "loss.disc_start=0",
                    f"data.global_batch={args.batch}", *variant_overrides(args.variant, TOKENIZER_LEVERS),
                    *NO_DROPOUT_TOKENIZER]
            try:
                cfg = load_config(args.preset, over)
            except ConfigError as e:
                refuse(f"config error: {e}")
            return TokenizerStage(cfg, device, 0, 1, steps_per_epoch=10**6, load_weights=False)

        make_batch, loss_key = _tokenizer_batches(load_config(args.preset).model.image_size), "g_loss"
    else:
        from ideal_ray.config import gpt_config
        from ideal_ray.train.ar_stage import ARStage

        def build(precision):
            cfg = ar_preset(args.preset if args.preset in ("B", "L", "XXL", "3B", "tiny") else "B")
            cfg.model = gpt_config(cfg.model.size)
            cfg.data.global_batch, cfg.dist.num_workers = args.batch, 1
            cfg = apply_overrides(cfg, [f"optim.precision={precision}",
                                        *variant_overrides(args.variant, AR_LEVERS), *NO_DROPOUT_AR])
            return ARStage(cfg, device, 0, 1, steps_per_epoch=10**6)

        m = gpt_config(args.preset if args.preset in ("B", "L", "XXL", "3B", "tiny") else "B")
        make_batch, loss_key = _ar_batches(m.vocab_size, m.num_tokens, m.num_classes), "loss"

    def trainable(stage):
        return {n: p.detach().float().cpu().clone() for n, p in stage.ema_module().named_parameters()
                if p.requires_grad}

    runs = {}
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    for precision in ("fp32", "bf16"):
        _free(device)
        if precision == "fp32":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        stage = build(precision)
        timer = _StepTimer(stage, make_batch, device)
        before = trainable(stage)
        result = timer.step(args.batch)
        runs[precision] = (before, trainable(stage), float(result.metrics[loss_key]), stage.levers, result.skipped)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        del stage, timer

    (w0_f, w1_f, loss_f, _, skip_f), (w0_b, w1_b, loss_b, lev_b, skip_b) = runs["fp32"], runs["bf16"]

    def norm(tensors):
        return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors)))

    same_init = all(torch.equal(w0_f[k], w0_b[k]) for k in w0_f)
    w_err = norm([w1_b[k] - w1_f[k] for k in w1_f]) / max(norm(w1_f.values()), 1e-30)
    d_err = norm([(w1_b[k] - w0_b[k]) - (w1_f[k] - w0_f[k]) for k in w1_f]) / max(
        norm([w1_f[k] - w0_f[k] for k in w1_f]), 1e-30)
    finite = all(bool(torch.isfinite(t).all()) for t in list(w1_b.values()) + list(w1_f.values()))
    finite = finite and all(map(lambda v: v == v and abs(v) != float("inf"), (loss_b, loss_f)))
    loss_err = abs(loss_b - loss_f) / max(abs(loss_f), 1e-30)
    ok = finite and same_init and not skip_f and not skip_b and loss_err < 2e-2 and w_err < 1e-2
    print(f"precision check, {args.stage} {args.preset}, batch {args.batch}, {_device_name(device)}; bf16 levers: "
          f"{'+'.join(lev_b) or '-'}")
    print("| stage | loss fp32 | loss bf16 | loss rel err | weights rel err | update rel err | same init | finite | "
          "verdict |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.stage} {args.preset} | {loss_f:.6g} | {loss_b:.6g} | {loss_err:.2e} | {w_err:.2e} | {d_err:.2e} | "
          f"{same_init} | {finite} | {'PASS' if ok else 'FAIL'} (loss < 2e-2, weights < 1e-2) |")


def _llamagen_model(llamagen_dir: str, cfg, state, device, dtype):
    """LlamaGen's c2i Transformer with the same sizes, loaded with our weights."""
    root = os.path.abspath(llamagen_dir)
    if not os.path.isfile(os.path.join(root, "autoregressive", "models", "gpt.py")):
        refuse(f"--llamagen-dir {llamagen_dir} is not a LlamaGen checkout (no autoregressive/models/gpt.py);"
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
        refuse(f"LlamaGen's Transformer does not match our GPT: missing {missing[:3]}, "
               f"unexpected {unexpected[:3]}.")
    return theirs.to(device=device, dtype=dtype).eval(), generate


# sample --variants: which ideal_ray rows to time (each one Sampler, built, first-called and timed on its own)
SAMPLE_VARIANTS = {
    "full": ("full KV (old path)", dict(kv_bound=False)),
    "bounded": ("bounded KV", dict(kv_bound=True)),
    "compiled": ("compiled + bounded KV", dict(kv_bound=True, compile=True)),
    "compiled-full": ("compiled + full KV", dict(kv_bound=False, compile=True)),
    "compiled-static": ("compiled + bounded KV, one static compile per bucket",
                        dict(kv_bound=True, compile=True, compile_dynamic=False)),
}


def cmd_sample(args) -> None:
    import traceback

    device = _device(args.device)
    if args.variants == "auto":  # compiling on a CPU takes minutes: opt-in there
        chosen = ["full", "bounded", "compiled"] if device.type == "cuda" else ["full", "bounded"]
    else:
        chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.compile == "on" and "compiled" not in chosen:  # the older flag, kept working
        chosen.append("compiled")
    elif args.compile == "off":
        chosen = [v for v in chosen if not v.startswith("compiled")]
    unknown = sorted(set(chosen) - set(SAMPLE_VARIANTS))
    if unknown or not chosen:
        refuse(f"--variants {args.variants}: unknown {unknown}; choose from {sorted(SAMPLE_VARIANTS)} or auto.")

    def run() -> None:
        """Build the model once, time each chosen variant, then LlamaGen; print the table."""
        from ideal_ray.config import SampleConfig
        from ideal_ray.models.gpt import GPT
        from ideal_ray.sampling import Sampler

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
        seeds = list(range(b))

        def peak():
            return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")

        rows, tokens, kv_lengths, failed = [], {}, {}, []  # rows: (name, batch s, peak GiB, first call s, same)
        repeat_notes = []
        for v in chosen:
            label, kw = SAMPLE_VARIANTS[v]
            _free(device)
            try:  # one failing variant (e.g. a compile error on some torch version) must not cost the other rows
                t_first = time.perf_counter()
                sampler = Sampler(model, b, sc, kv_buckets=args.kv_buckets, **kw)
                tokens[v] = sampler(labels, seeds)  # first call: build, compile, graph capture -- never timed below
                _sync(device)
                t_first = time.perf_counter() - t_first
                calls = []  # every later call's tokens: which calls agree tells a first-call effect from drift
                t = _median_seconds(lambda i: calls.append(sampler(labels, seeds)), device, args.warmup, args.iters)
            except Exception as exc:  # noqa: BLE001 -- reported in the table, then the next variant runs
                traceback.print_exc()
                failed.append(f"{v}: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
                tokens.pop(v, None)
                continue
            # the same seeds give the same tokens: first call vs later ones, and the later ones among themselves
            same = all(torch.equal(c, tokens[v]) for c in calls)
            if not same:
                later = all(torch.equal(c, calls[0]) for c in calls[1:])
                first = (calls[0] == tokens[v]).float().mean().item() if calls else float("nan")
                repeat_notes.append(f"{v}: first call vs second: {100 * first:.2f}% of tokens equal; later calls "
                                    f"{'equal to each other' if later else 'differ among themselves too'}")
            graph = " + CUDA graphs" if sampler.use_graph else ""
            rows.append((f"ideal_ray Sampler, {label}{graph}", t, peak(), t_first, same))
            kv_lengths[v] = sampler.kv_lengths
            del sampler
        done = [v for v in chosen if v in tokens]
        n_ours = len(rows)
        agree_with = {}  # fraction of tokens equal to the first variant's (same seeds; bf16 fusion may flip near-ties)
        for v in done[1:]:
            agree_with[v] = (tokens[v] == tokens[done[0]]).float().mean().item()

        t_theirs = agree = None
        if args.llamagen_dir:
            _free(device)
            theirs, generate = _llamagen_model(args.llamagen_dir, cfg, state, device, dtype)
            kw = dict(cfg_scale=args.cfg_scale, cfg_interval=-1, temperature=args.temperature, top_k=args.top_k,
                      top_p=args.top_p, sample_logits=True)
            t_theirs = _median_seconds(lambda i: generate(theirs, labels, n, **kw), device, args.warmup, args.iters)
            rows.append(("LlamaGen generate (eager)", t_theirs, peak(), float("nan"), True))
            # same weights, same model: greedy decoding with the same CFG must give (nearly) the same tokens
            greedy = dataclasses.replace(sc, temperature=0.0, top_k=0, top_p=1.0)
            mine = Sampler(model, b, greedy, compile=False, cuda_graph=False)(labels, seeds)  # (B, N)
            kw.update(top_k=0, top_p=1.0, sample_logits=False)
            other = generate(theirs, labels, n, **kw).long()  # (B, N)
            agree = (mine == other).float().mean().item()

        rows_kv = 2 * b if args.cfg_scale != 1.0 else b
        per_slot = cfg.n_layer * 2 * rows_kv * cfg.dim * (2 if dtype == torch.bfloat16 else 4)  # K + V bytes per slot
        print(f"GPT-{cfg.size} ({model.num_params():,} params, {n} tokens/image), batch {b}, CFG {args.cfg_scale} "
              f"({'doubled batch' if args.cfg_scale != 1.0 else 'no guidance'}), {str(dtype).replace('torch.', '')}, "
              f"{_device_name(device)}, kv buckets {args.kv_buckets}")
        for v in done:
            ends = kv_lengths[v]
            need = [next(e for e in ends if e >= cfg.cls_token_num + p) for p in range(1, n)]
            print(f"  {v}: attention lengths {ends}; KV read per decode step {per_slot * max(ends) / 1e9:.3g} GB max, "
                  f"{per_slot * statistics.mean(need) / 1e9:.3g} GB mean")
        print(f"| sampler | batch s (median of {args.iters}) | tokens/s | images/s (= tokens/s / {n}) | peak GiB | "
              f"first call s (build + compile + capture) | x LlamaGen eager |")
        print("|---|---|---|---|---|---|---|")
        for name, t, m, first, same in rows:
            ratio = f"{t_theirs / t:.2f}" if t_theirs else "-"
            note = "" if same else " (tokens changed between calls!)"
            print(f"| {name}{note} | {t:.4f} | {b * n / t:.4g} | {b * n / t / n:.4g} | {m:.2f} | {first:.2f} | "
                  f"{ratio} |")
        for v, frac in agree_with.items():
            print(f"same seeds: {v} tokens equal to {done[0]}'s for {100 * frac:.2f}% of positions")
        for line in repeat_notes:
            print(f"repeat check: {line}")
        for line in failed:
            print(f"FAILED variant {line}")
        if t_theirs is not None:
            print(f"same weights check: greedy tokens equal to LlamaGen's for {100 * agree:.1f}% of positions")
        if t_theirs is not None and n_ours:
            best = min(rows[:n_ours], key=lambda r: r[1])
            print(f"speedup over LlamaGen eager generate: {t_theirs / best[1]:.2f}x ({best[0]})")

    threads = torch.get_num_threads()
    if device.type == "cpu" and args.threads > 0:  # small CPU models gain nothing from threads on a shared box
        torch.set_num_threads(args.threads)
    try:
        run()
    finally:
        torch.set_num_threads(threads)


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

    from ideal_ray.data import crops, reader
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
    decoded = [reader.decode_bytes(b) for b in jpegs]
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
    args = build_parser().parse_args(argv)
    with outcome("a benchmark keeps nothing; run it again"):
        args.fn(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("params", help="parameter counts per module (meta device)")
    add_config_args(p, default_preset="paper")
    p.add_argument("--discriminator", action="store_true", help="also count the discriminator (after the tokenizer)")
    p.set_defaults(fn=cmd_params)
    t = sub.add_parser("tokenizer", help="time the tokenizer stage's step (G + D + EMA) per lever variant")
    add_config_args(t, default_preset="tiny")
    _add_step_args(t, TOKENIZER_LEVERS, default_batch=8)
    t.set_defaults(fn=cmd_tokenizer)
    presets = ["B", "L", "XXL", "3B", "tiny"]
    a = sub.add_parser("ar-train", help="time the AR stage's step (fwd + bwd + AdamW + EMA): seq/s, MFU")
    a.add_argument("--preset", default="tiny", choices=presets)
    a.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="AR config overrides, e.g. dist.zero_stage=0")
    _add_step_args(a, AR_LEVERS, default_batch=8)
    a.add_argument("--peak-tflops", type=float, default=790.0, help="MFU denominator (790 = measured H200 bf16)")
    a.add_argument("--vocab", type=int, default=0, help="override the preset's vocab size")
    a.add_argument("--grid", type=int, default=0, help="override the preset's token grid")
    a.set_defaults(fn=cmd_ar_train)
    c = sub.add_parser("precision", help="one step in bf16 (every lever) vs fp32 (TF32 off): loss and weights")
    c.add_argument("stage", choices=["tokenizer", "ar"])
    c.add_argument("--preset", default="tiny", help="tokenizer preset, or GPT size for ar (B, L, ..., tiny)")
    c.add_argument("--batch", type=int, default=4)
    c.add_argument("--variant", default="default", help="the bf16 run's levers (base, all, default or one lever)")
    c.add_argument("--device", default=None)
    c.set_defaults(fn=cmd_precision)
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
    s.add_argument("--variants", default="auto",
                   help="comma-separated ideal_ray rows: full (eager, whole KV cache: the old path), bounded (eager, "
                        "KV read bounded by position), compiled (inductor + bounded), compiled-full, compiled-static "
                        "(one static compile per bucket); auto: full,bounded,compiled on CUDA, full,bounded on CPU. "
                        "CUDA graphs on CUDA for every row")
    s.add_argument("--kv-buckets", type=int, default=8, help="position buckets of the bounded rows (one graph each)")
    s.add_argument("--threads", type=int, default=1, help="CPU only: intra-op threads (0: torch's default)")
    s.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="older switch: on adds the compiled row, off drops every compiled row")
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
    return parser


def _add_step_args(p, levers, default_batch: int) -> None:
    p.add_argument("--batch", type=int, default=default_batch, help="per-GPU batch")
    p.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variants", default="default",
                   help=f"comma-separated lever variants: base (every lever off), all, default (the config's), "
                        f"cudagraphs (all, compiled regions as CUDA graphs), or one lever alone: {', '.join(levers)}")
    p.add_argument("--probe", default="", help="comma-separated larger batches: one step each, peak memory, "
                                                "stops at the first that does not fit (first uncompiled variant)")
    p.add_argument("--profile", type=int, default=0, help="print the N ops with most device time (last variant)")
    p.add_argument("--device", default=None)


def crops_view_sets():
    from ideal_ray.data.crops import VIEW_SETS

    return VIEW_SETS


if __name__ == "__main__":
    main()
