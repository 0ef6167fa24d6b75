"""Image sources: one listing + byte reader for folder / flat / parquet / webdataset, and robust decoding."""
import os
import pickle
import re
import shutil

import numpy as np
import pytest
from PIL import ImageFile

from ideal_ray.data.convert import folder_to_flat, folder_to_parquet, folder_to_webdataset
from ideal_ray.data.folder import DECODE_ERRORS, BadImageError, ImageFolderDataset, open_rgb, skip_reason
from ideal_ray.data.reader import ByteReader, decode_bytes, load_rgb
from ideal_ray.data.sources import FORMATS, Listing, detect_format, list_images
from ideal_ray.data.synthetic import make_synthetic_imagenet
from planted import plant_bad_files

# name -> (writer, expected format, how the ids look)
SOURCES = {
    "parquet_struct": (lambda src, out: folder_to_parquet(src, "train", out, files=2, struct=True, row_group_size=2),
                       "parquet", "basename"),
    "parquet_binary_wnid": (lambda src, out: folder_to_parquet(src, "train", out, files=3, struct=False,
                                                               wnid_labels=True, row_group_size=3),
                            "parquet", "row"),
    "webdataset": (lambda src, out: folder_to_webdataset(src, "train", out, shards=2), "webdataset", "key"),
    "flat_csv": (lambda src, out: folder_to_flat(src, "train", out, labels="csv"), "flat", "path"),
    "flat_txt": (lambda src, out: folder_to_flat(src, "train", out, labels="txt"), "flat", "path"),
}


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """The synthetic folder and every other format written from its train split."""
    base = tmp_path_factory.mktemp("sources")
    src = base / "folder"
    make_synthetic_imagenet(src, num_classes=3, train_per_class=4, val_per_class=2, size=16)
    out = {"folder": src}
    for name, (write, _, _) in SOURCES.items():
        write(src, base / name)
        out[name] = base / name
    return out


@pytest.fixture(scope="module")
def folder_listing(roots):
    return list_images(roots["folder"], "train")


def test_folder_listing_matches_the_image_folder_reader(roots, folder_listing):
    ds = ImageFolderDataset(roots["folder"], "train")
    assert folder_listing.fmt == "folder" and len(folder_listing) == len(ds) == 12
    assert folder_listing.files == [p for p, _ in ds.samples]
    assert folder_listing.labels.tolist() == ds.targets and folder_listing.classes == ds.classes
    assert folder_listing.ids == [os.path.relpath(p, roots["folder"]) for p, _ in ds.samples]
    assert folder_listing.file_index.tolist() == list(range(12)) and set(folder_listing.offset.tolist()) == {-1}


@pytest.mark.parametrize("name", list(SOURCES))
def test_every_format_lists_the_same_images_with_the_same_labels_and_bytes(roots, folder_listing, name):
    _, fmt, id_kind = SOURCES[name]
    assert detect_format(roots[name], "train") == fmt
    listing = list_images(roots[name], "train")  # fmt="auto"
    assert listing.fmt == fmt and len(listing) == len(folder_listing)
    assert listing.labels.tolist() == folder_listing.labels.tolist()
    assert listing.classes == folder_listing.classes and listing.class_names == folder_listing.class_names
    assert len(set(listing.ids)) == len(listing)
    rel = [os.path.relpath(p, roots["folder"] / "train") for p in folder_listing.files]  # wnid/file.JPEG
    expected_ids = {
        "basename": [os.path.basename(r) for r in rel],
        "row": [f"train/train-{k:05d}-of-00003.parquet#{r}" for k, n in enumerate((4, 4, 4)) for r in range(n)],
        "key": [f"train/train-{i // 6:05d}.tar/{os.path.splitext(r)[0]}" for i, r in enumerate(rel)],
        "path": [f"train/{os.path.basename(r)}" for r in rel],
    }[id_kind]
    assert listing.ids == expected_ids

    order = np.random.default_rng(0).permutation(len(listing))  # random access, across row groups and files
    with ByteReader(listing) as reader:
        for i in order:
            with open(folder_listing.files[i], "rb") as f:
                assert reader.read(int(i)) == f.read(), listing.ids[i]
        assert np.asarray(load_rgb(reader, 0)).shape == (16, 16, 3)


@pytest.mark.parametrize("name", ["folder", "parquet_struct", "webdataset"])
def test_pack_unpack_round_trips_through_pickle_5(roots, name):
    listing = list_images(roots[name], "train")
    packed = listing.pack()
    assert all(isinstance(v, np.ndarray) and v.dtype != object for v in packed.values())
    buffers = []
    data = pickle.dumps(packed, protocol=5, buffer_callback=buffers.append)
    assert buffers, "numpy arrays should travel out of band (zero-copy in Ray's object store)"
    back = Listing.unpack(pickle.loads(data, buffers=buffers))
    for field in ("root", "split", "fmt", "files", "ids", "classes", "class_names", "image_column"):
        assert getattr(back, field) == getattr(listing, field), field
    for field in ("labels", "file_index", "offset", "size"):
        np.testing.assert_array_equal(getattr(back, field), getattr(listing, field))
    assert back.sha256() == listing.sha256()
    with ByteReader(listing) as a, ByteReader(packed) as b:
        assert [a.read(i) for i in range(len(listing))] == [b.read(i) for i in range(len(listing))]


def test_sha256_is_the_identity_of_ids_and_labels(roots, folder_listing):
    assert list_images(roots["folder"], "train").sha256() == folder_listing.sha256()
    d = folder_listing.pack()
    d["labels"] = d["labels"].copy()
    d["labels"][0] += 1
    assert Listing.unpack(d).sha256() != folder_listing.sha256()
    d = folder_listing.pack()
    d["ids"] = d["ids"][::-1].copy()
    assert Listing.unpack(d).sha256() != folder_listing.sha256()
    assert list_images(roots["webdataset"], "train").sha256() != folder_listing.sha256()  # other ids


def test_planted_files_fail_or_decode_to_the_expected_rgb_in_every_container(roots, tmp_path):
    root = tmp_path / "planted"
    shutil.copytree(roots["folder"], root)
    planted = plant_bad_files(root)
    first = {n: open(root / p["id"], "rb").read() for n, p in planted.items()}
    assert plant_bad_files(root).keys() == planted.keys()  # deterministic: the same bytes again
    assert all(open(root / p["id"], "rb").read() == first[n] for n, p in planted.items())
    assert {p["good"] for p in planted.values()} == {True, False}

    folder_to_webdataset(root, "train", tmp_path / "wds", shards=3)
    folder_to_parquet(root, "train", tmp_path / "pq", files=2, struct=False)
    folder = list_images(root, "train")
    for src in (root, tmp_path / "wds", tmp_path / "pq"):
        listing = list_images(src, "train")
        assert listing.labels.tolist() == folder.labels.tolist()
        reader = ByteReader(listing.pack())
        by_file = {f: i for i, f in enumerate(folder.ids)}
        for name, p in planted.items():
            i = by_file[p["id"]]
            if not p["good"]:
                with pytest.raises(DECODE_ERRORS):
                    load_rgb(reader, i)
                continue
            rgb = np.asarray(load_rgb(reader, i))
            tol = 3 if name.endswith("jpeg") else 0  # lossy JPEG; PNG exact
            assert rgb.dtype == np.uint8 and rgb.shape == (16, 16, 3), name
            assert np.abs(rgb.astype(int) - p["expected"]).max() <= tol, name
        good = [i for i, f in enumerate(folder.ids) if "planted_" not in f]
        assert all(np.asarray(load_rgb(reader, i)).shape == (16, 16, 3) for i in good)
        reader.close()
    # the values the brief pins down: 16-bit gray 0x8000 -> 128, a transparent pixel -> white
    assert planted["gray16_png"]["expected"][0, 0].tolist() == [128] * 3
    assert planted["rgba_png"]["expected"][0, -1].tolist() == [255] * 3


def test_decoding_never_accepts_partial_files(monkeypatch):
    with pytest.raises(DECODE_ERRORS):
        decode_bytes(b"")
    with pytest.raises(DECODE_ERRORS):
        decode_bytes(b"GIF89a" + b"\x00" * 7)  # a header and nothing else
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        decode_bytes(b"")


def test_skip_reasons_name_the_problem(roots, tmp_path):
    """The text a skipped file is listed with names what is wrong with it, the same whether the image is decoded
    from its path (training), from its bytes (extraction) or out of a tar member; never PIL's object repr."""
    root = tmp_path / "planted"
    shutil.copytree(roots["folder"], root)
    planted = plant_bad_files(root)
    expected = {"zero_bytes": "empty file (0 bytes)", "not_an_image": "not an image (unrecognised format)",
                "truncated_jpeg": "truncated image (JPEG, 14 bytes not processed)",
                "truncated_png": "truncated image (PNG)"}
    assert {n for n, p in planted.items() if not p["good"]} == set(expected)  # every bad kind is checked
    folder_to_webdataset(root, "train", tmp_path / "wds", shards=2)
    gone = root / planted["truncated_png"]["id"]  # listed below, then removed: a file that vanished
    for src in (root, tmp_path / "wds"):
        listing = list_images(src, "train")
        reader = ByteReader(listing.pack())
        index = {os.path.splitext(i)[0].split("/")[-1]: k for k, i in enumerate(listing.ids)}
        for name, reason in expected.items():
            stem = os.path.splitext(os.path.basename(planted[name]["id"]))[0]
            with pytest.raises(BadImageError) as err:
                load_rgb(reader, index[stem])
            assert skip_reason(err.value) == str(err.value) == reason, (src, name)
            if src == root:  # the training pipeline opens the path itself
                with pytest.raises(BadImageError, match=re.escape(reason)):
                    open_rgb(root / planted[name]["id"])
        reader.close()
    listing = list_images(root, "train")
    os.remove(gone)
    with pytest.raises(BadImageError, match=r"^unreadable: No such file or directory$"):
        load_rgb(ByteReader(listing), listing.ids.index(planted["truncated_png"]["id"]))
    with pytest.raises(BadImageError, match=r"^unreadable: No such file or directory$"):
        open_rgb(gone)
    assert skip_reason(ValueError("odd crop")) == "ValueError: odd crop"  # anything else keeps its type


def test_parquet_listing_reads_no_image_bytes(roots, tmp_path):
    """Garbage over the image column of row group 0: listing still works; reading that group is an OSError."""
    import pyarrow.parquet as pq

    root = tmp_path / "pq"
    shutil.copytree(roots["parquet_struct"], root)
    path = sorted((root / "train").glob("*.parquet"))[0]
    md = pq.ParquetFile(path).metadata
    col = next(md.row_group(0).column(j) for j in range(md.num_columns)
               if md.row_group(0).column(j).path_in_schema == "image.bytes")
    start = col.dictionary_page_offset or col.data_page_offset
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(b"\xff" * col.total_compressed_size)
    listing = list_images(root, "train")
    assert len(listing) == 12
    reader = ByteReader(listing)
    with pytest.raises(OSError):
        reader.read(0)
    assert decode_bytes(reader.read(2)).size == (16, 16)  # row group 1 of the same file is intact
    reader.close()


def test_truncated_shard(roots, tmp_path):
    root = tmp_path / "wds"
    shutil.copytree(roots["webdataset"], root)
    tar = sorted((root / "train").glob("*.tar"))[-1]
    listing = list_images(root, "train")
    last = len(listing) - 1
    with open(tar, "r+b") as f:  # cut after listing: the read fails cleanly
        f.truncate(int(listing.offset[last]) + 10)
    reader = ByteReader(listing)
    with pytest.raises(OSError, match="truncated"):
        reader.read(last)
    assert decode_bytes(reader.read(0)).size == (16, 16)
    reader.close()
    with pytest.raises(ValueError, match="not a readable uncompressed tar"):  # cut before listing: clear error
        list_images(root, "train")


def _copy(roots, name, tmp_path):
    shutil.copytree(roots[name], tmp_path / name)
    return tmp_path / name


def test_layout_errors(roots, tmp_path, folder_listing):
    flat = _copy(roots, "flat_csv", tmp_path)
    csv_file = flat / "LOC_train_solution.csv"
    text = csv_file.read_text()

    csv_file.rename(flat / "elsewhere.csv")
    with pytest.raises(FileNotFoundError, match="needs a labels file.*LOC_train_solution.csv"):
        list_images(flat, "train")
    assert len(list_images(flat, "train", labels_file=flat / "elsewhere.csv")) == 12
    (flat / "elsewhere.csv").rename(csv_file)

    csv_file.write_text(text.replace(",n90000001 ", ",n99999999 ", 1))
    with pytest.raises(ValueError, match="wnid 'n99999999' of image .* is not in the class index"):
        list_images(flat, "train")
    csv_file.write_text(text)

    extra = flat / "train" / "stray.JPEG"
    shutil.copyfile(folder_listing.files[0], extra)
    with pytest.raises(ValueError, match="image .*stray.JPEG has no label in .*LOC_train_solution.csv"):
        list_images(flat, "train")
    extra.unlink()

    gone = sorted((flat / "train").iterdir())[0]
    gone.unlink()
    with pytest.raises(ValueError, match=f"names '{gone.stem}' but there is no such image"):
        list_images(flat, "train")

    txt = _copy(roots, "flat_txt", tmp_path)
    labels = txt / "train_labels.txt"
    labels.write_text(labels.read_text().replace(" 2\n", " 7\n", 1))
    with pytest.raises(ValueError, match=r"label 7 of image .* line \d+\) is outside \[0, 3\)"):
        list_images(txt, "train")

    with pytest.raises(ValueError, match="labels_file=.* applies only to the flat format"):
        list_images(roots["folder"], "train", labels_file=csv_file)
    with pytest.raises(ValueError, match="unknown image source format 'zip'"):
        list_images(roots["folder"], "train", fmt="zip")
    assert set(FORMATS) == {"folder", "flat", "parquet", "webdataset"}


def test_format_detection_errors(roots, tmp_path):
    root = tmp_path / "mixed"
    (root / "empty").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="split folder .*empty is empty"):
        list_images(root, "empty")
    with pytest.raises(FileNotFoundError, match="split folder .*nosplit does not exist"):
        list_images(root, "nosplit")
    shutil.copytree(roots["webdataset"] / "train", root / "train")
    for p in (roots["parquet_struct"] / "train").iterdir():
        shutil.copy(p, root / "train")
    with pytest.raises(ValueError, match="cannot tell the format .* parquet .* webdataset .* pass data.format="):
        list_images(root, "train")
    assert list_images(root, "train", fmt="webdataset", class_index=roots["folder"]).fmt == "webdataset"


def test_webdataset_image_without_label(roots, tmp_path):
    import tarfile

    root = tmp_path / "wds"
    (root / "train").mkdir(parents=True)
    shutil.copy(roots["folder"] / "class_index.json", root)
    with tarfile.open(roots["webdataset"] / "train" / "train-00000.tar") as src, \
            tarfile.open(root / "train" / "a.tar", "w") as dst:
        for m in src.getmembers():
            if m.name != src.getmembers()[1].name:  # drop the first sample's .cls
                dst.addfile(m, src.extractfile(m))
    with pytest.raises(ValueError, match=r"image .* in shard .*a\.tar has no .*\.cls label"):
        list_images(root, "train")


def test_writers_refuse_to_overwrite(roots):
    with pytest.raises(FileExistsError, match="already exists; refusing to overwrite"):
        folder_to_webdataset(roots["folder"], "train", roots["webdataset"])
    with pytest.raises(FileExistsError, match="already exists; refusing to overwrite"):
        folder_to_flat(roots["folder"], "train", roots["flat_csv"])
    assert not [p for p in roots["webdataset"].iterdir() if ".tmp" in p.name]  # nothing half-written left
