"""DINO discriminator, GAN losses and DiffAugment (spec section 6), on the tiny preset."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from ideal_ray.config import paper, tiny
from ideal_ray.losses.diffaug import diff_augment, rand_cutout, rand_translation, strong_augment
from ideal_ray.losses.gan import (LeCAM, consistency_loss, discriminator_loss, generator_adv_loss, hinge_d_loss,
                                  hinge_g_loss, lecam_loss)
from ideal_ray.models.discriminator import BatchNormLocal, DinoDiscriminator, head_param_count


@pytest.fixture(scope="module")
def cfg():
    return tiny()


@pytest.fixture()
def disc(cfg):
    torch.manual_seed(0)
    return DinoDiscriminator(cfg.discriminator)


def _images(b=4, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1


# ------------------------------------------------------------------------------------ discriminator
def test_output_shape_add_cls(disc, cfg):
    d = cfg.discriminator
    L = (d.image_size // d.patch_size) ** 2  # release readout: class token added to each patch token
    out = disc(_images())
    assert out.shape == (4, 5 * L)
    assert [t.shape for t in disc.taps(_images())] == [(4, d.width, L)] * 5


def test_output_shape_cls_token(cfg):
    d = dataclasses.replace(cfg.discriminator, tap_readout="cls_token")
    L = 1 + (d.image_size // d.patch_size) ** 2
    assert DinoDiscriminator(d)(_images(2)).shape == (2, 5 * L)


def test_input_sizes(disc):
    for size in (32, 40, 24):  # equal, larger (crop or area), smaller (bicubic)
        assert disc(_images(2, size)).shape == (2, 80)


def test_trunk_frozen_heads_trainable(disc):
    assert all(not p.requires_grad for p in disc.trunk.parameters())
    trainable = [p for p in disc.parameters() if p.requires_grad]
    assert len(trainable) > 0
    assert {id(p) for p in trainable} == {id(p) for p in disc.heads.parameters()}
    assert {id(p) for p in disc.heads_parameters()} == {id(p) for p in trainable}
    disc.train()
    assert not disc.trunk.training and disc.heads.training


def test_gradient_reaches_input(disc):
    x = _images(2).requires_grad_(True)
    disc(x).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in disc.trunk.parameters())
    assert all(p.grad is not None for p in disc.heads_parameters())


def test_paper_param_count_meta():
    d = dataclasses.replace(paper().discriminator, pretrained=False)
    with torch.device("meta"):
        D = DinoDiscriminator(d, load_weights=False)
    # One head at width C = 384, kernel 9:
    #   SN-Conv1d k=1:   C*C + C     = 147,456 + 384   =   147,840
    #   BN affine:       2*C                           =       768
    #   SN-Conv1d k=9:   9*C*C + C   = 1,327,104 + 384 = 1,327,488
    #   BN affine:       2*C                           =       768
    #   SN-Conv1d -> 1:  C + 1                         =       385
    #   head total                                     = 1,477,249
    # Five heads (embedding + blocks 2, 5, 8, 11): 5 * 1,477,249 = 7,386,245 (release prints "7.39M").
    assert head_param_count(384, 9) == 1_477_249
    assert sum(p.numel() for p in D.parameters() if p.requires_grad) == 7_386_245
    assert sum(p.numel() for p in D.trunk.parameters()) == 21_665_664  # ViT-S/16, no classifier head
    assert D.tokens_per_tap == 196


def test_trunk_weights_from_local_file_and_hf_cache(cfg, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from ideal_ray.weights import MissingWeightsError

    src = DinoDiscriminator(cfg.discriminator)
    state = {k: v.contiguous() for k, v in src.trunk.state_dict().items()}
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    d = dataclasses.replace(cfg.discriminator, pretrained=True, weights_path=str(path))
    torch.manual_seed(123)  # a different random init, then overwritten by the file
    D = DinoDiscriminator(d)
    assert all(torch.equal(D.trunk.state_dict()[k], v) for k, v in state.items())

    # HF hub cache layout: models--timm--<name>/snapshots/<rev>/model.safetensors + refs/main
    repo = tmp_path / "hub" / f"models--timm--{cfg.discriminator.model_name}"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123" / "model.safetensors").write_bytes(path.read_bytes())
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    D = DinoDiscriminator(dataclasses.replace(d, weights_path=""))
    assert all(torch.equal(D.trunk.state_dict()[k], v) for k, v in state.items())

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(MissingWeightsError, match="discriminator.weights_path"):
        DinoDiscriminator(dataclasses.replace(d, weights_path=""))
    wrong = dataclasses.replace(cfg.discriminator, width=32, heads=2, pretrained=True, weights_path=str(path))
    with pytest.raises(ValueError, match="do not fit"):
        DinoDiscriminator(wrong)


def test_bad_config_errors(cfg):
    with pytest.raises(ValueError, match="tap_readout"):
        DinoDiscriminator(dataclasses.replace(cfg.discriminator, tap_readout="mean"))
    with pytest.raises(ValueError, match="tap_blocks"):
        DinoDiscriminator(dataclasses.replace(cfg.discriminator, tap_blocks=(0, 9)))


def test_preprocess_reproducible_and_crop(cfg):
    d = dataclasses.replace(cfg.discriminator, crop_prob=1.0)
    D = DinoDiscriminator(d)
    x = _images(2)
    torch.manual_seed(3)
    a = D.preprocess(x)
    torch.manual_seed(3)
    b = D.preprocess(x)
    assert torch.equal(a, b) and a.shape == (2, 3, 32, 32)
    normed = x * D.x_scale + D.x_shift
    windows = normed.unfold(2, 32, 1).unfold(3, 32, 1)  # (B, 3, 33, 33, 32, 32): every crop position
    diffs = (windows - a[:, :, None, None]).abs().amax(dim=(0, 1, 4, 5))  # (33, 33)
    assert diffs.min() < 1e-6  # one crop, the same offset for the whole batch
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(D.preprocess(x, g1), D.preprocess(x, g2))
    D0 = DinoDiscriminator(dataclasses.replace(cfg.discriminator, crop_prob=0.0))
    assert torch.allclose(D0.preprocess(x), F.avg_pool2d(normed, 2), atol=1e-6)  # area resize 64 -> 32


def test_batchnorm_local_groups():
    bn = BatchNormLocal(3)
    x = torch.randn(16, 3, 5) * 4 + 2
    y = bn(x)
    for g in y.view(2, 8, 3, 5):  # two virtual batches of 8
        assert torch.allclose(g.mean(dim=(0, 2)), torch.zeros(3), atol=1e-5)
        assert torch.allclose(g.var(dim=(0, 2), unbiased=False), torch.ones(3), atol=1e-3)
    assert bn(torch.randn(9, 3, 5)).shape == (9, 3, 5)  # uneven split works


# ------------------------------------------------------------------------------------------- losses
def test_hinge_by_hand():
    real = torch.tensor([[2.0, 0.5], [-1.0, 0.0]])
    fake = torch.tensor([[-2.0, 0.5], [1.0, -0.5]])
    # relu(1 - real) = [0, 0.5, 2, 1] -> mean 0.875; relu(1 + fake) = [0, 1.5, 2, 0.5] -> mean 1.0
    loss, m = hinge_d_loss(real, fake)
    assert loss.item() == pytest.approx(0.5 * (0.875 + 1.0))
    assert m["d_hinge"] == pytest.approx(0.9375)
    g, mg = hinge_g_loss(fake)
    assert g.item() == pytest.approx(-(-2.0 + 0.5 + 1.0 - 0.5) / 4) and mg["g_hinge"] == pytest.approx(0.25)


def test_lecam_by_hand():
    real = torch.tensor([1.0, -1.0, 3.0])
    fake = torch.tensor([0.0, 2.0])
    # ema_real 0.5, ema_fake 0.2: relu(real - 0.2)^2 = [0.64, 0, 7.84] -> mean 2.8267;
    # relu(0.5 - fake)^2 = [0.25, 0] -> mean 0.125
    loss, m = lecam_loss(real, fake, 0.5, 0.2)
    assert loss.item() == pytest.approx((0.64 + 7.84) / 3 + 0.125, rel=1e-5)
    assert m["d_lecam"] == pytest.approx(loss.item())


def test_lecam_state():
    lc = LeCAM(decay=0.9)
    lc.update(torch.tensor(1.0), 2.0)
    lc.update(1.0, torch.tensor(2.0))
    # 0 -> 0.1 -> 0.19 (real); 0 -> 0.2 -> 0.38 (fake)
    assert lc.ema_real.item() == pytest.approx(0.19) and lc.ema_fake.item() == pytest.approx(0.38)
    other = LeCAM(decay=0.9)
    other.load_state_dict(lc.state_dict())
    assert other.ema_real.item() == pytest.approx(0.19) and other.ema_fake.item() == pytest.approx(0.38)
    with pytest.raises(ValueError, match="decay"):
        LeCAM(decay=1.0)


def test_consistency_by_hand():
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 0.0, 4.0])
    loss, m = consistency_loss(a, b)
    assert loss.item() == pytest.approx((0 + 4 + 1) / 3) and m["d_cr"] == pytest.approx(5 / 3)


def test_discriminator_loss_schedule(disc, cfg):
    lc = cfg.loss
    real, fake = _images(4, seed=1), _images(4, seed=2)
    torch.manual_seed(0)
    lecam = LeCAM.from_config(lc)
    assert lecam.decay == lc.lecam_decay
    loss, m = discriminator_loss(disc, real, fake, lc, step=lc.disc_start - 1, lecam=lecam)
    assert loss.item() == 0.0 and m["d_weight"] == 0.0 and m["d_cr"] == 0.0
    assert m["d_hinge"] > 0.0  # D still ran: logits logged, LeCAM EMAs warm
    assert lecam.ema_real.item() != 0.0
    loss.backward()  # graph-connected zero
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in disc.heads_parameters())

    disc.zero_grad()
    loss, m = discriminator_loss(disc, real, fake, lc, step=lc.disc_start, lecam=lecam)
    assert m["d_weight"] == lc.disc_weight and m["d_cr"] > 0.0
    expected = lc.disc_weight * (m["d_hinge"] + lc.lecam_weight * m["d_lecam"]) + lc.cr_weight * m["d_cr"]
    assert loss.item() == pytest.approx(float(expected), rel=1e-5)
    assert set(m) >= {"d_hinge", "d_lecam", "d_cr", "logits_real_mean", "logits_fake_mean", "d_weight"}
    loss.backward()
    assert sum(p.grad.abs().sum() for p in disc.heads_parameters()) > 0


def test_discriminator_loss_detaches_fake(disc, cfg):
    fake = _images(2, seed=2).requires_grad_(True)
    loss, _ = discriminator_loss(disc, _images(2), fake, cfg.loss, step=cfg.loss.disc_start, lecam=LeCAM())
    loss.backward()
    assert fake.grad is None


def test_generator_adv_loss(disc, cfg):
    lc = cfg.loss

    class Boom(torch.nn.Module):
        def forward(self, x, generator=None):
            raise AssertionError("D must not run before disc_start")

    loss, m = generator_adv_loss(Boom(), _images(2), lc, step=lc.disc_start - 1)
    assert loss.item() == 0.0 and m["adv_weight"] == 0.0
    fake = _images(2, seed=2).requires_grad_(True)
    loss, m = generator_adv_loss(disc, fake, lc, step=lc.disc_start, generator=torch.Generator().manual_seed(0))
    assert m["adv_weight"] == lc.adv_weight and loss.item() == pytest.approx(lc.adv_weight * m["g_hinge"])
    loss.backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0


def test_d_steps_lower_loss(cfg):
    torch.manual_seed(0)
    D = DinoDiscriminator(cfg.discriminator)
    lc = dataclasses.replace(cfg.loss, disc_start=0, diffaug=False, cr_weight=0.0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    real = torch.stack([xx, yy, xx * yy]).expand(4, 3, 64, 64).contiguous() * 0.8  # smooth gradients
    fake = _images(4, seed=7)  # uniform noise
    opt = torch.optim.Adam(D.heads_parameters(), lr=1e-3)
    lecam = LeCAM(lc.lecam_decay)
    losses = []
    for step in range(6):
        g = torch.Generator().manual_seed(step)
        loss, _ = discriminator_loss(D, real, fake, lc, step=step, lecam=lecam, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# ------------------------------------------------------------------------------------------ DiffAugment
def test_diff_augment_shape_grad_identity():
    x = _images(3, 32).requires_grad_(True)
    y = diff_augment(x, prob=1.0, generator=torch.Generator().manual_seed(0))
    assert y.shape == x.shape and not torch.equal(y, x)
    y.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert torch.equal(diff_augment(x, prob=0.0), x)
    assert strong_augment(x, torch.Generator().manual_seed(0)).shape == x.shape


def test_diff_augment_reproducible():
    x = _images(3, 32)
    a = diff_augment(x, prob=0.5, generator=torch.Generator().manual_seed(11))
    b = diff_augment(x, prob=0.5, generator=torch.Generator().manual_seed(11))
    assert torch.equal(a, b)
    torch.manual_seed(4)
    c = strong_augment(x)
    torch.manual_seed(4)
    assert torch.equal(c, strong_augment(x))


def test_diff_augment_unknown_policy():
    with pytest.raises(ValueError, match="policy"):
        diff_augment(_images(1, 8), policy=("rotate",))


def test_translation_zero_fill():
    x = torch.ones(8, 1, 16, 16)
    y = rand_translation(x, 0.125, torch.Generator().manual_seed(0))  # shifts up to 2 px
    zeros_per_image = (y == 0).flatten(1).sum(1)
    assert zeros_per_image.max() <= 16 * 16 - 14 * 14 and set(y.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(rand_translation(x, 0.0), x)


def test_cutout_side():
    x = torch.ones(16, 1, 20, 20)
    y = rand_cutout(x, 0.2, torch.Generator().manual_seed(0))  # 4 x 4 square, clipped at the border
    zeros = (y == 0).flatten(1).sum(1)
    assert zeros.max() == 16 and zeros.min() >= 4
    y = rand_cutout(x, 0.5, torch.Generator().manual_seed(0))
    assert (y == 0).flatten(1).sum(1).max() == 100
