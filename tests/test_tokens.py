"""Token extraction and token shards: crop geometry, the Parquet schema, verification, resumable extraction and
the AR readers (in-process and Ray).

One tiny synthetic set (2 classes x 4 train images) and one random-init tiny tokenizer checkpoint are shared by the
module; the Ray tests join the session's local Ray head (conftest's ``ray_head``). The reference for every Ray row
is the in-process ``TokenShardDataset.step_batch`` (pure schedule + the shards read in full).
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from conftest import ray_connected, tiny_tokenizer_set
from ideal_ray.data import crops
from ideal_ray.data import ar_reader as ar
from ideal_ray.data import tokens as tk
from ideal_ray.data.augment import decode, to_model_input

S = 32  # the tiny tokenizer's image size


# ------------------------------------------------------------------------------------- crop geometry
def _coord_image(side_w: int, side_h: int | None = None) -> Image.Image:
    """RGB image whose pixel (x, y) is (x, y, 7): every crop reveals its own box."""
    h = side_h or side_w
    x = np.arange(side_w, dtype=np.uint8)[None, :].repeat(h, 0)
    y = np.arange(h, dtype=np.uint8)[:, None].repeat(side_w, 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 7)], -1))


def _random_image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_crop_sizes_truncate_like_llamagen():
    assert [crops.crop_size_at(64, r) for r in crops.LLAMAGEN_CROP_RANGES] == [70, 67]
    assert [crops.crop_size_at(384, r) for r in crops.LLAMAGEN_CROP_RANGES] == [422, 403]
    assert [crops.crop_size_at(256, r) for r in crops.LLAMAGEN_CROP_RANGES] == [281, 268]
    with pytest.raises(ValueError, match="crop_range"):
        crops.crop_size_at(64, 0.9)


def _adm_reference(img: Image.Image, size: int) -> np.ndarray:
    """ADM center crop written straight from its description (BOX halvings, bicubic, floor-centred crop)."""
    while min(img.size) >= 2 * size:
        img = img.resize((img.width // 2, img.height // 2), Image.BOX)
    s = size / min(img.size)
    img = img.resize((round(img.width * s), round(img.height * s)), Image.BICUBIC)
    a = np.asarray(img)
    y, x = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    return a[y:y + size, x:x + size]


def test_center_crop_plan_and_pixels():
    assert crops.center_crop_plan(200, 150, 70) == (1, (93, 70), (11, 0))  # 150 >= 140: one halving first
    assert crops.center_crop_plan(300, 301, 70) == (2, (70, 70), (0, 0))
    assert crops.center_crop_plan(67, 90, 70) == (0, (70, 94), (0, 12))  # upscales a small image
    for w, h in [(200, 150), (67, 90), (97, 64), (70, 70)]:
        img = _random_image(w, h, seed=w)
        out = np.asarray(crops.center_crop_arr(img, 70))
        assert out.shape == (70, 70, 3)
        np.testing.assert_array_equal(out, _adm_reference(img, 70))


@pytest.mark.parametrize("crop_range,side", [(1.1, 35), (1.05, 33)])  # crop_size_at(S, crop_range)
def test_ten_crop_boxes_and_flips(crop_range, side):
    """On a square of the crop size the ADM step is the identity, so each view's pixels name its box."""
    views = crops.ten_crop_views(_coord_image(side), S, crop_range)
    assert views.shape == (10, S, S, 3) and views.dtype == np.uint8
    d = side - S
    c = int(round(d / 2))  # torchvision's centre offset (67 -> round(1.5) = 2)
    corners = [(0, 0), (d, 0), (0, d), (d, d), (c, c)]
    for j, (x0, y0) in enumerate(corners):
        np.testing.assert_array_equal(views[j][..., 0], np.arange(x0, x0 + S)[None, :].repeat(S, 0))
        np.testing.assert_array_equal(views[j][..., 1], np.arange(y0, y0 + S)[:, None].repeat(S, 1))
        # flipped five: the same boxes cut from the mirrored square -> columns run backwards from side-1-x0
        np.testing.assert_array_equal(views[5 + j][0, :, 0], side - 1 - np.arange(x0, x0 + S))
        np.testing.assert_array_equal(views[5 + j][..., 1], views[j][..., 1])
    # flipped tl is the mirror image of the unflipped tr crop, and so on
    for a, b in [(5, 1), (6, 0), (7, 3), (8, 2)]:
        np.testing.assert_array_equal(views[a], views[b][:, ::-1])
    mirror_center_left = d - c  # the flipped centre is not the mirrored centre box when d is odd
    np.testing.assert_array_equal(views[9][:, ::-1][0, :, 0], np.arange(mirror_center_left, mirror_center_left + S))


def test_ten_crop_matches_torchvision_on_random_images():
    for w, h in [(200, 150), (97, 64), (90, 130)]:
        img = _random_image(w, h, seed=h)
        for r in crops.LLAMAGEN_CROP_RANGES:
            square = crops.center_crop_arr(img, crops.crop_size_at(S, r))
            ref = np.stack([np.asarray(v) for v in TF.ten_crop(square, S)])
            np.testing.assert_array_equal(crops.ten_crop_views(img, S, r), ref)


def test_view_sets():
    img = _random_image(120, 90, seed=3)
    ll = crops.llamagen_views(img, S)
    assert ll.shape == (20, S, S, 3) and crops.num_views("llamagen") == 20
    np.testing.assert_array_equal(ll[:10], crops.ten_crop_views(img, S, 1.1))
    np.testing.assert_array_equal(ll[10:], crops.ten_crop_views(img, S, 1.05))
    names = crops.view_names("llamagen")
    assert names[0] == "crop1.10/tl" and names[9] == "crop1.10/flip/center" and names[10] == "crop1.05/tl"
    rel = crops.make_views(img, "release", S)
    assert rel.shape == (2, S, S, 3) and crops.num_views("release") == 2
    np.testing.assert_array_equal(rel[0], np.asarray(crops.center_crop_arr(img, S)))
    np.testing.assert_array_equal(rel[1], rel[0][:, ::-1])
    with pytest.raises(ValueError, match="llamagen, release"):
        crops.make_views(img, "tencrop", S)


# ------------------------------------------------------------------------------------- schema, writes, verify
def _manifest(v: int, shards: list[dict], grid: int = 2, vocab: int = 16, complete: bool = True) -> dict:
    return {"format": tk.FORMAT, "complete": complete, "grid": grid, "vocab": vocab, "num_views": v,
            "views": "test", "shards": shards, "num_images": sum(s["images"] for s in shards)}


def _write_set(d, shards_rows: list[list[tuple[str, int]]], v: int = 2, grid: int = 2, images=None) -> None:
    """Shards from (image_id, view_id) rows; tokens encode (shard, row) so every row is distinguishable."""
    entries = []
    for k, rows in enumerate(shards_rows):
        toks = (np.arange(len(rows) * grid * grid).reshape(len(rows), -1) + k) % 16
        info = tk.write_shard(os.path.join(d, tk.shard_name(k)), [r[0] for r in rows], [r[1] for r in rows],
                              [ord(r[0][0]) % 5 for r in rows], toks, row_group_rows=2 * v)
        entries.append(dict(info, images=len({r[0] for r in rows}) if images is None else images[k]))
    tk.write_manifest(d, _manifest(v, entries, grid))


def test_schema_round_trip(tmp_path):
    toks = np.array([[0, 65535, 7, 9], [1, 2, 3, 4], [5, 6, 7, 8]])
    info = tk.write_shard(tmp_path / "s.parquet", ["a/x.JPEG", "a/x.JPEG", "b/y.png"], [0, 1, 0], [3, 3, 999], toks,
                          row_group_rows=2)
    assert info == {"file": "s.parquet", "rows": 3, "bytes": os.path.getsize(tmp_path / "s.parquet")}
    t = tk.read_shard(tmp_path / "s.parquet")
    assert t.schema.equals(tk.TOKEN_SCHEMA)
    assert t.column("image_id").to_pylist() == ["a/x.JPEG", "a/x.JPEG", "b/y.png"]
    assert t.column("view_id").to_pylist() == [0, 1, 0] and t.column("label").to_pylist() == [3, 3, 999]
    back = tk.tokens_to_numpy(t.column("tokens"), 4)
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back, toks)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(tk.TMP_SUFFIX)]
    with pytest.raises(ValueError, match="expected 3"):
        tk.tokens_to_numpy(t.column("tokens"), 3)


def test_write_refuses_overwrite_and_bad_input(tmp_path):
    p = tmp_path / "s.parquet"
    tk.write_shard(p, ["a"], [0], [1], np.zeros((1, 4), np.int64))
    before = p.read_bytes()
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        tk.write_shard(p, ["b"], [0], [2], np.ones((1, 4), np.int64))
    assert p.read_bytes() == before and not os.path.exists(str(p) + tk.TMP_SUFFIX)
    with pytest.raises(ValueError, match="integers"):
        tk.write_shard(tmp_path / "t.parquet", ["a"], [0], [1], np.zeros((1, 4)))
    with pytest.raises(ValueError, match="uint16"):
        tk.write_shard(tmp_path / "t.parquet", ["a"], [0], [1], np.full((1, 4), 70000))
    with pytest.raises(ValueError, match="one row per image id"):
        tk.write_shard(tmp_path / "t.parquet", ["a", "b"], [0, 0], [1, 1], np.zeros((3, 4), np.int64))
    assert not os.path.exists(tmp_path / "t.parquet")


def test_verify_accepts_good_and_catches_duplicate_missing_and_strays(tmp_path):
    good = [[("a", 0), ("a", 1), ("b", 0), ("b", 1)], [("c", 0), ("c", 1)]]
    _write_set(tmp_path / "good", good)
    s = tk.verify_shards(tmp_path / "good")
    assert s["ok"] and (s["images"], s["rows"], s["views"], s["duplicates"], s["missing"]) == (3, 6, 2, 0, 0)

    _write_set(tmp_path / "dup", [good[0] + [("b", 1), ("b", 0)], good[1]], images=[3, 1])  # b twice
    with pytest.raises(tk.TokenShardError, match="duplicate") as e:
        tk.verify_shards(tmp_path / "dup")
    assert e.value.summary["duplicates"] == 2 and not e.value.summary["ok"]

    _write_set(tmp_path / "cross", [good[0], [("c", 0), ("c", 1), ("a", 0), ("a", 1)]])  # a in two shards
    assert tk.verify_shards(tmp_path / "cross", raise_on_error=False)["duplicates"] == 2

    _write_set(tmp_path / "miss", [[("a", 0), ("a", 1), ("b", 0)], good[1]])  # b lacks view 1
    with pytest.raises(tk.TokenShardError, match="missing") as e:
        tk.verify_shards(tmp_path / "miss")
    assert e.value.summary["missing"] == 1 and e.value.summary["rows"] == 5

    _write_set(tmp_path / "order", [[("a", 1), ("a", 0), ("b", 0), ("b", 1)]])  # right rows, wrong layout
    assert any("layout" in p for p in tk.verify_shards(tmp_path / "order", raise_on_error=False)["problems"])

    (tmp_path / "good" / "tokens-00009.parquet.tmp").write_bytes(b"partial")
    os.remove(tmp_path / "good" / tk.shard_name(1))
    probs = tk.verify_shards(tmp_path / "good", raise_on_error=False)["problems"]
    assert any("missing on disk" in p for p in probs) and any("temporary" in p for p in probs)


# ------------------------------------------------------------------------------------- extraction
@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """(base folder, data root, tokenizer checkpoint, tokenizer): 2 classes x 4 train images, random-init tiny
    tokenizer."""
    base = tmp_path_factory.mktemp("tokens")
    return (base, *tiny_tokenizer_set(base, seed=3))


def _extract(ckpt, root, out, *overrides: str) -> dict:
    """The in-process extraction of ``root``'s train split with ``ckpt`` into ``out``: the tiny preset (CPU) with
    ``a.b=c`` overrides."""
    from ideal_ray.config import ExtractConfig, load_stage_config
    from ideal_ray.pipelines.extract_local import extract_tokens_local

    return extract_tokens_local(load_stage_config(ExtractConfig, "tiny", [f"tokenizer={ckpt}", f"data.root={root}",
                                                                          f"out={out}", *overrides]))


@pytest.fixture(scope="module")
def extracted(tiny_setup):
    """LlamaGen 20-view extraction in 3 shards (3 + 3 + 2 images), one image's 20 views per encoder call."""
    base, root, ckpt, _ = tiny_setup
    out = str(base / "llamagen")
    summary = _extract(ckpt, root, out, "views=llamagen", "batch_size=20", "shard_images=3", "row_group_images=2")
    return out, summary


def _direct_codes(tok, root: str, image_id: str, views: str) -> np.ndarray:
    arr = crops.make_views(decode(os.path.join(root, image_id)), views, S)  # (V, S, S, 3)
    return tok.encode(to_model_input(torch.from_numpy(arr))).flatten(1).numpy()  # (V, N)


def test_extraction_rows_and_tokens_equal_direct_encoding(tiny_setup, extracted):
    _, root, ckpt, tok = tiny_setup
    out, summary = extracted
    assert (summary["images"], summary["rows"], summary["shards"], summary["shards_written"]) == (8, 160, 3, 3)
    assert summary["verify"]["ok"] and summary["skipped"] == []
    m = tk.read_manifest(out)
    assert m["complete"] and m["grid"] == 8 and m["vocab"] == 256 and m["num_views"] == 20
    assert m["image_size"] == S and m["tokenizer_path"] == os.path.abspath(ckpt) and len(m["tokenizer_sha256"]) == 64
    ds = ar.TokenShardDataset(out)
    assert ds.tokens.shape == (8, 20, 64) and ds.tokens.dtype == np.uint16
    assert ds.image_ids[0] == "train/n90000000/n90000000_0.JPEG" and list(ds.labels) == [0] * 4 + [1] * 4
    for i, image_id in enumerate(ds.image_ids):
        np.testing.assert_array_equal(ds.tokens[i], _direct_codes(tok, root, image_id, "llamagen"), err_msg=image_id)
    ds.set_epoch(3)
    x, y = ds[5]
    assert x.dtype == torch.int64 and x.shape == (64,) and int(y) == 1
    np.testing.assert_array_equal(x.numpy(), ds.tokens[5, ar.view_of(0, 3, 5, 20)])


def test_release_views_extraction(tiny_setup):
    base, root, ckpt, tok = tiny_setup
    s = _extract(ckpt, root, base / "release", "views=release", "batch_size=2", "shard_images=5")
    assert (s["images"], s["rows"], s["num_views"], s["shards"]) == (8, 16, 2, 2)
    ds = ar.TokenShardDataset(base / "release")
    for i in (0, 7):
        np.testing.assert_array_equal(ds.tokens[i], _direct_codes(tok, root, ds.image_ids[i], "release"))
    with pytest.raises(FileExistsError, match="other parameters"):  # same folder, other view set: refused
        _extract(ckpt, root, base / "release", "views=llamagen", "shard_images=5")
    os.makedirs(base / "foreign")
    (base / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        _extract(ckpt, root, base / "foreign", "views=release")
    assert os.listdir(base / "foreign") == ["notes.txt"]  # not even a lock file left in someone else's folder


def test_undecodable_file_is_skipped_and_listed(tiny_setup, tmp_path):
    _, root, ckpt, _ = tiny_setup
    data = tmp_path / "data"
    shutil.copytree(root, data)
    (data / "train" / "n90000001" / "n90000001_00bad.JPEG").write_bytes(b"")  # zero bytes, listed first of its class
    s = _extract(ckpt, data, tmp_path / "out", "views=release", "batch_size=2", "shard_images=4")
    assert (s["images"], s["rows"]) == (8, 16) and s["verify"]["ok"]
    assert [x["image_id"] for x in s["skipped"]] == ["train/n90000001/n90000001_00bad.JPEG"]
    assert tk.read_manifest(tmp_path / "out")["num_skipped"] == 1


def test_extraction_refuses_a_wrong_or_missing_setting_first(tiny_setup, tmp_path):
    """An in-process caller's config is validated before anything is read or made: the ConfigError sentence."""
    import dataclasses

    from ideal_ray.config import ConfigError, ExtractConfig, RunConfig, SourceConfig
    from ideal_ray.pipelines.extract_local import extract_tokens_local

    _, root, ckpt, _ = tiny_setup
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="out is empty; pass out=PATH"):
        extract_tokens_local(ExtractConfig(tokenizer=ckpt, data=SourceConfig(root=root)))
    good = ExtractConfig(tokenizer=ckpt, data=SourceConfig(root=root), out=str(out))
    for bad, said in ((dict(tokenizer=""), "tokenizer is empty; pass tokenizer=PATH"),
                      (dict(views="five"), "views 'five' is unknown"),
                      (dict(shard_images=0), "shard_images=0 must be at least 1"),
                      (dict(run=RunConfig(device="tpu")), "run.device=tpu is not a device"),
                      (dict(data=SourceConfig(root=root, format="zip")), "data.format 'zip' is unknown")):
        with pytest.raises(ConfigError, match=said):
            extract_tokens_local(dataclasses.replace(good, **bad))
    assert not os.path.exists(out)  # refused before the output folder was made


def test_resume_redoes_only_the_lost_shard(tiny_setup, extracted, tmp_path):
    _, root, ckpt, _ = tiny_setup
    out = str(tmp_path / "copy")
    shutil.copytree(extracted[0], out)
    original = {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out) if f.endswith(".parquet")}
    # crash 1: shard 1 lost; crash 2: shard 2 renamed into place but the manifest never heard of it; a .tmp left
    os.remove(os.path.join(out, tk.shard_name(1)))
    m = tk.read_manifest(out)
    m["shards"] = [s for s in m["shards"] if s["file"] != tk.shard_name(2)]
    m["complete"] = False
    tk.write_manifest(out, m)
    with open(os.path.join(out, tk.shard_name(1) + tk.TMP_SUFFIX), "wb") as f:
        f.write(b"half a shard")
    kept = os.stat(os.path.join(out, tk.shard_name(0))).st_mtime_ns
    with pytest.raises(ValueError, match="incomplete"):
        ar.TokenShardDataset(out)

    llamagen = ("views=llamagen", "batch_size=20", "shard_images=3", "row_group_images=2")  # as `extracted`
    s = _extract(ckpt, root, out, *llamagen)
    assert (s["shards_written"], s["shards_kept"], s["rows"]) == (2, 1, 160) and s["verify"]["ok"]
    assert os.stat(os.path.join(out, tk.shard_name(0))).st_mtime_ns == kept  # finished shard untouched
    assert not [f for f in os.listdir(out) if f.endswith(tk.TMP_SUFFIX)]
    for f, data in original.items():  # redone shards are byte-identical: exactly one copy of every row
        assert open(os.path.join(out, f), "rb").read() == data, f
    again = _extract(ckpt, root, out, *llamagen)
    assert (again["shards_written"], again["shards_kept"]) == (0, 3)


# ------------------------------------------------------------------------------------- AR readers
GB, WORLD, STEPS, SEED = 4, 2, 6, 11  # 8 images -> 2 steps per epoch; 6 steps = 3 epochs


def test_schedule_one_view_per_image_per_epoch(extracted):
    ds = ar.TokenShardDataset(extracted[0], seed=SEED)
    seen_views = []
    for epoch in range(3):
        idx_all, views_all = [], []
        for t in (2 * epoch, 2 * epoch + 1):
            for r in range(WORLD):
                e, idx, views = ar.ar_step_plan(t, r, WORLD, GB, 8, 20, SEED)
                assert e == epoch
                idx_all += list(idx)
                views_all += list(views)
                b = ds.step_batch(t, r, WORLD, GB)
                np.testing.assert_array_equal(b["tokens"], ds.tokens[idx, views].astype(np.int64))
        assert sorted(idx_all) == list(range(8))  # every image exactly once per epoch
        assert all(v == ar.view_of(SEED, epoch, i, 20) for i, v in zip(idx_all, views_all))
        seen_views.append(dict(zip(idx_all, views_all)))
    assert seen_views[0] != seen_views[1]  # views are redrawn each epoch
    assert all(0 <= v < 20 for d in seen_views for v in d.values())
    draws = [ar.view_of(SEED, 1, i, 20) for i in range(50)]
    assert draws == list(ar.views_of(SEED, np.ones(50, int), np.arange(50), 20))  # deterministic, vectorised alike
    assert draws != [ar.view_of(SEED + 1, 1, i, 20) for i in range(50)]  # the seed matters


@pytest.fixture(scope="module")
def ray_local(ray_head):
    with ray_connected(ray_head) as ray:
        yield ray


def _rows(ds) -> dict[str, np.ndarray]:
    cols = {c: [] for c in ar.AR_COLUMNS}
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        assert set(b) == set(ar.AR_COLUMNS)
        for c in ar.AR_COLUMNS:
            cols[c].append(b[c])
    return {c: np.concatenate(v) for c, v in cols.items()}


@pytest.fixture(scope="module")
def ray_full(ray_local, extracted):
    """Both ranks' rows for steps [0, STEPS); rank 0 from a 2-actor pool (order must really be preserved)."""
    out = extracted[0]
    r0 = _rows(ar.ar_rank_dataset(out, GB, WORLD, 0, 0, STEPS, SEED, num_actors=2))
    r1 = _rows(ar.ar_rank_datasets(out, GB, WORLD, 0, STEPS, SEED)[1])
    return r0, r1


def test_ray_reader_exact_order(ray_full, extracted):
    ds = ar.TokenShardDataset(extracted[0], seed=SEED)
    lb = GB // WORLD
    for r, rows in enumerate(ray_full):
        assert rows["tokens"].shape == (STEPS * lb, 64) and rows["tokens"].dtype == np.int64
        for t in range(STEPS):
            exp = ds.step_batch(t, r, WORLD, GB)
            for c in ar.AR_COLUMNS:
                np.testing.assert_array_equal(rows[c][t * lb:(t + 1) * lb], exp[c], err_msg=f"{c} rank {r} step {t}")


def test_ray_reader_resume_tail_and_determinism(ray_full, extracted, ray_local):
    out = extracted[0]
    k = 3  # resumes mid-epoch 1
    tail = _rows(ar.ar_rank_dataset(out, GB, WORLD, 0, k, STEPS - k, SEED, steps_per_block=2))
    for c in ar.AR_COLUMNS:
        np.testing.assert_array_equal(tail[c], ray_full[0][c][k * (GB // WORLD):], err_msg=c)
    ds = ar.ar_rank_dataset(out, GB, WORLD, 1, 0, 2, SEED)
    batches = list(ds.iter_torch_batches(batch_size=GB // WORLD, dtypes=ar.AR_TORCH_DTYPES))
    assert len(batches) == 2 and batches[0]["tokens"].shape == (2, 64) and batches[0]["tokens"].dtype == torch.int64
    np.testing.assert_array_equal(torch.cat([b["tokens"] for b in batches]).numpy(), ray_full[1]["tokens"][:4])


def test_readers_refuse_incomplete_or_bad_requests(extracted, tmp_path):
    out = str(tmp_path / "inc")
    shutil.copytree(extracted[0], out)
    m = tk.read_manifest(out)
    m["complete"] = False
    tk.write_manifest(out, m)
    with pytest.raises(ValueError, match="incomplete"):
        ar.ar_rank_dataset(out, GB, WORLD, 0, 0, 1, SEED)
    with pytest.raises(ValueError, match="does not divide"):
        ar.ar_rank_dataset(extracted[0], 5, WORLD, 0, 0, 1, SEED)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ar.ar_rank_dataset(extracted[0], 16, WORLD, 0, 0, 1, SEED)
    with pytest.raises(FileNotFoundError, match="not a token shard folder"):
        ar.TokenShardDataset(tmp_path)
    reader = ar.TokenShardReader(extracted[0], max_open_files=1)  # every shard switch reopens a file
    toks, labels = reader.read([7, 0, 3], [19, 0, 10])
    assert len(reader._open) == 1
    full = ar.TokenShardDataset(extracted[0])
    np.testing.assert_array_equal(toks, full.tokens[[7, 0, 3], [19, 0, 10]])
    np.testing.assert_array_equal(labels, full.labels[[7, 0, 3]])
    with pytest.raises(IndexError):
        reader.read([8], [0])
