"""The class-conditional GPT: sizes, causality, the KV-cache path, class dropout, init, LlamaGen weights."""
import re

import pytest
import torch

from ideal_ray.config import gpt_config
from ideal_ray.checkpoint import convert_llamagen_state_dict, load_llamagen_state_dict
from ideal_ray.models.gpt import GPT, KVCache, rope_2d_tables, swiglu_hidden_dim

REFERENCE_PARAMS = {"B": 110_888_448, "L": 342_910_976, "XXL": 1_410_972_672, "3B": 3_096_659_200}


pytestmark = pytest.mark.usefixtures("one_thread")


def _random_model(seed: int = 0, std: float = 0.2, **overrides) -> GPT:
    """Tiny GPT with every weight random (the zero-init head would make all logits zero)."""
    torch.manual_seed(seed)
    model = GPT(gpt_config("tiny", **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


def _batch(model: GPT, b: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    tokens = torch.randint(0, cfg.vocab_size, (b, cfg.num_tokens), generator=g)
    labels = torch.randint(0, cfg.num_classes, (b,), generator=g)
    return tokens, labels


# ------------------------------------------------------------------------------------------ sizes
@pytest.mark.parametrize("size", sorted(REFERENCE_PARAMS))
def test_reference_param_counts_on_meta(size):
    cfg = gpt_config(size)
    assert (cfg.vocab_size, cfg.num_classes, cfg.num_tokens) == (16384, 1000, 576)
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.num_params() == REFERENCE_PARAMS[size]


def test_swiglu_hidden_matches_8d_over_3_rounded_up():
    assert swiglu_hidden_dim(gpt_config("B")) == 2048
    assert swiglu_hidden_dim(gpt_config("3B")) == 8704  # int(8 * 3200 / 3) = 8533 -> next multiple of 256
    assert swiglu_hidden_dim(gpt_config("tiny")) == 192  # int(8 * 64 / 3) = 170 -> next multiple of 32


def test_tiny_builds_and_trains_one_step():
    model = GPT(gpt_config("tiny"))
    tokens, labels = _batch(model)
    logits = model(tokens, labels)
    assert logits.shape == (3, 64, 256) and logits.dtype == torch.float32
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_bad_configs_and_inputs_raise():
    with pytest.raises(ValueError, match="not a multiple of 4"):
        GPT(gpt_config("tiny", dim=72, n_head=4))  # head dim 18
    with pytest.raises(ValueError, match="cls_token_num"):
        GPT(gpt_config("tiny", cls_token_num=2))
    model = GPT(gpt_config("tiny")).eval()
    tokens, labels = _batch(model)
    with pytest.raises(ValueError, match="tokens per sequence"):
        model(torch.zeros(3, 65, dtype=torch.long), labels)
    with pytest.raises(ValueError, match="labels of shape"):
        model(tokens, labels[:2])


# ------------------------------------------------------------------------------------------ attention
def test_changing_a_future_token_never_changes_earlier_logits():
    model = _random_model().eval()
    tokens, labels = _batch(model)
    with torch.no_grad():
        base = model(tokens, labels)
        for j in (0, 17, 40, 63):
            changed = tokens.clone()
            changed[:, j] = (changed[:, j] + 1) % model.cfg.vocab_size
            out = model(changed, labels)
            # logits[:, i] sees tokens < i only: positions <= j are untouched, later ones move
            torch.testing.assert_close(out[:, : j + 1], base[:, : j + 1], rtol=0, atol=1e-6)
            if j < 63:
                assert (out[:, j + 1:] - base[:, j + 1:]).abs().max() > 1e-3


def test_shorter_prefix_gives_the_same_logits():
    model = _random_model().eval()
    tokens, labels = _batch(model)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens[:, :10], labels), model(tokens, labels)[:, :10],
                                   rtol=1e-5, atol=1e-5)


def test_prefill_and_decode_with_the_kv_cache_equal_the_full_forward():
    model = _random_model().eval()
    tokens, labels = _batch(model, b=4)
    n = model.num_tokens
    with torch.no_grad():
        full = model(tokens, labels)  # (B, N, V)
        cache = model.new_cache(4)
        assert len(cache.keys) == len(cache.values) == 2
        assert all(t.shape == (4, 4, n + 1, 16) for t in cache.buffers())
        assert len({t.data_ptr() for t in cache.buffers()}) == 4  # separate buffers, not views of one
        steps = [model.prefill(labels, cache)]
        for pos in range(1, n):
            p = pos if pos % 2 else torch.tensor(pos)  # ints and 0-dim tensors both work
            steps.append(model.decode_step(tokens[:, pos - 1], p, cache))
    cached = torch.stack(steps, dim=1)  # (B, N, V)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


def test_kv_cache_is_static_and_reusable():
    model = _random_model().eval()
    tokens, labels = _batch(model, b=2)
    cache = KVCache(model.cfg, 2)
    ptrs = [t.data_ptr() for t in cache.buffers()]
    with torch.no_grad():
        for _ in range(2):  # a second batch through the same cache gives the same answers
            out = [model.prefill(labels, cache)]
            out += [model.decode_step(tokens[:, p - 1], p, cache) for p in range(1, 8)]
        assert [t.data_ptr() for t in cache.buffers()] == ptrs
        full = model(tokens[:, :8], labels)
    torch.testing.assert_close(torch.stack(out, 1), full, rtol=1e-5, atol=1e-5)


def test_bounded_kv_len_gives_the_full_cache_logits():
    """Attending over slots [0, kv_len) only (what the sampler's buckets do) changes no logit: the extra slots
    are masked either way. Garbage in the unread slots (a previous batch) must not matter either."""
    model = _random_model().eval()
    tokens, labels = _batch(model, b=3)
    n = model.num_tokens
    with torch.no_grad():
        ref_cache, cache = model.new_cache(3), model.new_cache(3)
        for t in cache.buffers():
            t.normal_()  # stale values everywhere
        ref = [model.prefill(labels, ref_cache)]
        out = [model.prefill(labels, cache)]
        for pos in range(1, n):
            ref.append(model.decode_step(tokens[:, pos - 1], pos, ref_cache))
            kv_len = pos + 1 + (pos % 3) * 5  # the tightest bound and some looser ones
            out.append(model.decode_step(tokens[:, pos - 1], torch.tensor(pos), cache, kv_len=min(kv_len, n + 1)))
    torch.testing.assert_close(torch.stack(out, 1), torch.stack(ref, 1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="does not reach"):
        model.decode_step(tokens[:, 0], 5, cache, kv_len=5)
    with pytest.raises(ValueError, match="kv_len"):
        model.decode_step(tokens[:, 0], 5, cache, kv_len=n + 2)


def test_rope_pairs_equal_apply_rope_bit_for_bit():
    from ideal_ray.models.gpt import apply_rope, apply_rope_pairs, rope_pair_table

    cfg = gpt_config("tiny")
    cos, sin = rope_2d_tables(cfg)
    table = rope_pair_table(cos, sin)  # (S, 2, hd)
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(3, 1, 4, 16, generator=g) * 5).to(dtype)  # (B, 1, H, hd)
        for slot in (0, 1, 9, 37, 64):
            ref = apply_rope(x, cos[slot:slot + 1], sin[slot:slot + 1])
            got = apply_rope_pairs(x, table[slot])
            assert got.dtype == dtype and torch.equal(got, ref), (dtype, slot)


def test_sampling_paths_check_mode_cache_and_position():
    model = _random_model()
    cache = model.new_cache(2)
    labels = torch.tensor([0, 1])
    with pytest.raises(RuntimeError, match="model.eval"):
        model.prefill(labels, cache)
    model.eval()
    with pytest.raises(ValueError, match="holds 2 rows"):
        model.prefill(torch.tensor([0, 1, 2]), cache)
    with pytest.raises(ValueError, match="out of range"):
        model.decode_step(labels, 0, cache)


# ------------------------------------------------------------------------------------------ class conditioning
def test_class_dropout_only_in_training_and_uses_the_null_class():
    model = _random_model(class_dropout=1.0, token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0)
    tokens, labels = _batch(model)
    null = torch.full_like(labels, model.null_class)
    assert model.null_class == model.cfg.num_classes and model.class_embed.num_embeddings == 11
    with torch.no_grad():
        model.train()
        torch.testing.assert_close(model(tokens, labels), model(tokens, null), rtol=0, atol=0)
        model.eval()
        assert (model(tokens, labels) - model(tokens, null)).abs().max() > 1e-3


def test_class_dropout_rate():
    model = GPT(gpt_config("tiny", class_dropout=0.25))
    seen = []
    model.class_embed.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    labels = torch.zeros(4000, dtype=torch.long)
    torch.manual_seed(0)
    model.train()
    model(torch.zeros(4000, 1, dtype=torch.long), labels)
    model.eval()
    model(torch.zeros(4000, 1, dtype=torch.long), labels)
    train_labels, eval_labels = seen
    assert set(train_labels.unique().tolist()) == {0, model.null_class}
    assert abs((train_labels == model.null_class).float().mean().item() - 0.25) < 0.03
    assert torch.equal(eval_labels, labels)


# ------------------------------------------------------------------------------------------ init and RoPE
def test_zero_init_head_gives_uniform_predictions():
    torch.manual_seed(0)
    model = GPT(gpt_config("tiny")).eval()
    tokens, labels = _batch(model)
    with torch.no_grad():
        probs = model(tokens, labels).softmax(-1)
    torch.testing.assert_close(probs, torch.full_like(probs, 1.0 / 256))
    assert model.head.weight.abs().max() == 0
    w = model.blocks[0].attn.qkv.weight
    assert abs(w.std().item() - 0.02) < 0.003 and abs(w.mean().item()) < 0.002
    assert torch.equal(model.blocks[1].ffn_norm.weight, torch.ones(64))


def test_rope_layout_rows_then_columns_and_zero_class_row():
    cfg = gpt_config("tiny")  # head dim 16: pairs 0-3 rotate with the row, 4-7 with the column
    cos, sin = rope_2d_tables(cfg)
    assert cos.shape == (65, 8) and cos.dtype == torch.float32
    assert cos[0].abs().max() == 0 and sin[0].abs().max() == 0  # LlamaGen's class row: zeros
    inv = 10000.0 ** (-torch.arange(4) / 4.0)  # base^(-2k / (hd / 2)), k = 0..3
    t = 1 + 3 * 8 + 5  # row 3, column 5
    torch.testing.assert_close(cos[t], torch.cat([torch.cos(3 * inv), torch.cos(5 * inv)]))
    torch.testing.assert_close(sin[t], torch.cat([torch.sin(3 * inv), torch.sin(5 * inv)]))


def test_rope_tables_stay_float32_and_survive_meta_init():
    model = GPT(gpt_config("tiny")).to(torch.bfloat16)
    assert model.rope_cos.dtype == torch.float32 and model.tok_embed.weight.dtype == torch.bfloat16
    cos, _ = rope_2d_tables(model.cfg)
    torch.testing.assert_close(model.rope_cos, cos, rtol=0, atol=0)
    with torch.device("meta"):
        meta = GPT(gpt_config("tiny"))
    real = meta.to_empty(device="cpu")
    torch.testing.assert_close(real.rope_cos, cos, rtol=0, atol=0)
    assert "rope_cos" not in real.state_dict()


# ------------------------------------------------------------------------------------------ LlamaGen weights
# Their c2i Transformer's state dict for the tiny config, written down from autoregressive/models/gpt.py:
# LabelEmbedder table (classes + 1 with class dropout), tok_embeddings, per layer attention.wqkv ([q; k; v]),
# attention.wo, feed_forward.w1/w3/w2 (SwiGLU gate/up/down), attention_norm, ffn_norm; final norm; output.
def _llamagen_tiny_shapes(n_layer=2, d=64, hidden=192, vocab=256, classes=10):
    shapes = {"cls_embedding.embedding_table.weight": (classes + 1, d), "tok_embeddings.weight": (vocab, d),
              "norm.weight": (d,), "output.weight": (vocab, d)}
    for i in range(n_layer):
        shapes.update({f"layers.{i}.attention.wqkv.weight": (3 * d, d), f"layers.{i}.attention.wo.weight": (d, d),
                       f"layers.{i}.feed_forward.w1.weight": (hidden, d),
                       f"layers.{i}.feed_forward.w3.weight": (hidden, d),
                       f"layers.{i}.feed_forward.w2.weight": (d, hidden),
                       f"layers.{i}.attention_norm.weight": (d,), f"layers.{i}.ffn_norm.weight": (d,)})
    return shapes


# test-only inverse of the loader's mapping: our names -> LlamaGen's
_TO_LLAMAGEN = [
    (r"^class_embed\.", "cls_embedding.embedding_table."),
    (r"^tok_embed\.", "tok_embeddings."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"layers.\1.attention.wqkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"layers.\1.attention.wo."),
    (r"^blocks\.(\d+)\.ffn\.w_gate\.", r"layers.\1.feed_forward.w1."),
    (r"^blocks\.(\d+)\.ffn\.w_up\.", r"layers.\1.feed_forward.w3."),
    (r"^blocks\.(\d+)\.ffn\.w_down\.", r"layers.\1.feed_forward.w2."),
    (r"^blocks\.(\d+)\.attn_norm\.", r"layers.\1.attention_norm."),
    (r"^blocks\.(\d+)\.ffn_norm\.", r"layers.\1.ffn_norm."),
    (r"^norm\.", "norm."),
    (r"^head\.", "output."),
]


def _to_llamagen(state):
    out = {}
    for k, v in state.items():
        for pat, rep in _TO_LLAMAGEN:
            if re.match(pat, k):
                out[re.sub(pat, rep, k)] = v.clone()
                break
        else:
            raise AssertionError(f"no LlamaGen name for {k}")
    return out


def test_llamagen_layout_matches_their_key_list():
    theirs = _to_llamagen(GPT(gpt_config("tiny")).state_dict())
    assert {k: tuple(v.shape) for k, v in theirs.items()} == _llamagen_tiny_shapes()


def test_llamagen_checkpoint_loads_and_gives_the_same_logits():
    src = _random_model(seed=3).eval()
    theirs = _to_llamagen(src.state_dict())
    # a DDP + torch.compile training checkpoint with a stray RoPE buffer, as LlamaGen's trainer may write it
    wrapped = {f"module._orig_mod.{k}": v for k, v in theirs.items()}
    wrapped["freqs_cis"] = torch.zeros(65, 8, 2)
    ckpt = {"model": wrapped, "optimizer": {}, "steps": 10, "args": None}
    dst = GPT(gpt_config("tiny")).eval()
    load_llamagen_state_dict(dst, ckpt)
    tokens, labels = _batch(src)
    with torch.no_grad():
        torch.testing.assert_close(dst(tokens, labels), src(tokens, labels), rtol=0, atol=0)


def test_llamagen_loader_containers_and_errors(tmp_path):
    src = _random_model(seed=4)
    theirs = _to_llamagen(src.state_dict())
    other = {k: v + 1 for k, v in theirs.items()}
    ckpt = {"model": other, "ema": theirs}
    assert torch.equal(convert_llamagen_state_dict(ckpt, prefer_ema=True)["head.weight"], src.head.weight)
    assert torch.equal(convert_llamagen_state_dict(ckpt)["head.weight"], src.head.weight + 1)
    assert set(convert_llamagen_state_dict({"module": theirs})) == set(src.state_dict())
    path = tmp_path / "gpt.pt"
    torch.save({"state_dict": theirs}, path)
    dst = load_llamagen_state_dict(GPT(gpt_config("tiny")), str(path))
    assert torch.equal(dst.tok_embed.weight, src.tok_embed.weight)

    with pytest.raises(KeyError, match="Unrecognised key"):
        convert_llamagen_state_dict({**theirs, "cls_embedding.cap_proj.fc1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="dim, vocab_size"):
        load_llamagen_state_dict(GPT(gpt_config("tiny", vocab_size=512)), theirs)
    no_null = dict(theirs, **{"cls_embedding.embedding_table.weight": torch.zeros(10, 64)})
    with pytest.raises(ValueError, match="no CFG null-class row"):
        load_llamagen_state_dict(GPT(gpt_config("tiny")), no_null)
    with pytest.raises(ValueError, match="n_layer"):
        load_llamagen_state_dict(GPT(gpt_config("tiny", n_layer=3)), theirs)
