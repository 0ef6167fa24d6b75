"""Token shards in an S3-compatible object store (moto's server on loopback, ``conftest.s3_store``): the extraction
writes its shards, manifest and ``skipped.tsv`` to ``out=s3://bucket/tokens/...`` exactly as to a folder, resumes
there with every row once (an upload cut off midway or a shard the manifest never heard of is redone), the Ray
extraction does the same, and the AR stage reads its shards from the bucket (``data.shards=s3://...``) on Ray
workers that inherit the store's environment, training to the same parameters as from the local copy.
"""
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

from conftest import BUCKET, tiny_tokenizer_set
from ideal_ray.data import ar_reader as ar
from ideal_ray.data import tokens as tk

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

URI = f"s3://{BUCKET}/tokens"
RUN = ("views=release", "batch_size=8", "shard_images=3", "row_group_images=2")  # 8 images -> 3 + 3 + 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(base folder, data root, tokenizer checkpoint): 2 classes x 4 train images, random-init tiny tokenizer."""
    base = tmp_path_factory.mktemp("s3_tokens")
    root, ckpt, _ = tiny_tokenizer_set(base, seed=7)
    return base, root, ckpt


def _cfg(setup, out, *overrides: str):
    from ideal_ray.config import ExtractConfig, load_stage_config

    _, root, ckpt = setup
    return load_stage_config(ExtractConfig, "tiny", [f"tokenizer={ckpt}", f"data.root={root}", f"out={out}", *RUN,
                                                     *overrides])


def _extract(setup, out, *overrides: str) -> dict:
    from ideal_ray.pipelines.extract_local import extract_tokens_local

    return extract_tokens_local(_cfg(setup, out, *overrides))


def _store():
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(URI)[0]


def objects(prefix: str) -> dict:
    """{name: bytes} of the objects directly under ``bucket/tokens/<prefix>``."""
    import pyarrow.fs

    fs = _store()
    infos = fs.get_file_info(pyarrow.fs.FileSelector(f"{BUCKET}/tokens/{prefix}", allow_not_found=True))
    out = {}
    for i in infos:
        if i.type == pyarrow.fs.FileType.File:
            with fs.open_input_stream(i.path) as f:
                out[i.base_name] = f.read()
    return out


def _same_shards(ds: ar.TokenShardDataset, ref: ar.TokenShardDataset) -> None:
    assert ds.image_ids == ref.image_ids and len(set(ds.image_ids)) == len(ds.image_ids) == 8
    np.testing.assert_array_equal(ds.labels, ref.labels)
    np.testing.assert_array_equal(ds.tokens, ref.tokens)


@pytest.fixture(scope="module")
def local_ref(setup):
    out = str(setup[0] / "local")
    return out, _extract(setup, out)


@pytest.fixture(scope="module")
def on_s3(s3_store, setup):
    uri = f"{URI}/whole"
    return uri, _extract(setup, uri)


# ------------------------------------------------------------------------------------- extraction into the bucket
def test_extraction_into_the_bucket_equals_the_one_into_a_folder(setup, on_s3, local_ref):
    uri, s = on_s3
    local, ref = local_ref
    assert (s["images"], s["rows"], s["shards"], s["shards_written"]) == (8, 16, 3, 3) and s["verify"]["ok"]
    assert s["out_dir"] == uri and s["skipped_file"] == f"{uri}/skipped.tsv"
    stored = objects("whole")
    on_disk = {n: open(os.path.join(local, n), "rb").read() for n in os.listdir(local) if not n.startswith(".")}
    assert sorted(stored) == sorted(on_disk) == sorted([tk.shard_name(k) for k in range(3)]
                                                        + [tk.MANIFEST_FILE, "skipped.tsv"])
    for name in stored:  # shards byte for byte, the manifest (no path in it differs) and skipped.tsv
        assert stored[name] == on_disk[name], name
    assert tk.read_manifest(uri) == tk.read_manifest(local)
    assert tk.verify_shards(uri)["ok"]
    _same_shards(ar.TokenShardDataset(uri), ar.TokenShardDataset(local))
    rerun = _extract(setup, uri)  # a finished bucket folder: nothing redone
    assert (rerun["shards_written"], rerun["shards_kept"], rerun["rows"]) == (0, 3, 16)


CUT_OFF = ("import os, pyarrow.fs as f\n"
           "fs, p = f.FileSystem.from_uri({uri!r})\n"
           "s = fs.open_output_stream(p)\n"
           "s.write(b'x' * (11 << 20)); s.flush()\n"  # two 5 MiB parts sent, the upload never completed
           "os._exit(9)\n")


def test_an_interrupted_extraction_resumes_in_the_bucket_with_every_row_once(s3_store, setup, local_ref):
    """A run stopped after one shard, then crashes: the upload of shard 1 cut off midway (no object), shard 2
    uploaded whole but never recorded (a copy of shard 0 under the next name: duplicated rows if it were kept), a
    half-written local shard in the staging folder. The rerun keeps shard 0, redoes 1 and 2, and ends equal to the
    uninterrupted extraction."""
    from ideal_ray.storage import staging_dir

    uri = f"{URI}/resumed"
    first = _extract(setup, uri, "max_shards=1")
    assert first["stopped_early"] and not first["complete"] and first["shards_written"] == 1
    kept = objects("resumed")[tk.shard_name(0)]
    proc = subprocess.run([sys.executable, "-c", CUT_OFF.format(uri=f"{uri}/{tk.shard_name(1)}")], timeout=60)
    assert proc.returncode == 9 and tk.shard_name(1) not in objects("resumed")
    _store().copy_file(f"{BUCKET}/tokens/resumed/{tk.shard_name(0)}", f"{BUCKET}/tokens/resumed/{tk.shard_name(2)}")
    half = os.path.join(staging_dir(uri), "shard-killed")
    os.makedirs(half, exist_ok=True)
    with open(os.path.join(half, tk.shard_name(1) + tk.TMP_SUFFIX), "wb") as f:
        f.write(b"half a shard")
    with pytest.raises(ValueError, match="incomplete"):
        ar.TokenShardDataset(uri)
    assert not tk.verify_shards(uri, raise_on_error=False)["ok"]  # the stray shard is seen

    s = _extract(setup, uri)
    assert (s["shards_kept"], s["shards_written"]) == (1, 2)
    assert s["verify"]["ok"] and s["verify"]["duplicates"] == 0 and s["verify"]["missing"] == 0
    assert not os.path.exists(half)
    stored = objects("resumed")
    assert stored[tk.shard_name(0)] == kept
    local = local_ref[0]
    for k in range(3):  # every shard byte for byte as the uninterrupted run wrote it: each row exactly once
        assert stored[tk.shard_name(k)] == open(os.path.join(local, tk.shard_name(k)), "rb").read(), k
    _same_shards(ar.TokenShardDataset(uri), ar.TokenShardDataset(local))


def test_a_folder_in_the_bucket_without_a_manifest_is_refused(s3_store, setup):
    _store().open_output_stream(f"{BUCKET}/tokens/foreign/notes.txt").close()
    with pytest.raises(FileExistsError, match="not empty and has no manifest.json"):
        _extract(setup, f"{URI}/foreign")
    assert sorted(objects("foreign")) == ["notes.txt"]


# ------------------------------------------------------------------------------------- Ray, and the AR stage
@pytest.fixture(scope="module")
def s3_ray(s3_store, ray_cluster):
    """The session's Ray head joined after the store's environment is set (the job's workers get it)."""
    return s3_store


def test_the_ray_extraction_writes_the_same_shards_into_the_bucket(s3_ray, setup, local_ref):
    from ideal_ray.pipelines.extract_ray import extract_tokens_ray

    uri = f"{URI}/ray"
    s = extract_tokens_ray(_cfg(setup, uri, "run.decode_actors=1", "decode_batch=4", "tracking_uri="))
    assert (s["images"], s["rows"], s["shards_written"]) == (8, 16, 3) and s["verify"]["ok"]
    assert tk.read_manifest(uri)["shards"] == tk.read_manifest(local_ref[0])["shards"]
    _same_shards(ar.TokenShardDataset(uri), ar.TokenShardDataset(local_ref[0]))


def _ar_cfg(shards: str):
    from ideal_ray.config import load_ar_config

    return load_ar_config("ar-tiny", [f"data.shards={shards}", "model.num_classes=2", "model.vocab_size=256",
                                      "data.global_batch=4", "dist.num_workers=1", "dist.engine=torch"])


def _train(cfg, batches, steps_per_epoch: int) -> tuple[dict, dict]:
    """AR steps of the stage in this process on ``batches`` (one per step); returns (the rows it took, the final
    parameters)."""
    from ideal_ray.train.ar_stage import ARStage
    from ideal_ray.train.ema import EMA
    from ideal_ray.train.loop import take_step
    from ideal_ray.train.sessions import LocalSession

    stage = ARStage(cfg, torch.device("cpu"), 0, 1, steps_per_epoch=steps_per_epoch)
    ema = EMA(stage.ema_module(), cfg.optim.ema_decay)
    session = LocalSession(tempfile.mkdtemp())  # (no step here saves a checkpoint)
    rows = []
    for step, batch in enumerate(batches, 1):
        rows.append(batch)
        assert not take_step(stage, ema, batch, step, session).skipped
    return ({c: torch.cat([r[c] for r in rows]) for c in ar.AR_COLUMNS},
            {n: p.detach().clone() for n, p in stage.model.named_parameters()})


def test_ar_training_reads_its_shards_from_the_bucket(s3_ray, on_s3, local_ref):
    """3 steps of the AR stage on the batches the Ray reader's actors read from the bucket end on the parameters of
    the same steps on the local copy's batches (``TokenShardDataset.step_batch``: the rows the Ray reader yields)."""
    from ideal_ray.data.tokens import check_shards
    from ideal_ray.models.gpt import GPT

    uri, local = on_s3[0], local_ref[0]
    cfg, steps = _ar_cfg(uri), 3
    m = check_shards(cfg)  # the AR config's check reads the manifest from the bucket
    assert m == tk.read_manifest(local)
    gb, spe = cfg.data.global_batch, m["num_images"] // cfg.data.global_batch
    ds = ar.ar_rank_dataset(uri, gb, 1, 0, 0, steps, cfg.optim.seed, manifest=m)
    rows, params = _train(cfg, ds.iter_torch_batches(batch_size=gb, dtypes=ar.AR_TORCH_DTYPES), spe)
    ref = ar.TokenShardDataset(local, seed=cfg.optim.seed)
    want_rows, want = _train(_ar_cfg(local), ({c: torch.from_numpy(v) for c, v in ref.step_batch(t, 0, 1, gb).items()}
                                              for t in range(steps)), spe)
    assert len(rows["step"]) == steps * gb
    for c in ar.AR_COLUMNS:
        assert torch.equal(rows[c], want_rows[c]), c
    torch.manual_seed(cfg.optim.seed)
    init = dict(GPT(cfg.model).named_parameters())
    assert any(not torch.equal(want[n], init[n]) for n in want)  # the steps trained
    for n in want:
        assert torch.equal(params[n], want[n]), n


def test_missing_shards_in_the_bucket_are_one_sentence_naming_the_uri(s3_store, capsys):
    from ideal_ray.config import ConfigError
    from ideal_ray.data.tokens import check_shards

    uri = f"{URI}/never-written"
    with pytest.raises(ConfigError) as e:
        check_shards(_ar_cfg(uri))
    assert str(e.value) == (f"No token shards at data.shards={uri} (no manifest.json); write them first with "
                            f"jobs/extract_tokens.py.")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs"))
    import train_ar

    with pytest.raises(SystemExit) as exit_:
        train_ar.main(["--preset", "ar-tiny", f"data.shards={uri}"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err == f"config error: {e.value}", err


def test_an_unusable_bucket_for_the_shards_is_one_sentence_before_any_work(s3_store, setup, capsys, monkeypatch):
    """A missing bucket (or missing credentials) for ``out`` is refused before the images are listed or the
    tokenizer loaded, with the sentence ``dist.storage_path`` gets; the job exits 2 with that one line."""
    import ideal_ray.pipelines.extract_common as ec

    def listed(*a, **k):
        raise AssertionError("the extraction started although its output store is unusable")

    monkeypatch.setattr(ec, "list_split", listed)
    out = "s3://no-such-bucket/tokens"
    with pytest.raises(ec.storage.StoreAccessError) as e:
        _extract(setup, out)
    assert str(e.value) == (
        f"out {out} is not usable: its bucket does not exist (tried writing and deleting "
        f"{out}/.ideal-ray-storage-check through {s3_store} with credentials from AWS_ACCESS_KEY_ID / "
        f"AWS_SECRET_ACCESS_KEY).")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs"))
    import extract_tokens

    _, root, ckpt = setup
    with pytest.raises(SystemExit) as exit_:
        extract_tokens.main(["--preset", "tiny", "--tokenizer", ckpt, "--data-root", root, "--out", out])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.endswith(str(e.value)) and len(err.splitlines()) == 1, err
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    with pytest.raises(ec.storage.StoreAccessError, match=f"^out {out} needs AWS credentials and none were found"):
        _extract(setup, out)
