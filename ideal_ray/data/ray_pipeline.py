"""Ray Data training pipeline with an exactly deterministic, resumable sample order.

Why it exists: "train to step k, resume, continue to 2k" must reach the same parameters as one uninterrupted
run, so which image (and which crop/flip of it) rank r sees at step t has to be a pure function of
``(seed, t, r)`` -- never of block boundaries, task placement, actor count or when the job was restarted.

The schedule (pure functions below, unit-testable without Ray):

* epoch ``e`` visits the N training images in the order ``np.random.default_rng([seed, e]).permutation(N)``;
  each epoch drops its last partial batch, so ``steps_per_epoch = N // global_batch``;
* global step ``t`` (0-based) is epoch ``e = t // spe`` and uses the epoch positions
  ``[(t % spe) * GB, (t % spe + 1) * GB)``; rank ``r`` of ``W`` takes the contiguous ``local_batch = GB // W``
  positions ``[r * LB, (r + 1) * LB)`` of that step;
* the augmentation of the sample at ``(e, position)`` draws from its own generator seeded by
  ``(seed, e, position)`` only, so its bytes do not depend on the world size either.

Each rank gets its OWN dataset in exact consumption order (no ``streaming_split``), built lazily from
``ray.data.range(num_steps * LB)``: row ``i`` is step ``start_step + i // LB``. A callable class running in an
actor pool maps rows to (epoch, position) -> image -> decode -> augment. The image list travels once through
the object store (numpy arrays: zero-copy on every actor of a node) and is read once per actor process.

Ray Train integration (issue 3): pass ``datasets={dataset_name(r): ds_r}`` with
:func:`train_data_config` -- Train replaces every dataset's execution options with its own and, by default,
takes ``preserve_order`` from the *driver's* DataContext, which would silently drop the order guarantee set
here. A ``FailureConfig`` restart re-iterates a dataset object handed to the trainer from its first row, so
resuming from a checkpoint at step c needs a dataset built with ``start_step=c``: Train V2 accepts a
zero-argument callable per dataset and calls it at every worker-group (re)start (or build it inside
``train_loop_per_worker`` with :func:`rank_dataset`). List the folder once and pass ``images=`` (a
:func:`put_images` ref) rather than re-listing ImageNet for every rank.

Output rows (``COLUMNS``; pass ``TORCH_DTYPES`` to ``iter_torch_batches``): ``image`` uint8 (S, S, 3) -- 4x
smaller than float over the wire, the trainer converts with :func:`to_model_input` on its device -- ``label``,
``step`` and ``position`` (within the epoch). ``provenance=True`` adds ``index`` (the image used, in
``list_training_images`` order) and ``substituted`` (1 where the scheduled file could not be decoded and the
next decodable image of the permutation stood in for it): the way for a trainer to count bad files per step;
then use ``torch_dtypes(provenance=True)``.

Unreadable files (``skips=``): each is reported once, with the reason of ``folder.skip_reason``, to the run's
:class:`~ideal_ray.data.skipped.SkipLedger` (a Ray actor the driver owns; a plain object in process), from which the
driver reports the run's total, ``skipped.tsv`` and the MLflow metric; a decode call that finds more of its files
unreadable than extraction's stop rule allows (a vanished mount) stops the run with one sentence naming the first.

VFM in the pipeline (``dist.vfm_placement=data``): ``vfm=VFMStage(...)`` appends a second actor pool that runs
the frozen VFM trunk (``FrozenVFM.trunk_features``) on each step's decoded images and adds the columns ``shallow``
(block output before any norm; absent in single-layer mode) and ``deep`` (final norm applied), each (N, C). They
are a pure function of the image, so order and resume are untouched. Features travel as fp32, or under bf16
autocast as bf16 bit patterns in uint16 columns (Arrow has no bf16; half of fp32's bytes, fp32's exponent range,
so no overflow on a ViT's outlier channels as float16 could have). :func:`trunk_features_from_batch` turns them back
into fp32 tensors on the trainer's device; ``torch_dtypes(vfm=...)`` names the columns for ``iter_torch_batches``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

import numpy as np
from PIL import Image

from ideal_ray.config import VFMConfig
from ideal_ray.data.folder import _DECODE_ERRORS, ImageFolderDataset, open_rgb, skip_reason
from ideal_ray.data.skipped import (
    MAX_SKIP_FRACTION,
    UnreadableDataError,
    ledger_call,
    skip_fraction_error,
    too_many_skipped,
)
from ideal_ray.data.transforms import check_train_augmentation

if TYPE_CHECKING:  # annotations only: torch is imported where it is used (the Ray decode actors run without it)
    import torch

log = logging.getLogger(__name__)

COLUMNS = ("image", "label", "step", "position")
PROVENANCE_COLUMNS = ("index", "substituted")  # added by provenance=True


@dataclass(frozen=True)
class VFMStage:
    """The frozen VFM trunk as a Ray Data actor-pool stage of every rank's dataset (``dist.vfm_placement=data``)."""

    vfm: VFMConfig
    # torch seed the trainer builds its model under: a random-init trunk (tiny) is the first thing TokenizerSystem
    # builds after torch.manual_seed(optim.seed), so the actor repeats that to hold the same weights
    seed: int
    num_actors: int = 1  # actors per rank's dataset
    use_gpu: bool = False  # one GPU per actor
    bf16: bool = False  # bf16 autocast on the GPU (as the trainer runs the trunk); features leave as bf16 bits

    @property
    def columns(self) -> tuple[str, ...]:
        """The feature columns the stage adds."""
        return ("deep",) if self.vfm.single_layer else ("shallow", "deep")

    @property
    def wire_dtype(self) -> torch.dtype:
        """dtype of the feature columns: uint16 holding bf16 bits, or float32."""
        import torch

        return torch.uint16 if self.bf16 else torch.float32


def torch_dtypes(provenance: bool = False, vfm: Optional[VFMStage] = None) -> dict[str, torch.dtype]:
    """``iter_torch_batches(dtypes=...)`` for the pipeline's columns (Ray 2.60 needs every column named)."""
    import torch

    cols = COLUMNS + (PROVENANCE_COLUMNS if provenance else ())
    out = {c: torch.uint8 if c == "image" else torch.int64 for c in cols}
    for c in vfm.columns if vfm is not None else ():
        out[c] = vfm.wire_dtype
    return out




def __getattr__(name: str):
    """``TORCH_DTYPES`` (= ``torch_dtypes()``) is made on first use: the decode actors import this module without
    torch, which they do not need (seconds of start-up per actor process)."""
    if name == "TORCH_DTYPES":
        return torch_dtypes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Last word of the augmentation seed: SeedSequence pads short entropy with zeros, so [seed, e, 0] would
# otherwise equal the epoch-permutation seed [seed, e]; a non-zero tag keeps the two streams apart.
_AUG_STREAM = 0x6175676D  # "augm"
_PERM_CACHE_EPOCHS = 2  # an actor only ever straddles one epoch boundary at a time


class PermutationCache:
    """The epoch permutations a reader actor needs, computed once and kept for the last two epochs."""

    def __init__(self, seed: int, num_items: int):
        self.seed, self.n = int(seed), int(num_items)
        self._perms: dict[int, np.ndarray] = {}

    def __call__(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            while len(self._perms) >= _PERM_CACHE_EPOCHS:
                self._perms.pop(min(self._perms))
            perm = self._perms[epoch] = epoch_permutation(self.seed, epoch, self.n)
        return perm


# ------------------------------------------------------------------------------------- pure schedule
def schedule_info(num_images: int, global_batch: int) -> int:
    """Steps per epoch with drop_last: ``num_images // global_batch`` (at least one full batch required)."""
    if global_batch < 1:
        raise ValueError(f"global_batch={global_batch} must be at least 1.")
    if num_images < global_batch:
        raise ValueError(
            f"the training set has {num_images} images, fewer than one global batch of {global_batch}; "
            f"add images or lower data.global_batch."
        )
    return num_images // global_batch


def local_batch_size(global_batch: int, world_size: int) -> int:
    """``global_batch // world_size``; rejects a global batch that does not split evenly over the workers."""
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be at least 1.")
    if global_batch < 1 or global_batch % world_size:
        raise ValueError(
            f"global batch {global_batch} does not divide by the {world_size} workers; "
            f"choose a global batch that is a multiple of the worker count."
        )
    return global_batch // world_size


def epoch_permutation(seed: int, epoch: int, num_images: int) -> np.ndarray:
    """The visiting order of epoch ``epoch``: ``default_rng([seed, epoch]).permutation(num_images)``."""
    return np.random.default_rng([seed, epoch]).permutation(num_images)


def position_of(
    step: int, rank: int, world_size: int, global_batch: int, steps_per_epoch: int
) -> tuple[int, np.ndarray]:
    """(epoch, positions (LB,)) that rank ``rank`` consumes at global step ``step`` (positions in the epoch)."""
    lb = local_batch_size(global_batch, world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, {world_size}).")
    if step < 0:
        raise ValueError(f"step={step} must be non-negative.")
    epoch, k = divmod(step, steps_per_epoch)
    first = k * global_batch + rank * lb
    return epoch, np.arange(first, first + lb, dtype=np.int64)


def row_schedule(
    row_ids: np.ndarray, start_step: int, rank: int, local_batch: int, global_batch: int, steps_per_epoch: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised row -> (step, epoch, position) of one rank's dataset whose row 0 is ``start_step``."""
    row_ids = np.asarray(row_ids, dtype=np.int64)
    step = start_step + row_ids // local_batch  # (n,)
    epoch = step // steps_per_epoch  # (n,)
    position = (step % steps_per_epoch) * global_batch + rank * local_batch + row_ids % local_batch  # (n,)
    return step, epoch, position


def sample_indices(
    step: int, rank: int, world_size: int, global_batch: int, num_images: int, seed: int
) -> np.ndarray:
    """Image indices (LB,) scheduled for rank ``rank`` at ``step`` (before any bad-file substitution)."""
    spe = schedule_info(num_images, global_batch)
    epoch, positions = position_of(step, rank, world_size, global_batch, spe)
    return epoch_permutation(seed, epoch, num_images)[positions]


# ------------------------------------------------------------------------------------- augmentation
def check_augmentation(data_cfg) -> None:
    """Reject crop/resize/flip settings the train augmentation cannot honour (the rules of transforms.py)."""
    check_train_augmentation(data_cfg.image_size, data_cfg.resize_min, data_cfg.resize_max, data_cfg.hflip_prob,
                             prefix="data.")


def sample_rng(seed: int, epoch: int, position: int) -> np.random.Generator:
    """The augmentation generator of one sample: a function of (seed, epoch, position) only."""
    return np.random.default_rng([int(seed), int(epoch), int(position), _AUG_STREAM])


def augment(
    img: Image.Image, rng: np.random.Generator, image_size: int, resize_min: int, resize_max: int, hflip_prob: float
) -> np.ndarray:
    """Spec section 6 train augmentation of an RGB PIL image -> uint8 (image_size, image_size, 3).

    Shorter side to a random integer in [resize_min, resize_max] (bicubic; PIL always antialiases, as the
    in-process ``transforms.train_transform`` does), random crop, horizontal flip with ``hflip_prob``. All four
    draws are always taken, in a fixed order, so the stream layout does not depend on the image or on p.
    """
    short = int(rng.integers(resize_min, resize_max + 1))
    w, h = img.size
    if w <= h:
        new_w, new_h = short, max(short, int(round(h * short / w)))
    else:
        new_w, new_h = max(short, int(round(w * short / h))), short
    top = int(rng.integers(0, new_h - image_size + 1))
    left = int(rng.integers(0, new_w - image_size + 1))
    flip = bool(rng.random() < hflip_prob)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.BICUBIC)
    img = img.crop((left, top, left + image_size, top + image_size))
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    out = np.asarray(img, dtype=np.uint8)  # (S, S, 3)
    if out.shape != (image_size, image_size, 3):  # to_rgb guarantees RGB; this guards against PIL surprises
        raise RuntimeError(f"augmentation produced shape {out.shape}, expected ({image_size}, {image_size}, 3).")
    return out


def decode(path: str) -> Image.Image:
    """Open and fully decode ``path`` as RGB (raises one of folder's decode errors on a bad file)."""
    return open_rgb(path)


def load_sample(path: str, data_cfg, seed: int, epoch: int, position: int) -> np.ndarray:
    """Decode + augment one file exactly as the pipeline does for (seed, epoch, position): uint8 (S, S, 3)."""
    return augment(
        decode(path),
        sample_rng(seed, epoch, position),
        data_cfg.image_size,
        data_cfg.resize_min,
        data_cfg.resize_max,
        data_cfg.hflip_prob,
    )


def to_model_input(batch_uint8: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> ``dtype`` (default float32) (B, 3, H, W) in [-1, 1]; call it after moving the uint8
    batch to the device."""
    import torch

    if batch_uint8.dim() != 4 or batch_uint8.shape[-1] != 3 or batch_uint8.dtype != torch.uint8:
        raise ValueError(
            f"to_model_input expects a uint8 (B, H, W, 3) batch, got {batch_uint8.dtype} "
            f"{tuple(batch_uint8.shape)}; pass the pipeline's 'image' column."
        )
    x = batch_uint8.permute(0, 3, 1, 2).to(torch.float32)  # (B, 3, H, W) in [0, 255]
    x = x.div(127.5).sub_(1.0)  # (B, 3, H, W) in [-1, 1], same arithmetic as folder.default_to_tensor
    return x.to(dtype or torch.float32).contiguous()  # (B, 3, H, W)


def trunk_features_from_batch(batch: dict[str, torch.Tensor], vfm: VFMStage,
                              device: torch.device) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """A batch of the VFM stage -> (shallow before its norm (B, N, C) or None, deep (B, N, C)), fp32 on ``device``:
    what ``FrozenVFM.trunk_features`` returns for the batch's images (exactly, on the fp32 wire)."""
    import torch

    def column(name: str) -> torch.Tensor:
        t = batch[name].to(device, non_blocking=True)  # (B, N, C) in the wire dtype
        return (t.view(torch.bfloat16) if vfm.bf16 else t).float()

    return (None if vfm.vfm.single_layer else column("shallow")), column("deep")


# ------------------------------------------------------------------------------------- image list
def list_training_images(
    root: str | os.PathLike, split: str = "train", class_index: str | os.PathLike = ""
) -> tuple[list[str], np.ndarray]:
    """(paths, labels int64 (N,)) of an ImageNet-layout split, in the folder reader's (sorted) order.

    Reuses ``ImageFolderDataset``'s listing, so a missing/empty folder, a split without class folders or a
    class folder missing from the class index raises its clear error here, before any Ray work.
    """
    ds = ImageFolderDataset(root, split=split, class_index=class_index)
    paths = [p for p, _ in ds.samples]
    labels = np.asarray(ds.targets, dtype=np.int64)
    return paths, labels


def _pack_images(paths: Sequence[str], labels: np.ndarray) -> dict[str, Any]:
    """Compact, pickle-5 friendly form of the list: a common folder + fixed-width byte paths + labels.

    Numpy arrays come out of the object store zero-copy, so every actor of a node maps one shared buffer
    (ImageNet: ~40 MB of relative paths) instead of unpickling 1.28M Python strings.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if len(paths) == 0:
        raise ValueError("the image list is empty; the training split needs at least one image.")
    if labels.shape != (len(paths),):
        raise ValueError(f"got {len(paths)} paths but labels of shape {labels.shape}; pass one label per path.")
    paths = [p if os.path.isabs(p) else os.path.abspath(p) for p in map(os.fspath, paths)]
    base = os.path.commonpath(sorted({os.path.dirname(p) for p in paths}))
    cut = len(base) if base.endswith(os.sep) else len(base) + 1  # commonpath ends on a path component
    rel = np.array([os.fsencode(p[cut:]) for p in paths], dtype=np.bytes_)  # (N,) e.g. b"n01440764/x.JPEG"
    return {"base": base, "rel": rel, "labels": labels}


def put_images(paths: Sequence[str], labels: np.ndarray):
    """Put the image list into the object store once; share the ref (e.g. via ``train_loop_config``)."""
    import ray

    return ray.put(_pack_images(paths, labels))


# ------------------------------------------------------------------------------------- map function
class _DecodeAugment:
    """Callable class of the actor pool: receives the packed image list once per actor process.

    A file that cannot be read or decoded is reported once to ``skips`` (a :class:`~ideal_ray.data.skipped.SkipLedger`
    or its Ray actor: the run's one list of them, which the driver writes to ``skipped.tsv`` and MLflow) and the next
    decodable image of the epoch order stands in for it. A call that meets more bad files than the stop rule of
    :mod:`ideal_ray.data.skipped` allows (a vanished mount) records its sentence in ``skips`` and raises it."""

    def __init__(self, images, data_cfg, seed: int, start_step: int, rank: int, local_batch: int,
                 provenance: bool = False, skips=None) -> None:
        if not isinstance(images, dict):  # an ObjectRef of _pack_images(...) in an actor; the dict in-process
            import ray

            images = ray.get(images)
        self.base: str = images["base"]
        self.rel: np.ndarray = images["rel"]  # (N,) bytes, zero-copy view into the object store
        self.labels: np.ndarray = images["labels"]  # (N,) int64
        self.n = len(self.labels)
        self.seed, self.start_step, self.rank = int(seed), int(start_step), int(rank)
        self.lb, self.gb = int(local_batch), int(data_cfg.global_batch)
        self.spe = schedule_info(self.n, self.gb)
        self.aug = (int(data_cfg.image_size), int(data_cfg.resize_min), int(data_cfg.resize_max),
                    float(data_cfg.hflip_prob))
        self.provenance = bool(provenance)
        self._perm = PermutationCache(self.seed, self.n)
        self._bad: dict[int, str] = {}  # index -> reason, the files known unreadable in this process
        self.skips = skips

    def _path(self, index: int) -> str:
        return os.path.join(self.base, os.fsdecode(bytes(self.rel[index])))

    def _decode_from(self, epoch: int, position: int, step: int, met: list[tuple[str, str]],
                     decoded: int) -> tuple[int, Image.Image, bool]:
        """Decode the image at ``position``; if it is bad, the next decodable one along the permutation. ``met``:
        (path, reason) of the bad files this call passed over so far, ``decoded`` its good ones (the stop rule's
        counts: checked at every bad file, so a vanished mount stops after a few, not after trying every file)."""
        perm = self._perm(epoch)
        for k in range(self.n):
            index = int(perm[(position + k) % self.n])
            path = self._path(index)
            reason = self._bad.get(index)
            if reason is None:
                try:
                    return index, decode(path), k > 0
                except _DECODE_ERRORS as e:
                    reason = self._bad[index] = skip_reason(e)
                    if self.skips is not None:
                        ledger_call(self.skips, "add", index, reason)
                    log.warning("skipping unreadable image %s (%s): the next decodable image of the epoch order "
                                "stands in for it (%d bad files met by this actor)", path, reason, len(self._bad))
            met.append((path, reason))
            if too_many_skipped(len(met), len(met) + decoded):
                err = skip_fraction_error(  # the loop's step numbers start at 1, the schedule's at 0
                    len(met), len(met) + decoded, f"image files rank {self.rank} read for training step {step + 1}",
                    *met[0], f"{MAX_SKIP_FRACTION:.0%} of them", "Training stopped; check data.root, then rerun the "
                    "same run name to resume from its latest checkpoint.")
                if self.skips is not None:
                    ledger_call(self.skips, "stop", str(err))
                raise err
        raise UnreadableDataError(f"none of the {self.n} training images under {self.base} could be read or decoded "
                                  f"(first: {met[0][0]}: {met[0][1]}); check data.root.")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        step, epoch, position = row_schedule(batch["id"], self.start_step, self.rank, self.lb, self.gb, self.spe)
        n = len(step)
        images = np.empty((n, self.aug[0], self.aug[0], 3), dtype=np.uint8)  # (n, S, S, 3)
        index = np.empty(n, dtype=np.int64)
        substituted = np.zeros(n, dtype=np.int64)
        met: list[tuple[str, str]] = []  # the bad files this call passed over: (path, reason)
        for j in range(n):
            e, p = int(epoch[j]), int(position[j])
            index[j], img, substituted[j] = self._decode_from(e, p, int(step[j]), met, j)
            images[j] = augment(img, sample_rng(self.seed, e, p), *self.aug)
        out = {"image": images, "label": self.labels[index], "step": step, "position": position}
        if self.provenance:
            out["index"] = index
            out["substituted"] = substituted
        return out


class _VFMFeatures:
    """Callable class of the VFM actor pool: the frozen trunk over one step's images, its outputs added as columns."""

    def __init__(self, stage: VFMStage) -> None:
        import torch

        from ideal_ray.models.vfm import FrozenVFM

        self.stage = stage
        self.device = torch.device("cuda" if stage.use_gpu else "cpu")
        torch.manual_seed(stage.seed)  # the trainer's weights for a random-init trunk (see VFMStage.seed)
        self.vfm = FrozenVFM(stage.vfm).to(self.device).eval()  # built on CPU, fp32 weights, as the trainer's

    def _wire(self, t: torch.Tensor) -> np.ndarray:
        """(B, N, C) features -> the wire format: bf16 bits as uint16, or float32."""
        import torch

        t = t.to(torch.bfloat16).view(torch.uint16) if self.stage.bf16 else t.float()
        return t.cpu().numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        images = to_model_input(torch.tensor(batch["image"]).to(self.device))  # (B, 3, S, S) in [-1, 1]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.stage.bf16 and self.stage.use_gpu):
            shallow_raw, deep = self.vfm.trunk_features(images)  # (B, N, C) each, shallow None in single-layer
        out = dict(batch)
        for name, t in zip(("shallow", "deep"), (shallow_raw, deep)):
            if t is not None:
                out[name] = self._wire(t)
        return out


# ------------------------------------------------------------------------------------- datasets
def dataset_name(rank: int) -> str:
    """Name under which rank ``rank``'s dataset is handed to Ray Train (``get_dataset_shard(name)``)."""
    return f"train_{rank}"


def ingest_execution_options(cpus_per_rank: Optional[float] = None):
    """The driver DataContext's execution options (resource limits etc., as Train would use) with order preserved.

    ``cpus_per_rank`` caps the logical CPUs one rank's dataset may reserve. Without a cap, Ray Data's autoscaler
    lets the first rank dataset to start reserve every free CPU and keep it while idle (it re-sends its last request
    when utilisation is low), and the other ranks' datasets get a zero CPU budget: on a small cluster one rank then
    decodes a step at a time and every rank waits for it (4 instead of 25 img/s in the tiny run)."""
    import copy

    from ray.data import DataContext, ExecutionResources

    opts = copy.deepcopy(DataContext.get_current().execution_options)
    opts.preserve_order = True
    if cpus_per_rank is not None:
        opts.resource_limits = opts.resource_limits.min(ExecutionResources.for_limits(cpu=float(cpus_per_rank)))
    return opts


def train_data_config(cpus_per_rank: Optional[float] = None):
    """``ray.train.DataConfig`` for the rank datasets: nothing split, order preserved on every worker, each rank's
    dataset held to ``cpus_per_rank`` logical CPUs (see :func:`ingest_execution_options`)."""
    from ray.train import DataConfig

    return DataConfig(datasets_to_split=[], execution_options=ingest_execution_options(cpus_per_rank))


def _resolve_images(data_cfg, split: str, images):
    """(ObjectRef of the packed list, number of images); lists the folder when ``images`` is None."""
    import ray

    if images is None:
        images = list_training_images(data_cfg.root, split, data_cfg.class_index)
    if isinstance(images, ray.ObjectRef):
        return images, len(ray.get(images)["labels"])
    paths, labels = images
    packed = _pack_images(paths, labels)
    return ray.put(packed), len(packed["labels"])


def _check_request(
    data_cfg, world_size: int, start_step: int, num_steps: int, steps_per_block: int, num_actors: int | None,
    vfm: Optional[VFMStage] = None,
) -> int:
    """Validate everything that needs no image list (so errors come before any Ray work); returns the LB."""
    actors = num_actors if num_actors is not None else data_cfg.loader_workers
    if actors < 1:
        raise ValueError(f"num_actors={actors} must be at least 1 (defaults to data.loader_workers).")
    if vfm is not None and vfm.num_actors < 1:
        raise ValueError(f"VFMStage.num_actors={vfm.num_actors} must be at least 1 (dist.vfm_actors).")
    local_batch = local_batch_size(data_cfg.global_batch, world_size)  # rejects uneven batches up front
    if start_step < 0:
        raise ValueError(f"start_step={start_step} must be non-negative.")
    if num_steps < 0:
        raise ValueError(f"num_steps={num_steps} must be non-negative (0 gives an empty dataset).")
    if steps_per_block < 1:
        raise ValueError(f"steps_per_block={steps_per_block} must be at least 1.")
    check_augmentation(data_cfg)
    return local_batch


def rank_dataset(
    data_cfg,
    world_size: int,
    rank: int,
    start_step: int,
    num_steps: int,
    seed: int,
    split: str = "train",
    *,
    images=None,
    num_actors: int | None = None,
    cpus_per_actor: float = 1.0,
    steps_per_block: int = 1,
    provenance: bool = False,
    vfm: Optional[VFMStage] = None,
    skips=None,
):
    """Rank ``rank``'s dataset: ``num_steps * LB`` rows for steps ``[start_step, start_step + num_steps)``.

    ``images``: None (list ``data_cfg.root/split``), ``(paths, labels)``, or a ref from :func:`put_images`
    (list once on the driver, share with every worker). ``num_actors`` defaults to ``data_cfg.loader_workers``.
    ``steps_per_block``: steps decoded per actor task. One keeps what the ordered actor pool buffers small (a
    task that finishes early holds only its own step until the earlier ones are consumed). ``provenance``
    adds the ``index`` and ``substituted`` columns. ``vfm`` appends the VFM actor pool (``shallow``/``deep``
    columns, see :class:`VFMStage`). ``num_steps=0`` gives an empty dataset (a finished run). ``skips``: where the
    decode actors report unreadable files and a stop (a :class:`~ideal_ray.data.skipped.SkipLedger` actor from
    ``skipped.remote_ledger()``; None: only their logs).
    """
    local_batch = _check_request(data_cfg, world_size, start_step, num_steps, steps_per_block, num_actors, vfm)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, {world_size}).")
    ref, n = _resolve_images(data_cfg, split, images)
    schedule_info(n, data_cfg.global_batch)  # at least one global batch
    return _build(ref, data_cfg, local_batch, rank, start_step, num_steps, seed, num_actors, cpus_per_actor,
                  steps_per_block, provenance, vfm, skips)


def rank_datasets(
    data_cfg,
    world_size: int,
    start_step: int,
    num_steps: int,
    seed: int,
    split: str = "train",
    *,
    images=None,
    num_actors: int | None = None,
    cpus_per_actor: float = 1.0,
    steps_per_block: int = 1,
    provenance: bool = False,
    vfm: Optional[VFMStage] = None,
    skips=None,
) -> list:
    """One dataset per rank (list index = rank), all sharing one image list in the object store.

    Hand them to Ray Train as ``{dataset_name(r): ds}`` with :func:`train_data_config`. Arguments as in
    :func:`rank_dataset`.
    """
    _check_request(data_cfg, world_size, start_step, num_steps, steps_per_block, num_actors, vfm)
    ref, _ = _resolve_images(data_cfg, split, images)  # listed and put once, shared by every rank
    return [rank_dataset(data_cfg, world_size, r, start_step, num_steps, seed, split, images=ref,
                         num_actors=num_actors, cpus_per_actor=cpus_per_actor, steps_per_block=steps_per_block,
                         provenance=provenance, vfm=vfm, skips=skips)
            for r in range(world_size)]


def local_batches(data_cfg, world_size: int, rank: int, start_step: int, num_steps: int, seed: int,
                  split: str = "train", *, images=None, skips=None) -> Iterator[dict[str, torch.Tensor]]:
    """Rank ``rank``'s batches for steps ``[start_step, start_step + num_steps)`` made in this process, without Ray:
    what ``rank_dataset(...).iter_torch_batches(batch_size=LB, dtypes=TORCH_DTYPES)`` hands a Ray Train worker,
    byte for byte (the same schedule and the same decode + augment code, one step per batch).

    The in-process runs use it (``ray_trainer.train_tokenizer(in_process=True)``). ``images``: None (list
    ``data_cfg.root/split``) or ``(paths, labels)``; ``skips`` a :class:`~ideal_ray.data.skipped.SkipLedger`, as in
    :func:`rank_dataset`. Decoding happens in the calling thread, one step at a time.
    """
    local_batch = _check_request(data_cfg, world_size, start_step, num_steps, 1, 1)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, {world_size}).")
    paths, labels = images if images is not None else list_training_images(data_cfg.root, split,
                                                                            data_cfg.class_index)
    decode_augment = _DecodeAugment(_pack_images(paths, labels), data_cfg, seed, start_step, rank, local_batch,
                                    skips=skips)
    return _local_steps(decode_augment, local_batch, num_steps)  # checked above, decoded as it is read


def _local_steps(decode_augment: "_DecodeAugment", local_batch: int, num_steps: int):
    import torch

    dtypes = torch_dtypes()
    for i in range(num_steps):
        rows = decode_augment({"id": np.arange(i * local_batch, (i + 1) * local_batch, dtype=np.int64)})
        yield {c: torch.as_tensor(rows[c], dtype=dtypes[c]) for c in COLUMNS}


def _build(ref, data_cfg, local_batch, rank, start_step, num_steps, seed, num_actors, cpus_per_actor,
           steps_per_block, provenance, vfm, skips):
    import ray

    actors = int(num_actors if num_actors is not None else data_cfg.loader_workers)
    rows = num_steps * local_batch
    # Few, large read blocks (cheap to plan, whatever num_steps is), then streamed into step-sized blocks so
    # every actor task decodes one step: an ordered actor pool then buffers at most a few steps ahead.
    ds = ray.data.range(rows).repartition(target_num_rows_per_block=steps_per_block * local_batch)
    ds = ds.map_batches(
        _DecodeAugment,
        fn_constructor_args=(ref, data_cfg, seed, start_step, rank, local_batch, provenance, skips),
        batch_size=local_batch,
        batch_format="numpy",
        zero_copy_batch=True,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus_per_actor,
    )
    if vfm is not None:
        # One step per call: the trunk sees exactly the trainer's micro-batch (the same batch shapes as the
        # trainer placement), and the order-preserving pool keeps the schedule.
        ds = ds.map_batches(
            _VFMFeatures,
            fn_constructor_args=(vfm,),
            batch_size=local_batch,
            batch_format="numpy",
            zero_copy_batch=True,
            compute=ray.data.ActorPoolStrategy(size=vfm.num_actors),
            num_cpus=1,
            **({"num_gpus": 1} if vfm.use_gpu else {}),
        )
    ds.context.execution_options.preserve_order = True
    # One bar per rank dataset would flood a training job's log; the training loop logs throughput instead.
    ds.context.enable_progress_bars = False
    return ds
