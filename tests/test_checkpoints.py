"""Checkpoint files as users meet them: official layouts (the authors' release, LlamaGen) load exactly and work in
every job that takes a tokenizer or GPT; a bad file (missing, empty, truncated, hostile, the wrong model) is refused
by every such job with one sentence and exit code 2, before torch or Ray start, with nothing written."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import random_sampling_models, release_layout
from ideal_ray.checkpoint import (GPT, LLAMAGEN, OURS, RELEASE, TOKENIZER, CheckpointError, inspect_checkpoint,
                                  load_gpt, load_tokenizer, torch_load)
from ideal_ray.checkpoint import to_llamagen_state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
pytestmark = pytest.mark.usefixtures("one_thread")
NUM_CLASSES = 4


class _Hostile:
    """Pickles as a call of os.system: what a booby-trapped checkpoint does."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Our exports of a random tiny tokenizer and GPT, the same weights in the release's and LlamaGen's layouts, and
    a set of bad files."""
    d = tmp_path_factory.mktemp("ckpts")
    gpt_path, tok_path = random_sampling_models(str(d), NUM_CLASSES)
    tok, gpt = load_tokenizer(tok_path), load_gpt(gpt_path)
    rel = release_layout(tok)
    noise = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in rel.items()}
    args = argparse.Namespace(gpt_model="GPT-tiny", vocab_size=gpt.cfg.vocab_size, num_classes=NUM_CLASSES,
                              cls_token_num=1, class_dropout_prob=0.1, latent_size=gpt.cfg.grid, lr=1e-4)
    f = {"tokenizer": tok_path, "gpt": gpt_path, "root": d}
    f["release_export"] = d / "ideal_tokenizer.pth"  # inference/export_model.py: {"model": wrapper state dict}
    torch.save({"model": rel}, f["release_export"])
    f["release_train"] = d / "0001000.pt"  # train/train_tokenizer.py: EMA next to the trained weights, args, ...
    torch.save({"model": noise, "ema": rel, "optimizer": {"state": {}, "param_groups": []}, "discriminator": {},
                "steps": 1000, "args": argparse.Namespace(ema=True, lr=1e-4, image_size=32)}, f["release_train"])
    f["release_bare"] = d / "vq_model.pt"  # the inner model's state dict: no "model." prefix, no aliases
    torch.save({k[len("model."):]: v for k, v in rel.items() if k.startswith("model.")}, f["release_bare"])
    theirs = to_llamagen_state_dict(gpt.state_dict())
    f["llamagen_train"] = d / "GPT-tiny-500.pt"  # LlamaGen / the release's train_c2i.py
    torch.save({"model": {k: torch.randn_like(v) for k, v in theirs.items()}, "ema": theirs, "steps": 500,
                "args": args}, f["llamagen_train"])
    f["llamagen_bare"] = d / "c2i_tiny.pt"  # a released c2i file: {"model": ...}, no args (grid unknown)
    torch.save({"model": theirs}, f["llamagen_bare"])
    # bad files
    f["missing"] = d / "nope.pt"
    f["empty"], f["truncated"], f["text"] = d / "empty.pt", d / "truncated.pt", d / "notes.pt"
    f["empty"].write_bytes(b"")
    data = open(tok_path, "rb").read()
    f["truncated"].write_bytes(data[: len(data) // 2])
    f["text"].write_text("not a checkpoint\n")
    f["legacy"] = d / "legacy.pt"
    torch.save({"model": {"w": torch.zeros(2)}}, f["legacy"], _use_new_zipfile_serialization=False)
    f["marker"] = d / "PWNED"
    f["hostile"] = d / "hostile.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "extra": _Hostile(str(f["marker"]))}, f["hostile"])
    f["folder"] = d
    f["unknown"] = d / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(2, 3, 1, 1)}, f["unknown"])
    return {k: str(v) for k, v in f.items()}


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


def test_layouts_are_detected_without_reading_the_weights(files):
    info = {k: inspect_checkpoint(files[k]) for k in ("tokenizer", "gpt", "release_export", "release_train",
                                                      "release_bare", "llamagen_train", "llamagen_bare")}
    assert [(i.kind, i.layout) for i in info.values()] == [
        (TOKENIZER, OURS), (GPT, OURS), (TOKENIZER, RELEASE), (TOKENIZER, RELEASE), (TOKENIZER, RELEASE),
        (GPT, LLAMAGEN), (GPT, LLAMAGEN)]
    assert info["release_train"].weights == "ema" and info["release_train"].step == 1000
    assert inspect_checkpoint(files["release_train"], prefer_ema=False).weights == "model"
    assert {i.tokens for k, i in info.items() if k != "llamagen_bare"} == {64} and info["llamagen_bare"].tokens == 0
    assert info["llamagen_train"].num_classes == NUM_CLASSES == info["gpt"].num_classes
    assert all(i.has_trunk for i in info.values())


def test_official_layouts_load_to_the_same_models(files):
    tok, gpt = load_tokenizer(files["tokenizer"]), load_gpt(files["gpt"])
    for k in ("release_export", "release_train", "release_bare"):
        _same_state(load_tokenizer(files[k]), tok)
    _same_state(load_gpt(files["llamagen_train"]), gpt)
    _same_state(load_gpt(files["llamagen_bare"], grid=gpt.cfg.grid), gpt)
    with pytest.raises(CheckpointError, match="does not say its token grid"):
        load_gpt(files["llamagen_bare"])
    with pytest.raises(CheckpointError, match="not 4x4"):
        load_gpt(files["llamagen_train"], grid=4)
    # the trained (not EMA) weights when asked: the noise planted under "model"
    assert not torch.equal(load_tokenizer(files["release_train"], prefer_ema=False).pre_quant.weight,
                           tok.pre_quant.weight)


def test_convert_writes_our_export(files, tmp_path, capsys):
    from jobs.convert import main

    tok, gpt = load_tokenizer(files["tokenizer"]), load_gpt(files["gpt"])
    out = tmp_path / "tok.pt"
    assert main(["--src", files["release_train"], "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert (summary["kind"], summary["layout"], summary["weights"], summary["step"]) == (TOKENIZER, RELEASE, "ema",
                                                                                       1000)
    assert inspect_checkpoint(str(out)).layout == OURS
    _same_state(load_tokenizer(str(out)), tok)
    with pytest.raises(SystemExit) as e:  # never overwritten
        main(["--src", files["release_train"], "--out", str(out)])
    assert e.value.code == 2 and "exists" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--src", files["llamagen_bare"], "--out", str(tmp_path / "gpt.pt")])
    assert e.value.code == 2 and "--grid" in capsys.readouterr().err and not (tmp_path / "gpt.pt").exists()
    assert main(["--src", files["llamagen_bare"], "--out", str(tmp_path / "gpt.pt"), "--grid", str(gpt.cfg.grid)]) == 0
    _same_state(load_gpt(str(tmp_path / "gpt.pt")), gpt)


def test_sample_job_takes_official_files(files, tmp_path, capsys):
    """jobs/sample.py with LlamaGen's GPT and the release tokenizer writes the images our exports give."""
    from jobs.sample import main

    common = ["sample.per_class=2", "sample.batch_size=4", "sample.out_size=32", "sample.seed=1", "--in-process"]
    assert main(["--gpt", files["gpt"], "--tokenizer", files["tokenizer"], "--out", str(tmp_path / "ours")]
                + common) == 0
    assert main(["--gpt", files["llamagen_bare"], "--tokenizer", files["release_train"],
                 "--out", str(tmp_path / "official")] + common) == 0
    a, b = np.load(tmp_path / "ours" / "samples.npz"), np.load(tmp_path / "official" / "samples.npz")
    np.testing.assert_array_equal(a["labels"], b["labels"])
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])


def test_extract_job_takes_the_release_tokenizer(files, tmp_path):
    """jobs/extract_tokens.py with the release file writes the codes our export gives, row for row."""
    from ideal_ray.data.synthetic import make_synthetic_imagenet
    from ideal_ray.data.tokens import read_manifest, read_shard
    from jobs.extract_tokens import main

    root = tmp_path / "data"
    make_synthetic_imagenet(str(root), num_classes=2, train_per_class=3, val_per_class=1, size=40, seed=0)
    common = ["--data-root", str(root), "--in-process", "views=release", "batch_size=8"]
    assert main(["--tokenizer", files["tokenizer"], "--out", str(tmp_path / "ours")] + common) == 0
    assert main(["--tokenizer", files["release_export"], "--out", str(tmp_path / "official")] + common) == 0
    def rows(folder):
        shards = [read_shard(os.path.join(folder, s["file"])) for s in read_manifest(folder)["shards"]]
        return [r for t in shards for r in t.to_pylist()]

    ours, official = rows(tmp_path / "ours"), rows(tmp_path / "official")
    assert len(ours) == 6 * 2 and ours == official  # 6 images x 2 release views (tiny), every column equal


# ---------------------------------------------------------------------------------------------- bad files
BAD = {  # file -> what its sentence must say
    "missing": "No tokenizer file at",
    "empty": "is empty (0 bytes",
    "truncated": "is truncated or corrupt",
    "text": "is not a PyTorch checkpoint",
    "legacy": "legacy (before 1.6) format",
    "hostile": "asks to import posix.system",
    "folder": "is a folder",
    "unknown": "holds weights of an unknown model",
    "gpt": "holds a GPT (ideal-ray export, EMA weights), not a tokenizer",
}


def _jobs(f: dict, bad: str, out: str) -> dict:
    """Every job that takes a tokenizer, the bad file in the tokenizer's place (the other inputs exist)."""
    there = f["root"]
    return {
        "sample": ["sample.py", "--gpt", f["gpt"], "--tokenizer", bad, "--out", out, "--in-process"],
        "extract_tokens": ["extract_tokens.py", "--tokenizer", bad, "--data-root", there, "--out", out],
        "evaluate recon": ["evaluate.py", "recon", "--tokenizer", bad, "--data-root", there, "--out", out],
        "sweep_cfg": ["sweep_cfg.py", "--gpt", f["gpt"], "--tokenizer", bad, "--reference", there, "--name", "s",
                      "--storage-path", out, "--cfg-scales", "1.0"],
        "convert": ["convert.py", "--src", bad, "--out", os.path.join(out, "x.pt")],
    }


@pytest.mark.parametrize("kind", sorted(BAD))
def test_every_job_refuses_a_bad_tokenizer_file_in_one_sentence(files, tmp_path, kind):
    rows = []
    for job, argv in _jobs(files, files[kind], str(tmp_path / "out")).items():
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, os.path.join(ROOT, "jobs", argv[0])] + argv[1:], capture_output=True,
                           text=True, cwd=tmp_path, timeout=600)
        rows.append(f"{job}: rc {p.returncode}, {time.perf_counter() - t0:.2f} s")
        want = BAD[kind] if job != "convert" else BAD[kind].replace("No tokenizer file", "No checkpoint file")
        if kind == "gpt" and job == "convert":  # a GPT export is a fine source for convert (it re-exports)
            continue
        assert p.returncode == 2, (job, p.stderr[-2000:])
        assert "Traceback" not in p.stderr and p.stderr.strip().count("\n") == 0, (job, p.stderr)
        assert want in p.stderr and (files[kind] in p.stderr), (job, p.stderr)
        assert os.listdir(tmp_path) == [], (job, os.listdir(tmp_path))  # nothing created
    assert not os.path.exists(files["marker"])  # the hostile pickle never ran
    print(f"{kind}: " + "; ".join(rows))


def test_the_safe_loader_refuses_what_slips_past_the_check(files):
    """torch_load (weights_only=True) turns a refused pickle into one sentence, not torch's advice to trust it."""
    with pytest.raises(CheckpointError, match="refused by the safe loader"):
        torch_load(files["hostile"])
    assert not os.path.exists(files["marker"])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        torch_load(files["truncated"])


def test_a_gpt_and_tokenizer_that_do_not_fit_are_refused(files, tmp_path):
    from ideal_ray.checkpoint import check_models, write_gpt_export
    from ideal_ray.config import gpt_config
    from ideal_ray.models.gpt import GPT as GPTModel

    cfg = gpt_config("tiny", grid=4, num_classes=NUM_CLASSES)
    other = write_gpt_export(str(tmp_path / "g4.pt"), cfg, GPTModel(cfg).state_dict(), 0)
    with pytest.raises(CheckpointError, match="16 tokens per image.*does not fit tokenizer .*64 tokens"):
        check_models(other, files["tokenizer"])
    with pytest.raises(CheckpointError, match=r"class ids \[7\] are outside the GPT's 4 classes"):
        check_models(files["gpt"], files["tokenizer"], classes=[1, 7])
    p = subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "sample.py"), "--gpt", other, "--tokenizer",
                        files["release_bare"], "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert p.returncode == 2 and "does not fit" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists()
