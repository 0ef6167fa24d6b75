"""Shared test fixtures."""
import contextlib
import logging
import os
import re
import socket

import pytest
import torch

# Ray Train's controller polls its workers every 2 s by default; each tiny run waits one poll to start the worker
# group and one to notice it finished. The local clusters the tests start inherit this (the workers are children
# of the test process); it changes no result, only how soon the controller looks.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# ... and starts a preemption-watcher actor (one more Python process per run) that a local CPU cluster never needs.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Empty HF / torch caches and a machine where any connection attempt fails loudly."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)

    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    return tmp_path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core box OpenMP spin-waits can make every
    op 20-100x slower while another process holds a core. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``; the setting is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def local_group():
    """A one-rank gloo process group for engines outside Ray Train (in-process stages, as ``jobs/bench.py`` and
    in-process runs build them); destroyed after the module, with the environment it set restored."""
    from ideal_ray.train.sessions import local_process_group

    with local_process_group(torch.device("cpu")):
        yield


@pytest.fixture(scope="session")
def ray_head():
    """The address of one local Ray head for the whole session (8 logical CPUs: train workers + decode actors + Ray
    Data's tasks fit on a 2-core machine without deadlock). Modules join it (:func:`ray_connected`, ``ray_cluster``)
    instead of each starting and stopping a local instance of their own (~5 s idle, ~10 s on a loaded machine, a
    dozen modules). Its temp dir is private: a head writes its address to ``<temp>/ray/ray_current_cluster``, which
    a plain ``ray.init()`` (a job the tests start, an in-process stage) would otherwise find and join. Its processes
    are this process's children, so ``own_processes`` finds its workers."""
    import shutil
    import tempfile

    from ray.cluster_utils import Cluster

    temp = tempfile.mkdtemp(prefix="ray-s-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    with ray_tmpdir(temp):
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 8, "include_dashboard": False})
    try:
        yield cluster.address
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        with ray_tmpdir(temp):
            cluster.shutdown()  # also deletes the head's address file under its temp dir
        shutil.rmtree(temp, ignore_errors=True)


@contextlib.contextmanager
def ray_tmpdir(temp: str):
    """``$RAY_TMPDIR`` set to ``temp`` inside the block (where a Ray cluster started then keeps its sessions and its
    address file), restored afterwards."""
    saved = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = temp
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved


@contextlib.contextmanager
def ray_connected(head: str, **env_vars):
    """This process joined to the session's head (``ray_head``) with a job whose workers see ``env_vars`` and every
    AWS variable now set (``s3_store``'s endpoint and credentials, when a module uses it), Ray Data's progress bars
    and start-of-execution prints off; disconnected afterwards (the head keeps running). Yields the ``ray`` module."""
    import ray

    if ray.is_initialized():  # a connection a test left open
        ray.shutdown()
    env = {**{k: os.environ[k] for k in AWS_VARS if k in os.environ}, **env_vars}
    ray.init(address=head, log_to_driver=False, runtime_env={"env_vars": env} if env else None)
    ctx = ray.data.DataContext.get_current()
    saved = ctx.enable_progress_bars, ctx.print_on_execution_start
    ctx.enable_progress_bars = ctx.print_on_execution_start = False
    try:
        yield ray
    finally:
        ray.shutdown()
        ctx.enable_progress_bars, ctx.print_on_execution_start = saved


@pytest.fixture(scope="module")
def ray_cluster(ray_head):
    """The session's Ray head joined for a module of Ray Train tests, DeepSpeed told to use the CPU (and the object
    store's environment, when the module set up ``s3_store`` first)."""
    with ray_connected(ray_head, DS_ACCELERATOR="cpu") as ray:
        yield ray


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """A small synthetic ImageNet-layout set (4 classes x 8 train / 2 val images at 72 px) for training tests."""
    from ideal_ray.data.synthetic import make_synthetic_imagenet

    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic_imagenet(str(root), num_classes=4, train_per_class=8, val_per_class=2, size=72, seed=0)
    return str(root)


@pytest.fixture(autouse=True)
def _tracking_uri_restored():
    """Nothing a test runs may leave $MLFLOW_TRACKING_URI changed for the next one (mlflow.set_tracking_uri sets it
    process-wide; a leaked value silently sends later runs into another test's store)."""
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if saved is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = saved


@pytest.fixture(scope="module")
def fid_inception():
    """The FID Inception weights file (`make` installs it); modules that need the real network skip without it."""
    from ideal_ray.eval.inception import resolve_inception_weights
    from ideal_ray.weights import MissingWeightsError

    try:
        return resolve_inception_weights()
    except MissingWeightsError:
        pytest.skip("no FID Inception weights: run `make venv` (python -m ideal_ray.eval.inception install)")


def ctrl_c_reaches_it() -> None:
    """``preexec_fn`` of a job a test interrupts with SIGINT: the signal's default action in the child, as in a
    terminal. A suite started in the background by a non-interactive shell (``make test &``, ``nohup``) has SIGINT
    ignored, which a child inherits and Python then keeps (Ctrl-C would never reach the job)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def tiny_tokenizer_set(base, seed: int, classes: int = 2, per_class: int = 4):
    """A tiny synthetic set under ``base/data`` (``classes`` x ``per_class`` train images, 1 val each, 80 px) and a
    random-init tiny tokenizer (torch seed 0) saved as our export ``base/tok.pt``: (data root, export path,
    tokenizer)."""
    from ideal_ray.checkpoint import save_inference_checkpoint
    from ideal_ray.config import load_config
    from ideal_ray.data.synthetic import make_synthetic_imagenet
    from ideal_ray.models.tokenizer import IdealTokenizer

    make_synthetic_imagenet(base / "data", num_classes=classes, train_per_class=per_class, val_per_class=1, size=80,
                            seed=seed)
    cfg = load_config("tiny")
    torch.manual_seed(0)
    tok = IdealTokenizer(cfg.model).eval()
    return str(base / "data"), save_inference_checkpoint(str(base / "tok.pt"), tok, cfg), tok


class Background:
    """``fn()`` on a thread, for a fault test: :meth:`wait_for` an event of the run (a checkpoint, a shard on disk)
    while it runs, fault it, then :meth:`result` (its return value, or its exception re-raised with the traceback)."""

    def __init__(self, fn) -> None:
        import threading

        self._out, self._error = None, None

        def target():
            try:
                self._out = fn()
            except BaseException as e:  # surfaced by result()
                self._error = e

        self._thread = threading.Thread(target=target)
        self._thread.start()

    def running(self) -> bool:
        return self._thread.is_alive()

    def wait_for(self, event, hang_s: float = 300.0) -> None:
        """Poll ``event()`` until it is true or the run ends (``hang_s``: only a guard against a hang)."""
        import time

        deadline = time.time() + hang_s
        while self._thread.is_alive() and not event() and time.time() < deadline:
            time.sleep(0.05)

    def result(self, hang_s: float = 400.0):
        self._thread.join(timeout=hang_s)
        assert not self._thread.is_alive(), f"the run did not end within {hang_s:g} s"
        if self._error is not None:
            raise self._error
        return self._out


def own_processes(marker: str) -> list:
    """The processes of this test process's own Ray clusters (its descendants: the raylets it started and their
    workers) whose command line contains ``marker`` (``RayTrainWorker``, ``_EncodeViews``): what a fault test may
    kill, never a process of another test process running beside it."""
    import psutil

    return [p for p in psutil.Process().children(recursive=True)
            if marker in " ".join(_cmdline(p))]


def _cmdline(p) -> list:
    import psutil

    try:
        return p.cmdline()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return []


def random_sampling_models(folder, num_classes: int):
    """(GPT export, tokenizer checkpoint) paths in ``folder``: a tiny random GPT whose weights, head included, are
    drawn N(0, 0.2) (the zero-init head would give uniform logits, so classes and CFG would change nothing) and a
    random tiny tokenizer, both from seed 0, for the sampling and CFG-sweep tests."""
    from ideal_ray.checkpoint import save_inference_checkpoint, write_gpt_export
    from ideal_ray.config import gpt_config, load_config
    from ideal_ray.models.gpt import GPT
    from ideal_ray.models.tokenizer import IdealTokenizer

    torch.manual_seed(0)
    cfg = gpt_config("tiny", num_classes=num_classes)
    gpt = GPT(cfg)
    for p in gpt.parameters():
        torch.nn.init.normal_(p, std=0.2)
    gpt_path = write_gpt_export(os.path.join(folder, "gpt_step0.pt"), cfg, gpt.state_dict(), 0)
    tcfg = load_config("tiny")
    tok = IdealTokenizer(tcfg.model, load_weights=False)
    return gpt_path, save_inference_checkpoint(os.path.join(folder, "tokenizer.pt"), tok, tcfg)


def report_rows(text: str) -> dict:
    """The rows of the pipeline report's table (``pipeline.pipeline_report``) in console text, as {stage: [seconds,
    result, artifacts]}; the header row is left out."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| "):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    rows.pop("stage", None)
    return rows


# ---- the authors' release layout -----------------------------------------------------------------------------
# Our name -> the release's name (the release's VQModel under the "model." prefix of its IDEALModel wrapper).
_OURS_TO_RELEASE = [
    (r"^vfm\.trunk\.", "encode_transformer.backbone.model."),
    (r"^vfm\.shallow_norm\.", "encode_transformer.backbone.spatial_norm."),
    (r"^fusion\.", "encode_transformer.attn_fuse."),
    (r"^pre_quant\.", "pre_slots_quant."),
    (r"^post_quant\.", "post_slots_quant."),
    (r"^quantizer\.embedding\.", "slot_quantize.embedding."),
    (r"^feature_decoder\.pos_embed$", "decode_transformer.slot_position_embedding"),
    (r"^feature_decoder\.cls_pos_embed$", "decode_transformer.cls_pos_embedding"),
    (r"^feature_decoder\.cls_token$", "decode_transformer.cls_token"),
    (r"^feature_decoder\.register_tokens$", "decode_transformer.register_tokens"),
    (r"^feature_decoder\.norm_in\.", "decode_transformer.norm_post."),
    (r"^feature_decoder\.deep_head\.", "decode_transformer.project_semantic."),
    (r"^feature_decoder\.shallow_head\.", "decode_transformer.project_shallow."),
    (r"^feature_decoder\.blocks\.(\d+)\.mlp\.", r"decode_transformer.transformer.layers.\1.ffn.net."),
    (r"^feature_decoder\.blocks\.(\d+)\.", r"decode_transformer.transformer.layers.\1."),
    (r"^pixel_decoder\.", "decoder."),
]


def release_layout(model, usage_len=64):
    """The state dict the authors' release would save for ``model`` (our tokenizer): its IDEALModel wrapper's
    keys, written here from the release's module names independently of the product's mapping."""
    out = {}
    for k, v in model.state_dict().items():
        for pat, repl in _OURS_TO_RELEASE:
            if re.search(pat, k):
                rk = re.sub(pat, repl, k)
                break
        else:
            raise AssertionError(f"no release name for {k}")
        out["model." + rk] = v.clone()
        if rk.startswith("decoder."):
            out[rk] = v.clone()  # the wrapper's alias of the same module
    out["model.slot_quantize.codebook_used"] = torch.zeros(usage_len)
    out["quantize.embedding.weight"] = model.quantizer.embedding.weight.clone()
    return out


# ------------------------------------------------------------------------------------- an S3 store on loopback
BUCKET = "bucket"
STORAGE = f"s3://{BUCKET}/runs"
AWS_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE",
            "AWS_CONFIG_FILE", "AWS_EC2_METADATA_DISABLED", "AWS_EC2_METADATA_SERVICE_ENDPOINT",
            "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bucket_objects(prefix: str) -> dict:
    """{key relative to ``prefix``: size} of every object under ``prefix`` (``bucket/...``) of the store that
    ``s3_store`` set up."""
    import pyarrow.fs

    fs = pyarrow.fs.FileSystem.from_uri(f"s3://{prefix}")[0]
    infos = fs.get_file_info(pyarrow.fs.FileSelector(prefix, recursive=True, allow_not_found=True))
    return {i.path[len(prefix) + 1:]: i.size for i in infos if i.type == pyarrow.fs.FileType.File}


@pytest.fixture(scope="module")
def s3_store(tmp_path_factory):
    """moto's S3 server on a free loopback port with an empty bucket; dummy credentials and the endpoint in the
    environment (restored afterwards). Yields the endpoint URL."""
    from moto.server import ThreadedMotoServer
    import pyarrow.fs

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request at INFO
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in AWS_VARS}
    for k in AWS_VARS:
        os.environ.pop(k, None)
    home = tmp_path_factory.mktemp("aws")  # no credentials file of this machine's user may count
    os.environ.update(AWS_ENDPOINT_URL_S3=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true",
                      AWS_SHARED_CREDENTIALS_FILE=str(home / "credentials"), AWS_CONFIG_FILE=str(home / "config"))
    pyarrow.fs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True).create_dir(BUCKET)
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
