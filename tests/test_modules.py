"""Property tests for the trainable tokenizer modules: fusion, quantizer, feature decoder, pixel decoder."""
from __future__ import annotations

import pytest
import torch

from ideal_ray.config import FusionConfig, paper, tiny
from ideal_ray.models.feature_decoder import FeatureDecoder
from ideal_ray.models.fusion import AttnFusion, LinearFusion, NoFusion, build_fusion
from ideal_ray.models.pixel_decoder import PixelDecoder
from ideal_ray.models.quantizer import QuantizerOutput, VectorQuantizer


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture
def tcfg():
    return tiny().model


# ------------------------------------------------------------------------------- paper-scale counts
def test_paper_param_counts_on_meta():
    m = paper().model
    with torch.device("meta"):
        fusion = build_fusion(m.fusion, m.vfm.width)
        fdec = FeatureDecoder(m.feature_decoder, m.vfm.num_tokens, m.vfm.width)
        pdec = PixelDecoder(m.pixel_decoder, m.vfm.width)
        vq = VectorQuantizer(m.quantizer)
    assert isinstance(fusion, AttnFusion)
    assert n_params(fusion) == 8_401_920
    assert n_params(fdec) == 53_096_448
    assert n_params(pdec) == 35_158_403
    assert vq.embedding.weight.shape == (16384, 64)
    assert n_params(vq) == 1_048_576


def test_fusion_ablation_param_counts_on_meta():
    with torch.device("meta"):
        assert n_params(build_fusion(FusionConfig(mode="linear"), 1024)) == 2048 * 1024 + 1024
        assert n_params(build_fusion(FusionConfig(mode="none"), 1024)) == 0


# ---------------------------------------------------------------------------------------- fusion
@pytest.mark.parametrize("mode,cls", [("attention", AttnFusion), ("linear", LinearFusion), ("none", NoFusion)])
def test_fusion_shapes(tcfg, mode, cls):
    torch.manual_seed(0)
    width = tcfg.vfm.width
    fusion = build_fusion(FusionConfig(mode=mode, heads=tcfg.fusion.heads), width).eval()
    assert isinstance(fusion, cls)
    deep, shallow = torch.randn(2, 16, width), torch.randn(2, 16, width)
    assert fusion(deep, shallow).shape == (2, 16, width)


def test_no_fusion_returns_deep_unchanged(tcfg):
    deep = torch.randn(2, 16, tcfg.vfm.width)
    fusion = build_fusion(FusionConfig(mode="none"), tcfg.vfm.width)
    assert fusion(deep, torch.randn_like(deep)) is deep
    assert fusion(deep, None) is deep


@pytest.mark.parametrize("mode", ["attention", "linear"])
def test_fusion_depends_on_shallow(tcfg, mode):
    torch.manual_seed(0)
    width = tcfg.vfm.width
    fusion = build_fusion(FusionConfig(mode=mode, heads=tcfg.fusion.heads), width).eval()
    deep, shallow = torch.randn(2, 16, width), torch.randn(2, 16, width)
    with torch.no_grad():
        a = fusion(deep, shallow)
        b = fusion(deep, shallow + torch.randn_like(shallow))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="shallow"):
        fusion(deep, None)


def test_attn_fusion_gradients_reach_both_inputs(tcfg):
    width = tcfg.vfm.width
    fusion = build_fusion(tcfg.fusion, width)
    deep = torch.randn(2, 16, width, requires_grad=True)
    shallow = torch.randn(2, 16, width, requires_grad=True)
    fusion(deep, shallow).sum().backward()
    assert deep.grad.abs().sum() > 0 and shallow.grad.abs().sum() > 0


def test_fusion_unknown_mode():
    with pytest.raises(ValueError, match="unknown"):
        build_fusion(FusionConfig(mode="concat"), 64)


# ------------------------------------------------------------------------------------- quantizer
def test_quantizer_init_rows_unit_norm(tcfg):
    vq = VectorQuantizer(tcfg.quantizer)
    norms = vq.embedding.weight.norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    assert torch.allclose(vq.codebook().norm(dim=-1), torch.ones(tcfg.quantizer.codebook_size), atol=1e-5)


def test_quantizer_output_shapes_and_norms(tcfg):
    torch.manual_seed(0)
    q = tcfg.quantizer
    vq = VectorQuantizer(q)
    out = vq(torch.randn(2, 16, q.dim) * 3)
    assert isinstance(out, QuantizerOutput)
    assert out.z.shape == out.z_q.shape == out.z_st.shape == (2, 16, q.dim)
    assert out.indices.shape == (2, 16) and out.indices.dtype == torch.long
    assert out.distances.shape == (32, q.codebook_size)
    assert torch.allclose(out.z.norm(dim=-1), torch.ones(2, 16), atol=1e-5)
    assert torch.allclose(out.z_q.norm(dim=-1), torch.ones(2, 16), atol=1e-5)


def test_quantizer_distances_match_brute_force(tcfg):
    torch.manual_seed(0)
    q = tcfg.quantizer
    vq = VectorQuantizer(q)
    out = vq(torch.randn(2, 16, q.dim))
    z = out.z.reshape(-1, q.dim)
    brute = ((z[:, None, :] - vq.codebook()[None, :, :]) ** 2).sum(-1)  # (M, K)
    assert torch.allclose(out.distances, brute, atol=1e-5)
    assert torch.equal(out.indices.reshape(-1), brute.argmin(dim=1))
    # the chosen code is the nearest one
    assert torch.allclose(out.z_q.reshape(-1, q.dim), vq.codebook()[brute.argmin(dim=1)])


def test_quantizer_codes_round_trip(tcfg):
    torch.manual_seed(0)
    q = tcfg.quantizer
    vq = VectorQuantizer(q)
    out = vq(torch.randn(3, 16, q.dim))
    codes = vq.codes(out.indices)  # (B, N, D)
    assert torch.allclose(codes, out.z_q)
    assert torch.equal(vq(codes).indices, out.indices)
    grid = vq.codes(out.indices.view(3, 4, 4))  # (B, H, W, D)
    assert grid.shape == (3, 4, 4, q.dim)
    with pytest.raises(TypeError, match="integer"):
        vq.codes(out.indices.float())


def test_quantizer_straight_through(tcfg):
    torch.manual_seed(0)
    q = tcfg.quantizer
    vq = VectorQuantizer(q)
    x = torch.randn(2, 16, q.dim, requires_grad=True)
    out = vq(x)
    assert torch.allclose(out.z_st, out.z_q, atol=1e-6)
    out.z_st.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert vq.embedding.weight.grad is None  # straight-through sends nothing to the codebook
    out.z_q.pow(2).sum().backward()
    assert vq.embedding.weight.grad is not None and vq.embedding.weight.grad.abs().sum() > 0


def test_quantizer_distances_carry_grad(tcfg):
    q = tcfg.quantizer
    vq = VectorQuantizer(q)
    x = torch.randn(2, 16, q.dim, requires_grad=True)
    out = vq(x)
    torch.softmax(-out.distances / q.entropy_temperature, dim=-1).max(dim=-1).values.sum().backward()
    assert x.grad.abs().sum() > 0 and vq.embedding.weight.grad.abs().sum() > 0


def test_quantizer_bf16_autocast_picks_same_codes(tcfg):
    torch.manual_seed(0)
    q = tcfg.quantizer
    vq = VectorQuantizer(q)
    x = torch.randn(2, 16, q.dim)
    ref = vq(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vq(x)
    assert out.distances.dtype == torch.float32
    assert torch.equal(out.indices, ref.indices)


def test_quantizer_rejects_wrong_dim(tcfg):
    vq = VectorQuantizer(tcfg.quantizer)
    with pytest.raises(ValueError, match="model.quantizer.dim"):
        vq(torch.randn(2, 16, tcfg.quantizer.dim + 1))


def test_quantizer_usage(tcfg):
    q = tcfg.quantizer
    K, window = q.codebook_size, q.usage_window
    vq = VectorQuantizer(q)
    assert vq.usage() == 0.0
    vq.update_usage(torch.arange(K).view(2, -1))
    assert vq.usage() == 1.0
    vq.reset_usage()
    vq.update_usage(torch.tensor([[7]]))
    assert vq.usage() == pytest.approx(1 / K)
    # the ring keeps only the last `window` indices, newest last
    vq.reset_usage()
    vq.update_usage(torch.arange(K))
    vq.update_usage(torch.zeros(window - 1, dtype=torch.long))
    assert vq.usage() == pytest.approx(2 / K)  # id 0 plus the single surviving id K - 1
    assert vq.usage_buffer[-1].item() == 0 and vq.usage_buffer[0].item() == K - 1
    vq.update_usage(torch.full((3 * window,), 5, dtype=torch.long))  # longer than the window
    assert vq.usage() == pytest.approx(1 / K)


def test_quantizer_usage_buffer_not_in_state_dict(tcfg):
    vq = VectorQuantizer(tcfg.quantizer)
    assert set(vq.state_dict()) == {"embedding.weight"}


# ------------------------------------------------------------------------------- feature decoder
def test_feature_decoder_shapes(tcfg):
    torch.manual_seed(0)
    fd, v = tcfg.feature_decoder, tcfg.vfm
    dec = FeatureDecoder(fd, v.num_tokens, v.width)
    tokens = torch.randn(2, v.num_tokens, fd.width)
    deep, shallow = dec(tokens)
    assert deep.shape == shallow.shape == (2, v.num_tokens, v.width)
    assert not torch.allclose(deep, shallow)
    assert dec.register_tokens.shape == (1, fd.num_registers, fd.width)
    assert torch.count_nonzero(dec.register_tokens) == 0
    assert torch.count_nonzero(dec.deep_head.bias) == 0


def test_feature_decoder_positions_matter(tcfg):
    """Permuting the input tokens does not just permute the outputs: positions are learned and used."""
    torch.manual_seed(0)
    fd, v = tcfg.feature_decoder, tcfg.vfm
    dec = FeatureDecoder(fd, v.num_tokens, v.width).eval()
    tokens = torch.randn(1, v.num_tokens, fd.width)
    perm = torch.randperm(v.num_tokens)
    with torch.no_grad():
        a, _ = dec(tokens)
        b, _ = dec(tokens[:, perm])
    assert not torch.allclose(a[:, perm], b, atol=1e-4)


def test_feature_decoder_rejects_wrong_tokens(tcfg):
    fd, v = tcfg.feature_decoder, tcfg.vfm
    dec = FeatureDecoder(fd, v.num_tokens, v.width)
    with pytest.raises(ValueError, match="expects tokens"):
        dec(torch.randn(2, v.num_tokens + 1, fd.width))


# --------------------------------------------------------------------------------- pixel decoder
def test_pixel_decoder_shapes(tcfg):
    torch.manual_seed(0)
    pd, v = tcfg.pixel_decoder, tcfg.vfm
    dec = PixelDecoder(pd, v.width)
    feat = torch.randn(2, v.width, v.grid, v.grid)
    img = dec(feat)
    assert img.shape == (2, 3, tcfg.image_size, tcfg.image_size)
    assert dec.upsample_factor == tcfg.image_size // v.grid
    assert dec.last_layer is dec.conv_out.weight
    img.mean().backward()
    assert dec.last_layer.grad is not None


def test_pixel_decoder_channels_last_matches(tcfg):
    torch.manual_seed(0)
    pd, v = tcfg.pixel_decoder, tcfg.vfm
    dec = PixelDecoder(pd, v.width).eval()
    feat = torch.randn(1, v.width, v.grid, v.grid)
    with torch.no_grad():
        ref = dec(feat)
        dec = dec.to(memory_format=torch.channels_last)
        out = dec(feat.to(memory_format=torch.channels_last))
    assert torch.allclose(ref, out, atol=1e-4)


def test_pixel_decoder_res_blocks_per_level(tcfg):
    pd, v = tcfg.pixel_decoder, tcfg.vfm
    dec = PixelDecoder(pd, v.width)
    assert len(dec.conv_blocks) == len(pd.ch_mult)
    assert all(len(b.res) == pd.num_res_blocks for b in dec.conv_blocks)
    assert not hasattr(dec.conv_blocks[-1], "upsample")
