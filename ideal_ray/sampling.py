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
- **Static everything.** One :class:`~ideal_ray.models.gpt.KVCache` is allocated per :class:`Sampler`; the
  decode step reads and writes fixed buffers (input token, position, output tokens) and advances the position
  on the device, so the host loop only launches work. On CUDA the step is captured once as a CUDA graph; each of
  the N - 1 decode steps is then a single graph replay. ``torch.compile`` of the step is opt-in: measured on an
  H200 (GPT-B, batch 64, CFG 1.75, bf16, torch 2.11, ``jobs/bench.py sample``) the eager step in a CUDA graph ran
  a batch in 1.41 s (4.2x LlamaGen's eager ``generate``, 5.88 s) while the inductor-compiled step in a graph took
  26.3 s -- a regression not yet understood, so compiling stays off until it is.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ideal_ray.config import SampleConfig
from ideal_ray.models.gpt import GPT, KVCache

__all__ = ["Sampler", "sample", "validate_sample_config", "decode_to_uint8", "exponential_noise"]

Seeds = Union[torch.Tensor, Sequence[int]]

_M32 = 0xFFFFFFFF


def validate_sample_config(cfg: SampleConfig) -> None:
    """Raise ValueError with one actionable sentence for sampling settings that make no sense."""
    start, end = cfg.cfg_interval
    if not 0.0 <= start <= end <= 1.0:
        raise ValueError(f"cfg_interval {tuple(cfg.cfg_interval)} must be (start, end) with 0 <= start <= end <= 1 "
                         f"(fractions of the token sequence).")
    if cfg.temperature < 0:
        raise ValueError(f"temperature {cfg.temperature} is negative; use 0 for greedy decoding or a positive value.")
    if cfg.top_k < 0:
        raise ValueError(f"top_k {cfg.top_k} is negative; use 0 to turn top-k filtering off.")
    if not 0.0 < cfg.top_p <= 1.0:
        raise ValueError(f"top_p {cfg.top_p} must be in (0, 1]; use 1.0 to turn nucleus filtering off.")


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


def _noise_from_keys(row_keys: torch.Tensor, pos: torch.Tensor, vocab_keys: torch.Tensor) -> torch.Tensor:
    """Exp(1) variates (B, V) float32 for token position ``pos`` (0-dim int64), from the row and vocab keys."""
    step = _hash32(row_keys ^ _hash32((pos + 0x27D4EB2F) & _M32))  # (B,)
    bits = _hash32(step[:, None] ^ vocab_keys[None, :])  # (B, V) uniform in [0, 2^32)
    u = (bits.float() + 0.5) * 2.0 ** -32  # (B, V) in (0, 1]; fine resolution near 0, where E = -log1p(-u) ~ u
    return -torch.log1p(-u)  # (B, V) Exp(1); u rounding to 1 gives +inf, i.e. that token cannot win


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
class Sampler:
    """Samples batches of up to ``batch_size`` images with one preallocated cache (and one captured graph).

    ``sampler(labels, seeds) -> tokens (B, N) long`` for B <= batch_size; smaller batches are padded internally.
    Build one per (model, batch size, settings) and call it for every batch of a run.

    compile:    torch.compile the decode step with ``compile_backend`` (default: off; see the module notes).
    cuda_graph: capture the decode step as a CUDA graph (default: on for CUDA; ignored on CPU).
    cache_dtype: the KV cache dtype (default: the model's parameter dtype).
    """

    def __init__(self, model: GPT, batch_size: int, sample_cfg: SampleConfig, *, compile: Optional[bool] = None,
                 cuda_graph: Optional[bool] = None, cache_dtype: Optional[torch.dtype] = None,
                 compile_backend: str = "inductor"):
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
        # static buffers the decode step reads and writes in place
        self.tok_in = torch.zeros(rows, dtype=torch.long, device=dev)  # (R,) token pos - 1 of every row
        self.pos = torch.ones((), dtype=torch.long, device=dev)  # the token being predicted
        self.tokens = torch.zeros(batch_size, self.num_tokens, dtype=torch.long, device=dev)  # (B, N)
        self.row_keys = torch.zeros(batch_size, dtype=torch.long, device=dev)  # (B,)
        self.vocab_keys = _vocab_keys(self.vocab_size, dev)  # (V,)
        self.null_labels = torch.full((batch_size,), model.null_class, dtype=torch.long, device=dev)
        start, end = sample_cfg.cfg_interval
        frac = torch.arange(self.num_tokens, dtype=torch.float64) / self.num_tokens
        self.use_cfg = ((frac >= start) & (frac < end)).to(dev)  # (N,) bool: guidance on for token t

        self._step = self._decode_step
        if self.use_compile:
            self._step = torch.compile(self._decode_step, fullgraph=True, dynamic=False, backend=compile_backend)
        self._graph = None

    # ------------------------------------------------------------------------------------- pieces
    def _pick(self, logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """logits (R, V) float32 for token ``pos`` -> chosen tokens (B,) long; no host sync."""
        b, sc = self.batch_size, self.cfg
        if self.guided:
            cond, uncond = logits[:b], logits[b:]  # (B, V) each
            guided = uncond + sc.cfg_scale * (cond - uncond)  # (B, V)
            on = self.use_cfg.index_select(0, pos.reshape(1))  # (1,)
            logits = torch.where(on[:, None], guided, cond)  # (B, V)
        if sc.temperature > 0:
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
        return (logits - torch.log(noise)).argmax(dim=-1)  # (B,) exponential race == categorical sample

    def _feed(self, nxt: torch.Tensor) -> None:
        """Store the chosen tokens (B,) at ``pos`` and make them the next step's input (both CFG halves)."""
        self.tokens.index_copy_(1, self.pos.reshape(1), nxt[:, None])
        if self.guided:
            self.tok_in[: self.batch_size].copy_(nxt)
            self.tok_in[self.batch_size:].copy_(nxt)
        else:
            self.tok_in.copy_(nxt)

    def _decode_step(self) -> None:
        """One token for every row, entirely on the device, in place: the unit that is compiled / captured."""
        logits = self.model.decode_step(self.tok_in, self.pos, self.cache)  # (R, V)
        self._feed(self._pick(logits, self.pos))
        self.pos.add_(1)

    def _capture(self) -> None:
        """Warm up (compiles) on a side stream, then record one decode step as a CUDA graph.

        Warm-up runs write garbage into buffers that the next batch's prefill overwrites before they are read.
        """
        self.pos.fill_(1)
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self.pos.fill_(1)
                self._step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.pos.fill_(1)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step()
        self._graph = graph

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
        if self.use_graph and self._graph is None:
            self._capture()
        self.row_keys.copy_(_row_keys(seeds_t))

        all_labels = torch.cat([labels, self.null_labels]) if self.guided else labels  # (R,)
        logits = self.model.prefill(all_labels, self.cache)  # (R, V)
        self.pos.zero_()
        self._feed(self._pick(logits, self.pos))
        self.pos.fill_(1)
        for _ in range(1, self.num_tokens):
            if self._graph is not None:
                self._graph.replay()
            else:
                self._step()
        return self.tokens[:b].clone()


def sample(model: GPT, labels: torch.Tensor, sample_cfg: SampleConfig, seeds: Seeds, *,
           compile: Optional[bool] = None, cuda_graph: Optional[bool] = None,
           cache_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """labels (B,) long, seeds (B,) -> tokens (B, N) long. One-off convenience around :class:`Sampler`
    (build a Sampler yourself to reuse its cache and compiled graph across batches)."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    sampler = Sampler(model, labels.shape[0], sample_cfg, compile=compile, cuda_graph=cuda_graph,
                      cache_dtype=cache_dtype)
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
