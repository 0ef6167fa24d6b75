"""Training and extraction read images from ``s3://`` (issue 18): one tiny image set (synthetic images plus every
awkward kind of ``planted.py``, four of them unreadable) written as a class folder, a flat folder with a labels file,
Parquet shards (HF struct column; plain binary with wnid labels) and WebDataset tars, then copied whole into a bucket
of an S3-compatible store (moto's server on loopback). Read from the bucket, every format gives what its local copy
gives: the same listing (ids, labels, classes, order, sha256), the same bytes for every item, the same skip reasons,
the same training batches (in process and on one Ray rank dataset) and the same extracted tokens.

The store is configured the one way users configure it: the bare URI plus the AWS SDK's environment variables
(``s3_store`` sets them before any Ray cluster of this module starts, so its workers inherit them).
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import pyarrow.fs
import pytest
import torch

from conftest import BUCKET, ray_connected
from ideal_ray.config import ConfigError, DataConfig, check_data_root, load_config
from ideal_ray.data import ray_pipeline as rp
from ideal_ray.data.convert import folder_to_flat, folder_to_parquet, folder_to_webdataset
from ideal_ray.data.folder import DECODE_ERRORS, skip_reason
from ideal_ray.data.reader import ByteReader, load_rgb
from ideal_ray.data.skipped import SkipLedger
from ideal_ray.data.sources import Listing, list_images
from ideal_ray.data.synthetic import make_synthetic_imagenet
from ideal_ray.storage import filesystem
from planted import plant_bad_files

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

PREFIX = f"s3://{BUCKET}/sets"
SEED = 5
GB = 4
# name -> (writer of out_root from the folder root, the format the listing detects)
WRITERS = {
    "flat": (lambda src, out: folder_to_flat(src, "train", out, labels="txt"), "flat"),
    "parquet": (lambda src, out: folder_to_parquet(src, "train", out, files=2, row_group_size=3), "parquet"),
    "parquet_binary_wnid": (lambda src, out: folder_to_parquet(src, "train", out, files=3, struct=False,
                                                               wnid_labels=True, row_group_size=4), "parquet"),
    "webdataset": (lambda src, out: folder_to_webdataset(src, "train", out, shards=2), "webdataset"),
}
NAMES = ["folder", *WRITERS]


@pytest.fixture(scope="module")
def sets(s3_store, tmp_path_factory):
    """{name: (local root, its copy's URI)}: the folder set and each other format written from it, all uploaded to
    ``s3://bucket/sets/<name>``."""
    base = tmp_path_factory.mktemp("s3_sources")
    src = base / "folder"
    make_synthetic_imagenet(src, num_classes=3, train_per_class=4, val_per_class=1, size=24, seed=2)
    plant_bad_files(src)  # 14 awkward files, 4 of them unreadable: 26 images
    for name, (write, _) in WRITERS.items():
        write(src, base / name)
    fs, path = filesystem(PREFIX)
    pyarrow.fs.copy_files(str(base), path, source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=fs)
    return {name: (base / name, f"{PREFIX}/{name}") for name in NAMES}


def _cfg(root, **kw) -> DataConfig:
    base = dict(root=str(root), image_size=16, resize_min=16, resize_max=22, hflip_prob=0.5, global_batch=GB,
                loader_workers=1)
    base.update(kw)
    return DataConfig(**base)


def _outcomes(listing: Listing) -> tuple[list[bytes], list]:
    """(the bytes of every item, its decoded RGB array or its skip reason), read through one ByteReader of the
    packed listing, as every reading process does."""
    data, out = [], []
    with ByteReader(listing.pack()) as reader:
        for i in range(len(listing)):
            data.append(reader.read(i))
            try:
                out.append(np.asarray(load_rgb(reader, i)))
            except DECODE_ERRORS as e:
                out.append(skip_reason(e))
    return data, out


# ------------------------------------------------------------------------------------------------ listing + bytes
@pytest.mark.parametrize("name", NAMES)
def test_the_bucket_lists_and_reads_as_the_local_copy(sets, name):
    """Same ids, labels, classes, order and sha256; the files are the same files under the URI; every item's bytes
    are the same, and the four unreadable ones are skipped with the same reasons."""
    local_root, uri = sets[name]
    local, remote = list_images(local_root, "train"), list_images(uri, "train")
    assert remote.fmt == local.fmt == WRITERS.get(name, (None, "folder"))[1] and len(remote) == 26
    assert remote.root == uri and remote.ids == local.ids and not any("://" in i or BUCKET in i for i in remote.ids)
    assert remote.labels.tolist() == local.labels.tolist() and remote.sha256() == local.sha256()
    assert (remote.classes, remote.class_names, remote.image_column) == (local.classes, local.class_names,
                                                                         local.image_column)
    for k in ("file_index", "offset", "size"):
        assert getattr(remote, k).tolist() == getattr(local, k).tolist(), k
    assert remote.files == [uri + f[len(str(local_root)):] for f in local.files]
    assert Listing.unpack(remote.pack()).files == remote.files  # what travels to the reading processes

    local_bytes, local_out = _outcomes(local)
    remote_bytes, remote_out = _outcomes(remote)
    assert remote_bytes == local_bytes
    reasons = [o for o in local_out if isinstance(o, str)]
    assert len(reasons) == 4 and [o for o in remote_out if isinstance(o, str)] == reasons
    for a, b in zip(local_out, remote_out):
        assert isinstance(b, str) if isinstance(a, str) else np.array_equal(a, b)


def test_a_missing_root_split_or_object_says_so_naming_the_uri(sets, tmp_path):
    _, uri = sets["folder"]
    for root, split, sentence in (
        (f"{PREFIX}/nothing-here", "train", f"dataset root {PREFIX}/nothing-here does not exist or is not a folder"),
        ("s3://no-such-bucket/imagenet", "train", "dataset root s3://no-such-bucket/imagenet does not exist"),
        (uri, "test", f"split folder {uri}/test does not exist"),
    ):
        with pytest.raises(FileNotFoundError) as e:
            list_images(root, split)
        assert str(e.value).startswith(sentence), str(e.value)
    with pytest.raises(ValueError, match="carries a query string; pass the bare URI"):
        list_images(f"{uri}?endpoint_override=http://elsewhere", "train")  # the endpoint comes from the environment

    # An object gone after the listing reads as a local file gone after the listing.
    local_root, _ = sets["flat"]
    copy, copy_uri = tmp_path / "flat", f"{PREFIX}/flat-copy"
    shutil.copytree(local_root, copy)
    fs, path = filesystem(copy_uri)
    pyarrow.fs.copy_files(str(copy), path, source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=fs)
    local, remote = list_images(copy, "train"), list_images(copy_uri, "train")
    gone = remote.files[3][len(copy_uri) + 1:]
    os.remove(copy / gone)
    fs.delete_file(f"{path}/{gone}")
    reasons = []
    for listing in (local, remote):
        with ByteReader(listing.pack()) as reader, pytest.raises(DECODE_ERRORS) as e:
            load_rgb(reader, 3)
        reasons.append(skip_reason(e.value))
    assert reasons[1] == reasons[0] == "unreadable: No such file or directory"


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("name", ["folder", "parquet", "webdataset"])
def test_training_reads_the_same_batches_from_the_bucket(sets, name):
    """The training input (``local_batches``: the rank's decode + augment, world 2, rank 1, across an epoch
    boundary) gives the same pixels, labels and order from the bucket, and meets the same unreadable files."""
    local_root, uri = sets[name]
    got = {}
    for root in (local_root, uri):
        ledger = SkipLedger()
        batches = list(rp.local_batches(_cfg(root), 2, 1, 5, 4, SEED, skips=ledger))
        got[str(root)] = ({c: torch.cat([b[c] for b in batches]).numpy() for c in rp.COLUMNS}, ledger.items())
    (local, local_met), (remote, remote_met) = got[str(local_root)], got[uri]
    for c in rp.COLUMNS:
        assert remote[c].tobytes() == local[c].tobytes(), c
    assert remote_met == local_met and local_met  # these steps pass over some of the unreadable files


def test_the_training_stage_takes_a_bucket_root(sets, tmp_path):
    """check_data_root does not probe a URI (the listing does: prepare_data lists it as the local copy); the
    synthetic set is never made in a bucket."""
    from ideal_ray.train.ray_trainer import prepare_data

    local_root, uri = sets["parquet"]
    cfgs = [load_config("tiny", [f"data.root={root}", f"output_dir={tmp_path}", "data.global_batch=4"])
            for root in (local_root, uri)]
    assert check_data_root(cfgs[1])
    assert prepare_data(cfgs[1]).sha256() == prepare_data(cfgs[0]).sha256()
    with pytest.raises(ConfigError, match="makes the synthetic set in a local folder"):
        check_data_root(load_config("tiny", [f"data.root={PREFIX}/none", "data.make_synthetic=true"]))


def test_a_rank_dataset_on_ray_reads_the_bucket(sets, ray_head):
    """One Ray Data rank dataset over the WebDataset shards in the bucket (the decode actor makes its own file
    system from the environment it inherited and reads each member with one ranged read) gives the local copy's
    in-process batches byte for byte."""
    local_root, uri = sets["webdataset"]
    expected = list(rp.local_batches(_cfg(local_root), 1, 0, 6, 3, SEED))
    with ray_connected(ray_head):  # with the store's endpoint and credentials
        cfg = _cfg(uri)
        ds = rp.rank_dataset(cfg, 1, 0, 6, 3, SEED, num_actors=1, images=rp.put_listing(rp.training_listing(cfg)))
        got = list(ds.iter_torch_batches(batch_size=GB, dtypes=rp.TORCH_DTYPES))
    for c in rp.COLUMNS:
        assert torch.cat([b[c] for b in got]).numpy().tobytes() == torch.cat([b[c] for b in expected]).numpy().tobytes()


# ------------------------------------------------------------------------------------------------ extraction
def test_extraction_from_the_bucket_writes_the_same_tokens(sets, tmp_path):
    """``source.root=s3://...``: the same shard rows (ids, views, labels, tokens) and the same skipped files as the
    extraction of the local copy."""
    from ideal_ray.checkpoint import save_inference_checkpoint
    from ideal_ray.config import ExtractConfig, load_stage_config
    from ideal_ray.data.ar_reader import TokenShardDataset
    from ideal_ray.data.tokens import read_manifest
    from ideal_ray.models.tokenizer import IdealTokenizer
    from ideal_ray.pipelines.extract_local import extract_tokens_local

    cfg = load_config("tiny")
    torch.manual_seed(0)
    ckpt = save_inference_checkpoint(str(tmp_path / "tok.pt"), IdealTokenizer(cfg.model).eval(), cfg)
    local_root, uri = sets["webdataset"]
    out = {}
    for key, root in (("local", local_root), ("s3", uri)):
        summary = extract_tokens_local(load_stage_config(ExtractConfig, "tiny", [
            f"tokenizer={ckpt}", f"data.root={root}", f"out={tmp_path / key}", "views=release", "batch_size=16",
            "shard_images=10", "row_group_images=5"]))
        out[key] = (summary, TokenShardDataset(tmp_path / key))
    (local_summary, local), (s3_summary, s3) = out["local"], out["s3"]
    assert s3_summary["skipped"] == local_summary["skipped"] and len(local_summary["skipped"]) == 4
    assert s3.image_ids == local.image_ids and len(local.image_ids) == 22
    np.testing.assert_array_equal(s3.labels, local.labels)
    np.testing.assert_array_equal(s3.tokens, local.tokens)
    assert read_manifest(tmp_path / "s3")["listing_sha256"] == read_manifest(tmp_path / "local")["listing_sha256"]


# ------------------------------------------------------------------------------------------------ FID references
def test_a_reference_in_the_bucket_is_its_local_copy(sets, tmp_path):
    """The generation evaluation's reference read from ``s3://`` (a folder of images, an ADM npz) gives what its
    local copy gives: the same identity (so the same cache entry), images, skipped files and ADM statistics."""
    from ideal_ray.eval.reference import AdmNpzReference, ImageFolderReference, reference_source

    folder = tmp_path / "val"  # the folder set's training images, plus hidden entries that are not images to use
    shutil.copytree(sets["folder"][0] / "train", folder)
    some = next(folder.glob("*/*.JPEG"))
    (folder / ".cache").mkdir()
    shutil.copy(some, folder / ".cache" / "a.JPEG")
    shutil.copy(some, some.parent / ".b.JPEG")
    fs, path = filesystem(f"{PREFIX}/refs/val")
    pyarrow.fs.copy_files(str(folder), path, destination_filesystem=fs)
    local, remote = reference_source(str(folder), 16), reference_source(f"{PREFIX}/refs/val", 16)
    assert isinstance(local, ImageFolderReference) and isinstance(remote, ImageFolderReference)
    a, b = local.identity(), remote.identity()
    assert b["path"] == f"{PREFIX}/refs/val" and {**b, "path": a["path"]} == a and a["num_files"] == 26
    got, want = list(remote.batches(8)), list(local.batches(8))
    assert len(got) == len(want) and all(np.array_equal(x, y) for x, y in zip(got, want))
    assert remote.skipped == local.skipped and len(local.skipped) == 4

    rng = np.random.default_rng(0)
    npz = tmp_path / "ref.npz"
    np.savez(npz, arr_0=rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8), mu=rng.normal(size=4),
             sigma=np.eye(4), mu_s=rng.normal(size=3), sigma_s=np.eye(3))
    fs, path = filesystem(f"{PREFIX}/refs/ref.npz")
    pyarrow.fs.copy_files(str(npz), path, destination_filesystem=fs)
    local, remote = reference_source(str(npz), 16), reference_source(f"{PREFIX}/refs/ref.npz", 16)
    assert isinstance(local, AdmNpzReference) and isinstance(remote, AdmNpzReference)
    a, b = local.identity(), remote.identity()
    assert b["path"] == f"{PREFIX}/refs/ref.npz" and {**b, "path": a["path"]} == a
    assert all(np.array_equal(x, y) for x, y in zip(remote.batches(2), local.batches(2)))
    assert {k: v.tolist() for k, v in remote.adm_stats().items()} == {k: v.tolist() for k, v in local.adm_stats().items()}

    with pytest.raises(FileNotFoundError, match=f"reference {PREFIX}/nope does not exist"):
        reference_source(f"{PREFIX}/nope", 16)
    with pytest.raises(ValueError, match="has no image files"):
        reference_source(f"{PREFIX}/parquet/train", 16).files()
