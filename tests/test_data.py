"""Synthetic ImageNet-layout generator, image-folder reader and transforms (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ideal_ray.data.folder import ImageFolderDataset, load_class_index
from ideal_ray.data.synthetic import COMPLETE_MARKER, MAX_CLASSES, class_name, main, make_synthetic_imagenet
from ideal_ray.data.transforms import eval_transform, make_grid_png, to_uint8, train_transform

SMALL = dict(num_classes=4, train_per_class=3, val_per_class=2, size=32)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    """10 classes, 20 train / 6 val each, 48 px: large enough to check that classes are learnable."""
    root = tmp_path_factory.mktemp("synth")
    make_synthetic_imagenet(root, num_classes=10, train_per_class=20, val_per_class=6, size=48, seed=0)
    return root


# --------------------------------------------------------------------------------------------- generator


def test_layout_counts_and_class_index(tmp_path):
    s = make_synthetic_imagenet(tmp_path / "d", **SMALL, seed=1)
    root = Path(s["root"])
    assert s["created"] and s["train_images"] == 12 and s["val_images"] == 8
    index = json.loads((root / "class_index.json").read_text())
    assert list(index) == ["0", "1", "2", "3"]
    assert index["0"] == ["n90000000", class_name(0)] and index["3"][0] == "n90000003"
    assert len({name for _, name in index.values()}) == 4  # readable names are unique
    for c, (wnid, _) in index.items():
        train = sorted(p.name for p in (root / "train" / wnid).iterdir())
        assert train == sorted(f"{wnid}_{i}.JPEG" for i in range(3))
        val = list((root / "val" / wnid).iterdir())
        assert len(val) == 2 and all(p.name.startswith("ILSVRC2012_val_") and p.suffix == ".JPEG" for p in val)
    val_numbers = sorted(int(p.stem.rsplit("_", 1)[1]) for p in (root / "val").rglob("*.JPEG"))
    assert val_numbers == list(range(1, 9))  # 1-based, unique across classes
    with Image.open(next((root / "train").rglob("*.JPEG"))) as im:
        assert im.format == "JPEG" and im.mode == "RGB" and im.size == (32, 32)
    assert (root / COMPLETE_MARKER).is_file()
    assert not list(root.rglob(".*tmp*"))  # no temporary files left behind


def test_deterministic_by_seed(tmp_path):
    a = _files(Path(make_synthetic_imagenet(tmp_path / "a", **SMALL, seed=7)["root"]))
    b = _files(Path(make_synthetic_imagenet(tmp_path / "b", **SMALL, seed=7)["root"]))
    c = _files(Path(make_synthetic_imagenet(tmp_path / "c", **SMALL, seed=8)["root"]))
    assert a == b
    assert a["class_index.json"] == c["class_index.json"]  # classes do not depend on the seed
    images = [k for k in a if k.startswith("train/")]
    assert len(images) == 12 and all(k in c for k in images)
    assert all(a[k] != c[k] for k in images)


def test_idempotent_rerun_and_param_change(tmp_path):
    root = tmp_path / "d"
    make_synthetic_imagenet(root, **SMALL)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    again = make_synthetic_imagenet(root, **SMALL)
    assert again["created"] is False and again["train_images"] == 12
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == before
    with pytest.raises(FileExistsError, match="other parameters"):
        make_synthetic_imagenet(root, **{**SMALL, "num_classes": 3})
    s = make_synthetic_imagenet(root, **{**SMALL, "num_classes": 3}, overwrite=True)
    assert s["created"] and sorted(p.name for p in (root / "train").iterdir()) == [f"n9000000{i}" for i in range(3)]


def test_refuses_non_synthetic_folder(tmp_path):
    root = tmp_path / "user"
    (root / "train" / "n01440764").mkdir(parents=True)
    precious = root / "train" / "n01440764" / "fish.JPEG"
    precious.write_bytes(b"user data")
    with pytest.raises(FileExistsError, match="not a synthetic dataset"):
        make_synthetic_imagenet(root, **SMALL)
    assert precious.read_bytes() == b"user data"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        make_synthetic_imagenet(tmp_path / "afile", **SMALL)
    with pytest.raises(ValueError, match="num_classes"):
        make_synthetic_imagenet(tmp_path / "x", **{**SMALL, "num_classes": MAX_CLASSES + 1})


def test_interrupted_run_is_redone(tmp_path):
    root = tmp_path / "d"
    make_synthetic_imagenet(root, **SMALL)
    (root / COMPLETE_MARKER).unlink()  # as if the run died before the marker
    (root / ".synthetic_in_progress").write_text("{}")
    assert make_synthetic_imagenet(root, **SMALL)["created"] is True


def test_cli(tmp_path, capsys):
    assert main(["--root", str(tmp_path / "d"), "--classes", "2", "--train-per-class", "1",
                 "--val-per-class", "1", "--size", "16"]) == 0
    assert json.loads(capsys.readouterr().out)["train_images"] == 2
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "f").write_text("x")
    assert main(["--root", str(tmp_path / "e")]) == 2


def test_classes_are_distinguishable(synth):
    """Nearest-class-mean on 16x16 thumbnails (train means, val queries) is far above chance (10%)."""
    def load(split):
        ds = ImageFolderDataset(synth, split, transform=lambda im: np.asarray(im.resize((16, 16), Image.BILINEAR)))
        x = np.stack([ds[i][0] for i in range(len(ds))]).reshape(len(ds), -1).astype(np.float32)
        return x, np.asarray(ds.targets)

    xtr, ytr = load("train")
    xva, yva = load("val")
    means = np.stack([xtr[ytr == c].mean(0) for c in range(10)])  # (10, 768)
    pred = ((xva[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == yva).mean() >= 0.7, (pred == yva).mean()
    # Mean RGB per class differs clearly between every pair of classes.
    colour = np.stack([xtr[ytr == c].reshape(-1, 256, 3).mean((0, 1)) for c in range(10)])  # (10, 3)
    dists = np.linalg.norm(colour[:, None] - colour[None], axis=-1)[~np.eye(10, dtype=bool)]
    assert dists.min() > 8.0, np.sort(dists)[:4]


# --------------------------------------------------------------------------------------------- reader


def test_dataset_labels_follow_class_index(synth):
    index = load_class_index(synth)
    assert len(index) == 10 and index[0][0] == "n90000000"
    ds = ImageFolderDataset(synth, "val", return_path=True)
    assert len(ds) == 60 and ds.num_classes == 10 and ds.class_names[2] == index[2][1]
    x, label, path = ds[7]
    assert x.shape == (3, 48, 48) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    assert Path(path).parent.name == index[label][0]
    assert all(Path(p).parent.name == ds.classes[y] for p, y in ds.samples)
    assert ds.num_skipped == 0


def test_label_order_comes_from_index_not_folders(tmp_path):
    root = tmp_path / "d"
    for wnid in ("a", "b"):
        (root / "train" / wnid).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / "train" / wnid / "x.jpg")
    json.dump({"0": ["b", "bee"], "1": ["a", "ant"], "2": ["c", "cat"]}, (root / "class_index.json").open("w"))
    ds = ImageFolderDataset(root)
    assert ds.classes == ["b", "a", "c"] and [y for _, y in ds.samples] == [1, 0]
    (root / "class_index.json").unlink()
    ds = ImageFolderDataset(root)  # fallback: sorted folder names
    assert ds.classes == ["a", "b"] and ds.class_names == ["a", "b"] and ds.targets == [0, 1]
    (root / "map.txt").write_text("b bee insect\na ant\n")
    assert ImageFolderDataset(root, class_index=root / "map.txt").class_names == ["bee insect", "ant"]


def test_bad_files_are_skipped_and_counted(tmp_path):
    d = tmp_path / "d" / "train" / "n1"
    d.mkdir(parents=True)
    Image.new("RGB", (10, 10), (255, 0, 0)).save(d / "a_good.JPEG")
    (d / "b_empty.JPEG").write_bytes(b"")
    (d / "c_text.jpg").write_text("this is not an image")
    buf = (tmp_path / "full.jpg")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf)
    data = buf.read_bytes()
    (d / "d_truncated.jpeg").write_bytes(data[: len(data) // 2])  # valid header, half the scan data
    Image.new("RGB", (12, 12), (0, 0, 255)).save(d / "e_good.png")
    (d / "notes.txt").write_text("ignored: not an image extension")
    ds = ImageFolderDataset(tmp_path / "d")
    assert len(ds) == 5
    out = [ds[i][0] for i in range(len(ds))]
    assert [tuple(x.shape) for x in out] == [(3, 10, 10), (3, 12, 12), (3, 12, 12), (3, 12, 12), (3, 12, 12)]
    assert ds.num_skipped == 3 and [Path(p).name for p in ds.skipped] == ["b_empty.JPEG", "c_text.jpg",
                                                                        "d_truncated.jpeg"]
    ds[1]  # known-bad files are not retried or re-counted
    assert ds.num_skipped == 3


def test_grayscale_and_rgba_become_rgb(tmp_path):
    d = tmp_path / "d" / "val" / "n1"
    d.mkdir(parents=True)
    Image.new("L", (8, 6), 128).save(d / "gray.png")
    Image.new("RGBA", (8, 6), (255, 0, 0, 0)).save(d / "rgba.png")  # fully transparent -> white
    Image.new("CMYK", (8, 6), (0, 0, 0, 0)).save(d / "cmyk.JPEG")
    ds = ImageFolderDataset(tmp_path / "d", "val")
    for i in range(3):
        x, _ = ds[i]
        assert x.shape == (3, 6, 8)
    assert torch.allclose(ds[2][0], torch.ones(3, 6, 8))  # rgba over white (files sort: cmyk, gray, rgba)
    assert ds.num_skipped == 0


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing")
    root = tmp_path / "d"
    root.mkdir()
    with pytest.raises(FileNotFoundError, match="split folder .*train does not exist"):
        ImageFolderDataset(root)
    (root / "train").mkdir()
    (root / "train" / "stray.JPEG").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no class folders"):
        ImageFolderDataset(root)
    (root / "train" / "n1").mkdir()
    with pytest.raises(FileNotFoundError, match="no image files"):
        ImageFolderDataset(root)
    (root / "train" / "mystery").mkdir()
    Image.new("RGB", (4, 4)).save(root / "train" / "n1" / "x.png")
    json.dump({"0": ["n1", "one"]}, (root / "class_index.json").open("w"))
    with pytest.raises(ValueError, match="class folder .*mystery is not in the class index"):
        ImageFolderDataset(root)
    with pytest.raises(FileNotFoundError, match="class index"):
        ImageFolderDataset(root, class_index=root / "nope.json")
    (root / "bad.json").write_text('{"0": ["n1", "one"], "2": ["n2", "two"]}')
    with pytest.raises(ValueError, match="0..1 with no gaps"):
        load_class_index(root / "bad.json")


# --------------------------------------------------------------------------------------------- transforms


def test_train_and_eval_transform_shapes_ranges():
    torch.manual_seed(0)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    t = train_transform(32, 36, 44, 0.5)
    for _ in range(5):
        x = t(img)
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1
    e = eval_transform(32)
    a, b = e(img), e(img)
    assert a.shape == (3, 32, 32) and torch.equal(a, b)  # deterministic
    white = eval_transform(16)(Image.new("RGB", (40, 20), (255, 255, 255)))
    assert torch.allclose(white, torch.ones(3, 16, 16), atol=1e-6)
    with pytest.raises(ValueError, match="resize_min"):
        train_transform(64, 32, 48, 0.5)


def test_flip():
    arr = np.zeros((16, 16, 3), dtype=np.uint8)
    arr[:, :8] = 255  # left half white
    img = Image.fromarray(arr)
    kept = train_transform(16, 16, 16, hflip_prob=0.0)(img)
    flipped = train_transform(16, 16, 16, hflip_prob=1.0)(img)
    assert kept[:, :, 0].mean() > 0.9 and kept[:, :, -1].mean() < -0.9
    assert torch.equal(flipped, kept.flip(-1))


def test_to_uint8_and_grid(tmp_path):
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0]).view(1, 1, 5).expand(3, 1, 5)
    u = to_uint8(x)
    assert u.shape == (1, 5, 3) and u.dtype == np.uint8 and u[0, :, 0].tolist() == [0, 0, 128, 255, 255]
    assert to_uint8(torch.zeros(2, 3, 4, 5)).shape == (2, 4, 5, 3)
    inputs, outputs = torch.rand(5, 3, 8, 8) * 2 - 1, torch.zeros(5, 3, 8, 8)
    p = make_grid_png(inputs, outputs, tmp_path / "vis" / "grid.png", nrow=2)
    with Image.open(p) as im:
        # 2 pairs per row, 3 rows; each cell 8 x 16 plus 2 px padding around
        assert im.mode == "RGB" and im.size == (2 * (16 + 2) + 2, 3 * (8 + 2) + 2)
        arr = np.asarray(im)
    assert (arr[2:10, 2 + 8:2 + 16] == 128).all()  # first output (zeros) sits right of the first input
    with pytest.raises(ValueError, match="same shape"):
        make_grid_png(inputs, outputs[:, :, :4], tmp_path / "g.png")
