"""The shared loop in one process (LocalSession): resume equals uninterrupted, the NaN guard, cadences."""
import os

import pytest
import torch
import torch.nn as nn

from ideal_ray.train.loop import LoopConfig, NonFiniteLossError, StepResult, run_loop
from ideal_ray.train.sessions import LocalSession


class ToyStage:
    """A linear regression whose batches are a pure function of the step; ``nan_steps`` make the loss NaN."""

    def __init__(self, nan_steps=()):
        torch.manual_seed(0)
        self.model = nn.Linear(4, 1)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=0.05)
        self.nan_steps = set(nan_steps)
        self.steps_run = []

    def ema_module(self):
        return self.model

    def train_step(self, batch, step, all_finite):
        x, y = batch
        loss = ((self.model(x) - y) ** 2).mean()
        if step in self.nan_steps:
            loss = loss * float("nan")
        if not all_finite(loss):
            return StepResult({}, 0, skipped=True)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.steps_run.append(step)
        return StepResult({"g_loss": loss.detach()}, samples=x.shape[0])

    def save(self, d):
        torch.save({"model": self.model.state_dict(), "opt": self.opt.state_dict()}, os.path.join(d, "toy.pt"))

    def load(self, d):
        s = torch.load(os.path.join(d, "toy.pt"), weights_only=True)
        self.model.load_state_dict(s["model"])
        self.opt.load_state_dict(s["opt"])

    def visualize(self, batch, out_dir, step):
        return None


class Recorder:
    def __init__(self, run_id=None):
        self.run_id = run_id or "run-1"
        self.metrics, self.tags, self.status, self.images = [], {}, None, []

    def log_metrics(self, m, step):
        self.metrics.append((step, m))

    def log_image(self, path, artifact_path):
        self.images.append(path)

    def set_tags(self, t):
        self.tags.update(t)

    def finish(self, status="FINISHED"):
        self.status = status


def batches(start_step=0):
    step = start_step
    while True:
        g = torch.Generator().manual_seed(step)
        x = torch.randn(8, 4, generator=g)
        yield x, x.sum(1, keepdim=True)
        step += 1


def test_resume_equals_uninterrupted(tmp_path):
    full = ToyStage()
    run_loop(full, batches(), LocalSession(str(tmp_path / "a")), LoopConfig(total_steps=20, ckpt_every=5),
             lambda rid: Recorder(), log=lambda s: None)

    first = ToyStage()
    sess = LocalSession(str(tmp_path / "b"))
    run_loop(first, batches(), sess, LoopConfig(total_steps=10, ckpt_every=5), lambda rid: Recorder(),
             log=lambda s: None)
    seen_run_ids = []
    second = ToyStage()  # fresh weights: everything must come back from the checkpoint
    state = run_loop(second, batches(start_step=10), sess, LoopConfig(total_steps=20, ckpt_every=5),
                     lambda rid: seen_run_ids.append(rid) or Recorder(rid), log=lambda s: None)
    assert state.step == 20 and second.steps_run[0] == 11
    assert seen_run_ids == ["run-1"], "the tracker run continues on resume"
    for a, b in zip(full.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)
    # the EMA continues too: compare the final checkpoints' EMA files
    ema_a = torch.load(tmp_path / "a" / "checkpoint_00000020" / "ema.pt", weights_only=True)
    ema_b = torch.load(tmp_path / "b" / "checkpoint_00000020" / "ema.pt", weights_only=True)
    for k in ema_a:
        assert torch.equal(ema_a[k], ema_b[k])


def test_nan_guard_skips_and_counts(tmp_path):
    stage = ToyStage(nan_steps={3, 4})
    rec = Recorder()
    state = run_loop(stage, batches(), LocalSession(str(tmp_path)), LoopConfig(total_steps=6, log_every=1,
                     ckpt_every=3, max_bad_steps=3), lambda rid: rec, log=lambda s: None)
    assert state.step == 6 and state.bad_total == 2 and state.bad_in_a_row == 0
    assert 3 not in stage.steps_run and 4 not in stage.steps_run  # skipped, then retried with the next batches
    assert rec.metrics[-1][1]["nonfinite_steps"] == 2.0 and rec.status == "FINISHED"


def test_nan_guard_stops_after_k_in_a_row_keeping_the_last_good_checkpoint(tmp_path):
    stage = ToyStage(nan_steps=set(range(5, 100)))
    sess = LocalSession(str(tmp_path))
    rec = Recorder()
    with pytest.raises(NonFiniteLossError, match="steps 5-8.*latest good checkpoint \\(step 4\\)"):
        run_loop(stage, batches(), sess, LoopConfig(total_steps=50, ckpt_every=2, max_bad_steps=4),
                 lambda rid: rec, log=lambda s: None)
    assert [os.path.basename(c) for c in sess.checkpoints()][-1] == "checkpoint_00000004"
    assert rec.status == "FAILED" and "non-finite" in rec.tags["stopped"]
    with open(os.path.join(sess.checkpoints()[-1], "loop_state.json")) as f:
        assert '"step": 4' in f.read()


def test_log_and_checkpoint_cadence(tmp_path):
    rec = Recorder()
    sess = LocalSession(str(tmp_path), keep=2)
    run_loop(ToyStage(), batches(), sess, LoopConfig(total_steps=9, log_every=4, ckpt_every=3),
             lambda rid: rec, log=lambda s: None)
    assert [s for s, _ in rec.metrics] == [4, 8, 9]
    assert {"g_loss", "samples_per_s", "nonfinite_steps"} <= set(rec.metrics[0][1])
    assert [os.path.basename(c) for c in sess.checkpoints()] == ["checkpoint_00000006", "checkpoint_00000009"]


def test_read_ahead_yields_the_same_batches_and_its_errors():
    import threading

    from ideal_ray.train.worker import read_ahead

    started = threading.Event()

    def source(n):
        started.set()  # set by the background read, before anyone iterates
        yield from range(n)

    it = read_ahead(source(5))
    assert started.wait(10)
    assert list(it) == [0, 1, 2, 3, 4]
    assert list(read_ahead(iter([]))) == []

    def broken():
        raise OSError("shard missing")
        yield  # pragma: no cover

    with pytest.raises(OSError, match="shard missing"):
        next(read_ahead(broken()))
