"""FrozenVFM and offline weight resolution: shapes, freezing, the exact token definitions, zero-shot pooling,
and the fail-fast path when pretrained weights are not on the machine (no network is ever touched)."""
from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch
import torch.nn.functional as F

from ideal_ray.config import VFMConfig, load_config, tiny
from ideal_ray.models.vfm import FrozenVFM, _build_trunk, _check_trunk, build_zero_shot_model, get_tokenizer
from ideal_ray.weights import (
    LPIPS_TRUNK_FILES,
    MissingWeightsError,
    lpips_model,
    resolve_hf_file,
    resolve_torch_hub_file,
)


def tiny_cfg(**changes) -> VFMConfig:
    return dataclasses.replace(tiny().model.vfm, **changes)


def images(b: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1  # (B, 3, H, W) in [-1, 1]


@pytest.fixture(scope="module")
def vfm() -> FrozenVFM:
    torch.manual_seed(0)
    return FrozenVFM(tiny_cfg())


# ----------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("size", [64, 80])
def test_output_shapes(vfm, size):
    cfg = vfm.cfg
    shallow, deep = vfm(images(size=size))
    assert shallow.shape == deep.shape == (2, cfg.grid ** 2, cfg.width)
    assert vfm.num_tokens == cfg.grid ** 2 == 64 and vfm.width == cfg.width


def test_trunk_frozen_and_stays_eval(vfm):
    vfm.train()
    assert not vfm.trunk.training and vfm.shallow_norm.training
    trainable = [n for n, p in vfm.named_parameters() if p.requires_grad]
    assert trainable == ["shallow_norm.weight", "shallow_norm.bias"]
    shallow, deep = vfm(images())
    assert shallow.requires_grad and not deep.requires_grad
    shallow.square().mean().backward()
    assert vfm.shallow_norm.weight.grad is not None
    assert all(p.grad is None for p in vfm.trunk.parameters())
    vfm.zero_grad(set_to_none=True)


def test_shallow_norm_can_be_frozen():
    m = FrozenVFM(tiny_cfg(shallow_norm_trainable=False))
    assert not any(p.requires_grad for p in m.parameters())


def test_single_layer_returns_no_shallow():
    m = FrozenVFM(tiny_cfg(single_layer=True, deep_layer=3))
    shallow, deep = m(images())
    assert shallow is None and deep.shape == (2, 64, 64)
    assert not any(p.requires_grad for p in m.parameters())  # the unused shallow norm does not train


# -------------------------------------------------------------------------------------- token definitions
def test_tokens_are_block_outputs(vfm):
    """deep = trunk.norm(output of block deep_layer); shallow = fresh LayerNorm(output of block shallow_layer)."""
    cfg, trunk = vfm.cfg, vfm.trunk
    img = images()
    shallow, deep = vfm(img)
    with torch.no_grad():
        x = trunk.norm_pre(trunk.patch_drop(trunk._pos_embed(trunk.patch_embed(vfm.preprocess(img)))))
        outs = []
        for blk in trunk.blocks:
            x = blk(x)
            outs.append(x)  # (B, N, C), no prefix tokens in a MAP ViT
        torch.testing.assert_close(deep, trunk.norm(outs[cfg.deep_layer - 1]))
        torch.testing.assert_close(shallow, F.layer_norm(outs[cfg.shallow_layer - 1], (cfg.width,), eps=1e-6))


def test_pool_equals_open_clip_encode_image(vfm):
    zs = build_zero_shot_model(vfm.cfg)
    m = FrozenVFM(vfm.cfg)
    m.trunk.load_state_dict(zs.visual.trunk.state_dict())
    img = images(size=80)
    _, deep = m(img)
    with torch.no_grad():
        torch.testing.assert_close(m.pool(deep), zs.encode_image(m.preprocess(img)), atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in zs.parameters())


def test_preprocess_range_and_size(vfm):
    cfg = vfm.cfg
    big = images(size=97) * 1.5  # out-of-range values and bicubic overshoot are clamped
    x = vfm.preprocess(big)
    assert x.shape == (2, 3, cfg.image_size, cfg.image_size)
    mean, std = torch.tensor(cfg.mean).view(1, 3, 1, 1), torch.tensor(cfg.std).view(1, 3, 1, 1)
    assert ((x * std + mean) >= -1e-6).all() and ((x * std + mean) <= 1 + 1e-6).all()
    same = images(size=cfg.image_size)  # already the right size: no resampling, exact affine map
    torch.testing.assert_close(vfm.preprocess(same), ((same + 1) / 2 - mean) / std)


def test_bf16_images_and_bf16_trunk():
    m = FrozenVFM(tiny_cfg())
    shallow, deep = m(images(size=80).bfloat16())  # preprocessing runs in fp32 (no CPU bf16 bicubic-AA kernel)
    assert shallow.dtype == deep.dtype == torch.float32
    m = m.to(torch.bfloat16)  # what a bf16 engine does to every parameter
    shallow, deep = m(images(size=80).bfloat16())
    assert shallow.dtype == deep.dtype == torch.bfloat16 and deep.shape == (2, 64, 64)


def test_tiny_tokenizer_offline(offline):
    cfg = tiny_cfg()
    tok = get_tokenizer(cfg)
    ids = tok(["a photo of a cat", "a dog"])
    assert ids.shape == (2, 16) and ids.dtype == torch.long
    zs = build_zero_shot_model(cfg)
    assert zs.encode_text(ids).shape == (2, cfg.width)


# -------------------------------------------------------------------------------------- local weights used
def test_local_open_clip_file_is_loaded(tmp_path):
    from safetensors.torch import save_file

    cfg = tiny_cfg()
    torch.manual_seed(1)
    src = build_zero_shot_model(cfg)
    path = str(tmp_path / "tiny_open_clip.safetensors")
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, path)
    torch.manual_seed(2)
    loaded = FrozenVFM(dataclasses.replace(cfg, weights_path=path))
    fresh = FrozenVFM(cfg)
    for (k, a), b, c in zip(src.visual.trunk.state_dict().items(), loaded.trunk.state_dict().values(),
                            fresh.trunk.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    assert not torch.equal(src.visual.trunk.patch_embed.proj.weight, fresh.trunk.patch_embed.proj.weight)


def dino_small(**changes) -> VFMConfig:
    """Real timm DINOv2 architecture at ViT-S size and a 4x4 grid (the cls token must be dropped)."""
    cfg = VFMConfig(backbone="dinov2", model_name="vit_small_patch14_dinov2.lvd142m", pretrained="",
                    image_size=56, patch_size=14, width=384, depth=12, heads=6, shallow_layer=4, deep_layer=12,
                    mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    return dataclasses.replace(cfg, **changes)


def test_timm_backbone_local_file_is_loaded(tmp_path, offline):
    torch.manual_seed(3)
    src = FrozenVFM(dino_small())
    path = str(tmp_path / "dino_small.pth")
    torch.save(src.trunk.state_dict(), path)
    torch.manual_seed(4)
    loaded = FrozenVFM(dino_small(pretrained="default", weights_path=path))
    torch.testing.assert_close(loaded.trunk.state_dict(), src.trunk.state_dict())
    shallow, deep = loaded(images())
    assert loaded.trunk.num_prefix_tokens == 1
    assert shallow.shape == deep.shape == (2, 16, 384)  # prefix token dropped
    with pytest.raises(ValueError, match="attention-pool"):
        loaded.pool(deep)


def test_trunk_size_mismatch_is_one_clear_error():
    with pytest.raises(ValueError, match="depth 12 and width 384.*model.vfm.depth/width"):
        FrozenVFM(dino_small(width=1024))


def test_tiny_name_must_not_contain_siglip():
    with pytest.raises(ValueError, match="siglip"):
        FrozenVFM(tiny_cfg(model_name="tiny-siglip-test"))


@pytest.mark.parametrize("preset,params", [("paper", 316_283_904), ("paper+backbone-dinov2", None),
                                           ("paper+backbone-dinov3", None)])
def test_paper_trunks_match_config_on_meta(preset, params):
    """The paper-size trunks (built on the meta device, no memory, no weights) have the configured depth,
    width and a 24 x 24 grid."""
    cfg = dataclasses.replace(load_config(preset).model.vfm, pretrained="")
    trunk = _build_trunk(cfg, device="meta")
    _check_trunk(trunk, cfg)
    assert tuple(trunk.patch_embed.grid_size) == (24, 24)
    if params is not None:
        assert sum(p.numel() for p in trunk.parameters()) == params


# ------------------------------------------------------------------------------------- offline error path
def _assert_fast_missing(build, *needles):
    # fast: nothing downloaded or retried (under `offline` a connection raises AssertionError)
    with pytest.raises(MissingWeightsError) as info:
        build()
    for needle in needles:
        assert needle in str(info.value)
    return info.value


def test_siglip2_without_weights_fails_fast(offline):
    err = _assert_fast_missing(lambda: FrozenVFM(VFMConfig()), "open_clip_model.safetensors",
                               "model.vfm.weights_path=", "huggingface-cli download timm/ViT-L-16-SigLIP2-384")
    assert isinstance(err, FileNotFoundError)
    assert str(offline / "hf" / "hub") in str(err)


@pytest.mark.parametrize("preset,repo", [("paper+backbone-dinov2", "timm/vit_large_patch14_dinov2.lvd142m"),
                                         ("paper+backbone-dinov3", "timm/vit_large_patch16_dinov3.lvd1689m")])
def test_dino_without_weights_fails_fast(offline, preset, repo):
    cfg = load_config(preset).model.vfm
    _assert_fast_missing(lambda: FrozenVFM(cfg), "model.safetensors", "model.vfm.weights_path=", repo)


def test_missing_explicit_weights_path_is_an_error(offline):
    missing = str(offline / "nope" / "open_clip_model.safetensors")
    _assert_fast_missing(lambda: FrozenVFM(VFMConfig(weights_path=missing)), missing, "model.vfm.weights_path=")
    _assert_fast_missing(lambda: FrozenVFM(tiny_cfg(weights_path=missing)), missing)


def test_siglip2_tokenizer_without_cache_fails_fast(offline):
    _assert_fast_missing(lambda: get_tokenizer(VFMConfig()), "tokenizer.json", "HF_HOME")


def test_lpips_without_trunk_weights_fails_fast(offline):
    _assert_fast_missing(lambda: lpips_model("vgg", pretrained=True), "vgg16-397923af.pth",
                         "loss.lpips_weights_path=", "hub/checkpoints")


def test_missing_weights_error_pickles():
    err = MissingWeightsError("x", ["/a/b.pth"], "loss.lpips_weights_path", "b.pth", "wget u")
    back = pickle.loads(pickle.dumps(err))
    assert str(back) == str(err) and back.looked_for == ["/a/b.pth"] and back.config_key == err.config_key


# ---------------------------------------------------------------------------------------- cache lookups
def test_resolve_hf_file_reads_the_cache(offline):
    snap = offline / "hf" / "hub" / "models--org--repo" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "model.safetensors").write_bytes(b"x")
    (offline / "hf" / "hub" / "models--org--repo" / "refs").mkdir()
    (offline / "hf" / "hub" / "models--org--repo" / "refs" / "main").write_text("abc123")
    assert resolve_hf_file("org/repo", ["missing.bin", "model.safetensors"]) == str(snap / "model.safetensors")
    with pytest.raises(MissingWeightsError, match="other.bin"):
        resolve_hf_file("org/repo", "other.bin")


def _alexnet_state():
    import torchvision

    torch.manual_seed(5)
    return torchvision.models.alexnet(weights=None).state_dict()


def _assert_trunk_is(model, state):
    for name, p in model.net.state_dict().items():  # "slice2.3.weight" <- "features.3.weight"
        torch.testing.assert_close(p, state["features." + name.split(".", 1)[1]])


def test_lpips_uses_local_trunk_file(offline):
    state = _alexnet_state()
    path = offline / "my_alexnet.pth"
    torch.save(state, path)
    model = lpips_model("alex", pretrained=True, weights_path=str(path))
    _assert_trunk_is(model, state)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    x = images(size=32)
    assert model(x, x).abs().max() < 1e-6


def test_lpips_uses_torch_hub_cache(offline):
    state = _alexnet_state()
    folder = offline / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(state, folder / LPIPS_TRUNK_FILES["alex"])
    assert resolve_torch_hub_file(LPIPS_TRUNK_FILES["alex"]) == str(folder / LPIPS_TRUNK_FILES["alex"])
    _assert_trunk_is(lpips_model("alex", pretrained=True), state)


def test_lpips_random_trunk_needs_no_file(offline):
    model = lpips_model("alex", pretrained=False)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    a, b = images(size=32, seed=1), images(size=32, seed=2)
    assert model(a, b).shape == (2, 1, 1, 1)
