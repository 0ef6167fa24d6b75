"""Class-conditional sampling from a :class:`~ideal_ray.models.gpt.GPT` (spec section 7).

Why it is shaped this way:

- **Classifier-free guidance by a doubled batch.** Rows ``[0, B)`` carry the requested classes, rows ``[B, 2B)``
  the null class; the guided logits are ``u + s (c - u)``. Guidance applies to token ``t`` only when
  ``start <= t / N < end`` (``cfg_interval``); outside it the conditional logits are used, but both halves
  keep running so the unconditional cache stays complete. A scale of exactly 1 skips the doubled batch.
- **Per-sample seeds, no global RNG.** Token ``t`` of a row is drawn by an exponential race,
  ``argmax_v (logit_v - log E_v)`` with ``E_v ~ Exp(1)``, which picks ``v`` with probability ``softmax(logit)_v``.
  The ``E_v`` come from a counter-based hash of ``(seed, t, v)`` computed with integer tensor ops: the same on
  CPU and GPU, no generator state, no host sync, and a row's noise never depends on which other rows share its
  batch -- so a ``(class, seed)`` pair always gives the same tokens (up to floating-point differences between
  kernels for different batch sizes, which only matter at near-ties).
- **Static everything.** One :class:`~ideal_ray.models.gpt.KVCache` (one buffer per layer for keys and one for
  values) is allocated per :class:`Sampler`; the decode step reads and writes fixed buffers (input token,
  position, output tokens) and advances the position on the device, so the host loop only launches work.

The levers, and what is measured (GPT-B = dim 768, 12 layers, vocab 16384, 576 tokens; batch 64 at CFG 1.75 is
128 rows; ``jobs/bench.py sample`` prints every one of them as a row next to LlamaGen's eager ``generate``):

- **KV reads bounded by the position** (``kv_bound``, default on). A decode step reads all weights (0.22 GB in
  bf16) plus the keys/values it attends over; the whole preallocated cache is 12 x 2 x 128 x 768 x 577 x 2 bytes
  = 1.36 GB, of which on average only half holds valid slots. The positions are cut into ``kv_buckets`` (8)
  buckets; a step in bucket k attends over slots ``[0, end_k)`` only (still under the position mask), so the
  mean read is (1 + 1/8) / 2 = 56% of the cache. Shapes stay static per bucket: one CUDA graph per bucket, the
  graphs sharing one memory pool. Same tokens as the full-cache path (tested on CPU in fp32).
- **CUDA graphs** (default on CUDA): each decode step is one graph replay, no launch overhead.
- **Fewer kernels in the eager step**, each bit for bit the old math (LlamaGen's fp32 RoPE included): q and k
  rotated together in 4-6 kernels instead of 14-18 (:func:`~ideal_ray.models.gpt.apply_rope_pairs`), the
  attention mask built once per step as an additive mask instead of converted from bool inside every layer's
  SDPA, the noise hash over (B, vocab) in int32 instead of int64 (about half the kernels and bytes), no guidance
  switch or temperature division where they are no-ops. Counted with a dispatch mode on one step of a 12-layer
  model: 680 -> 495 aten ops per step in bf16 (581 -> 419 in fp32). Not yet timed on a GPU.
- **torch.compile** of the step (``compile=True``, off by default until a GPU run shows it faster). The 18x
  slowdown measured before (H200, torch 2.11: eager step in a graph 1.41 s per batch, 4.2x LlamaGen's 5.88 s;
  inductor step in a graph 26.3 s) came from the cache layout, not from inductor: every layer's write into a
  view of one (layers, 2, ...) buffer was functionalized into copies of whole layers and, per layer, of the
  whole cache (docs/perf-notes/sampling.md has the generated code). With one buffer per layer the write is an
  ``index_put_`` that inductor re-inplaces, and the generated code copies no cache (tested on CPU). ``kv_len``
  is traced as a dynamic size, so one compile serves every bucket. Whether compiled + bounded beats eager +
  bounded on an H200, and by how much over LlamaGen, is not measured yet.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ideal_ray.config import SampleConfig, validate_sample
from ideal_ray.models.gpt import GPT, KVCache

__all__ = ["Sampler", "sample", "validate_sample_config", "decode_to_uint8", "exponential_noise"]

Seeds = Union[torch.Tensor, Sequence[int]]

_M32 = 0xFFFFFFFF


def validate_sample_config(cfg: SampleConfig) -> None:
    """Raise :class:`~ideal_ray.config.ConfigError` (a ValueError) with one actionable sentence for sampling
    settings that make no sense (:func:`ideal_ray.config.validate_sample`, which needs no torch)."""
    validate_sample(cfg)


# ------------------------------------------------------------------------------------------ counter-based noise
def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32) held in int64, split in 16-bit halves so nothing overflows int64."""
    lo = x * (c & 0xFFFF)  # < 2^48
    hi = ((x * (c >> 16)) & 0xFFFF) << 16  # < 2^32
    return (lo + hi) & _M32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (Wellons' "lowbias32"): a bijection with strong avalanche, on int64 holding u32."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _row_keys(seeds: torch.Tensor) -> torch.Tensor:
    """seeds (B,) int64 >= 0 -> 32-bit keys (B,) int64 that depend on all 64 bits of each seed."""
    lo, hi = seeds & _M32, (seeds >> 32) & _M32
    return _hash32(_hash32(lo ^ 0x9E3779B9) ^ hi)


def _vocab_keys(vocab_size: int, device) -> torch.Tensor:
    return _hash32(torch.arange(vocab_size, dtype=torch.int64, device=device) ^ 0x85EBCA6B)  # (V,)


def _to_i32(x: torch.Tensor) -> torch.Tensor:
    """u32 values held in int64 -> the same 32 bits in int32 (two's complement: the conversion wraps)."""
    return x.to(torch.int32)


_C1_I32 = 0x7FEB352D  # _hash32's multipliers as int32 two's-complement constants
_C2_I32 = 0x846CA68B - 2**32


def _hash32_i32(x: torch.Tensor) -> torch.Tensor:
    """:func:`_hash32` on int32 tensors holding the u32 bits: the same 32 bits out, in about half the kernels and
    bytes of the int64 version. int32 products wrap modulo 2^32, which keeps exactly the low 32 bits the hash
    needs; right shifts are arithmetic on int32, so each is masked back to a logical shift."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _C1_I32
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _C2_I32
    return x ^ ((x >> 16) & 0xFFFF)


def _noise_from_keys(row_keys: torch.Tensor, pos: torch.Tensor, vocab_keys: torch.Tensor) -> torch.Tensor:
    """Exp(1) variates (B, V) float32 for token position ``pos`` (0-dim int64), from the row keys (B,) and vocab
    keys (V,) (either int64 holding u32 values, or int32 holding the same bits)."""
    step = _hash32(row_keys ^ _hash32((pos + 0x27D4EB2F) & _M32))  # (B,) int64
    vk = vocab_keys if vocab_keys.dtype == torch.int32 else _to_i32(vocab_keys)
    bits = _hash32_i32(_to_i32(step)[:, None] ^ vk[None, :])  # (B, V) uniform u32 bits, as int32
    u = (bits.long() & _M32).float().add_(0.5).mul_(2.0 ** -32)  # (B, V) in (0, 1]; fine near 0, where E ~ u
    return torch.log1p(u.neg_()).neg_()  # (B, V) Exp(1); u rounding to 1 gives +inf, i.e. that token cannot win


def exponential_noise(seeds: Seeds, pos: int, vocab_size: int, device=None) -> torch.Tensor:
    """The Exp(1) noise (B, V) the sampler uses for token ``pos`` of rows with these seeds (for tests/analysis)."""
    s = _seeds_tensor(seeds, len(seeds), device)
    return _noise_from_keys(_row_keys(s), torch.tensor(pos, device=s.device), _vocab_keys(vocab_size, s.device))


def _seeds_tensor(seeds: Seeds, batch: int, device) -> torch.Tensor:
    s = torch.as_tensor(seeds, dtype=torch.int64)
    if s.shape != (batch,):
        raise ValueError(f"Expected one seed per sample, shape ({batch},), got {tuple(s.shape)}.")
    if s.device.type == "cpu" and bool((s < 0).any()):  # checked only where it costs no device sync
        raise ValueError("Seeds must be non-negative integers (below 2^63).")
    return s.to(device)


# ------------------------------------------------------------------------------------------ the sampler
def _kv_bucket_ends(decode_length: int, first_slot: int, num_buckets: int, align: int = 8) -> List[int]:
    """Attention lengths for the decode steps: sorted bucket ends (each a multiple of ``align`` or the maximum).

    Decode step ``pos`` reads slots ``[0, first_slot + pos - 1]``, at most ``decode_length`` of them. The slots
    are cut into ``num_buckets`` about equal ranges; the step uses the smallest end that covers its slot. Ends are
    rounded up to a multiple of ``align`` (SDPA's memory-efficient CUDA kernel pads an unaligned mask in every
    call). On average the steps then read about (1 + 1/num_buckets) / 2 of the slots instead of all of them.
    """
    if num_buckets < 1:
        raise ValueError(f"kv_buckets is {num_buckets}; use at least 1 (1 = every step reads all slots it may need).")
    ends = set()
    for k in range(1, num_buckets + 1):
        end = -(-k * decode_length // num_buckets)  # ceil
        end = -(-end // align) * align
        ends.add(max(first_slot + 1, min(end, decode_length)))
    return sorted(ends)


class Sampler:
    """Samples batches of up to ``batch_size`` images with one preallocated cache (and captured graphs).

    ``sampler(labels, seeds) -> tokens (B, N) long`` for B <= batch_size; smaller batches are padded internally.
    Build one per (model, batch size, settings) and call it for every batch of a run.

    kv_bound:   bound each decode step's attention by its position (default on): the steps are split into
                ``kv_buckets`` position buckets and a step in bucket k reads cache slots [0, end_k) only. Off, every
                step reads the whole cache (the old path, kept for comparison). Tokens are the same either way.
    kv_buckets: number of position buckets (default 8; one CUDA graph each).
    compile:    torch.compile the decode step with ``compile_backend``, ``fullgraph=True`` (default: off; see the
                module notes). The bucket's attention length is traced as a dynamic size, so one compile serves
                every bucket; ``compile_dynamic=False`` compiles each bucket with static shapes instead (one compile
                per bucket: slower to build, possibly tighter code).
    cuda_graph: capture the decode step as CUDA graphs, one per bucket, sharing one memory pool (default: on for
                CUDA; ignored on CPU).
    cache_dtype: the KV cache dtype (default: the model's parameter dtype).
    """

    def __init__(self, model: GPT, batch_size: int, sample_cfg: SampleConfig, *, compile: Optional[bool] = None,
                 cuda_graph: Optional[bool] = None, cache_dtype: Optional[torch.dtype] = None,
                 compile_backend: str = "inductor", kv_bound: bool = True, kv_buckets: int = 8,
                 compile_dynamic: Optional[bool] = None):
        validate_sample_config(sample_cfg)
        if model.training:
            raise RuntimeError("Sampling runs the model's inference path; call model.eval() first.")
        if batch_size < 1:
            raise ValueError(f"Sampler batch_size is {batch_size}; it must be at least 1.")
        self.model = model
        self.cfg = sample_cfg
        self.batch_size = batch_size
        w = model.tok_embed.weight
        self.device = w.device
        on_cuda = self.device.type == "cuda"
        self.use_compile = False if compile is None else bool(compile)
        self.use_graph = on_cuda and (True if cuda_graph is None else bool(cuda_graph))
        self.guided = sample_cfg.cfg_scale != 1.0
        self.num_tokens = model.num_tokens
        self.vocab_size = model.cfg.vocab_size
        rows = 2 * batch_size if self.guided else batch_size
        dev = self.device

        self.cache: KVCache = model.new_cache(rows, dtype=cache_dtype or w.dtype, device=dev)
        # attention length per decode step: bucket ends, and which one each position pos in [1, N) uses
        first = model.cfg.cls_token_num
        self.kv_bound = bool(kv_bound)
        self.kv_lengths = (_kv_bucket_ends(self.cache.decode_length, first, kv_buckets) if self.kv_bound
                           else [self.cache.length])
        self._kv_len_of = [None] + [next(e for e in self.kv_lengths if e >= first + p)
                                    for p in range(1, self.num_tokens)]
        # static buffers the decode step reads and writes in place
        self.tok_in = torch.zeros(rows, dtype=torch.long, device=dev)  # (R,) token pos - 1 of every row
        self.pos = torch.ones((), dtype=torch.long, device=dev)  # the token being predicted
        self.tokens = torch.zeros(batch_size, self.num_tokens, dtype=torch.long, device=dev)  # (B, N)
        self.row_keys = torch.zeros(batch_size, dtype=torch.long, device=dev)  # (B,)
        self.vocab_keys = _to_i32(_vocab_keys(self.vocab_size, dev))  # (V,) int32 bits
        self.null_labels = torch.full((batch_size,), model.null_class, dtype=torch.long, device=dev)
        start, end = sample_cfg.cfg_interval
        frac = torch.arange(self.num_tokens, dtype=torch.float64) / self.num_tokens
        use_cfg = (frac >= start) & (frac < end)  # (N,) bool: guidance on for token t
        self._cfg_everywhere = bool(use_cfg.all())  # then no per-token switch is needed in the step
        self.use_cfg = use_cfg.to(dev)

        self._step = self._decode_step
        self._compile_dynamic = compile_dynamic
        if self.use_compile:
            self._step = torch.compile(self._decode_step, fullgraph=True, dynamic=compile_dynamic,
                                       backend=compile_backend)
        self._graphs: Dict[int, "torch.cuda.CUDAGraph"] = {}

    # ------------------------------------------------------------------------------------- pieces
    def _pick(self, logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """logits (R, V) float32 for token ``pos`` -> chosen tokens (B,) long; no host sync."""
        b, sc = self.batch_size, self.cfg
        if self.guided:
            cond, uncond = logits[:b], logits[b:]  # (B, V) each
            guided = uncond + sc.cfg_scale * (cond - uncond)  # (B, V)
            if self._cfg_everywhere:
                logits = guided
            else:
                on = self.use_cfg.index_select(0, pos.reshape(1))  # (1,)
                logits = torch.where(on[:, None], guided, cond)  # (B, V)
        if sc.temperature > 0 and sc.temperature != 1.0:
            logits = logits / sc.temperature
        if sc.top_k > 0:
            k = min(sc.top_k, logits.shape[-1])
            kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if sc.top_p < 1.0:
            srt, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
            cum = torch.cumsum(F.softmax(srt, dim=-1), dim=-1)  # (B, V)
            before = F.pad(cum[:, :-1], (1, 0))  # (B, V) probability mass ranked above each token
            drop_sorted = before > sc.top_p  # keeps the smallest prefix whose mass exceeds top_p (>= 1 token)
            drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)  # (B, V) back in vocab order
            logits = logits.masked_fill(drop, float("-inf"))
        if sc.temperature == 0:
            return logits.argmax(dim=-1)  # (B,) greedy
        noise = _noise_from_keys(self.row_keys, pos, self.vocab_keys)  # (B, V) Exp(1)
        return (logits - noise.log_()).argmax(dim=-1)  # (B,) exponential race == categorical sample

    def _feed(self, nxt: torch.Tensor) -> None:
        """Store the chosen tokens (B,) at ``pos`` and make them the next step's input (both CFG halves)."""
        self.tokens.index_copy_(1, self.pos.reshape(1), nxt[:, None])
        if self.guided:
            self.tok_in.view(2, self.batch_size).copy_(nxt.expand(2, -1))
        else:
            self.tok_in.copy_(nxt)

    def _decode_step(self, kv_len: int) -> None:
        """One token for every row, entirely on the device, in place: the unit that is compiled / captured.
        ``kv_len``: the attention length of the current position's bucket (a Python int)."""
        logits = self.model.decode_step(self.tok_in, self.pos, self.cache, kv_len)  # (R, V)
        self._feed(self._pick(logits, self.pos))
        self.pos.add_(1)

    def _run_step(self, kv_len: int) -> None:
        graph = self._graphs.get(kv_len)
        if graph is not None:
            graph.replay()
        else:
            self._step(kv_len)

    def _capture(self) -> None:
        """For each bucket: warm up (compiles) on a side stream, then record one decode step as a CUDA graph. The
        graphs share one memory pool: they never run concurrently and keep no tensor alive between replays.

        Warm-up runs write garbage into buffers that the next batch's prefill and steps overwrite before they are
        read (every bucket covers the slot of position 1, which they write).
        """
        stream = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(device=self.device)
        pool = None
        for kv_len in self.kv_lengths:
            side.wait_stream(stream)
            with torch.cuda.stream(side):
                for _ in range(3):
                    self.pos.fill_(1)
                    self._step(kv_len)
            stream.wait_stream(side)
            self.pos.fill_(1)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._step(kv_len)
            pool = graph.pool()
            self._graphs[kv_len] = graph

    # ------------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def __call__(self, labels: torch.Tensor, seeds: Seeds) -> torch.Tensor:
        """labels (B,) long, seeds (B,) int >= 0 -> tokens (B, N) long (a fresh tensor on the model's device)."""
        labels = torch.as_tensor(labels, dtype=torch.long).to(self.device)
        b = labels.shape[0]
        if labels.dim() != 1 or not 1 <= b <= self.batch_size:
            raise ValueError(f"Expected labels of shape (B,) with 1 <= B <= {self.batch_size}, got "
                             f"{tuple(labels.shape)}; build the Sampler with a larger batch_size.")
        seeds_t = _seeds_tensor(seeds, b, self.device)
        if b < self.batch_size:  # pad to the static batch; padded rows are computed and dropped
            pad = self.batch_size - b
            labels = torch.cat([labels, labels.new_zeros(pad)])
            seeds_t = torch.cat([seeds_t, seeds_t.new_zeros(pad)])
        with self._compile_limits():
            if self.use_graph and not self._graphs:
                self._capture()
            self.row_keys.copy_(_row_keys(seeds_t))

            all_labels = torch.cat([labels, self.null_labels]) if self.guided else labels  # (R,)
            logits = self.model.prefill(all_labels, self.cache)  # (R, V)
            self.pos.zero_()
            self._feed(self._pick(logits, self.pos))
            self.pos.fill_(1)
            for p in range(1, self.num_tokens):
                self._run_step(self._kv_len_of[p])
        return self.tokens[:b].clone()

    def _compile_limits(self):
        """Compile settings for this sampler's calls: room for one compiled entry per bucket (dynamo allows 8 per
        function, shared by all samplers), and ``kv_len`` traced as a dynamic size from the first compile (one
        graph for every bucket) unless ``compile_dynamic=False``."""
        if not self.use_compile:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        limit = max(torch._dynamo.config.recompile_limit, 2 * len(self.kv_lengths) + 8)
        stack.enter_context(torch._dynamo.config.patch(recompile_limit=limit))
        if self._compile_dynamic is not False and len(self.kv_lengths) > 1:
            stack.enter_context(torch.compiler.config.patch(dynamic_sources="L['kv_len']"))
        return stack


def sample(model: GPT, labels: torch.Tensor, sample_cfg: SampleConfig, seeds: Seeds, *,
           compile: Optional[bool] = None, cuda_graph: Optional[bool] = None,
           cache_dtype: Optional[torch.dtype] = None, kv_bound: bool = True, kv_buckets: int = 8) -> torch.Tensor:
    """labels (B,) long, seeds (B,) -> tokens (B, N) long. One-off convenience around :class:`Sampler`
    (build a Sampler yourself to reuse its cache and compiled graphs across batches)."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    sampler = Sampler(model, labels.shape[0], sample_cfg, compile=compile, cuda_graph=cuda_graph,
                      cache_dtype=cache_dtype, kv_bound=kv_bound, kv_buckets=kv_buckets)
    return sampler(labels, seeds)


# ------------------------------------------------------------------------------------------ to images
@torch.no_grad()
def decode_to_uint8(decode_fn: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor, out_size: int,
                    antialias: bool = False) -> torch.Tensor:
    """tokens (B, N) or (B, g, g) -> uint8 images (B, out_size, out_size, 3), on the decoder's device.

    ``decode_fn`` is the tokenizer's ``decode`` (indices -> (B, 3, H, W) in about [-1, 1], H = 384 for the paper).
    Like LlamaGen's evaluation: bicubic resize of the float image (no antialias unless asked), then
    ``clamp(127.5 x + 128, 0, 255)`` truncated to uint8 (the ADM reference-batch convention).
    """
    images = decode_fn(tokens).float()  # (B, 3, H, W)
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"decode_fn must return images (B, 3, H, W); got {tuple(images.shape)}.")
    if images.shape[-2:] != (out_size, out_size):
        images = F.interpolate(images, size=(out_size, out_size), mode="bicubic", align_corners=False,
                               antialias=antialias)  # (B, 3, out, out)
    images = torch.clamp(127.5 * images + 128.0, 0, 255)
    return images.permute(0, 2, 3, 1).to(torch.uint8).contiguous()  # (B, out, out, 3)
