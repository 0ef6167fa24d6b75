"""Token extraction on Ray Data (decode actor pool -> encoder actor pool -> driver-written shards).

One tiny synthetic set (2 classes x 5 train images) with one planted file of every bad kind, one random-init tiny
tokenizer, the session's local Ray head (conftest's ``ray_head``) joined for the module. The reference for every
token is the in-process extraction (itself tested against direct ``tokenizer.encode`` calls in test_tokens.py).
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from conftest import Background, own_processes, ray_connected
from ideal_ray.data import crops
from ideal_ray.data import ar_reader as ar
from ideal_ray.data import tokens as tk

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from ideal_ray.checkpoint import save_inference_checkpoint
    from ideal_ray.config import load_config
    from ideal_ray.data.synthetic import make_synthetic_imagenet
    from planted import plant_bad_files
    from ideal_ray.models.tokenizer import IdealTokenizer

    base = tmp_path_factory.mktemp("extract_ray")
    root = base / "data"
    make_synthetic_imagenet(root, num_classes=2, train_per_class=5, val_per_class=1, size=80, seed=5)
    planted = plant_bad_files(root, "train")
    cfg = load_config("tiny")
    torch.manual_seed(0)
    tok = IdealTokenizer(cfg.model).eval()
    ckpt = save_inference_checkpoint(str(base / "tok.pt"), tok, cfg)
    return base, str(root), ckpt, planted


@pytest.fixture(scope="module")
def ray_local(ray_head):
    with ray_connected(ray_head) as ray:
        yield ray


# the settings every Ray run here starts from (the tiny preset is on the CPU: run.device=cpu, run.num_actors=1)
RAY_RUN = ("views=llamagen", "batch_size=40", "shard_images=4", "row_group_images=2", "run.decode_actors=2",
           "decode_batch=3")


def _cfg(setup, out, *overrides: str, data_root=None):
    """The tiny preset's ExtractConfig of ``setup``'s train split (or ``data_root``'s) into ``out``, with overrides."""
    from ideal_ray.config import ExtractConfig, load_stage_config

    _, root, ckpt, _ = setup
    return load_stage_config(ExtractConfig, "tiny", [f"tokenizer={ckpt}", f"data.root={data_root or root}",
                                                     f"out={out}", *overrides])


def _run(setup, out, *overrides: str, data_root=None, **kw):
    """The Ray extraction with :data:`RAY_RUN` and ``overrides``; ``kw``: its run_name / experiment."""
    from ideal_ray.pipelines.extract_ray import extract_tokens_ray

    return extract_tokens_ray(_cfg(setup, out, *RAY_RUN, *overrides, data_root=data_root), **kw)


def _local(setup, out, *overrides: str, data_root=None):
    from ideal_ray.pipelines.extract_local import extract_tokens_local

    return extract_tokens_local(_cfg(setup, out, *overrides, data_root=data_root))


@pytest.fixture(scope="module")
def local_ref(setup):
    out = setup[0] / "local"
    _local(setup, out, "views=llamagen", "batch_size=40", "shard_images=4", "row_group_images=2")
    return ar.TokenShardDataset(out)


@pytest.fixture(scope="module")
def extracted(setup, ray_local):
    base = setup[0]
    out = base / "ray"
    return out, _run(setup, out, f"tracking_uri=sqlite:///{base / 'mlflow.db'}", run_name="extract-test")


def test_bad_files_skipped_counted_listed_and_good_rows_all_there(setup, extracted, local_ref):
    base, root, _, planted = setup
    out, s = extracted
    good = {v["id"] for v in planted.values() if v["good"]}
    bad = {v["id"] for v in planted.values() if not v["good"]}
    assert good and bad
    listed = 10 + len(planted)
    assert s["verify"]["ok"] and s["complete"] and s["duplicates_dropped"] == 0
    assert (s["images"], s["rows"]) == (listed - len(bad), (listed - len(bad)) * 20)
    assert {x["image_id"] for x in s["skipped"]} == bad
    assert all(x["error"] for x in s["skipped"])
    lines = open(os.path.join(out, "skipped.tsv")).read().splitlines()
    assert lines[0] == "image_id\terror" and {ln.split("\t")[0] for ln in lines[1:]} == bad

    ds = ar.TokenShardDataset(out)  # the AR stage's in-memory reader loads them
    assert good <= set(ds.image_ids) and not bad & set(ds.image_ids)
    assert ds.tokens.shape == (listed - len(bad), 20, 64) and ds.tokens.dtype == np.uint16
    # same tokens, ids and labels as the in-process extraction, which test_tokens.py checks against encode()
    assert ds.image_ids == local_ref.image_ids
    np.testing.assert_array_equal(ds.labels, local_ref.labels)
    np.testing.assert_array_equal(ds.tokens, local_ref.tokens)
    # both wrote the same manifest parameters: either extraction can resume the other's folder
    keys = ("views", "grid", "vocab", "tokenizer_sha256", "listing_sha256", "shard_images", "precision")
    assert {k: tk.read_manifest(out)[k] for k in keys} == {k: tk.read_manifest(base / "local")[k] for k in keys}


def test_mlflow_run_records_summary_and_skipped_list(setup, extracted):
    from ideal_ray.tracking import find_runs

    base = setup[0]
    _, s = extracted
    (run,) = [r for r in find_runs(f"sqlite:///{base / 'mlflow.db'}", "extract") if r["run_name"] == "extract-test"]
    assert run["status"] == "FINISHED"
    assert run["params"]["views"] == "llamagen" and run["params"]["device"] == "cpu"
    assert run["metrics"]["skipped"] == len(s["skipped"]) and run["metrics"]["images"] == s["images"]
    art = run["artifact_uri"].replace("file://", "")
    assert open(os.path.join(art, "skipped.tsv")).read() == open(os.path.join(s["out_dir"], "skipped.tsv")).read()
    assert os.path.isfile(os.path.join(art, "summary.json"))


def test_resume_after_crash_mid_write_keeps_one_copy_of_every_row(setup, extracted, tmp_path):
    out = tmp_path / "crash"
    first = _run(setup, out, "max_shards=2", "tracking_uri=")  # a run that stopped after two shards ...
    assert first["stopped_early"] and not first["complete"] and first["shards_written"] == 2
    kept = {k: os.stat(out / tk.shard_name(k)).st_mtime_ns for k in (0, 1)}
    # ... and then crashed mid-write: a half-written temporary file and a shard renamed into place whose manifest
    # update never happened (a copy of a finished shard under the next name: duplicated rows if it were kept)
    (out / (tk.shard_name(2) + tk.TMP_SUFFIX)).write_bytes(b"half a shard")
    shutil.copy(out / tk.shard_name(1), out / tk.shard_name(2))
    with pytest.raises(ValueError, match="incomplete"):
        ar.TokenShardDataset(out)

    s = _run(setup, out, "tracking_uri=")
    assert s["verify"]["ok"] and s["verify"]["duplicates"] == 0 and s["verify"]["missing"] == 0
    assert (s["shards_kept"], s["shards_written"]) == (2, s["shards"] - 2)
    assert {k: os.stat(out / tk.shard_name(k)).st_mtime_ns for k in (0, 1)} == kept  # finished shards untouched
    assert not list(out.glob("*" + tk.TMP_SUFFIX))
    ref = ar.TokenShardDataset(extracted[0])
    ds = ar.TokenShardDataset(out)
    assert ds.image_ids == ref.image_ids and len(set(ds.image_ids)) == len(ds.image_ids)
    np.testing.assert_array_equal(ds.tokens, ref.tokens)
    again = _run(setup, out, "tracking_uri=")  # a finished folder: nothing redone
    assert again["shards_written"] == 0 and again["rows"] == s["rows"]


def test_release_views_and_webdataset_input(setup, ray_local, tmp_path):
    from ideal_ray.data.convert import folder_to_webdataset

    root = setup[1]
    wds = tmp_path / "wds"
    folder_to_webdataset(root, "train", str(wds), shards=2)
    s = _run(setup, tmp_path / "out", "views=release", "data.format=webdataset", "tracking_uri=", data_root=wds)
    ref = _local(setup, tmp_path / "ref", "views=release", "batch_size=40", "shard_images=4", "row_group_images=2",
                 "data.format=webdataset", data_root=wds)
    assert s["verify"]["ok"] and s["num_views"] == 2 and s["images"] == ref["images"]
    np.testing.assert_array_equal(ar.TokenShardDataset(tmp_path / "out").tokens,
                                  ar.TokenShardDataset(tmp_path / "ref").tokens)


def test_views_from_squares_equal_cpu_views():
    from PIL import Image

    rng = np.random.default_rng(0)
    for views in crops.VIEW_SETS:
        for w, h in ((500, 375), (64, 90), (71, 71), (300, 1000)):
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            squares = crops.make_squares(img, views, 64)
            assert [sq.shape[0] for sq in squares] == crops.square_sizes(views, 64)
            got = crops.views_from_squares([sq[None] for sq in squares], views, 64)[0].numpy()
            np.testing.assert_array_equal(got, crops.make_views(img, views, 64), err_msg=f"{views} {w}x{h}")
    with pytest.raises(ValueError, match="needs 2 squares"):
        crops.views_from_squares([np.zeros((1, 70, 70, 3), np.uint8)], "llamagen", 64)


def test_argument_errors(setup, ray_local, tmp_path):
    import dataclasses

    from ideal_ray.config import ConfigError
    from ideal_ray.pipelines.extract_ray import extract_tokens_ray

    cfg = _cfg(setup, tmp_path / "x", *RAY_RUN)
    # refused before anything is read or started (the config's own check, then the Ray run's devices)
    for bad, said in ((dict(run=dataclasses.replace(cfg.run, device="tpu")), "run.device=tpu is not a device"),
                      (dict(run=dataclasses.replace(cfg.run, device="cuda:1")), "not a device of a Ray run"),
                      (dict(decode_batch=0), "decode_batch=0 must be at least 1"),
                      (dict(run=dataclasses.replace(cfg.run, decode_actors=0)), "run.decode_actors=0"),
                      (dict(out=""), "out is empty; pass out=PATH")):
        with pytest.raises(ConfigError, match=said):
            extract_tokens_ray(dataclasses.replace(cfg, **bad))
    with pytest.raises(RuntimeError, match="no GPUs"):
        _run(setup, tmp_path / "y", "run.device=cuda")
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "y")


def test_job_cli_reports_bad_input_in_one_line(setup, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("extract_job", os.path.join(os.path.dirname(__file__), "..",
                                                                              "jobs", "extract_tokens.py"))
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    _, root, ckpt, _ = setup
    for argv, said in (([str(tmp_path / "nowhere")], "nowhere"), ([root, "data.format=parquet"], "error:"),
                       ([root, "views=five"], "config error: views 'five' is unknown")):
        with pytest.raises(SystemExit) as refused:
            job.main(["--tokenizer", ckpt, "--out", str(tmp_path / "o"), "--data-root"] + argv)
        assert refused.value.code == 2 and said in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")  # nothing created before the input was understood


def test_mostly_unreadable_shard_stops_the_run_unwritten(setup, tmp_path):
    root = setup[1]
    data = tmp_path / "data"
    shutil.copytree(root, data)
    for i in range(12):  # what a vanished mount looks like: listed files that cannot be read
        (data / "train" / "n90000000" / f"n90000000_gone{i:02d}.JPEG").write_bytes(b"")
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="max_skip_fraction"):
        _local(setup, out, "views=release", "shard_images=16", data_root=data)
    assert not list(out.glob(tk.SHARD_GLOB))
    s = _local(setup, out, "views=release", "shard_images=16", "max_skip_fraction=1.0", data_root=data)
    assert s["verify"]["ok"] and len(s["skipped"]) >= 12


def test_a_shard_of_only_unreadable_files_is_written_empty_and_both_runs_finish(setup, ray_local, tmp_path):
    """Every image of shard 1 unreadable (4 files: fewer than MIN_SKIPS_TO_ABORT, so the run goes on): the in-process
    and the Ray extraction both finish with a complete, verified manifest; shard 1 is a shard of 0 rows that lists
    its 4 files as skipped; every good image is there exactly once; skipped.tsv lists every bad file with its
    reason; and the AR readers (in memory and random access) read past the empty shard."""
    from ideal_ray.data import sources
    from planted import planted_files

    _, root, _, planted = setup
    data = tmp_path / "data"
    shutil.copytree(root, data)
    listing = sources.list_images(data, "train")
    kinds = planted_files()
    bad_bytes = {"empty file (0 bytes)": b"", "not an image (unrecognised format)": kinds["not_an_image"][1],
                 "truncated image (JPEG, 14 bytes not processed)": kinds["truncated_jpeg"][1]}
    shard1 = {}  # image id -> reason, for the 4 files of shard 1 (listed images 4..7)
    for k, (path, image_id) in enumerate(zip(listing.files[4:8], listing.ids[4:8])):
        reason = list(bad_bytes)[k % len(bad_bytes)]
        with open(path, "wb") as f:
            f.write(bad_bytes[reason])
        shard1[image_id] = reason
    bad = set(shard1) | {v["id"] for v in planted.values() if not v["good"]}
    good = set(listing.ids) - bad

    args = ("views=release", "shard_images=4", "row_group_images=2")
    local = _local(setup, tmp_path / "local", "batch_size=40", *args, data_root=data)
    on_ray = _run(setup, tmp_path / "ray", *args, "tracking_uri=", data_root=data)
    for s in (local, on_ray):
        out = s["out_dir"]
        assert s["complete"] and s["verify"]["ok"] and s["shards"] == s["shards_written"] == -(-len(listing) // 4)
        m = tk.read_manifest(out)
        (entry,) = [e for e in m["shards"] if e["index"] == 1]
        assert (entry["images"], entry["rows"]) == (0, 0)
        assert {x["image_id"]: x["error"] for x in entry["skipped"]} == shard1
        assert m["num_images"] == len(good) and m["num_skipped"] == len(bad)
        lines = open(os.path.join(out, "skipped.tsv")).read().splitlines()
        listed = dict(ln.split("\t") for ln in lines[1:])
        assert lines[0] == "image_id\terror" and set(listed) == bad
        assert {i: listed[i] for i in shard1} == shard1
        ds = ar.TokenShardDataset(out)
        assert sorted(ds.image_ids) == sorted(good) and len(set(ds.image_ids)) == len(ds.image_ids)
        reader = ar.TokenShardReader(out)  # the Ray AR reader's index: arithmetic over the per-shard counts
        idx = np.arange(len(ds))
        tokens, labels = reader.read(idx, idx % 2)
        np.testing.assert_array_equal(tokens, ds.tokens[idx, idx % 2])
        np.testing.assert_array_equal(labels, ds.labels)
    np.testing.assert_array_equal(ar.TokenShardDataset(on_ray["out_dir"]).tokens,
                                  ar.TokenShardDataset(local["out_dir"]).tokens)


def test_the_encoder_takes_a_batch_of_no_images(setup):
    from ideal_ray.checkpoint import load_tokenizer
    from ideal_ray.pipelines.extract_common import ViewEncoder

    tok = load_tokenizer(setup[2], device="cpu")
    for views in crops.VIEW_SETS:
        enc = ViewEncoder(tok, views, 64, "cpu")
        squares = [np.zeros((0, s, s, 3), np.uint8) for s in crops.square_sizes(views, 64)]
        codes = enc(squares)
        assert codes.shape == (0, crops.num_views(views), 64) and codes.dtype == np.uint16


def test_killed_encoder_actor_is_restarted_and_every_row_arrives_once(setup, ray_local, local_ref, tmp_path):
    """SIGKILL the encoder actor's process once the first shard is on disk: Ray Data restarts the actor and retries
    its in-flight batches; the driver drops rows delivered twice, so the folder holds every row exactly once and
    equals the in-process extraction."""
    import signal

    out = tmp_path / "killed"
    # one image per encoder call and per decode task: many tasks, a wide window for the kill
    run = Background(lambda: _run(setup, out, "batch_size=20", "decode_batch=1", "tracking_uri="))
    run.wait_for(lambda: list(out.glob(tk.SHARD_GLOB)))
    victims = own_processes("_EncodeViews")
    assert run.running() and victims, "the kill must land mid-run, on the encoder actor"
    written_at_kill = len(list(out.glob(tk.SHARD_GLOB)))
    for p in victims:
        os.kill(p.pid, signal.SIGKILL)
    s = run.result()
    print(f"killed {len(victims)} encoder process(es) after {written_at_kill} shard(s); "
          f"{s['duplicates_dropped']} duplicate row(s) dropped, {s['shards']} shards")
    assert s["complete"] and s["verify"]["ok"] and s["verify"]["duplicates"] == 0 and s["verify"]["missing"] == 0
    assert s["shards_written"] == s["shards"] > written_at_kill  # nothing was written before the run started
    ds = ar.TokenShardDataset(out)
    assert ds.image_ids == local_ref.image_ids and len(set(ds.image_ids)) == len(ds.image_ids)
    np.testing.assert_array_equal(ds.labels, local_ref.labels)
    np.testing.assert_array_equal(ds.tokens, local_ref.tokens)
