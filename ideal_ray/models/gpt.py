"""Class-conditional LlamaGen-style GPT over the tokenizer's codes (spec section 7).

Single-device PyTorch. Three explicit entry points instead of one forward that guesses its mode:

- :meth:`GPT.forward` ``(tokens, labels) -> logits`` trains with teacher forcing: the input sequence is
  ``[class, tokens[:, :-1]]`` under a causal mask, so ``logits[:, i]`` predicts ``tokens[:, i]``.
- :meth:`GPT.prefill` ``(labels, cache) -> logits`` runs the class position, fills slot 0 of a :class:`KVCache`
  and predicts token 0.
- :meth:`GPT.decode_step` ``(tokens, pos, cache, kv_len) -> logits`` feeds token ``pos - 1`` and predicts token
  ``pos``, attending over cache slots ``[0, kv_len)`` under a position mask (``kv_len`` defaults to the whole
  cache). Shapes never change from step to step for a given ``kv_len`` (the cache is preallocated, ``pos`` may be
  a device tensor), so the step can be compiled or captured as a CUDA graph -- one per ``kv_len`` bucket.

The architecture, the 2D RoPE layout and the initialisation follow LlamaGen's ``autoregressive/models/gpt.py``
(which the Ideal release reuses) closely enough that its released weights give its logits here: see
``ideal_ray.checkpoint.convert_llamagen_state_dict`` for the key mapping (every file format lives there).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ideal_ray.config import GPTConfig

__all__ = [
    "GPT",
    "KVCache",
    "RMSNorm",
    "swiglu_hidden_dim",
    "rope_2d_tables",
    "rope_pair_table",
    "apply_rope_pairs",
    "validate_gpt_config",
]


def validate_gpt_config(cfg: GPTConfig) -> None:
    """Raise ValueError with one actionable sentence for a configuration the model cannot be built from."""
    if cfg.dim % cfg.n_head != 0:
        raise ValueError(f"GPT dim {cfg.dim} is not divisible by n_head {cfg.n_head}; choose a head count that "
                         f"divides the width.")
    if (cfg.dim // cfg.n_head) % 4 != 0:
        raise ValueError(f"GPT head dim {cfg.dim // cfg.n_head} is not a multiple of 4, which 2D RoPE needs "
                         f"(rows and columns each rotate pairs); change dim or n_head.")
    if cfg.cls_token_num != 1:
        raise ValueError(f"GPT cls_token_num is {cfg.cls_token_num}, but class conditioning uses exactly one "
                         f"class position (as LlamaGen's c2i model); set cls_token_num=1.")
    if cfg.grid < 1 or cfg.vocab_size < 2 or cfg.num_classes < 1:
        raise ValueError("GPT grid, vocab_size and num_classes must be positive (vocab_size at least 2).")
    for name in ("class_dropout", "token_dropout", "resid_dropout", "ffn_dropout", "attn_dropout", "drop_path"):
        p = getattr(cfg, name)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"GPT {name} is {p}; a probability must be in [0, 1].")


def swiglu_hidden_dim(cfg: GPTConfig) -> int:
    """LlamaGen's SwiGLU width: int(8d/3) (times ffn_dim_multiplier if set), rounded up to multiple_of."""
    hidden = int(2 * (4 * cfg.dim) / 3)
    if cfg.ffn_dim_multiplier:
        hidden = int(cfg.ffn_dim_multiplier * hidden)
    return -(-hidden // cfg.multiple_of) * cfg.multiple_of


def rope_2d_tables(cfg: GPTConfig, device: Optional[torch.device] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (cls_token_num + grid^2, head_dim // 2) float32, for LlamaGen's 2D RoPE.

    Rotation pairs are adjacent channels (2i, 2i+1) of a head. The first head_dim // 4 pairs rotate with the
    token's row, the last head_dim // 4 with its column, both with frequencies base^(-2k / (head_dim / 2)).
    Tokens are row-major (token t sits at row t // grid, column t % grid). The class position holds cos = sin = 0
    -- exactly what LlamaGen's table holds there -- which zeroes its query and key rather than leaving them
    unrotated; kept so that LlamaGen-trained weights reproduce their logits.
    """
    head_dim = cfg.dim // cfg.n_head
    half = head_dim // 2
    cpu = torch.device("cpu")  # computed on the CPU whatever the default device, so every device gets one table
    inv_freq = 1.0 / (cfg.rope_base ** (torch.arange(0, half, 2, device=cpu)[: half // 2].float() / half))  # (hd/4,)
    idx = torch.arange(cfg.grid, device=cpu)
    ang = torch.outer(idx, inv_freq)  # (g, hd / 4)
    grid_ang = torch.cat([ang[:, None, :].expand(-1, cfg.grid, -1),  # row angle
                          ang[None, :, :].expand(cfg.grid, -1, -1)], dim=-1)  # column angle -> (g, g, hd / 2)
    grid_ang = grid_ang.reshape(cfg.grid * cfg.grid, half)  # (N, hd / 2)
    zeros = torch.zeros(cfg.cls_token_num, half, device=cpu)
    cos = torch.cat([zeros, torch.cos(grid_ang)])  # (cls + N, hd / 2)
    sin = torch.cat([zeros, torch.sin(grid_ang)])  # (cls + N, hd / 2)
    return cos.to(device), sin.to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, S, H, hd), cos/sin (S, hd / 2) -> x with each channel pair rotated; computed in float32."""
    xf = x.float().unflatten(-1, (-1, 2))  # (B, S, H, hd / 2, 2)
    a, b = xf[..., 0], xf[..., 1]  # (B, S, H, hd / 2)
    c, s = cos[None, :, None, :], sin[None, :, None, :]  # (1, S, 1, hd / 2)
    out = torch.stack([a * c - b * s, b * c + a * s], dim=-1)  # (B, S, H, hd / 2, 2)
    return out.flatten(-2).type_as(x)


def rope_pair_table(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """cos/sin (S, hd / 2) -> (S, 2, hd) float32: row 0 each cosine twice (c0, c0, c1, c1, ...), row 1 the sines
    with the even channel's sign flipped (-s0, s0, -s1, s1, ...), for :func:`apply_rope_pairs`."""
    c2 = torch.stack([cos, cos], dim=-1).flatten(-2)  # (S, hd)
    s2 = torch.stack([-sin, sin], dim=-1).flatten(-2)  # (S, hd)
    return torch.stack([c2, s2], dim=1)  # (S, 2, hd)


def apply_rope_pairs(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """:func:`apply_rope` for one position in fewer kernels, bit for bit: x (..., hd), table (2, hd) from
    :func:`rope_pair_table` (broadcast against x's last dim) -> x * cos2 + swap(x) * sin2 in float32, where swap
    exchanges the channels of each pair. Per pair (a, b) that is (a c + b (-s), b c + a s): IEEE defines a - y as
    a + (-y) and b (-s) = -(b s), so every value equals apply_rope's ``a c - b s`` / ``b c + a s`` exactly."""
    xf = x.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (..., hd): (b, a) for each pair (a, b)
    return (xf * table[0] + swapped * table[1]).type_as(x)


# ------------------------------------------------------------------------------------------ layers
class RMSNorm(nn.Module):
    """RMSNorm normalised in float32 and cast back before the gain (LlamaGen's order, so bf16 matches)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for whole samples, rescaling survivors by 1 / keep."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)  # (B, 1, 1)
        return x * mask / keep if keep > 0 else x * mask

    def extra_repr(self) -> str:
        return f"p={self.p}"


class FeedForward(nn.Module):
    """SwiGLU without biases: w_down(silu(w_gate x) * w_up x), then dropout."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        hidden = swiglu_hidden_dim(cfg)
        self.w_gate = nn.Linear(cfg.dim, hidden, bias=False)
        self.w_up = nn.Linear(cfg.dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, cfg.dim, bias=False)
        self.dropout = nn.Dropout(cfg.ffn_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.w_down(F.silu(self.w_gate(x)) * self.w_up(x)))


class Attention(nn.Module):
    """Multi-head self-attention, fused qkv projection ([q; k; v] rows), no biases, 2D RoPE on q and k."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.head_dim = cfg.dim // cfg.n_head
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.attn_dropout = cfg.attn_dropout
        self.resid_dropout = nn.Dropout(cfg.resid_dropout)

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.n_head, self.head_dim).unbind(2)  # (B, S, H, hd) each
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, S, hd) each

    def _out(self, o: torch.Tensor) -> torch.Tensor:
        b, _, s, _ = o.shape
        return self.resid_dropout(self.proj(o.transpose(1, 2).reshape(b, s, -1)))  # (B, S, D)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Causal attention over x itself (training and the full-sequence reference)."""
        q, k, v = self._qkv(x, cos, sin)
        p = self.attn_dropout if self.training else 0.0
        return self._out(F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True))

    def prefill(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor) -> torch.Tensor:
        """Causal attention over the prefix x, whose keys/values are written to cache slots [0, S)."""
        q, k, v = self._qkv(x, cos, sin)
        s = x.shape[1]
        k_cache[:, :, :s].copy_(k)
        v_cache[:, :, :s].copy_(v)
        return self._out(F.scaled_dot_product_attention(q, k, v, is_causal=True))

    def decode(self, x: torch.Tensor, rope: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               slot: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One new position: write its key/value at ``slot`` (1,) of this layer's cache (B, H, S, hd), then attend
        over slots [0, kv_len) only, kv_len = mask.shape[-1]; ``mask`` (1, 1, 1, kv_len) is additive (0 / -inf)
        in the compute dtype, ``rope`` (2, hd) the position's :func:`rope_pair_table` row.

        The write goes to the layer's own buffer (a graph input of its own, not a view of a bigger one) by
        ``index_put_``, which inductor re-inplaces; see docs/perf-notes/sampling.md."""
        b = x.shape[0]
        qkv = self.qkv(x).view(b, 1, 3, self.n_head, self.head_dim)  # (B, 1, 3, H, hd)
        qk = apply_rope_pairs(qkv[:, :, :2], rope)  # (B, 1, 2, H, hd): q and k rotated together
        q, k = (t.transpose(1, 2) for t in qk.unbind(2))  # (B, H, 1, hd) each
        v = qkv[:, :, 2].transpose(1, 2)  # (B, H, 1, hd)
        k_cache[:, :, slot] = k.to(k_cache.dtype)
        v_cache[:, :, slot] = v.to(v_cache.dtype)
        n = mask.shape[-1]
        o = F.scaled_dot_product_attention(q, k_cache[:, :, :n].to(q.dtype), v_cache[:, :, :n].to(q.dtype),
                                           attn_mask=mask)
        return self._out(o)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then h + ffn(norm(h)), each branch with drop path."""

    def __init__(self, cfg: GPTConfig, drop_path: float):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = FeedForward(cfg)
        self.drop_path = DropPath(drop_path)

    def _ffn(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.drop_path(self.ffn(self.ffn_norm(h)))

    def forward(self, x, cos, sin):
        return self._ffn(x + self.drop_path(self.attn(self.attn_norm(x), cos, sin)))

    def prefill(self, x, cos, sin, k_cache, v_cache):
        return self._ffn(x + self.attn.prefill(self.attn_norm(x), cos, sin, k_cache, v_cache))

    def decode(self, x, rope, k_cache, v_cache, slot, mask):
        return self._ffn(x + self.attn.decode(self.attn_norm(x), rope, k_cache, v_cache, slot, mask))


# ------------------------------------------------------------------------------------------ KV cache
class KVCache:
    """Static keys/values for every layer, allocated once: ``keys[i]`` and ``values[i]`` are (B, heads, cls + N,
    head_dim), one separate buffer each.

    Nothing is appended or reallocated while sampling; a step writes one slot in place and reads slots
    ``[0, kv_len)`` under a position mask, so its shapes (and memory addresses) stay fixed across steps -- what
    ``torch.compile`` and CUDA-graph capture need. Slots past the current position are never read unmasked,
    so a cache can be reused for the next batch without clearing it.

    Separate buffers, not views of one (layers, 2, ...) tensor: a compiled step that writes into views of one
    graph input is functionalized into copies of the whole base (docs/perf-notes/sampling.md).
    """

    def __init__(self, cfg: GPTConfig, batch_size: int, dtype: torch.dtype = torch.float32,
                 device: Union[str, torch.device, None] = None):
        if batch_size < 1:
            raise ValueError(f"KVCache batch_size is {batch_size}; it must be at least 1.")
        self.cfg = cfg
        self.batch_size = batch_size
        self.length = cfg.cls_token_num + cfg.num_tokens
        head_dim = cfg.dim // cfg.n_head
        shape = (batch_size, cfg.n_head, self.length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)]  # (B, H, S, hd)
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)]
        self.positions = torch.arange(self.length, device=device)  # (S,) slot ids, for the decode mask

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype

    @property
    def device(self) -> torch.device:
        return self.keys[0].device

    @property
    def decode_length(self) -> int:
        """Slots a decode step can ever read: the class positions and tokens 0..N-2 (token N-1 is never fed)."""
        return self.length - 1

    def layer(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) of layer i, each (B, H, S, hd)."""
        return self.keys[i], self.values[i]

    def buffers(self):
        """Every buffer: keys then values, layer by layer."""
        return [t for pair in zip(self.keys, self.values) for t in pair]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())


# ------------------------------------------------------------------------------------------ the model
class GPT(nn.Module):
    """Decoder-only transformer over [class, token 0, ..., token N-2] predicting tokens 0..N-1.

    Parameters: class embedding (num_classes + 1 rows, the last is the CFG null class), token embedding,
    n_layer pre-norm blocks (RMSNorm, fused-qkv attention with 2D RoPE, SwiGLU), final RMSNorm, linear head.
    ``null_class`` is the label to pass for unconditional rows.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        validate_gpt_config(cfg)
        self.cfg = cfg
        self.num_tokens = cfg.num_tokens
        self.null_class = cfg.num_classes
        # one extra row: the CFG null class that class dropout trains and guidance conditions on
        self.class_embed = nn.Embedding(cfg.num_classes + 1, cfg.dim)
        self.tok_embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.tok_dropout = nn.Dropout(cfg.token_dropout)
        rates = torch.linspace(0, cfg.drop_path, cfg.n_layer, device="cpu").tolist()
        self.blocks = nn.ModuleList([Block(cfg, r) for r in rates])
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # RoPE tables: derived from the config, never saved, and kept float32 whatever dtype the model is cast to
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.register_buffer("rope_pairs", torch.empty(0), persistent=False)  # (cls + N, 2, hd), for decode
        self.reset_rope()
        if not self.tok_embed.weight.is_meta:  # on meta (counting, deferred init) there is nothing to fill;
            self.init_weights()  # after to_empty(), call init_weights() or load a state dict

    # ------------------------------------------------------------------------------------- setup
    def init_weights(self) -> None:
        """N(0, initializer_range) for every linear and embedding, ones for norms, zeros for the output head
        (so the untrained model predicts a uniform distribution)."""
        std = self.cfg.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        nn.init.zeros_(self.head.weight)

    def reset_rope(self) -> None:
        """(Re)compute the RoPE tables in float32, on the CPU, then move them to where the buffers live."""
        device = self.rope_cos.device
        cos, sin = rope_2d_tables(self.cfg)
        self.rope_cos = cos.to(device)  # (cls + N, hd / 2)
        self.rope_sin = sin.to(device)
        self.rope_pairs = rope_pair_table(cos, sin).to(device)  # (cls + N, 2, hd)

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() would cast the RoPE tables and .to_empty() would leave them uninitialised;
        # rebuild them in float32 after any such conversion (they are tiny and derived from the config)
        super()._apply(fn, recurse)
        self.reset_rope()
        return self

    def new_cache(self, batch_size: int, dtype: Optional[torch.dtype] = None,
                  device: Union[str, torch.device, None] = None) -> KVCache:
        """A :class:`KVCache` for this model, by default in the model's dtype and on its device."""
        w = self.tok_embed.weight
        return KVCache(self.cfg, batch_size, dtype or w.dtype, device or w.device)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(h)).float()  # float32 logits for the loss and for sampling

    # ------------------------------------------------------------------------------------- training
    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Teacher forcing. tokens (B, T) long with 1 <= T <= N, labels (B,) long -> logits (B, T, vocab) float32,
        where logits[:, i] predicts tokens[:, i] from the class and tokens[:, :i].

        In training mode each label becomes the null class with probability ``class_dropout`` (what makes
        classifier-free guidance possible); in eval mode labels are used as given.
        """
        b, t = tokens.shape
        if not 1 <= t <= self.num_tokens:
            raise ValueError(f"GPT.forward got {t} tokens per sequence; it takes between 1 and {self.num_tokens} "
                             f"(grid {self.cfg.grid} x {self.cfg.grid}).")
        if labels.shape != (b,):
            raise ValueError(f"GPT.forward needs labels of shape ({b},) for tokens {tuple(tokens.shape)}, "
                             f"got {tuple(labels.shape)}.")
        if self.training and self.cfg.class_dropout > 0:
            drop = torch.rand(b, device=labels.device) < self.cfg.class_dropout  # (B,)
            labels = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        cls = self.class_embed(labels)[:, None]  # (B, 1, D)
        h = torch.cat([cls, self.tok_embed(tokens[:, :-1])], dim=1)  # (B, T, D): [class, tokens 0..T-2]
        h = self.tok_dropout(h)
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]  # (T, hd / 2)
        for blk in self.blocks:
            h = blk(h, cos, sin)  # (B, T, D)
        return self._logits(h)  # (B, T, V)

    # ------------------------------------------------------------------------------------- sampling
    def _check_sampling(self, cache: KVCache, b: int) -> None:
        if self.training:
            raise RuntimeError("GPT.prefill / decode_step run the inference path; call model.eval() first.")
        if cache.batch_size != b:
            raise ValueError(f"The KV cache holds {cache.batch_size} rows but the batch has {b}; build the cache "
                             f"with the batch size you sample with (twice the images when CFG doubles the batch).")

    def prefill(self, labels: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """labels (B,) long -> logits (B, vocab) float32 for token 0; writes the class position into the cache.

        Labels are used as given (pass ``null_class`` for the unconditional half of a CFG batch).
        """
        b = labels.shape[0]
        self._check_sampling(cache, b)
        s = self.cfg.cls_token_num
        h = self.class_embed(labels)[:, None]  # (B, 1, D)
        cos, sin = self.rope_cos[:s], self.rope_sin[:s]  # (1, hd / 2)
        for i, blk in enumerate(self.blocks):
            k_cache, v_cache = cache.layer(i)
            h = blk.prefill(h, cos, sin, k_cache, v_cache)  # (B, 1, D)
        return self._logits(h[:, -1])  # (B, V)

    def decode_step(self, tokens: torch.Tensor, pos: Union[int, torch.Tensor], cache: KVCache,
                    kv_len: Optional[int] = None) -> torch.Tensor:
        """tokens (B,) long = token ``pos - 1`` of each row -> logits (B, vocab) float32 for token ``pos``.

        ``pos`` is in [1, N): an int, or a 0-dim long tensor on the cache's device (a tensor keeps the step free
        of host syncs and of recompiles). The input token occupies cache slot ``cls_token_num + pos - 1``.
        ``kv_len`` (a Python int, default: the whole cache) bounds the attention to slots ``[0, kv_len)``; it must
        exceed that slot (checked only when ``pos`` is an int). The answer does not depend on it: slots past the
        current one are masked either way, so only the bytes read change.
        """
        b = tokens.shape[0]
        self._check_sampling(cache, b)
        n = cache.length if kv_len is None else kv_len  # an int (or, under torch.compile, possibly a SymInt)
        if not 1 <= n <= cache.length:
            raise ValueError(f"decode_step kv_len {n} is out of range; it must be in [1, {cache.length}].")
        if isinstance(pos, int):
            if not 1 <= pos < self.num_tokens:
                raise ValueError(f"decode_step pos {pos} is out of range; it predicts tokens 1..{self.num_tokens - 1} "
                                 f"(token 0 comes from prefill).")
            if self.cfg.cls_token_num + pos - 1 >= n:
                raise ValueError(f"decode_step kv_len {n} does not reach the slot of pos {pos} "
                                 f"({self.cfg.cls_token_num + pos - 1}); use kv_len > cls_token_num + pos - 1.")
            pos = torch.tensor(pos, device=cache.device)
        slot = (pos + (self.cfg.cls_token_num - 1)).reshape(1)  # (1,)
        rope = self.rope_pairs.index_select(0, slot)[0]  # (2, hd) float32
        h = self.tok_embed(tokens)[:, None]  # (B, 1, D)
        # additive mask in the compute dtype, built once per step (SDPA would convert a bool mask in every layer)
        mask = torch.where(cache.positions[:n] <= slot, 0.0, float("-inf")).to(h.dtype).view(1, 1, 1, n)
        for i, blk in enumerate(self.blocks):
            k_cache, v_cache = cache.layer(i)
            h = blk.decode(h, rope, k_cache, v_cache, slot, mask)  # (B, 1, D)
        return self._logits(h[:, 0])  # (B, V)
