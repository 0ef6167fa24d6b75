"""Ray Data training pipeline: exact, resumable sample order; byte-identical rebuilds; bad files survive.

Pure schedule/augmentation tests need no Ray. The Ray tests join the session's local Ray head (conftest's
``ray_head``) and share one tiny synthetic set (18 train images, global batch 4, 2 ranks -> 4 steps per epoch, 2
images dropped each epoch); the reference for every row is recomputed in-process with ``load_sample`` (a
``ByteReader`` of the listing).
"""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ray_connected
from ideal_ray.config import DataConfig
from ideal_ray.data import augment as ag
from ideal_ray.data import ray_pipeline as rp
from ideal_ray.data.reader import ByteReader
from ideal_ray.data.synthetic import make_synthetic_imagenet

SEED = 7
WORLD = 2
STEPS = 10  # 2.5 epochs of 4 steps


def _cfg(root, **kw) -> DataConfig:
    base = dict(root=str(root), image_size=16, resize_min=16, resize_max=22, hflip_prob=0.5, global_batch=4,
                loader_workers=1)
    base.update(kw)
    return DataConfig(**base)


# ------------------------------------------------------------------------------------- pure schedule
def test_each_step_is_one_contiguous_global_batch():
    gb, spe = 12, 5
    for world in (1, 2, 3, 4, 6, 12):
        for step in (0, 1, 4, 5, 13):
            parts = [ag.position_of(step, r, world, gb, spe) for r in range(world)]
            assert {e for e, _ in parts} == {step // spe}
            got = np.concatenate([p for _, p in parts])
            k = step % spe
            np.testing.assert_array_equal(got, np.arange(k * gb, (k + 1) * gb))


def test_row_schedule_matches_position_of():
    lb, gb, spe, start, rank = 3, 6, 4, 9, 1
    rows = np.arange(5 * lb)
    step, epoch, pos = ag.row_schedule(rows, start, rank, lb, gb, spe)
    for t in range(start, start + 5):
        e, p = ag.position_of(t, rank, gb // lb, gb, spe)
        sel = step == t
        assert sel.sum() == lb and set(epoch[sel]) == {e}
        np.testing.assert_array_equal(pos[sel], p)


def test_every_image_once_per_epoch_and_epochs_reshuffle():
    n, gb, world = 19, 4, 2
    spe = ag.schedule_info(n, gb)
    assert spe == 4  # drop_last: 3 images left out per epoch
    per_epoch = []
    for e in range(3):
        idx = np.concatenate(
            [ag.sample_indices(t, r, world, gb, n, SEED) for t in range(e * spe, (e + 1) * spe) for r in range(world)]
        )
        assert len(idx) == spe * gb and len(set(idx.tolist())) == len(idx)  # no repeats within an epoch
        np.testing.assert_array_equal(idx, ag.epoch_permutation(SEED, e, n)[: spe * gb])
        per_epoch.append(idx)
    assert not np.array_equal(per_epoch[0], per_epoch[1]) and not np.array_equal(per_epoch[1], per_epoch[2])
    assert sorted(ag.epoch_permutation(SEED, 5, n).tolist()) == list(range(n))
    # The global batch of a step does not depend on how many workers share it.
    one = ag.sample_indices(6, 0, 1, gb, n, SEED)
    two = np.concatenate([ag.sample_indices(6, r, 2, gb, n, SEED) for r in range(2)])
    np.testing.assert_array_equal(one, two)


def test_schedule_errors():
    with pytest.raises(ValueError, match="does not divide by the 3 workers"):
        ag.local_batch_size(8, 3)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ag.schedule_info(3, 4)
    with pytest.raises(ValueError, match="rank=2"):
        ag.position_of(0, 2, 2, 4, 3)


# ------------------------------------------------------------------------------------- augmentation
def test_augment_shape_dtype_and_variation():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))  # landscape: W=50, H=30
    outs = [ag.augment(img, ag.sample_rng(SEED, 0, p), 16, 16, 24, 0.5) for p in range(40)]
    for o in outs:
        assert o.shape == (16, 16, 3) and o.dtype == np.uint8
    assert len({o.tobytes() for o in outs}) >= 30  # crops/sizes/flips vary with the position (few collide)
    np.testing.assert_array_equal(outs[3], ag.augment(img, ag.sample_rng(SEED, 0, 3), 16, 16, 24, 0.5))
    assert not np.array_equal(outs[3], ag.augment(img, ag.sample_rng(SEED, 1, 3), 16, 16, 24, 0.5))

    # Draw order (short side, top, left, flip) reproduced by hand: flips happen both ways over 40 positions.
    flips = []
    for p in range(40):
        r = ag.sample_rng(SEED, 0, p)
        short = int(r.integers(16, 25))
        new_w, new_h = round(50 * short / 30), short
        top, left, flip = int(r.integers(0, new_h - 16 + 1)), int(r.integers(0, new_w - 16 + 1)), r.random() < 0.5
        ref = img.resize((new_w, new_h), Image.BICUBIC).crop((left, top, left + 16, top + 16))
        ref = np.asarray(ref.transpose(Image.FLIP_LEFT_RIGHT) if flip else ref)
        np.testing.assert_array_equal(outs[p], ref)
        flips.append(flip)
    assert 0 < sum(flips) < len(flips)
    no_flip = ag.augment(img, ag.sample_rng(SEED, 0, 0), 16, 30, 30, 0.0)  # resize to exactly 30: no resize
    assert no_flip.shape == (16, 16, 3)


def test_check_augmentation_rejects_bad_sizes(tmp_path):
    with pytest.raises(ValueError, match="random crop must fit"):
        ag.check_augmentation(_cfg(tmp_path, image_size=32, resize_min=16))
    with pytest.raises(ValueError, match="hflip_prob"):
        ag.check_augmentation(_cfg(tmp_path, hflip_prob=1.5))


def test_to_model_input_range_and_layout():
    x = torch.tensor([0, 255, 128], dtype=torch.uint8).repeat(2, 4, 5, 1)  # (2, 4, 5, 3)
    y = ag.to_model_input(x)
    assert y.shape == (2, 3, 4, 5) and y.dtype == torch.float32 and y.is_contiguous()
    assert y[:, 0].eq(-1).all() and y[:, 1].eq(1).all()
    assert torch.allclose(y[:, 2], torch.full_like(y[:, 2], 128 / 127.5 - 1), atol=1e-6)
    assert ag.to_model_input(x, torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="uint8"):
        ag.to_model_input(x.float())


# ------------------------------------------------------------------------------------- listing errors
@pytest.fixture
def no_ray_work(monkeypatch):
    """Any Ray call the pipeline would make first fails the test."""
    import ray

    def boom(*a, **k):
        raise AssertionError("Ray work started before the folder was validated")

    monkeypatch.setattr(ray, "put", boom)
    monkeypatch.setattr(ray.data, "range", boom)


def test_layout_errors_raise_before_any_ray_work(tmp_path, no_ray_work):
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no class folders"):
        rp.rank_datasets(_cfg(empty), WORLD, 0, 1, SEED)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        rp.rank_datasets(_cfg(tmp_path / "missing"), WORLD, 0, 1, SEED)
    noimg = tmp_path / "noimg"
    (noimg / "train" / "n000").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no image files"):
        rp.rank_dataset(_cfg(noimg), WORLD, 0, 0, 1, SEED)
    unknown = tmp_path / "unknown"
    (unknown / "train" / "n999").mkdir(parents=True)
    (unknown / "class_index.json").write_text('{"0": ["n000", "zero"]}')
    with pytest.raises(ValueError, match="not in the class index"):
        rp.rank_datasets(_cfg(unknown), WORLD, 0, 1, SEED)
    with pytest.raises(ValueError, match="does not divide"):
        rp.rank_datasets(_cfg(empty, global_batch=5), WORLD, 0, 1, SEED)


# ------------------------------------------------------------------------------------- Ray
@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    make_synthetic_imagenet(root, num_classes=3, train_per_class=6, val_per_class=1, size=24, seed=1)
    return root


@pytest.fixture(scope="module")
def ray_local(ray_head):
    with ray_connected(ray_head) as ray:
        yield ray


ALL = rp.COLUMNS + rp.PROVENANCE_COLUMNS


def _rows(ds) -> dict[str, np.ndarray]:
    """All rows of a provenance dataset as stacked columns, in iteration order."""
    cols = {c: [] for c in ALL}
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        assert set(b) == set(ALL)
        for c in ALL:
            cols[c].append(b[c])
    return {c: np.concatenate(v) for c, v in cols.items()}


def _expected(cfg, listing, rank, world, start, steps):
    """Reference rows computed in-process from the pure schedule + load_sample."""
    n, gb = len(listing), cfg.global_batch
    reader = ByteReader(listing)
    spe = ag.schedule_info(n, gb)
    out = {c: [] for c in ALL}
    for t in range(start, start + steps):
        e, pos = ag.position_of(t, rank, world, gb, spe)
        idx = ag.epoch_permutation(SEED, e, n)[pos]
        for p, i in zip(pos, idx):
            out["image"].append(ag.load_sample(reader, int(i), cfg, SEED, e, int(p)))
            out["label"].append(listing.labels[i])
            out["step"].append(t)
            out["position"].append(p)
            out["index"].append(i)
            out["substituted"].append(0)
    return {c: np.stack(v) for c, v in out.items()}


@pytest.fixture(scope="module")
def full_rank0(ray_local, synth):
    """Rank 0's rows for steps [0, STEPS), from a 2-actor pool (so order really has to be preserved)."""
    cfg = _cfg(synth)
    return _rows(rp.rank_datasets(cfg, WORLD, 0, STEPS, SEED, num_actors=2, provenance=True)[0])


def test_rank_rows_come_in_exact_order(full_rank0, synth):
    cfg = _cfg(synth)
    listing = rp.training_listing(cfg)
    assert len(listing) == 18 and listing.fmt == "folder"
    exp = _expected(cfg, listing, 0, WORLD, 0, STEPS)
    assert len(full_rank0["step"]) == STEPS * 2
    for c in ALL:
        np.testing.assert_array_equal(full_rank0[c], exp[c], err_msg=c)
    assert full_rank0["image"].dtype == np.uint8 and full_rank0["image"].shape[1:] == (16, 16, 3)


def test_resume_yields_exact_tail_and_rebuild_is_identical(full_rank0, synth, ray_local):
    cfg = _cfg(synth)
    k = 6  # mid-epoch-1 boundary crossing: steps 6..9 span epochs 1 and 2
    tail = _rows(rp.rank_dataset(cfg, WORLD, 0, k, STEPS - k, SEED, steps_per_block=2, provenance=True))
    for c in ALL:
        np.testing.assert_array_equal(tail[c], full_rank0[c][k * 2:], err_msg=c)
    again = _rows(rp.rank_datasets(cfg, WORLD, 0, STEPS, SEED, num_actors=1, provenance=True)[0])  # other pool
    assert again["image"].tobytes() == full_rank0["image"].tobytes()
    np.testing.assert_array_equal(again["index"], full_rank0["index"])


def test_local_batches_are_the_ray_rows(full_rank0, synth):
    """The in-process runs' batches (no Ray) are the rank's Ray rows, byte for byte, as torch batches of one step."""
    cfg = _cfg(synth)
    for start in (0, 6):  # from the beginning, and resumed mid-run across an epoch boundary
        batches = list(rp.local_batches(cfg, WORLD, 0, start, STEPS - start, SEED))
        assert len(batches) == STEPS - start
        for c in rp.COLUMNS:
            got = torch.cat([b[c] for b in batches])
            assert got.dtype == rp.TORCH_DTYPES[c], c
            assert got.numpy().tobytes() == full_rank0[c][start * 2:].astype(got.numpy().dtype).tobytes(), c
        assert [int(b["step"][0]) for b in batches] == list(range(start, STEPS))


def test_iter_torch_batches_through_train_data_config(synth, ray_local):
    """Rank 1 (default columns) through Train's DataConfig, which replaces execution options: one batch = one step."""
    cfg = _cfg(synth)
    listing = rp.training_listing(cfg)
    ref = rp.put_listing(listing)
    dss = rp.rank_datasets(cfg, WORLD, 3, 3, SEED, images=ref, num_actors=2)
    dc = rp.train_data_config()
    assert dc._resolve_execution_options(rp.dataset_name(1)).preserve_order
    its = dc.configure({rp.dataset_name(r): d for r, d in enumerate(dss)}, world_size=WORLD, worker_handles=None,
                       worker_node_ids=None)
    it = its[1][rp.dataset_name(1)]  # every worker sees every rank dataset; rank 1 reads only its own
    exp = _expected(cfg, listing, 1, WORLD, 3, 3)
    batches = list(it.iter_torch_batches(batch_size=2, dtypes=rp.TORCH_DTYPES))
    assert len(batches) == 3
    for j, b in enumerate(batches):
        assert set(b) == set(rp.COLUMNS)
        assert b["image"].dtype == torch.uint8 and b["image"].shape == (2, 16, 16, 3)
        assert b["label"].dtype == torch.int64 and b["step"].eq(3 + j).all()
        np.testing.assert_array_equal(b["position"].numpy(), exp["position"][2 * j:2 * j + 2])
        np.testing.assert_array_equal(b["label"].numpy(), exp["label"][2 * j:2 * j + 2])
        np.testing.assert_array_equal(b["image"].numpy(), exp["image"][2 * j:2 * j + 2])
        x = ag.to_model_input(b["image"])  # (2, 3, 16, 16)
        assert x.shape == (2, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    # A finished run resumes with nothing left to read: an empty dataset, not an error.
    empty = rp.rank_dataset(cfg, WORLD, 0, 12, 0, SEED, images=ref)
    assert list(empty.iter_torch_batches(batch_size=2, dtypes=rp.TORCH_DTYPES)) == []


def test_image_list_is_put_once_for_all_ranks(synth, ray_local, monkeypatch):
    calls = []
    real_put = ray_local.put
    monkeypatch.setattr(ray_local, "put", lambda obj, **k: calls.append(1) or real_put(obj, **k))
    dss = rp.rank_datasets(_cfg(synth), 4, 0, 2, SEED)
    assert len(dss) == 4 and len(calls) == 1


def test_bad_file_is_substituted_without_changing_row_count(synth, tmp_path, ray_local):
    root = tmp_path / "withbad"
    shutil.copytree(synth, root)
    bad_dir = sorted((root / "train").iterdir())[1]
    (bad_dir / "zz_corrupt.JPEG").write_bytes(b"this is not a jpeg")
    cfg = _cfg(root)
    listing = rp.training_listing(cfg)
    labels = listing.labels
    n, bad = len(listing), listing.files.index(str(bad_dir / "zz_corrupt.JPEG"))
    world = 1
    # First step whose batch holds the bad file (it may sit in an epoch's dropped tail: search).
    step = next(t for t in range(50) if bad in ag.sample_indices(t, 0, world, 4, n, SEED))
    rows = _rows(rp.rank_dataset(cfg, world, 0, step, 2, SEED, provenance=True))
    assert len(rows["step"]) == 8  # row count unchanged
    hit = np.flatnonzero(rows["substituted"])
    assert len(hit) == 1
    j = int(hit[0])
    e, p = step // ag.schedule_info(n, 4), int(rows["position"][j])
    perm = ag.epoch_permutation(SEED, e, n)
    assert perm[p] == bad
    sub = int(perm[(p + 1) % n])  # the next image of the permutation stands in (it is a good one)
    assert rows["index"][j] == sub and rows["label"][j] == labels[sub]
    np.testing.assert_array_equal(rows["image"][j], ag.load_sample(ByteReader(listing), sub, cfg, SEED, e, p))
    assert (np.delete(rows["index"], j) != bad).all()
    local = list(rp.local_batches(cfg, world, 0, step, 2, SEED))  # the in-process batches substitute alike
    for c in rp.COLUMNS:
        np.testing.assert_array_equal(torch.cat([b[c] for b in local]).numpy(), rows[c], err_msg=c)


def test_each_unreadable_file_is_reported_once_and_a_vanished_folder_stops(synth, tmp_path):
    """The decode code's reports, in process (the Ray actors run the same code into a ledger actor of the same
    class): over 5 epochs two bad files are passed over again and again but listed once each, with their reasons;
    with 16 of the 18 files unreadable the first batch stops with one sentence naming the first bad file and the
    fraction, and the ledger holds that sentence for the driver."""
    from ideal_ray.data.skipped import SkipLedger, UnreadableDataError

    root = tmp_path / "withbad"
    shutil.copytree(synth, root)
    paths = rp.training_listing(_cfg(root)).files
    (root / paths[3]).write_bytes(b"")
    (root / paths[10]).write_bytes(b"<html>404</html>")
    ledger = SkipLedger()
    batches = list(rp.local_batches(_cfg(root), 1, 0, 0, 20, SEED, skips=ledger))
    assert len(batches) == 20 and all(len(b["image"]) == 4 for b in batches)
    assert ledger.items() == {3: "empty file (0 bytes)", 10: "not an image (unrecognised format)"}
    assert ledger.stopped() is None

    for p in paths[:16]:
        (root / p).write_bytes(b"")
    ledger = SkipLedger()
    with pytest.raises(UnreadableDataError) as e:
        next(rp.local_batches(_cfg(root), 1, 0, 0, 1, SEED, skips=ledger))
    m = re.match(r"(\d+) of the (\d+) image files rank 0 read for training step 1 could not be read or decoded "
                 r"\(first: (\S+): empty file \(0 bytes\)\); that is more than 5% of them", str(e.value))
    assert m, str(e.value)
    assert int(m[1]) == 11 and int(m[2]) - 11 <= 2 and m[3] in paths[:16]  # stopped at the first count over 10
    assert ledger.stopped() == str(e.value) and len(ledger.items()) <= 11
