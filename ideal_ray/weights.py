"""Find pretrained weights on local disk only, and fail fast with a message that says how to get them.

Every pretrained network in ideal-ray (the SigLIP2 / DINO encoder, the LPIPS trunk, the DINO discriminator)
gets its file through this module. Nothing here touches the network: a missing file raises
:class:`MissingWeightsError` in milliseconds, before any large model is built, instead of the ~50 s of hub
retries (and a generic RuntimeError) that open_clip / timm / torchvision give on an offline machine.

Where we look, in order:
1. an explicit local path from the config (an error if it is set but does not exist);
2. the Hugging Face hub cache (``$HF_HUB_CACHE`` or ``$HF_HOME/hub``), read with
   ``huggingface_hub.try_to_load_from_cache`` -- a pure file-system lookup;
3. for torchvision weights, ``$TORCH_HOME/hub/checkpoints`` (where ``torch.hub`` caches downloads).

Environment variables are read at call time (not at import), and nothing global is set.
"""
from __future__ import annotations

import os
import warnings
from typing import Dict, List, Sequence, Union

import torch

from ideal_ray.errors import InputError

__all__ = [
    "MissingWeightsError",
    "hf_hub_cache_dir",
    "torch_hub_checkpoints_dir",
    "resolve_local_file",
    "resolve_hf_file",
    "resolve_torch_hub_file",
    "load_state_dict_file",
    "lpips_model",
    "LPIPS_TRUNK_FILES",
]

# torchvision ImageNet weights used by the lpips package's trunks (torch hub file names).
LPIPS_TRUNK_FILES: Dict[str, str] = {
    "vgg": "vgg16-397923af.pth",
    "alex": "alexnet-owt-7be5be79.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}
_TORCHVISION_URL = "https://download.pytorch.org/models/"


class MissingWeightsError(InputError, FileNotFoundError):
    """Pretrained weights are not on this machine. The message names the file(s) looked for, the config key
    to set, and the command that fetches the file on a machine with internet."""

    def __init__(self, what: str, looked_for: Sequence[str], config_key: str, filename: str, how_to_get: str,
                 set_hint: str = ""):
        self.looked_for = list(looked_for)
        self.config_key = config_key
        self.filename = filename
        set_hint = set_hint or f"Set {config_key}=/path/to/{filename}"
        message = (
            f"No local weights for {what}: looked for {', '.join(self.looked_for)}. "
            f"{set_hint}, or on a machine with internet run `{how_to_get}` "
            f"and copy the result here (nothing is downloaded on this machine)."
        )
        super().__init__(message)

    def __str__(self) -> str:  # OSError's default str would prefix an errno; keep the plain sentence
        return self.args[0]

    def __reduce__(self):  # picklable across Ray workers despite the custom __init__
        return (_rebuild_missing_weights_error, (self.args[0], self.looked_for, self.config_key, self.filename))


def _rebuild_missing_weights_error(message: str, looked_for, config_key, filename) -> MissingWeightsError:
    err = MissingWeightsError.__new__(MissingWeightsError)
    FileNotFoundError.__init__(err, message)
    err.looked_for, err.config_key, err.filename = list(looked_for), config_key, filename
    return err


# --------------------------------------------------------------------------------------------- caches
def hf_hub_cache_dir() -> str:
    """The HF hub cache folder, from the environment at call time (huggingface_hub reads it at import)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return os.path.expanduser(os.environ[var])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "huggingface", "hub")


def torch_hub_checkpoints_dir() -> str:
    """``$TORCH_HOME/hub/checkpoints`` (torch.hub reads TORCH_HOME at call time)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def resolve_local_file(local_path: str, *, config_key: str, what: str, how_to_get: str) -> str:
    """``local_path`` if it is a file, else :class:`MissingWeightsError` (a set-but-wrong path is an error,
    never a silent fallback to a cache)."""
    path = os.path.expanduser(local_path)
    if not os.path.isfile(path):
        raise MissingWeightsError(what, [path], config_key, os.path.basename(path) or "weights-file", how_to_get)
    return path


# ------------------------------------------------------------------------------------------ resolvers
def resolve_hf_file(
    repo_id: str,
    filename: Union[str, Sequence[str]],
    local_path: str = "",
    *,
    config_key: str = "model.vfm.weights_path",
    what: str = "",
    set_hint: str = "",
) -> str:
    """Return ``local_path`` if set (it must exist), else the first of ``filename`` (one name or alternatives,
    best first) found in the HF hub cache for ``repo_id``; else raise :class:`MissingWeightsError`.

    Never makes a network call: ``try_to_load_from_cache`` only reads the cache's refs/snapshots folders.
    """
    from huggingface_hub import try_to_load_from_cache

    names: List[str] = [filename] if isinstance(filename, str) else list(filename)
    what = what or f"{repo_id}"
    how = f"huggingface-cli download {repo_id} {names[0]}"
    if local_path:
        return resolve_local_file(local_path, config_key=config_key, what=what, how_to_get=how)
    cache = hf_hub_cache_dir()
    for name in names:
        found = try_to_load_from_cache(repo_id, name, cache_dir=cache)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    looked = [f"{' or '.join(names)} of HF repo {repo_id} in the HF cache {cache}"]
    raise MissingWeightsError(what, looked, config_key, names[0], how, set_hint)


def resolve_torch_hub_file(
    filename: str,
    local_path: str = "",
    *,
    config_key: str = "loss.lpips_weights_path",
    what: str = "",
    url: str = "",
) -> str:
    """Return ``local_path`` if set (it must exist), else ``$TORCH_HOME/hub/checkpoints/<filename>``;
    else raise :class:`MissingWeightsError`. ``url`` (default: torchvision's model store) is only quoted
    in the message."""
    url = url or _TORCHVISION_URL + filename
    folder = torch_hub_checkpoints_dir()
    how = f"wget {url} -P $TORCH_HOME/hub/checkpoints/"
    what = what or filename
    if local_path:
        return resolve_local_file(local_path, config_key=config_key, what=what, how_to_get=how)
    path = os.path.join(folder, filename)
    if os.path.isfile(path):
        return path
    raise MissingWeightsError(what, [path], config_key, filename, how)


def load_state_dict_file(path: str) -> Dict[str, torch.Tensor]:
    """Read a .safetensors or torch-pickled state dict on CPU (``weights_only=True``); unwraps the common
    ``{"state_dict": ...}`` / ``{"model": ...}`` containers."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return sd


# ----------------------------------------------------------------------------------------------- LPIPS
def lpips_model(net: str, pretrained: bool, weights_path: str = ""):
    """The lpips package's LPIPS (eval, frozen), never downloading.

    LPIPS's linear heads ship inside the lpips wheel; only its torchvision trunk would be downloaded. So we
    always build with a random trunk (``pnet_rand=True``) and, when ``pretrained``, load the torchvision
    ImageNet weights from ``weights_path`` or ``$TORCH_HOME/hub/checkpoints`` ourselves -- resolved before
    anything is built, so a missing file costs milliseconds. ``pretrained=False`` (tiny/CPU tests) keeps the
    random trunk with the shipped heads.
    """
    if net not in LPIPS_TRUNK_FILES:
        raise ValueError(f"LPIPS net '{net}' is unknown; choose one of {sorted(LPIPS_TRUNK_FILES)}.")
    path = ""
    if pretrained:
        path = resolve_torch_hub_file(LPIPS_TRUNK_FILES[net], weights_path, config_key="loss.lpips_weights_path",
                                      what=f"the LPIPS '{net}' trunk (torchvision ImageNet weights)")
    import lpips

    with warnings.catch_warnings():  # lpips 0.1.4 calls torchvision's deprecated `pretrained=` argument
        warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*", category=UserWarning,
                                module="torchvision")
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    if path:
        _load_lpips_trunk(model.net, load_state_dict_file(path), path, net)
    model.eval().requires_grad_(False)
    return model


def _load_lpips_trunk(trunk: torch.nn.Module, tv_state: Dict[str, torch.Tensor], path: str, net: str) -> None:
    """lpips' pn.vgg16/alexnet/squeezenet put torchvision's ``features[i]`` into ``slice<k>`` under its
    original index ``i`` (e.g. ``slice2.5.weight`` is ``features.5.weight``), so dropping the slice name
    and prefixing ``features.`` maps every trunk key; torchvision's ``classifier.*`` keys are unused."""
    mapped = {}
    for key in trunk.state_dict():
        _, rest = key.split(".", 1)  # "slice2.5.weight" -> "5.weight"
        src = f"features.{rest}"
        if src not in tv_state:
            raise ValueError(f"{path} is not torchvision's {LPIPS_TRUNK_FILES[net]} weights: it has no '{src}'.")
        mapped[key] = tv_state[src]
    trunk.load_state_dict(mapped, strict=True)
