"""Config presets, ablation variants, overrides and one-sentence validation errors."""
import dataclasses

import pytest

from ideal_ray.config import (ABLATIONS, ConfigError, TokenizerTrainConfig, apply_overrides, from_dict, load_config,
                              preset_names)


def test_paper_preset_has_spec_values():
    c = load_config("paper")
    v = c.model.vfm
    assert (v.model_name, v.image_size, v.patch_size, v.width, v.depth) == ("ViT-L-16-SigLIP2-384", 384, 16, 1024, 24)
    assert (v.shallow_layer, v.deep_layer) == (8, 24) and v.grid == 24
    assert c.model.quantizer.codebook_size == 16384 and c.model.quantizer.dim == 64
    assert c.model.fusion.mode == "attention" and c.model.fusion.heads == 8
    assert c.model.pixel_decoder.ch_mult == (1, 1, 2, 2, 4)
    assert c.loss.disc_start == 20000 and c.loss.cr_weight == 4.0 and c.loss.lecam_weight == 0.001
    assert c.optim.betas == (0.9, 0.95) and c.optim.ema_decay == 0.9999 and c.data.global_batch == 256


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_and_variant_validates(name):
    load_config(name)


def test_ablations_change_what_they_name():
    assert load_config("paper+fusion-linear").model.fusion.mode == "linear"
    assert load_config("paper+fusion-none").model.fusion.mode == "none"
    assert load_config("paper+shallow-align-off").loss.shallow_align is False
    d2 = load_config("paper+backbone-dinov2").model.vfm
    assert d2.backbone == "dinov2" and d2.grid == 24 and d2.mean[0] == pytest.approx(0.485)
    assert load_config("paper+backbone-dinov3").model.vfm.grid == 24
    lp = load_config("paper+layer-12")
    assert lp.model.vfm.single_layer and lp.model.vfm.deep_layer == 12 and lp.model.fusion.mode == "none"
    assert not lp.loss.shallow_align
    both = load_config("tiny+fusion-none+shallow-align-off")
    assert both.model.fusion.mode == "none" and not both.loss.shallow_align
    assert set(ABLATIONS) >= {"fusion-attention", "fusion-linear", "fusion-none", "backbone-dinov2", "layer-8"}


def test_overrides_are_typed():
    c = load_config("tiny", ["optim.lr=2e-4", "model.fusion.mode=linear", "loss.diffaug=false",
                             "model.pixel_decoder.ch_mult=1,1,2", "optim.betas=0.8,0.9", "data.root=/x/y"])
    assert c.optim.lr == 2e-4 and isinstance(c.optim.lr, float)
    assert c.model.fusion.mode == "linear" and c.loss.diffaug is False
    assert c.model.pixel_decoder.ch_mult == (1, 1, 2) and c.optim.betas == (0.8, 0.9)
    assert c.data.root == "/x/y"


def test_overrides_do_not_touch_the_input():
    base = load_config("tiny")
    apply_overrides(base, ["optim.lr=5.0"])
    assert base.optim.lr != 5.0


@pytest.mark.parametrize("overrides, fragment", [
    (["model.vfm.deep_layer=30"], "beyond the backbone's depth"),
    (["model.vfm.shallow_layer=9"], "beyond the backbone's depth"),
    (["model.vfm.shallow_layer=4", "model.vfm.deep_layer=3"], "must come before"),
    (["model.quantizer.dim=128"], "model.quantizer.dim 128"),
    (["model.fusion.mode=cross"], "model.fusion.mode 'cross' is unknown"),
    (["model.vfm.backbone=clip"], "model.vfm.backbone 'clip' is unknown"),
    (["model.quantizer.codebook_size=70000"], "uint16"),
    (["model.pixel_decoder.ch_mult=1,2"], "upsamples"),
    (["discriminator.tap_blocks=0,9"], "tap_blocks"),
    (["model.vfm.single_layer=true"], "model.fusion.mode=none"),
    (["optim.precision=fp8"], "optim.precision"),
    (["data.resize_min=16"], "data.resize_min"),
    (["optim.lr=abc"], "needs a number"),
    (["loss.diffaug=maybe"], "needs a boolean"),
    (["optim.betas=0.9"], "exactly 2"),
    (["model.nope=1"], "has no field 'nope'"),
    (["model=1"], "names a section"),
    (["optim.lr"], "not of the form"),
    (["data.global_batch=9"], "does not divide evenly over dist.num_workers 2"),
    (["dist.zero_stage=3"], "dist.zero_stage 3"),
])
def test_validation_errors_are_one_clear_sentence(overrides, fragment):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides)
    msg = str(e.value)
    assert fragment in msg
    assert msg.endswith(".") and "\n" not in msg


def test_unknown_preset_and_variant():
    with pytest.raises(ConfigError, match="Unknown preset"):
        load_config("huge")
    with pytest.raises(ConfigError, match="Unknown ablation"):
        load_config("paper+fusion-cubic")


def test_round_trip_through_dict():
    c = load_config("paper+fusion-linear")
    again = from_dict(TokenizerTrainConfig, dataclasses.asdict(c))
    assert again == c


# ---- the AR stage ------------------------------------------------------------------------------------------
def test_ar_presets_follow_the_spec():
    from ideal_ray.config import load_ar_config

    b, l_, xxl, b3 = (load_ar_config(f"ar-{s}") for s in ("B", "L", "XXL", "3B"))
    assert (b.model.n_layer, b.model.n_head, b.model.dim) == (12, 12, 768)
    assert (b3.model.n_layer, b3.model.n_head, b3.model.dim) == (24, 32, 3200)
    assert [c.data.global_batch for c in (b, l_, xxl, b3)] == [512, 512, 256, 128]
    assert [c.optim.epochs for c in (b, l_, xxl, b3)] == [300, 300, 200, 200]
    assert [c.dist.zero_stage for c in (b, l_, xxl, b3)] == [1, 1, 2, 2]
    assert b.optim.lr == 1e-4 and b.optim.lr_schedule == "constant" and b.optim.base_batch == 0
    assert b.model.vocab_size == 16384 and b.model.num_tokens == 576 and b.model.class_dropout == 0.1


@pytest.mark.parametrize("overrides, fragment", [
    (["model.n_head=7"], "does not divide model.dim"),
    (["data.global_batch=9"], "does not divide evenly"),
    (["dist.zero_stage=3"], "dist.zero_stage 3"),
    (["model.token_dropout=1.5"], "model.token_dropout"),
    (["optim.lr_schedule=step"], "optim.lr_schedule 'step'"),
])
def test_ar_validation_errors(overrides, fragment):
    from ideal_ray.config import load_ar_config

    with pytest.raises(ConfigError, match=fragment):
        load_ar_config("ar-tiny", overrides)
    with pytest.raises(ConfigError, match="Unknown AR preset"):
        load_ar_config("ar-huge")
