"""The in-process training pieces: lr schedule, weight-decay groups, EMA, and a short demo-style run."""
import math

import pytest
import torch
import torch.nn as nn

from ideal_ray.config import load_config
from ideal_ray.losses.reconstruction import perceptual_weight
from ideal_ray.train.ema import EMA
from ideal_ray.train.optim import decay_groups
from ideal_ray.train.schedule import lr_at, scaled_lr


def test_lr_schedule_warmup_then_cosine():
    kw = dict(peak_lr=1e-4, warmup_steps=10, decay_steps=100, warmup_start_lr=1e-5, min_lr=1e-5)
    assert lr_at(0, **kw) == pytest.approx(1e-5)
    assert lr_at(5, **kw) == pytest.approx(1e-5 + 0.5 * 9e-5)
    assert lr_at(10, **kw) == pytest.approx(1e-4)
    assert lr_at(60, **kw) == pytest.approx(1e-5 + 0.5 * 9e-5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, **kw) == pytest.approx(1e-5) and lr_at(10_000, **kw) == pytest.approx(1e-5)
    lrs = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert scaled_lr(1e-4, 512, 256) == pytest.approx(2e-4)


def test_lr_schedule_object_matches_the_config():
    from ideal_ray.config import OptimConfig
    from ideal_ray.train.schedule import LRSchedule

    o = OptimConfig(lr=1e-4, base_batch=256, warmup_epochs=1, epochs=10, warmup_start_lr=1e-5, min_lr=1e-5)
    s = LRSchedule.from_config(o, global_batch=512, steps_per_epoch=10)
    assert s.peak_lr == pytest.approx(2e-4) and s.warmup_steps == 10 and s.decay_steps == 100
    assert s(0) == pytest.approx(1e-5) and s(10) == pytest.approx(2e-4) and s(110) == pytest.approx(1e-5)
    const = LRSchedule.from_config(OptimConfig(lr=1e-4, base_batch=512, warmup_epochs=0, lr_schedule="constant"),
                                   global_batch=512, steps_per_epoch=10)
    assert {const(i) for i in (0, 5, 10_000)} == {1e-4}


def test_perceptual_warmup():
    assert perceptual_weight(0, 1.0, 10) == 0.0
    assert perceptual_weight(5, 1.0, 10) == pytest.approx(0.5)
    assert perceptual_weight(50, 1.0, 10) == 1.0
    assert perceptual_weight(0, 1.0, 0) == 1.0


def test_weight_decay_only_on_matrices():
    m = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Conv2d(2, 2, 3))
    m[1].weight.requires_grad_(False)
    decay, no_decay = decay_groups(m.named_parameters(), 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {p.ndim for p in decay["params"]} == {2, 4}
    assert all(p.ndim == 1 for p in no_decay["params"])
    assert all(p is not m[1].weight for p in no_decay["params"])  # frozen parameters are left out


def test_ema_tracks_trainable_parameters_only():
    m = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    m[1].requires_grad_(False)
    ema = EMA(m, decay=0.5)
    assert set(ema.shadow) == {"0.weight", "0.bias"}
    start = m[0].weight.detach().clone()
    with torch.no_grad():
        m[0].weight.add_(2.0)
    ema.update(m)
    torch.testing.assert_close(ema.shadow["0.weight"], start + 1.0)
    copy = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    ema.copy_to(copy)
    torch.testing.assert_close(copy[0].weight, start + 1.0)
    restored = EMA(m, decay=0.5)
    restored.load_state_dict(ema.state_dict())
    torch.testing.assert_close(restored.shadow["0.weight"], ema.shadow["0.weight"])
    with pytest.raises(KeyError):
        restored.load_state_dict({})


@pytest.mark.slow
def test_short_local_run_beats_the_untrained_model(tmp_path):
    from ideal_ray.train.local import train_tokenizer_local

    cfg = load_config("tiny", [f"data.root={tmp_path / 'data'}", f"output_dir={tmp_path / 'runs'}",
                               "schedule.steps=80", "schedule.log_every=40", "data.synthetic_train_per_class=8",
                               "data.synthetic_val_per_class=4"])
    lines = []
    r = train_tokenizer_local(cfg, device="cpu", log=lines.append)
    assert r["after"]["psnr"] > r["before"]["psnr"] + 3.0
    assert (tmp_path / "runs" / cfg.name / "tokenizer.pt").is_file()
    assert (tmp_path / "runs" / cfg.name / "reconstructions.png").is_file()
    assert any("step 80/80" in line for line in lines)


def test_real_data_root_must_exist(tmp_path):
    from ideal_ray.train.local import ensure_dataset

    cfg = load_config("paper", [f"data.root={tmp_path / 'imagenet'}"])
    with pytest.raises(FileNotFoundError, match="data.root"):
        ensure_dataset(cfg)


def test_jobs_report_config_errors_in_one_line(capsys):
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "jobs"))
    from demo import main

    with pytest.raises(SystemExit) as e:
        main(["model.vfm.deep_layer=9"])
    assert "config error: model.vfm.deep_layer 9 is beyond the backbone's depth 4" in str(e.value.code)
