"""Training reads every format extraction reads (issue 17): one listing (``sources.list_images``), one packing
(``Listing.pack``), one reader (``reader.ByteReader`` + ``decode_bytes``).

One tiny image set (synthetic images plus every awkward kind of ``planted.py``: CMYK, 16-bit, alpha, ..., and four
unreadable files) is written as a class folder, as Parquet shards (HF struct column; plain binary with wnid labels),
as WebDataset tars and as a flat folder with a labels file elsewhere (``data.labels_file``). Through the real
training data path (``ray_pipeline.local_batches``, and one rank dataset on Ray) every format gives the batches the
folder gave before this change: the reference decodes each scheduled file by its path (the old path-only decode),
with the same schedule, substitution of unreadable files and augmentation seeds. An unreadable Parquet entry is
skipped, counted and named by shard and row.
"""
from __future__ import annotations

import os
import re
import shutil

import numpy as np
import pytest
import torch

from conftest import ray_connected
from ideal_ray.config import ConfigError, DataConfig, check_data_root, load_config
from ideal_ray.data import augment as ag
from ideal_ray.data import ray_pipeline as rp
from ideal_ray.data.convert import folder_to_flat, folder_to_parquet, folder_to_webdataset
from ideal_ray.data.folder import DECODE_ERRORS, ImageFolderDataset, open_rgb, skip_reason
from ideal_ray.data.skipped import SkipLedger, UnreadableDataError
from ideal_ray.data.synthetic import make_synthetic_imagenet
from planted import plant_bad_files

SEED = 5
GB = 4
# name -> (writer of out_root from the folder root, data.format the listing must detect)
WRITERS = {
    "parquet": (lambda src, out: folder_to_parquet(src, "train", out, files=2, row_group_size=3), "parquet"),
    "parquet_binary_wnid": (lambda src, out: folder_to_parquet(src, "train", out, files=3, struct=False,
                                                               wnid_labels=True, row_group_size=4), "parquet"),
    "webdataset": (lambda src, out: folder_to_webdataset(src, "train", out, shards=2), "webdataset"),
    "flat": (lambda src, out: folder_to_flat(src, "train", out, labels="txt"), "flat"),
}


def _cfg(root, **kw) -> DataConfig:
    base = dict(root=str(root), image_size=16, resize_min=16, resize_max=22, hflip_prob=0.5, global_batch=GB,
                loader_workers=1)
    base.update(kw)
    return DataConfig(**base)


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """{name: (root, DataConfig)}: the folder set and each other format written from it."""
    base = tmp_path_factory.mktemp("train_sources")
    src = base / "folder"
    make_synthetic_imagenet(src, num_classes=3, train_per_class=5, val_per_class=1, size=28, seed=2)
    plant_bad_files(src)  # 14 awkward files, 4 of them unreadable: 29 images
    out = {"folder": (src, _cfg(src))}
    for name, (write, fmt) in WRITERS.items():
        write(src, base / name)
        cfg = _cfg(base / name, format=fmt)
        if name == "flat":  # the labels file away from the root: only data.labels_file finds it
            labels = base / "flat_train_labels.txt"
            shutil.move(base / name / "train_labels.txt", labels)
            cfg = _cfg(base / name, labels_file=str(labels))  # format auto
        out[name] = (base / name, cfg)
    return out


def _folder_files(folder_root) -> list[str]:
    """The folder set's training files in the old training order (ImageFolderDataset's)."""
    return [p for p, _ in ImageFolderDataset(folder_root, "train").samples]


def _folder_path(folder_root, listing, i) -> str:
    """The file of the folder set that item ``i`` of ``listing`` was written from (file stems are unique)."""
    item = listing.ids[i]
    if "#" in item:  # a binary parquet column: ids are <file>#<row>, the rows in the folder's order
        return _folder_files(folder_root)[i]
    stem = os.path.splitext(os.path.basename(item))[0]  # struct parquet / flat: the file name; webdataset: the key
    return next(p for p in _folder_files(folder_root) if os.path.splitext(os.path.basename(p))[0] == stem)


def _reference(paths, labels, cfg, world, rank, start, steps):
    """The rank's rows as training made them before one listing: each scheduled file decoded BY PATH
    (``folder.open_rgb``), an unreadable one replaced by the next decodable image of the epoch order."""
    n, gb = len(paths), cfg.global_batch
    spe = ag.schedule_info(n, gb)
    bad = {}
    for i, p in enumerate(paths):
        try:
            open_rgb(p)
        except DECODE_ERRORS as e:
            bad[i] = skip_reason(e)
    out = {c: [] for c in rp.COLUMNS}
    for t in range(start, start + steps):
        e, pos = ag.position_of(t, rank, world, gb, spe)
        perm = ag.epoch_permutation(SEED, e, n)
        for p in pos:
            i = next(int(perm[(int(p) + k) % n]) for k in range(n) if int(perm[(int(p) + k) % n]) not in bad)
            img = open_rgb(paths[i])
            out["image"].append(ag.augment(img, ag.sample_rng(SEED, e, int(p)), cfg.image_size, cfg.resize_min,
                                           cfg.resize_max, cfg.hflip_prob))
            out["label"].append(labels[i])
            out["step"].append(t)
            out["position"].append(int(p))
    return {c: np.stack(v) for c, v in out.items()}, bad


def _stack(batches) -> dict[str, np.ndarray]:
    batches = list(batches)
    return {c: torch.cat([b[c] for b in batches]).numpy() for c in rp.COLUMNS}


def test_the_folder_listing_keeps_the_old_training_order(roots):
    """The training listing of a class folder is the old ``list_training_images`` order (ImageFolderDataset's)."""
    root, cfg = roots["folder"]
    listing = rp.training_listing(cfg)
    ds = ImageFolderDataset(root, "train")
    assert listing.fmt == "folder" and len(listing) == 29
    assert listing.files == [p for p, _ in ds.samples] and listing.labels.tolist() == ds.targets


@pytest.mark.parametrize("name", ["folder", *WRITERS])
def test_every_format_gives_the_folder_batches(roots, name):
    """Same pixels, labels and order (world 2, rank 1, across an epoch boundary), the same images skipped."""
    folder_root, _ = roots["folder"]
    root, cfg = roots[name]
    listing = rp.training_listing(cfg)
    assert listing.fmt == WRITERS.get(name, (None, "folder"))[1] and len(listing) == 29
    paths = [_folder_path(folder_root, listing, i) for i in range(len(listing))]
    if name != "flat":  # the flat folder lists by file name: another order, the same images
        assert paths == _folder_files(folder_root)
    expected, bad = _reference(paths, listing.labels, cfg, 2, 1, 5, 6)  # 7 steps per epoch: steps 5..10
    assert len(bad) == 4
    ledger = SkipLedger()
    got = _stack(rp.local_batches(cfg, 2, 1, 5, 6, SEED, skips=ledger))
    for c in rp.COLUMNS:
        assert got[c].tobytes() == expected[c].astype(got[c].dtype).tobytes(), c
    met = ledger.items()  # the bad files this rank's steps passed over, with the reasons of a path decode
    assert met and {i: bad[i] for i in met} == met


def test_a_rank_dataset_on_ray_reads_parquet_as_the_folder(roots, ray_head):
    """One Ray Data rank dataset over the Parquet shards (the decode actor's ByteReader keeps its row groups) gives
    the folder's in-process batches byte for byte."""
    _, folder_cfg = roots["folder"]
    _, cfg = roots["parquet"]
    expected = _stack(rp.local_batches(folder_cfg, 1, 0, 6, 3, SEED))
    with ray_connected(ray_head):
        ds = rp.rank_dataset(cfg, 1, 0, 6, 3, SEED, num_actors=1, images=rp.put_listing(rp.training_listing(cfg)))
        got = _stack(list(ds.iter_torch_batches(batch_size=GB, dtypes=rp.TORCH_DTYPES)))
    for c in rp.COLUMNS:
        assert got[c].tobytes() == expected[c].tobytes(), c


def _parquet_with_bad_rows(src_root, out_root, bad_rows: set[int]):
    """The folder set as two Parquet shards (plain binary image column) with the rows ``bad_rows`` (global index)
    holding bytes that are no image; returns the shard paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    samples = ImageFolderDataset(src_root, "train").samples
    (out_root / "train").mkdir(parents=True)
    shutil.copy(src_root / "class_index.json", out_root / "class_index.json")
    shards, half = [], (len(samples) + 1) // 2
    for k, part in enumerate((range(half), range(half, len(samples)))):
        data = [b"<html>404</html>" if i in bad_rows else open(samples[i][0], "rb").read() for i in part]
        table = pa.table({"image": pa.array(data, type=pa.binary()),
                          "label": pa.array([samples[i][1] for i in part], type=pa.int64())})
        shards.append(out_root / "train" / f"part-{k}.parquet")
        pq.write_table(table, shards[-1], row_group_size=4)
    return shards


def test_an_unreadable_parquet_entry_is_skipped_counted_and_named_by_shard_and_row(roots, tmp_path, caplog):
    from ideal_ray.data.skipped import read_skipped
    from ideal_ray.train.ray_trainer import report_skipped

    src = tmp_path / "src"  # the synthetic images only (no planted files): 15 images, 1 bad row
    make_synthetic_imagenet(src, num_classes=3, train_per_class=5, val_per_class=1, size=28, seed=2)
    shards = _parquet_with_bad_rows(src, tmp_path / "pq", {9})  # shard 1 (rows 8..14), its row 1
    cfg = _cfg(tmp_path / "pq")
    listing = rp.training_listing(cfg)
    assert listing.fmt == "parquet" and len(listing) == 15 and listing.ids[9] == "train/part-1.parquet#1"
    ledger = SkipLedger()
    with caplog.at_level("WARNING", logger=rp.__name__):
        batches = list(rp.local_batches(cfg, 1, 0, 0, 6, SEED, skips=ledger))  # 2 epochs: every image is scheduled
    assert len(batches) == 6 and all(len(b["image"]) == GB for b in batches)
    assert ledger.items() == {9: "not an image (unrecognised format)"}  # met in both epochs, counted once
    assert f"skipping unreadable image {shards[1]} row 1 (not an image" in caplog.text
    # The run's skipped.tsv names the entry by the listing's id, as extraction's does.
    run = load_config("tiny", [f"data.root={tmp_path / 'pq'}", f"output_dir={tmp_path / 'runs'}", "name=pq"])
    path, entries, stopped = report_skipped(run, listing, ledger)
    assert stopped is None and read_skipped(path) == entries == [
        {"image_id": "train/part-1.parquet#1", "error": "not an image (unrecognised format)"}]

    # Every row unreadable (a wrong column, a broken export): the first step stops with the one sentence, naming
    # the first entry met by shard and row.
    _parquet_with_bad_rows(src, tmp_path / "allbad", set(range(15)))
    ledger = SkipLedger()
    with pytest.raises(UnreadableDataError) as e:
        next(rp.local_batches(_cfg(tmp_path / "allbad"), 1, 0, 0, 1, SEED, skips=ledger))
    m = re.match(r"11 of the 11 image files rank 0 read for training step 1 could not be read or decoded \(first: "
                 r"(\S+/part-[01]\.parquet) row (\d+): not an image \(unrecognised format\)\)", str(e.value))
    assert m, str(e.value)
    assert ledger.stopped() == str(e.value)


def test_training_finds_every_format_before_any_worker(roots, tmp_path):
    """check_data_root (stdlib only) accepts each format's training split, prepare_data lists it with data.format
    and data.labels_file; a root without a training split, or a missing labels file, is one clear ConfigError."""
    from ideal_ray.train.ray_trainer import prepare_data

    for name in ("parquet", "webdataset", "flat"):
        root, cfg = roots[name]
        run = load_config("tiny", [f"data.root={root}", f"data.format={cfg.format}",
                                   f"data.labels_file={cfg.labels_file}", "data.global_batch=4"])
        assert check_data_root(run) is True
        assert prepare_data(run).fmt == WRITERS[name][1]
    single = tmp_path / "single"  # root/train.parquet, as detect_format reads it
    single.mkdir()
    shutil.copy(next((roots["parquet"][0] / "train").glob("*.parquet")), single / "train.parquet")
    assert check_data_root(load_config("paper", [f"data.root={single}"])) is True
    with pytest.raises(ConfigError, match=r"No training split at data.root=.*\*\.parquet or \*\.tar shards"):
        check_data_root(load_config("paper", [f"data.root={tmp_path}"]))
    with pytest.raises(ConfigError, match="data.labels_file=.*nope.txt does not exist"):
        check_data_root(load_config("paper", [f"data.root={roots['flat'][0]}",
                                              f"data.labels_file={tmp_path}/nope.txt"]))
