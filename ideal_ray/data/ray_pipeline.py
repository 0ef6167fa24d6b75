"""Ray Data training pipeline with an exactly deterministic, resumable sample order.

Which image (and which crop/flip of it) rank r sees at step t is a pure function of ``(seed, t, r)``: the schedule
and augmentation of :mod:`ideal_ray.data.augment`, never block boundaries, task placement, actor count or when the
job was restarted. This module runs that schedule on Ray Data.

Each rank gets its OWN dataset in exact consumption order (no ``streaming_split``), built lazily from
``ray.data.range(num_steps * LB)``: row ``i`` is step ``start_step + i // LB``. A callable class running in an
actor pool maps rows to (epoch, position) -> image -> decode -> augment.

The images are listed as extraction lists them, in any of its formats (``data.format``: an ImageNet class folder, a
flat folder + ``data.labels_file``, Parquet shards of encoded images, WebDataset tars; :func:`training_listing` is
``sources.list_images``). The :class:`~ideal_ray.data.sources.Listing` travels once through the object store as
``Listing.pack()`` (numpy arrays: zero-copy on every actor of a node); each decode actor reads an image's bytes
with its own :class:`~ideal_ray.data.reader.ByteReader` (which keeps its open shards and Parquet row groups) and
decodes them with ``reader.decode_bytes``.

Ray Train integration (issue 3): pass ``datasets={dataset_name(r): ds_r}`` with
:func:`train_data_config` -- Train replaces every dataset's execution options with its own and, by default,
takes ``preserve_order`` from the *driver's* DataContext, which would silently drop the order guarantee set
here. A ``FailureConfig`` restart re-iterates a dataset object handed to the trainer from its first row, so
resuming from a checkpoint at step c needs a dataset built with ``start_step=c``: Train V2 accepts a
zero-argument callable per dataset and calls it at every worker-group (re)start (or build it inside
``train_loop_per_worker`` with :func:`rank_dataset`). List once and pass ``images=`` (a :func:`put_listing`
ref) rather than re-listing ImageNet for every rank.

Output rows (``COLUMNS``; pass ``TORCH_DTYPES`` to ``iter_torch_batches``): ``image`` uint8 (S, S, 3) -- 4x
smaller than float over the wire, the trainer converts with ``augment.to_model_input`` on its device --
``label``, ``step`` and ``position`` (within the epoch). ``provenance=True`` adds ``index`` (the image used, in
the listing's order) and ``substituted`` (1 where the scheduled file could not be decoded and the next decodable
image of the permutation stood in for it): the way for a trainer to count bad files per step; then use
``torch_dtypes(provenance=True)``.

Unreadable images (``skips=``): each is reported once, with the reason of ``folder.skip_reason``, to the run's
:class:`~ideal_ray.data.skipped.SkipLedger` (a Ray actor the driver owns; a plain object in process), from which the
driver reports the run's total, ``skipped.tsv`` and the MLflow metric; a decode call that finds more of its files
unreadable than extraction's stop rule allows (a vanished mount) stops the run with one sentence naming the first.
Logs and that sentence name a file by its path, a Parquet entry as ``<shard> row <r>`` and a WebDataset one as
``<shard> member <key>`` (:func:`entry_name`).

VFM in the pipeline (``dist.vfm_placement=data``): ``vfm=VFMStage(...)`` appends a second actor pool that runs
the frozen VFM trunk (``FrozenVFM.trunk_features``) on each step's decoded images and adds the columns ``shallow``
(block output before any norm; absent in single-layer mode) and ``deep`` (final norm applied), each (N, C). They
are a pure function of the image, so order and resume are untouched. Features travel as fp32, or under bf16
autocast as bf16 bit patterns in uint16 columns (Arrow has no bf16; half of fp32's bytes, fp32's exponent range,
so no overflow on a ViT's outlier channels as float16 could have). :func:`trunk_features_from_batch` turns them back
into fp32 tensors on the trainer's device; ``torch_dtypes(vfm=...)`` names the columns for ``iter_torch_batches``.
"""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Optional

import numpy as np
from PIL import Image

from ideal_ray import storage
from ideal_ray.config import VFMConfig
from ideal_ray.data.augment import (
    PermutationCache,
    augment,
    check_augmentation,
    local_batch_size,
    row_schedule,
    sample_rng,
    schedule_info,
    to_model_input,
)
from ideal_ray.data.folder import DECODE_ERRORS, skip_reason
from ideal_ray.data.reader import ByteReader, load_rgb
from ideal_ray.data.skipped import (
    MAX_SKIP_FRACTION,
    UnreadableDataError,
    ledger_call,
    skip_fraction_error,
    too_many_skipped,
)
from ideal_ray.data.sources import Listing, list_images

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
def training_listing(data_cfg, split: str = "train") -> Listing:
    """The images of ``data_cfg.root/split`` as extraction lists them: ``sources.list_images`` in ``data.format``
    (``auto`` detects it) with ``data.labels_file`` (flat folders) and ``data.class_index``. A folder split comes in
    the folder reader's sorted (class folder, file name) order. Every layout problem raises its one clear error here,
    before any Ray work; reads no image bytes."""
    return list_images(data_cfg.root, split, class_index=data_cfg.class_index, fmt=data_cfg.format,
                       labels_file=data_cfg.labels_file)


def put_listing(listing: Listing):
    """Put the listing into the object store once (``Listing.pack()``: numpy arrays, mapped zero-copy by every actor
    of a node); share the ref (e.g. via ``train_loop_config``)."""
    import ray

    return ray.put(listing.pack())


def _packed(images) -> dict:
    """``Listing.pack()`` of a listing, a packed dict or an ObjectRef of one (zero-copy views out of the store)."""
    if isinstance(images, Listing):
        return images.pack()
    if isinstance(images, dict):
        return images
    import ray

    return ray.get(images)


def entry_name(packed: dict, index: int) -> str:
    """How logs and the stop sentence name item ``index`` of a packed listing: the image file (folder, flat),
    ``<shard> row <r>`` (Parquet) or ``<shard> member <key>`` (WebDataset). ``skipped.tsv`` lists the item's id."""
    root = os.fsdecode(packed["root"].item())
    rel = os.fsdecode(bytes(packed["files"][packed["file_index"][index]]))
    path = storage.join(root, rel)  # ByteReader.path(index): a local path or a URI
    fmt = packed["fmt"].item().decode()
    if fmt == "parquet":
        return f"{path} row {int(packed['offset'][index])}"
    if fmt == "webdataset":
        key = os.fsdecode(bytes(packed["ids"][index]))  # <shard rel>/<key>
        return f"{path} member {key[len(rel) + 1:] if key.startswith(rel + '/') else key}"
    return path


# ------------------------------------------------------------------------------------- map function
class _DecodeAugment:
    """Callable class of the actor pool: receives the packed listing once per actor process and reads the images
    through its own ``ByteReader`` (open shards and Parquet row groups stay cached in the actor).

    An image that cannot be read or decoded is reported once to ``skips`` (a :class:`~ideal_ray.data.skipped.SkipLedger`
    or its Ray actor: the run's one list of them, which the driver writes to ``skipped.tsv`` and MLflow) and the next
    decodable image of the epoch order stands in for it. A call that meets more bad files than the stop rule of
    :mod:`ideal_ray.data.skipped` allows (a vanished mount) records its sentence in ``skips`` and raises it."""

    def __init__(self, images, data_cfg, seed: int, start_step: int, rank: int, local_batch: int,
                 provenance: bool = False, skips=None) -> None:
        self.packed = _packed(images)  # an ObjectRef of Listing.pack() in an actor; the dict (or Listing) in-process
        self.reader = ByteReader(self.packed)  # one per actor: its open-file cache lives as long as the actor
        self.labels: np.ndarray = self.packed["labels"]  # (N,) int64, zero-copy view into the object store
        self.n = len(self.labels)
        self.seed, self.start_step, self.rank = int(seed), int(start_step), int(rank)
        self.lb, self.gb = int(local_batch), int(data_cfg.global_batch)
        self.spe = schedule_info(self.n, self.gb)
        self.aug = (int(data_cfg.image_size), int(data_cfg.resize_min), int(data_cfg.resize_max),
                    float(data_cfg.hflip_prob))
        self.provenance = bool(provenance)
        self._perm = PermutationCache(self.seed, self.n)
        self._bad: dict[int, str] = {}  # index -> reason, the images known unreadable in this process
        self.skips = skips

    def _decode_from(self, epoch: int, position: int, step: int, met: list[tuple[str, str]],
                     decoded: int) -> tuple[int, Image.Image, bool]:
        """Decode the image at ``position``; if it is bad, the next decodable one along the permutation. ``met``:
        (name, reason) of the bad images this call passed over so far, ``decoded`` its good ones (the stop rule's
        counts: checked at every bad file, so a vanished mount stops after a few, not after trying every file)."""
        perm = self._perm(epoch)
        for k in range(self.n):
            index = int(perm[(position + k) % self.n])
            reason = self._bad.get(index)
            if reason is None:
                try:
                    return index, load_rgb(self.reader, index), k > 0
                except DECODE_ERRORS as e:
                    reason = self._bad[index] = skip_reason(e)
                    if self.skips is not None:
                        ledger_call(self.skips, "add", index, reason)
                    log.warning("skipping unreadable image %s (%s): the next decodable image of the epoch order "
                                "stands in for it (%d bad images met by this actor)", entry_name(self.packed, index),
                                reason, len(self._bad))
            met.append((entry_name(self.packed, index), reason))
            if too_many_skipped(len(met), len(met) + decoded):
                err = skip_fraction_error(  # the loop's step numbers start at 1, the schedule's at 0
                    len(met), len(met) + decoded, f"image files rank {self.rank} read for training step {step + 1}",
                    *met[0], f"{MAX_SKIP_FRACTION:.0%} of them", "Training stopped; check data.root, then rerun the "
                    "same run name to resume from its latest checkpoint.")
                if self.skips is not None:
                    ledger_call(self.skips, "stop", str(err))
                raise err
        split = storage.join(self.reader.root, self.packed["split"].item().decode())
        raise UnreadableDataError(f"none of the {self.n} training images of {split} could be read or decoded "
                                  f"(first: {met[0][0]}: {met[0][1]}); check data.root.")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        step, epoch, position = row_schedule(batch["id"], self.start_step, self.rank, self.lb, self.gb, self.spe)
        n = len(step)
        images = np.empty((n, self.aug[0], self.aug[0], 3), dtype=np.uint8)  # (n, S, S, 3)
        index = np.empty(n, dtype=np.int64)
        substituted = np.zeros(n, dtype=np.int64)
        met: list[tuple[str, str]] = []  # the bad images this call passed over: (name, reason)
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
    """(ObjectRef of the packed listing, number of images); lists ``data_cfg.root/split`` when ``images`` is None."""
    import ray

    if images is None:
        images = training_listing(data_cfg, split)
    if isinstance(images, ray.ObjectRef):
        return images, len(ray.get(images)["labels"])
    packed = _packed(images)
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

    ``images``: None (list ``data_cfg.root/split`` with :func:`training_listing`), a ``Listing`` (or its ``pack()``),
    or a ref from :func:`put_listing` (list once on the driver, share with every worker). ``num_actors`` defaults
    to ``data_cfg.loader_workers``. ``steps_per_block``: steps decoded per actor task. One keeps what the ordered
    actor pool buffers small (a task that finishes early holds only its own step until the earlier ones are
    consumed). ``provenance`` adds the ``index`` and ``substituted`` columns. ``vfm`` appends the VFM actor pool
    (``shallow``/``deep`` columns, see :class:`VFMStage`). ``num_steps=0`` gives an empty dataset (a finished run).
    ``skips``: where the decode actors report unreadable images and a stop (a
    :class:`~ideal_ray.data.skipped.SkipLedger` actor from ``skipped.remote_ledger()``; None: only their logs).
    """
    local_batch = _check_request(data_cfg, world_size, start_step, num_steps, steps_per_block, num_actors, vfm)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, {world_size}).")
    ref, n = _resolve_images(data_cfg, split, images)
    schedule_info(n, data_cfg.global_batch)  # at least one global batch
    return _build(ref, data_cfg, local_batch, rank, start_step, num_steps, seed, num_actors, cpus_per_actor,
                  steps_per_block, provenance, vfm, skips)


def rank_datasets(data_cfg, world_size: int, start_step: int, num_steps: int, seed: int, split: str = "train", *,
                  images=None, **options) -> list:
    """One dataset per rank (list index = rank), all sharing one image list in the object store.

    ``options``: the other keywords of :func:`rank_dataset` (``num_actors``, ``cpus_per_actor``, ``steps_per_block``,
    ``provenance``, ``vfm``, ``skips``), the same for every rank; the arguments mean what they mean there. Hand the
    datasets to Ray Train as ``{dataset_name(r): ds}`` with :func:`train_data_config`.
    """
    # rank 0's call, checked (an unknown keyword, a bad value) before anything is listed
    call = inspect.signature(rank_dataset).bind(data_cfg, world_size, 0, start_step, num_steps, seed, split, **options)
    call.apply_defaults()
    _check_request(data_cfg, world_size, start_step, num_steps,
                   *(call.arguments[k] for k in ("steps_per_block", "num_actors", "vfm")))
    ref, _ = _resolve_images(data_cfg, split, images)  # listed and put once, shared by every rank
    return [rank_dataset(data_cfg, world_size, r, start_step, num_steps, seed, split, images=ref, **options)
            for r in range(world_size)]


def local_batches(data_cfg, world_size: int, rank: int, start_step: int, num_steps: int, seed: int,
                  split: str = "train", *, images=None, skips=None) -> Iterator[dict[str, torch.Tensor]]:
    """Rank ``rank``'s batches for steps ``[start_step, start_step + num_steps)`` made in this process, without Ray:
    what ``rank_dataset(...).iter_torch_batches(batch_size=LB, dtypes=TORCH_DTYPES)`` hands a Ray Train worker,
    byte for byte (the same schedule and the same decode + augment code, one step per batch).

    The in-process runs use it (``ray_trainer.train_tokenizer(in_process=True)``). ``images``: None (list
    ``data_cfg.root/split``), a ``Listing`` or its ``pack()``; ``skips`` a
    :class:`~ideal_ray.data.skipped.SkipLedger`, as in :func:`rank_dataset`. Decoding happens in the calling
    thread, one step at a time.
    """
    local_batch = _check_request(data_cfg, world_size, start_step, num_steps, 1, 1)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, {world_size}).")
    packed = _packed(images if images is not None else training_listing(data_cfg, split))
    decode_augment = _DecodeAugment(packed, data_cfg, seed, start_step, rank, local_batch, skips=skips)
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
