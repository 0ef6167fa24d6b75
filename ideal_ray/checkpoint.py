"""Every checkpoint file a job takes, in one place: our tokenizer and GPT exports, the authors' release files
(GitHub Row11n/IDEAL: exported weights or training checkpoints) and LlamaGen's GPT files, told apart by layout.

Two steps, so a bad file costs one sentence and no time:

- :func:`inspect_checkpoint` reads only the file's pickle (not the tensor data, and without importing torch) through
  an allow-list unpickler: which model the file holds, in which layout, with which sizes. A missing, empty,
  truncated, corrupt, hostile or wrong-kind file raises :class:`CheckpointError`, one sentence naming the file and
  what to do. Jobs call it (:func:`check_models`) before Ray starts or torch is imported.
- :func:`load_tokenizer` / :func:`load_gpt` build the model and load the weights, in any layout, with
  ``torch.load(..., weights_only=True)`` (plus an allow-list entry for the ``argparse.Namespace`` the release's and
  LlamaGen's training checkpoints carry). :func:`convert_checkpoint` writes our export from any of them.

Our files are written atomically (temp file, then rename); an existing file is never replaced unless the caller says
``overwrite=True``.
"""
from __future__ import annotations

import argparse
import codecs
import collections
import dataclasses
import io
import math
import os
import pickle
import re
import zipfile
import zlib
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ideal_ray.config import (GPT_SIZES, GPTConfig, TokenizerConfig, TokenizerTrainConfig, from_dict, load_config,
                              validate_tokenizer)
from ideal_ray.errors import InputError
from ideal_ray.io import atomic_path

if TYPE_CHECKING:  # annotations only: torch and the models are imported where they are used
    import torch

    from ideal_ray.models.gpt import GPT as GPTModel

FORMAT = "ideal-ray/tokenizer/v1"  # our tokenizer export (save_inference_checkpoint)
GPT_FORMAT = "ideal-ray/gpt/v1"  # our GPT export (write_gpt_export)
TOKENIZER, GPT = "tokenizer", "gpt"
OURS, RELEASE, LLAMAGEN = "ideal-ray", "release", "llamagen"
_NOUNS = {TOKENIZER: "tokenizer", GPT: "GPT"}
_LAYOUT_NAMES = {OURS: "ideal-ray export", RELEASE: "authors' release (Row11n/IDEAL)", LLAMAGEN: "LlamaGen"}
_HELP = {TOKENIZER: "a tokenizer export (tokenizer_step<N>.pt of jobs/train_tokenizer.py) or the authors' release "
                    "tokenizer file",
         GPT: "a GPT export (gpt_step<N>.pt of jobs/train_ar.py), a LlamaGen c2i GPT file or the authors' release GPT "
              "checkpoint"}


class CheckpointError(InputError, ValueError):
    """A checkpoint file that cannot be used; the message is one sentence naming the file and what to do."""


# ------------------------------------------------------------------------------------- our files: writing
def atomic_torch_save(obj, path: str, overwrite: bool = False) -> str:
    import torch

    path = os.path.abspath(path)
    exists = f"{path} exists; refusing to overwrite it (pass overwrite=True or choose a new path)."
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(exists)
    with atomic_path(path, overwrite, exists) as tmp:
        torch.save(obj, tmp)
    return path


def unique_dir(base: str) -> str:
    """``base`` if it does not exist yet, else ``base-2``, ``base-3``, ...: a rerun never overwrites a run."""
    if not os.path.exists(base):
        return base
    i = 2
    while os.path.exists(f"{base}-{i}"):
        i += 1
    return f"{base}-{i}"


def save_inference_checkpoint(path: str, tokenizer, cfg: TokenizerTrainConfig, step: int = 0,
                              include_vfm: bool = True, overwrite: bool = False) -> str:
    """Write ``{"format", "config", "model", "step"}``; ``model`` is the tokenizer's state dict (the EMA copy).

    ``include_vfm=False`` leaves out the frozen VFM trunk (316M parameters at paper scale), which the loader then
    takes from the VFM's own weights file.
    """
    state = tokenizer.state_dict() if include_vfm else tokenizer.trainable_state_dict()
    payload = {
        "format": FORMAT,
        "config": dataclasses.asdict(cfg.model),
        "train_config": dataclasses.asdict(cfg),
        "model": {k: v.detach().cpu() for k, v in state.items()},
        "step": int(step),
        "includes_vfm": bool(include_vfm),
    }
    return atomic_torch_save(payload, path, overwrite=overwrite)


def write_gpt_export(out_path: str, model_cfg: GPTConfig, state: dict, step: int) -> str:
    """The single-file GPT format :func:`load_gpt` reads: ``model_cfg`` (a GPTConfig), the weights, the step.
    Written atomically; an existing file is never replaced."""
    return atomic_torch_save({"format": GPT_FORMAT, "config": dataclasses.asdict(model_cfg), "model": state,
                              "step": int(step)}, out_path)


# ------------------------------------------------------------------------- inspecting a file without torch
@dataclasses.dataclass(frozen=True)
class _TensorInfo:
    """What the pickle says about one tensor: its shape (the data is not read)."""
    shape: Tuple[int, ...]


class _Storage:
    def __init__(self, key: str):
        self.key = key


class _Marker:
    """Stands in for an allowed torch class (Parameter, Tensor) that only appears as an argument."""


def _rebuild_tensor(storage, offset, size, *rest):
    return _TensorInfo(tuple(int(s) for s in size))


def _rebuild_from_type(func, new_type, args, state):
    return func(*args)


_ALLOWED_GLOBALS = {  # what a weights file's pickle may name (torch's weights_only allow-list, plus Namespace)
    "collections.OrderedDict": collections.OrderedDict,
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_parameter": lambda data, *rest: data,
    "torch._utils._rebuild_parameter_with_state": lambda data, *rest: data,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type,
    "torch.nn.parameter.Parameter": _Marker, "torch.Tensor": _Marker,
    "torch.Size": tuple, "torch.device": str,
    "builtins.set": set, "builtins.frozenset": frozenset, "builtins.complex": complex,
    "_codecs.encode": codecs.encode,
    "argparse.Namespace": argparse.Namespace,  # the args of the release's and LlamaGen's training checkpoints
}
_TORCH_DTYPES = {"float32", "float", "float64", "double", "float16", "half", "bfloat16", "int64", "long", "int32",
                 "int", "int16", "short", "int8", "uint8", "bool", "complex64", "complex128"}


class _Refused(Exception):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class _PeekUnpickler(pickle.Unpickler):
    """Unpickles a torch file's ``data.pkl`` into plain containers with :class:`_TensorInfo` for each tensor;
    any global outside the allow-list raises :class:`_Refused` (nothing is imported, nothing runs)."""

    def __init__(self, raw: bytes):
        super().__init__(io.BytesIO(raw))
        self.storage_keys: List[str] = []

    def find_class(self, module: str, name: str):
        full = f"{module}.{name}"
        if full in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[full]
        if module == "torch" and (name.endswith("Storage") or name in _TORCH_DTYPES):
            return full
        raise _Refused(full)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        self.storage_keys.append(str(pid[2]))
        return _Storage(str(pid[2]))


def _corrupt(path: str, size: int, why: str) -> CheckpointError:
    return CheckpointError(f"{path} is truncated or corrupt ({size:,} bytes; {why}): copy or download it again.")


def read_pickle(path: str, what: str = "checkpoint") -> Any:
    """The object a ``torch.save`` file holds, tensors replaced by their shapes; reads no tensor data and imports no
    torch. Raises :class:`CheckpointError` for a missing, empty, truncated, corrupt or hostile file."""
    if not os.path.exists(path):
        raise CheckpointError(f"No {what} file at {path}; check the path.")
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder, not a {what} file; pass the .pt file itself.")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes; an interrupted copy or download?): copy it again.")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04":
        if head[:1] == b"\x80":
            raise CheckpointError(f"{path} is a plain pickle or a torch file in the legacy (before 1.6) format, which "
                                  f"is not read here; load it in a trusted Python session and torch.save it again.")
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (torch.save writes a zip archive; this file starts "
                              f"with {head!r}); pass a {what} file.")
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            pkl = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
            if len(pkl) != 1:
                raise CheckpointError(f"{path} is a zip archive but not one torch.save wrote (no data.pkl); pass a "
                                      f"{what} file.")
            raw = zf.read(pkl[0])
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise _corrupt(path, size, "the zip archive torch.save writes is cut off" if "not a zip file" in str(e)
                       else str(e)) from None
    unpickler = _PeekUnpickler(raw)
    try:
        obj = unpickler.load()
    except _Refused as e:
        raise CheckpointError(f"{path} was not loaded: its pickle asks to import {e.name}, which a weights file never "
                              f"needs and which could run code; use files from sources you trust (re-save the "
                              f"weights with torch.save(state_dict) if you made it).") from None
    except Exception as e:  # a pickle stream that does not parse: damaged bytes inside an intact archive
        raise _corrupt(path, size, f"its pickle does not parse: {type(e).__name__}") from None
    prefix = pkl[0][: -len("data.pkl")]
    missing = [k for k in unpickler.storage_keys if f"{prefix}data/{k}" not in names]
    if missing:
        raise _corrupt(path, size, f"{len(missing)} tensor records are missing")
    return obj


# --------------------------------------------------------------------------------- telling layouts apart
@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What :func:`inspect_checkpoint` found: the model a file holds and its sizes, read without torch."""

    path: str
    kind: str  # TOKENIZER | GPT
    layout: str  # OURS | RELEASE | LLAMAGEN
    weights: str  # where the weights sit in the file: "model", "ema", "state dict", ...
    tokens: int  # codes per image (grid * grid); 0 = the file does not say (a LlamaGen file without its args)
    codebook: int  # tokenizer: codebook size; GPT: vocabulary
    num_classes: int = 0  # GPT only
    step: Optional[int] = None
    has_trunk: bool = True  # tokenizer: the frozen VFM trunk's weights are in the file
    config: Optional[Dict[str, Any]] = None  # ours: the model config; LlamaGen: the GPTConfig fields it implies

    @property
    def grid(self) -> int:
        """Tokens per side (0 = unknown)."""
        return math.isqrt(self.tokens)

    def weights_of(self, ckpt: Any) -> Mapping:
        """The state dict inside the loaded file, where the inspection found it (``weights``)."""
        return ckpt if self.weights == "state dict" else ckpt[self.weights]

    def describe(self) -> str:
        return f"{_NOUNS[self.kind]} ({_LAYOUT_NAMES[self.layout]}, {self.weights} weights)"


def _strip(key: str) -> str:
    """A key without the DDP / torch.compile wrappers' prefixes."""
    while key.startswith(("module.", "_orig_mod.")):
        key = key.split(".", 1)[1]
    return key


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(k, str) for k in obj) and \
        any(isinstance(v, _TensorInfo) for v in obj.values())


def _state_keys(prefer_ema: bool) -> Tuple[str, ...]:
    """Where a release / LlamaGen file keeps weights, in the order they are taken: EMA first when asked."""
    return ("ema", "model", "module", "state_dict") if prefer_ema else ("model", "module", "state_dict", "ema")


def _pick_state(obj: Any, prefer_ema: bool) -> Tuple[Optional[Mapping], str]:
    """The weights inside a release / LlamaGen file: EMA first when asked and present, else the trained weights,
    else the file itself when it is a bare state dict."""
    if not isinstance(obj, Mapping):
        return None, ""
    for key in _state_keys(prefer_ema):
        if _is_state_dict(obj.get(key)):
            return obj[key], key
    return (obj, "state dict") if _is_state_dict(obj) else (None, "")


def _args_of(obj: Any) -> Dict[str, Any]:
    args = obj.get("args") if isinstance(obj, Mapping) else None
    return dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args) if isinstance(args, Mapping) else {}


def _step_of(obj: Any) -> Optional[int]:
    for key in ("step", "steps"):
        v = obj.get(key) if isinstance(obj, Mapping) else None
        if isinstance(v, int):
            return v
    return None


def inspect_checkpoint(path: str, kind: Optional[str] = None, prefer_ema: bool = True) -> CheckpointInfo:
    """Which model ``path`` holds (``kind``: TOKENIZER or GPT to require one) in which layout, with its sizes.

    Reads only the pickle, never the tensor data, and imports no torch: jobs call it before anything heavy. Every
    problem is a :class:`CheckpointError` with one sentence: missing, empty, truncated, hostile, neither model, or
    the other model than ``kind`` asks for."""
    obj = read_pickle(path, _NOUNS.get(kind, "checkpoint"))
    info = _classify(path, obj, prefer_ema)
    if kind is not None and info.kind != kind:
        raise CheckpointError(f"{path} holds a {info.describe()}, not a {_NOUNS[kind]}; pass {_HELP[kind]}.")
    return info


def _classify(path: str, obj: Any, prefer_ema: bool) -> CheckpointInfo:
    if isinstance(obj, Mapping) and obj.get("format") in (FORMAT, GPT_FORMAT):
        cfg = obj.get("config")
        if not isinstance(cfg, Mapping) or not _is_state_dict(obj.get("model")):
            raise CheckpointError(f"{path} names the format {obj['format']} but lacks its config or weights; export "
                                  f"it again.")
        if obj["format"] == FORMAT:
            vfm, quant = cfg.get("vfm", {}), cfg.get("quantizer", {})
            grid = int(vfm.get("image_size", 0)) // max(1, int(vfm.get("patch_size", 1)))
            return CheckpointInfo(path, TOKENIZER, OURS, "EMA", grid * grid, int(quant.get("codebook_size", 0)),
                                  step=_step_of(obj), has_trunk=bool(obj.get("includes_vfm", True)), config=dict(cfg))
        return CheckpointInfo(path, GPT, OURS, "EMA", int(cfg.get("grid", 0)) ** 2, int(cfg.get("vocab_size", 0)),
                              int(cfg.get("num_classes", 0)), _step_of(obj), config=dict(cfg))
    state, where = _pick_state(obj, prefer_ema)
    if state is None:
        keys = f" with keys {', '.join(map(str, list(obj)[:6]))}" if isinstance(obj, Mapping) else ""
        raise CheckpointError(f"{path} holds no weights this project knows (a {type(obj).__name__}{keys}); pass "
                              f"{_HELP[TOKENIZER]}, or {_HELP[GPT]}.")
    keys = {_strip(k): v for k, v in state.items()}
    if "tok_embeddings.weight" in keys:
        return _llamagen_info(path, obj, keys, where)
    bare = {k[len("model."):] if k.startswith("model.") else k: v for k, v in keys.items()}
    if any(k.startswith(("encode_transformer.", "slot_quantize.", "decode_transformer.")) for k in bare):
        codebook = bare.get("slot_quantize.embedding.weight")
        slots = bare.get("decode_transformer.slot_position_embedding")
        return CheckpointInfo(path, TOKENIZER, RELEASE, where, slots.shape[1] if slots is not None else 0,
                              codebook.shape[0] if codebook is not None else 0, step=_step_of(obj),
                              has_trunk=any(k.startswith("encode_transformer.backbone.model.") for k in bare))
    if any(k.startswith(("quantizer.", "pixel_decoder.")) for k in keys) or "class_embed.weight" in keys:
        raise CheckpointError(f"{path} is a bare state dict of this project's model without its config; pass the "
                              f"export the training job wrote (tokenizer_step<N>.pt / gpt_step<N>.pt).")
    raise CheckpointError(f"{path} holds weights of an unknown model (first keys: {', '.join(list(keys)[:4])}); pass "
                          f"{_HELP[TOKENIZER]}, or {_HELP[GPT]}.")


# LlamaGen's GPT sizes (autoregressive/models/gpt.py GPT_models): (n_layer, dim) -> n_head, and by name
_LLAMAGEN_HEADS = {(12, 768): 12, (24, 1024): 16, (36, 1280): 20, (48, 1536): 24, (48, 2560): 40, (22, 2048): 32,
                   (24, 3200): 32, (32, 4096): 32}
_LLAMAGEN_SIZES = {"GPT-B": (12, 768), "GPT-L": (24, 1024), "GPT-XL": (36, 1280), "GPT-XXL": (48, 1536),
                   "GPT-XXXL": (48, 2560), "GPT-1B": (22, 2048), "GPT-3B": (24, 3200), "GPT-7B": (32, 4096)}


def _llamagen_info(path: str, obj: Any, keys: Mapping[str, Any], where: str) -> CheckpointInfo:
    """A LlamaGen-layout GPT (LlamaGen's own files and the authors' release GPT, which is LlamaGen's model): the
    GPTConfig it implies, from the training args when the file carries them, else from the tensor shapes."""
    args = _args_of(obj)
    vocab, dim = keys["tok_embeddings.weight"].shape
    n_layer = len({k.split(".")[1] for k in keys if k.startswith("layers.")})
    n_head = _LLAMAGEN_HEADS.get((n_layer, dim)) or \
        {(s["n_layer"], s["dim"]): s["n_head"] for s in GPT_SIZES.values()}.get((n_layer, dim))
    if not n_head:
        raise CheckpointError(f"{path} is a LlamaGen-layout GPT of an unknown size ({n_layer} layers, width {dim}), "
                              f"so its head count is unknown; only LlamaGen's GPT-B..7B sizes are recognised.")
    named = args.get("gpt_model")
    if named in _LLAMAGEN_SIZES and _LLAMAGEN_SIZES[named] != (n_layer, dim):
        raise _corrupt(path, os.path.getsize(path), f"its args say {named} but its weights have {n_layer} layers of "
                                                    f"width {dim}")
    class_rows = keys["cls_embedding.embedding_table.weight"].shape[0] \
        if "cls_embedding.embedding_table.weight" in keys else 0
    dropout = float(args.get("class_dropout_prob", 0.1))
    num_classes = int(args.get("num_classes", class_rows - (1 if dropout > 0 else 0)))
    grid = int(args.get("latent_size") or 0) or (int(args["image_size"]) // int(args["downsample_size"])
                                                 if args.get("image_size") and args.get("downsample_size") else 0)
    hidden = keys["layers.0.feed_forward.w1.weight"].shape[0] if "layers.0.feed_forward.w1.weight" in keys else 0
    base = int(2 * 4 * dim / 3)  # LlamaGen's SwiGLU width before rounding up to a multiple of multiple_of
    multiple_of = next((m for m in (256, 128, 64, 32, hidden) if m and -(-base // m) * m == hidden), 0)
    if not multiple_of:
        raise CheckpointError(f"{path} is a LlamaGen-layout GPT whose feed-forward width {hidden} is not LlamaGen's "
                              f"rounding of {base}; it was trained with another ffn rule and is not read here.")
    size = next((s for s, v in GPT_SIZES.items() if (v["n_layer"], v["dim"]) == (n_layer, dim)), named or "custom")
    p = float(args.get("dropout_p", 0.1))
    cfg = dataclasses.asdict(GPTConfig(
        size=str(size).replace("GPT-", ""), dim=int(dim), n_layer=n_layer, n_head=int(n_head), multiple_of=multiple_of,
        vocab_size=int(vocab),
        num_classes=num_classes, grid=grid, cls_token_num=int(args.get("cls_token_num", 1)), class_dropout=dropout,
        token_dropout=float(args.get("token_dropout_p", 0.1)), resid_dropout=p, ffn_dropout=p,
        drop_path=float(args.get("drop_path_rate", 0.0))))
    return CheckpointInfo(path, GPT, LLAMAGEN, where, grid * grid, int(vocab), num_classes, _step_of(obj), config=cfg)


def check_models(gpt: Optional[str] = None, tokenizer: Optional[str] = None,
                 classes: Optional[Sequence[int]] = None) -> Dict[str, CheckpointInfo]:
    """The checks a job runs on its checkpoint arguments before anything heavy: each file holds the model its flag
    names, a GPT and a tokenizer fit each other (grid, vocabulary) and ``classes`` are the GPT's. Returns the
    :class:`CheckpointInfo` of each given file by kind; raises :class:`CheckpointError` (one sentence)."""
    found: Dict[str, CheckpointInfo] = {}
    if tokenizer:
        found[TOKENIZER] = inspect_checkpoint(tokenizer, TOKENIZER)
    if gpt:
        g = found[GPT] = inspect_checkpoint(gpt, GPT)
        bad = [c for c in classes or [] if not 0 <= int(c) < g.num_classes]
        if bad:
            raise CheckpointError(f"class ids {bad[:5]} are outside the GPT's {g.num_classes} classes (0.."
                                  f"{g.num_classes - 1}) in {gpt}; pass --classes within that range.")
    if tokenizer and gpt:
        t, g = found[TOKENIZER], found[GPT]
        if (g.tokens and g.tokens != t.tokens) or g.codebook > t.codebook:
            raise CheckpointError(f"GPT {gpt} ({g.tokens or 'unknown'} tokens per image, vocabulary {g.codebook}) "
                                  f"does not fit tokenizer {tokenizer} ({t.tokens} tokens, codebook {t.codebook}); "
                                  f"pair a GPT trained on this tokenizer's codes.")
    return found


# ------------------------------------------------------------------------------------------ loading
def torch_load(path: str, what: str = "checkpoint"):
    """``torch.load(path, weights_only=True)`` with the release's ``argparse.Namespace`` allowed; a file the safe
    loader refuses or cannot read is a :class:`CheckpointError` (run :func:`read_pickle` first for the sentence of
    each case; this catches what slips past it, e.g. a tensor record damaged inside an intact archive)."""
    import torch

    if not os.path.isfile(path):
        raise CheckpointError(f"No {what} file at {path}; check the path.")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} was refused by the safe loader (weights_only=True): "
                              f"{str(e).splitlines()[0][:200]}; use files from sources you trust.") from None
    except (RuntimeError, EOFError) as e:
        if isinstance(e, EOFError) or "PytorchStreamReader" in str(e) or "zip archive" in str(e):
            raise _corrupt(path, os.path.getsize(path), str(e).splitlines()[0][:160]) from None
        raise


def load_tokenizer(path: str, device: str = "cpu", prefer_ema: bool = True):
    """An :class:`IdealTokenizer` in eval mode from our export or any authors' release file (see module doc)."""
    info = inspect_checkpoint(path, TOKENIZER, prefer_ema)
    ckpt = torch_load(path, "tokenizer")
    if info.layout == OURS:
        model = _load_ours_tokenizer(path, ckpt)
    else:
        state = info.weights_of(ckpt)
        ours = convert_release_state_dict(state)
        model = _build_for_release(path, ours, info.has_trunk)
        _load_release_state(model, ours, path, strict=True, with_trunk=info.has_trunk)
    return model.to(device).eval()


def _load_ours_tokenizer(path: str, ckpt: dict):
    from ideal_ray.models.tokenizer import IdealTokenizer

    cfg = from_dict(TokenizerConfig, ckpt["config"])
    validate_tokenizer(cfg)
    with_trunk = ckpt.get("includes_vfm", True)
    model = IdealTokenizer(cfg, load_weights=not with_trunk)
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    missing = [k for k in missing if not (k.startswith("vfm.trunk.") and not with_trunk)]
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match the tokenizer it describes (missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}); export it again.")
    return model


def load_gpt(path: str, device: str = "cpu", grid: Optional[int] = None, prefer_ema: bool = True):
    """A :class:`GPT` in eval mode from our export or a LlamaGen-layout file (LlamaGen's own or the authors'
    release). ``grid``: the token grid, needed for LlamaGen files that do not carry their training args (the jobs
    pass the tokenizer's); checked against the file's when both are known."""
    from ideal_ray.models.gpt import GPT as GPTModel

    info = inspect_checkpoint(path, GPT, prefer_ema)
    cfg = from_dict(GPTConfig, info.config)
    if grid and cfg.grid and grid != cfg.grid:
        raise CheckpointError(f"{path} is a GPT over a {cfg.grid}x{cfg.grid} token grid, not {grid}x{grid}; pair it "
                              f"with the tokenizer it was trained on.")
    if not cfg.grid:
        if not grid:
            raise CheckpointError(f"{path} does not say its token grid (a LlamaGen file without its training args); "
                                  f"pass the tokenizer it was trained on, or --grid to jobs/convert.py.")
        cfg = dataclasses.replace(cfg, grid=int(grid))
    ckpt = torch_load(path, "GPT")
    if info.layout == OURS:
        state = ckpt["model"]
    else:
        state = convert_llamagen_state_dict(info.weights_of(ckpt))
    model = load_fitting(GPTModel(cfg), state, f"{path} does not fit the GPT it implies ({cfg.n_layer} layers, "
                                             f"width {cfg.dim})", "export or convert it again")
    return model.to(device).eval()


# ------------------------------------------------------------------------------- the authors' release layout
# The release saves {"model": state_dict} (export_model.py; "ema" too in training checkpoints, with "args" etc.) of a
# wrapper whose keys start with "model." (plus aliases "decoder." and "quantize." of the same tensors, and DDP/compile
# prefixes); a state dict of the inner model has the same names without "model.". Each rule maps a release key
# (after the "model." prefix is removed) to ours.
_RELEASE_RULES: List[Tuple[str, str]] = [
    (r"^encode_transformer\.backbone\.model\.", "vfm.trunk."),
    (r"^encode_transformer\.backbone\.spatial_norm\.", "vfm.shallow_norm."),
    (r"^encode_transformer\.attn_fuse\.", "fusion."),
    (r"^pre_slots_quant\.", "pre_quant."),
    (r"^post_slots_quant\.", "post_quant."),
    (r"^slot_quantize\.embedding\.", "quantizer.embedding."),
    (r"^decode_transformer\.slot_position_embedding$", "feature_decoder.pos_embed"),
    (r"^decode_transformer\.cls_pos_embedding$", "feature_decoder.cls_pos_embed"),
    (r"^decode_transformer\.cls_token$", "feature_decoder.cls_token"),
    (r"^decode_transformer\.register_tokens$", "feature_decoder.register_tokens"),
    (r"^decode_transformer\.norm_post\.", "feature_decoder.norm_in."),
    (r"^decode_transformer\.project_semantic\.", "feature_decoder.deep_head."),
    (r"^decode_transformer\.project_shallow\.", "feature_decoder.shallow_head."),
    (r"^decode_transformer\.transformer\.layers\.(\d+)\.ffn\.net\.", r"feature_decoder.blocks.\1.mlp."),
    (r"^decode_transformer\.transformer\.layers\.(\d+)\.", r"feature_decoder.blocks.\1."),
    (r"^decoder\.", "pixel_decoder."),  # the CNN decoder's names are the same as ours
]
_RELEASE_SKIP = re.compile(r"codebook_used")


def release_key_to_ours(key: str) -> Optional[str]:
    """Map one key of the release wrapper's state dict to ours; None for keys we do not keep (usage buffers,
    aliases)."""
    key = _strip(key)
    if _RELEASE_SKIP.search(key):
        return None
    if not key.startswith("model."):
        return None  # the wrapper's aliases "decoder." / "quantize." repeat tensors found under "model."
    key = key[len("model."):]
    for pattern, repl in _RELEASE_RULES:
        if re.search(pattern, key):
            return re.sub(pattern, repl, key)
    raise CheckpointError(f"Unrecognised key in the release checkpoint: model.{key}; this file is not the authors' "
                          f"tokenizer layout.")


def convert_release_state_dict(state: Mapping[str, Any]) -> Dict[str, Any]:
    """The release's tokenizer weights under our names; takes the wrapper's state dict (keys ``model.*``) or the
    inner model's (the same names without ``model.``)."""
    wrapped = any(_strip(k).startswith("model.") for k in state)
    out = {}
    for k, v in state.items():
        ours = release_key_to_ours(k if wrapped else "model." + _strip(k))
        if ours is not None:
            out[ours] = v
    return out


def _build_for_release(path: str, ours: Mapping[str, Any], with_trunk: bool):
    """The tokenizer the release weights describe: the first base preset (paper, then the tiny test scale) whose
    tensor names and shapes equal the file's, built on the meta device to compare; the SigLIP2 trunk comes from the
    file when it carries one, else from the VFM's own weights file."""
    import torch

    from ideal_ray.models.tokenizer import IdealTokenizer

    want = {k: tuple(v.shape) for k, v in ours.items() if with_trunk or not k.startswith("vfm.trunk.")}
    for preset in ("paper", "tiny"):
        cfg = load_config(preset).model
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in IdealTokenizer(cfg, load_weights=False).state_dict().items()
                      if with_trunk or not k.startswith("vfm.trunk.")}
        if shapes == want:
            return IdealTokenizer(cfg, load_weights=not with_trunk)
    raise CheckpointError(f"{path} is in the authors' release layout but fits neither the paper nor the tiny "
                          f"tokenizer (different tensor names or shapes); build the model yourself and use "
                          f"load_release_checkpoint(model, path).")


def _load_release_state(model, ours: Mapping[str, Any], path: str, strict: bool, with_trunk: bool = True) -> None:
    missing, unexpected = model.load_state_dict(ours, strict=False)
    if not with_trunk:
        missing = [k for k in missing if not k.startswith("vfm.trunk.")]
    if strict and (missing or unexpected):
        raise CheckpointError(f"The release checkpoint {path} does not fit this model: missing {missing[:5]} "
                              f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)}); build it with the "
                              f"preset the file was trained with (shallow_norm, fusion mode and sizes must match).")


def load_release_checkpoint(model, path: str, prefer_ema: bool = True, strict: bool = True):
    """Load the authors' released tokenizer weights (exported file, training checkpoint or bare state dict) into an
    :class:`IdealTokenizer` you built; EMA weights are preferred when present. :func:`load_tokenizer` builds the
    model itself."""
    info = inspect_checkpoint(path, TOKENIZER, prefer_ema)
    state = info.weights_of(torch_load(path, "release tokenizer"))
    _load_release_state(model, convert_release_state_dict(state), path, strict)
    return model


# --------------------------------------------------------------------------------------- the LlamaGen layout
# LlamaGen ``Transformer`` key (after unwrapping) -> ours. Their wqkv rows are [q; k; v] like our qkv, and their
# w1 / w3 / w2 are our gate / up / down, so every tensor maps one to one without reshaping.
_LLAMAGEN_NAMES = [  # (LlamaGen's name, ours); "{i}" is the layer index
    ("cls_embedding.embedding_table.weight", "class_embed.weight"),
    ("tok_embeddings.weight", "tok_embed.weight"),
    ("layers.{i}.attention.wqkv.weight", "blocks.{i}.attn.qkv.weight"),
    ("layers.{i}.attention.wo.weight", "blocks.{i}.attn.proj.weight"),
    ("layers.{i}.feed_forward.w1.weight", "blocks.{i}.ffn.w_gate.weight"),
    ("layers.{i}.feed_forward.w3.weight", "blocks.{i}.ffn.w_up.weight"),
    ("layers.{i}.feed_forward.w2.weight", "blocks.{i}.ffn.w_down.weight"),
    ("layers.{i}.attention_norm.weight", "blocks.{i}.attn_norm.weight"),
    ("layers.{i}.ffn_norm.weight", "blocks.{i}.ffn_norm.weight"),
    ("norm.weight", "norm.weight"),
    ("output.weight", "head.weight"),
]


def _rules(src: int, dst: int):
    """(regex, replacement) pairs mapping column ``src`` of _LLAMAGEN_NAMES to column ``dst``."""
    return [("^" + re.escape(pair[src]).replace(r"\{i\}", r"(\d+)") + "$", pair[dst].replace("{i}", r"\1"))
            for pair in _LLAMAGEN_NAMES]


_LLAMAGEN_RULES = _rules(0, 1)
_TO_LLAMAGEN_RULES = _rules(1, 0)
# derived buffers some checkpoints carry: RoPE tables, KV caches, causal masks
_LLAMAGEN_SKIP = re.compile(r"(^|\.)(freqs_cis|causal_mask|k_cache|v_cache)$")
_CONTAINER_KEYS = ("model", "module", "state_dict")


def _unwrap_llamagen(state: Mapping[str, Any], prefer_ema: bool) -> Mapping[str, Any]:
    """Find the weights inside a training checkpoint ({"model"|"module"|"state_dict"|"ema": ...}) or a bare dict."""
    if not isinstance(state, Mapping):
        raise TypeError(f"Expected a state dict or checkpoint dict, got {type(state).__name__}.")
    order = (("ema",) + _CONTAINER_KEYS) if prefer_ema else (_CONTAINER_KEYS + ("ema",))
    for key in order:
        if isinstance(state.get(key), Mapping):
            return state[key]
    return state


def convert_llamagen_state_dict(state: Mapping[str, Any], prefer_ema: bool = False) -> Dict[str, torch.Tensor]:
    """LlamaGen-format GPT weights -> our key names.

    Accepts a bare state dict or a checkpoint holding one under "model" (DDP), "module" (DeepSpeed),
    "state_dict" or "ema" (``prefer_ema`` picks EMA weights when both are present); strips ``module.`` and
    ``_orig_mod.`` prefixes (DDP / torch.compile) and drops derived buffers (``freqs_cis``, KV caches).
    """
    state = _unwrap_llamagen(state, prefer_ema)
    out: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        k = key
        while True:
            for prefix in ("module.", "_orig_mod."):
                if k.startswith(prefix):
                    k = k[len(prefix):]
                    break
            else:
                break
        if _LLAMAGEN_SKIP.search(k):
            continue
        for pattern, repl in _LLAMAGEN_RULES:
            if re.match(pattern, k):
                out[re.sub(pattern, repl, k)] = value
                break
        else:
            raise KeyError(f"Unrecognised key '{key}' in the LlamaGen GPT state dict; only class-conditional "
                           f"(c2i) GPT checkpoints with one class token can be loaded.")
    return out


def load_llamagen_state_dict(model: "GPTModel", state: Union[str, Mapping[str, Any]],
                             prefer_ema: bool = False) -> "GPTModel":
    """Load LlamaGen-format GPT weights (a dict, or a path to a torch file) into ``model``; every tensor must fit.

    The model must be built with the checkpoint's sizes (dim, layers, heads, vocab, classes): a mismatch raises
    a CheckpointError (a ValueError) naming the first tensor that does not fit (:func:`load_fitting`).
    """
    if isinstance(state, str):
        state = torch_load(state, "LlamaGen GPT")
    return load_fitting(model, convert_llamagen_state_dict(state, prefer_ema=prefer_ema),
                        "The LlamaGen checkpoint does not fit this GPT",
                        "build the GPT with the checkpoint's n_layer, dim, vocab_size and num_classes")


def load_fitting(model: "GPTModel", state: Mapping[str, Any], what: str, fix: str) -> "GPTModel":
    """``state`` (our GPT's tensor names) into ``model`` when every tensor is there with its shape, else a
    :class:`CheckpointError`: ``what`` (the file and what it implies), the first tensor that does not fit, ``fix``
    (what to do). The one fit check of every GPT loader."""
    expected = model.state_dict()
    wrong = [k for k in expected if k not in state or tuple(state[k].shape) != tuple(expected[k].shape)]
    extra = sorted(k for k in state if k not in expected)
    if wrong or extra:
        k = (wrong or extra)[0]
        got = tuple(state[k].shape) if k in state else "missing"
        want = tuple(expected[k].shape) if k in expected else "no such tensor"
        hint = ""
        if k == "class_embed.weight" and k in state and state[k].shape[0] == model.cfg.num_classes:
            hint = " (the checkpoint has no CFG null-class row: it was trained without class dropout)"
        raise CheckpointError(f"{what}: {k} is {got}, expected {want}{hint}; {fix}.")
    model.load_state_dict(state, strict=True)
    return model


def to_llamagen_state_dict(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Our GPT state dict -> LlamaGen ``Transformer`` key names (tensors shared, not copied); e.g. to run their
    ``generate`` on our weights in a benchmark."""
    out = {}
    for k, v in state.items():
        for pattern, repl in _TO_LLAMAGEN_RULES:
            if re.match(pattern, k):
                out[re.sub(pattern, repl, k)] = v
                break
        else:
            raise KeyError(f"No LlamaGen name for GPT tensor '{k}'.")
    return out


# ------------------------------------------------------------------------------------------ conversion
def convert_checkpoint(src: str, out: str, grid: Optional[int] = None, prefer_ema: bool = True) -> Dict[str, Any]:
    """Write our export (tokenizer or GPT, by the source's layout) from a release or LlamaGen file, atomically;
    ``out`` must not exist. Returns what was written."""
    info = inspect_checkpoint(src, prefer_ema=prefer_ema)
    if os.path.exists(out):
        raise CheckpointError(f"{out} exists; refusing to overwrite it, choose a new path.")
    if info.kind == TOKENIZER:
        model = load_tokenizer(src, prefer_ema=prefer_ema)
        cfg = TokenizerTrainConfig(model=model.cfg)
        save_inference_checkpoint(out, model, cfg, step=info.step or 0, include_vfm=True)
    else:
        model = load_gpt(src, grid=grid, prefer_ema=prefer_ema)
        write_gpt_export(out, model.cfg, {k: v.detach().cpu() for k, v in model.state_dict().items()}, info.step or 0)
    return {"source": src, "out": os.path.abspath(out), "kind": info.kind, "layout": info.layout,
            "weights": info.weights, "step": info.step or 0}
