"""The assembled Ideal tokenizer at tiny scale: encode/decode, fusion and alignment switches, training signal,
checkpoints (ours and the authors' release layout) and the paper preset's exact parameter counts."""
import os
import sys

import pytest
import torch

from conftest import release_layout
from ideal_ray.checkpoint import (load_release_checkpoint, load_tokenizer, release_key_to_ours,
                                  save_inference_checkpoint)
from ideal_ray.config import load_config
from ideal_ray.models.tokenizer import IdealTokenizer
from ideal_ray.train.tokenizer_step import TokenizerSystem, evaluate_reconstruction

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "jobs"))


def images(b=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def tiny_cfg():
    return load_config("tiny")


@pytest.fixture(scope="module")
def tok(tiny_cfg):
    torch.manual_seed(0)
    return IdealTokenizer(tiny_cfg.model).eval()


def test_encode_decode_shapes_and_ranges(tok, tiny_cfg):
    x = images(3)
    idx = tok.encode(x)
    g, k = tiny_cfg.model.vfm.grid, tiny_cfg.model.quantizer.codebook_size
    assert idx.shape == (3, g, g) and idx.dtype == torch.long
    assert int(idx.min()) >= 0 and int(idx.max()) < k
    with torch.no_grad():
        rec = tok.decode(idx)
        feats = tok.decode_features(idx)
        feats_flat = tok.decode_features(idx.flatten(1))
    assert rec.shape == (3, 3, 32, 32) and torch.isfinite(rec).all()
    assert feats.shape == (3, g * g, tiny_cfg.model.vfm.width)
    torch.testing.assert_close(feats, feats_flat)
    # decode(indices) is the eval-mode forward through the bottleneck
    with torch.no_grad():
        out = tok(x)
    torch.testing.assert_close(out.recon, rec, rtol=1e-4, atol=1e-4)
    assert out.quant.indices.view_as(idx).equal(idx)


def test_indices_codes_indices_round_trip(tok):
    idx = tok.encode(images(2, seed=1))
    codes = tok.quantizer.codes(idx.flatten(1))  # (B, N, D) on the unit sphere
    assert torch.allclose(codes.norm(dim=-1), torch.ones(()), atol=1e-5)
    with torch.no_grad():
        again = tok.quantizer(codes).indices
    assert again.equal(idx.flatten(1))


def test_wrong_index_count_is_a_clear_error(tok):
    with pytest.raises(ValueError, match="indices per image"):
        tok.decode(torch.zeros(1, 5, dtype=torch.long))


def test_usage_counts(tok):
    batches = [(images(2, seed=s), None) for s in range(3)]
    r = evaluate_reconstruction(tok, batches)
    seen = torch.unique(torch.cat([tok.encode(b[0]).flatten() for b in batches]))
    assert r["usage"] == pytest.approx(len(seen) / tok.cfg.quantizer.codebook_size)
    assert 0 < r["entropy"] <= r["max_entropy"]


def _fused(model, x):
    with torch.no_grad():
        return model.encode_features(x)


@pytest.mark.parametrize("mode", ["attention", "linear", "none"])
def test_fusion_modes(mode):
    torch.manual_seed(0)
    cfg = load_config("tiny", [f"model.fusion.mode={mode}"])
    m = IdealTokenizer(cfg.model).eval()
    x = images(2)
    shallow, deep, fused = _fused(m, x)
    # perturb only the shallow path (its LayerNorm): deep tokens stay the same
    with torch.no_grad():
        m.vfm.shallow_norm.weight.mul_(3.0).add_(0.5)
    shallow2, deep2, fused2 = _fused(m, x)
    torch.testing.assert_close(deep, deep2)
    assert not torch.allclose(shallow, shallow2)
    if mode == "none":
        assert fused2.equal(deep2), "fusion none tokenizes the deep tokens alone"
        assert sum(p.numel() for p in m.fusion.parameters()) == 0
    else:
        assert not torch.allclose(fused, fused2), f"fusion {mode} must depend on the shallow tokens"


@pytest.mark.parametrize("on", [True, False])
def test_shallow_alignment_switch(on):
    """The generator loss reaches the shallow head only with shallow alignment on."""
    cfg = load_config("tiny", [f"loss.shallow_align={str(on).lower()}", "loss.use_discriminator=false",
                               "loss.perceptual_weight=0"])
    torch.manual_seed(0)
    system = TokenizerSystem(cfg).train()
    loss, _, _ = system.g_loss(images(2), step=1)
    loss.backward()
    grad = system.tokenizer.feature_decoder.shallow_head.weight.grad
    has_grad = grad is not None and grad.abs().sum() > 0
    assert has_grad == on


def test_single_layer_tokenization():
    cfg = load_config("tiny+layer-probe", ["model.vfm.deep_layer=3"])
    m = IdealTokenizer(cfg.model).eval()
    shallow, deep, fused = _fused(m, images(2))
    assert shallow is None and fused.equal(deep)
    assert m.encode(images(2)).shape == (2, 8, 8)


@pytest.mark.slow
def test_total_loss_falls_on_a_fixed_batch(tmp_path):
    """The training step every run takes (TokenizerStage, here on the torch engine) learns a fixed batch."""
    from ideal_ray.train.ema import EMA
    from ideal_ray.train.loop import take_step
    from ideal_ray.train.sessions import LocalSession
    from ideal_ray.train.tokenizer_stage import TokenizerStage

    cfg = load_config("tiny", ["loss.use_discriminator=true", "loss.disc_start=0", "optim.warmup_epochs=0",
                               "loss.diffaug=false", "dist.num_workers=1", "dist.engine=torch"])
    stage = TokenizerStage(cfg, torch.device("cpu"), 0, 1, steps_per_epoch=40)
    ema, session = EMA(stage.ema_module(), cfg.optim.ema_decay), LocalSession(str(tmp_path))
    x = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    losses = []
    for step in range(1, 31):
        batch = {"image": x, "label": torch.zeros(4, dtype=torch.long), "step": torch.full((4,), step - 1),
                 "position": torch.arange(4)}
        losses.append(float(take_step(stage, ema, batch, step, session).metrics["g_loss"]))
    assert all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.7 * first, losses


def test_inference_checkpoint_round_trip(tmp_path, tok, tiny_cfg):
    path = save_inference_checkpoint(str(tmp_path / "tok.pt"), tok, tiny_cfg, step=7)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] == 7 and ckpt["config"]["quantizer"]["codebook_size"] == 256
    loaded = load_tokenizer(path)
    x = images(2, seed=5)
    assert loaded.encode(x).equal(tok.encode(x))
    with pytest.raises(FileExistsError):
        save_inference_checkpoint(path, tok, tiny_cfg)


# ---- the authors' release layout -----------------------------------------------------------------------------
def test_release_keys_map_back():
    assert release_key_to_ours("module.model.decode_transformer.transformer.layers.3.ffn.net.0.weight") == \
        "feature_decoder.blocks.3.mlp.0.weight"
    assert release_key_to_ours("model.slot_quantize.codebook_used") is None
    assert release_key_to_ours("decoder.conv_out.weight") is None  # alias of model.decoder.*
    with pytest.raises(ValueError, match="Unrecognised key"):
        release_key_to_ours("model.something_new.weight")


def test_release_checkpoint_loads_and_prefers_ema(tmp_path, tiny_cfg):
    torch.manual_seed(1)
    src_model = IdealTokenizer(tiny_cfg.model).eval()
    torch.manual_seed(2)
    src_ema = IdealTokenizer(tiny_cfg.model).eval()
    path = tmp_path / "release.pt"
    torch.save({"model": release_layout(src_model), "ema": release_layout(src_ema), "steps": 10}, path)
    torch.manual_seed(3)
    ours = IdealTokenizer(tiny_cfg.model).eval()
    load_release_checkpoint(ours, str(path))
    x = images(2, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(ours.decode(ours.encode(x)), src_ema.decode(src_ema.encode(x)))
    load_release_checkpoint(ours, str(path), prefer_ema=False)
    with torch.no_grad():
        torch.testing.assert_close(ours.decode_features(ours.encode(x)), src_model.decode_features(src_model.encode(x)))
    # a checkpoint of another shape is a clear error, not a silent partial load
    other = IdealTokenizer(load_config("tiny", ["model.fusion.mode=linear"]).model)
    with pytest.raises(ValueError, match="does not fit"):
        load_release_checkpoint(other, str(path))


# ---- the paper preset's parameter counts (reference: the authors' release at random init) -------------------
def test_paper_parameter_counts_match_the_release():
    from bench import param_table

    rows = {name: (tr, fr) for name, tr, fr in param_table(load_config("paper"))}
    assert rows["pixel_decoder"] == (35_158_403, 0)
    assert rows["fusion"] == (8_401_920, 0)
    assert rows["feature_decoder"] == (53_096_448, 0)
    assert rows["quantizer"] == (1_048_576, 0)
    assert rows["pre_quant"] == (65_600, 0)
    assert rows["post_quant"] == (66_560, 0)
    assert rows["vfm"] == (2_048, 316_283_904)  # learnable shallow LayerNorm (paper), frozen SigLIP2 trunk
    assert sum(tr for tr, _ in rows.values()) == 97_837_507 + 2_048
    frozen_ln = {n: tr for n, tr, _ in param_table(load_config("paper", ["model.vfm.shallow_norm_trainable=false"]))}
    assert sum(frozen_ln.values()) == 97_837_507  # the release keeps the shallow LayerNorm frozen


def test_bench_params_prints_one_line_per_module(capsys):
    from bench import main

    main(["params", "--preset", "paper"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "total 97839555 316283904"
    assert all(len(line.split()) == 3 for line in lines)


def test_paper_training_offline_fails_fast_naming_the_file(offline):
    from ideal_ray.train.tokenizer_step import TokenizerSystem
    from ideal_ray.weights import MissingWeightsError

    # fast: nothing downloaded or retried (under `offline` a connection raises AssertionError)
    with pytest.raises(MissingWeightsError) as e:
        TokenizerSystem(load_config("paper"))
    msg = str(e.value)
    assert "open_clip_model.safetensors" in msg and "model.vfm.weights_path" in msg
