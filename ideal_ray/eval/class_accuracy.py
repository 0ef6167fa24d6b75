"""Class accuracy of class-conditional samples: does a sample of class c look like the real images of class c?

A classifier is fitted on **real images only** -- ``per_class`` evenly spaced images of each class of a labelled
split (e.g. the train split of the data set whose val split is the FID reference) -- and applied to the samples;
the score is the share of samples it assigns to the class they were sampled for (top-1). Chance is 1 / the
classifier's class count. The classifier sees nothing generated: it cannot be tuned to a generator. Two kinds:

- ``probe`` (default; natural images such as ImageNet): a linear probe on the FID Inception's pool_3 features
  (2048-d, :func:`ideal_ray.eval.fid.features`, the same pass that gives gFID, so scoring the samples costs nothing
  extra): multinomial logistic regression on standardized features (:func:`ideal_ray.eval.probe.fit_linear_classifier`),
  weight decay chosen on a held-out fifth of the real images. Real images: decoded and ADM-center-cropped to the
  samples' size (``ideal_ray.data.crops.center_crop_arr``), the preprocessing the FID reference folder gets.
- ``cnn`` (data sets unlike ImageNet, such as the synthetic shapes of the tiny runs): a small convnet trained from
  scratch on the real images (:mod:`ideal_ray.eval.convnet`, the GAN-test protocol) at 32 px, whatever the samples'
  size (they are resized to it). Real images: ADM-center-cropped to 40 px, random 32 px crops while training.

Either way a held-out fifth of the real images is scored and reported as ``class_accuracy_real``, the accuracy real
images get.

The real features and the fitted classifier are cached in the reference statistics' cache folder
(:mod:`ideal_ray.eval.reference`: ``$IDEAL_RAY_FID_REFS`` or ``~/.cache/ideal_ray/fid_refs``), keyed by the selected
listing (ids and labels), the preprocessing, the evaluator and the classifier settings, so every sweep trial reuses
them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Union

import numpy as np

from ideal_ray.data import sources
from ideal_ray.data.crops import center_crop_arr
from ideal_ray.data.folder import DECODE_ERRORS
from ideal_ray.data.reader import ByteReader, decode_bytes
from ideal_ray.eval.fid import features
from ideal_ray.eval.inception import FidInception
from ideal_ray.eval.probe import LinearClassifier, fit_linear_classifier

if TYPE_CHECKING:
    from ideal_ray.eval.convnet import ConvClassifier

__all__ = ["CLASSIFIER_KINDS", "CLASSIFIER_VERSION", "DEFAULT_PER_CLASS", "ClassifierData", "RealClassifier",
           "check_sample_labels", "class_accuracy", "classifier_data", "real_classifier", "select_per_class"]

log = logging.getLogger(__name__)

CLASSIFIER_VERSION = 1  # bump when the selection, preprocessing or fit changes: old cache entries then miss
DEFAULT_PER_CLASS = 50  # real images per class the classifier is fitted on (ImageNet: 50k of the 1.28M)
CLASSIFIER_KINDS = ("probe", "cnn")
METRIC_NOTES = {
    "probe": ("top-1 of a linear classifier fitted on Inception pool_3 features of real images only, applied to the "
              "samples' pool features and scored against the class each sample was drawn for; chance is 1 / the "
              "classifier's classes"),
    "cnn": ("top-1 of a small convnet trained from scratch on real images only (GAN-test), applied to the samples "
            "and scored against the class each sample was drawn for; chance is 1 / the classifier's classes")}
# the convnet reads pixels, not Inception features: its cache entry names this in place of an Inception evaluator
CNN_EVALUATOR = {"torch_fidelity": "", "weights_sha256": "", "layers": ["pixels"], "resize": "none"}


@dataclass
class RealClassifier:
    """A classifier fitted on real images, with the protocol that made it and where it came from."""

    classifier: Union[LinearClassifier, "ConvClassifier"]
    class_names: List[str]
    protocol: Dict[str, Any]
    from_cache: bool = False
    path: str = ""

    @property
    def kind(self) -> str:
        return "probe" if isinstance(self.classifier, LinearClassifier) else "cnn"

    @property
    def num_classes(self) -> int:
        return self.classifier.num_classes

    @property
    def real_top1(self) -> Optional[float]:
        """Held-out top-1 on real images (probe: of the chosen weight decay; None when nothing was held out)."""
        if isinstance(self.classifier, LinearClassifier):
            return self.classifier.val_top1.get(self.classifier.weight_decay)
        return self.classifier.real_top1

    @property
    def metric_note(self) -> str:
        return METRIC_NOTES[self.kind]


def select_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Sorted listing indices: ``per_class`` evenly spaced items of every class (0 = all items)."""
    if per_class < 0:
        raise ValueError(f"per_class={per_class} must be >= 0 (0 = every image of the split).")
    if per_class == 0:
        return np.arange(len(labels), dtype=np.int64)
    picks = []
    for k in np.unique(labels):
        idx = np.flatnonzero(labels == k)
        picks.append(idx[np.unique(np.linspace(0, len(idx) - 1, min(per_class, len(idx))).round().astype(np.int64))])
    return np.sort(np.concatenate(picks)) if picks else np.zeros(0, dtype=np.int64)


def _images(listing: sources.Listing, indices: np.ndarray, size: int, batch_size: int,
            skipped: List[str], kept: List[int], workers: int = 4) -> Iterator[np.ndarray]:
    """uint8 (B, size, size, 3) batches of the selected items (bytes read here, decoded on ``workers`` threads);
    undecodable items go to ``skipped``, the decoded ones' indices to ``kept``."""
    reader = ByteReader(listing)

    def decode(i_data):
        i, data = i_data
        try:
            return np.asarray(center_crop_arr(decode_bytes(data), size))
        except DECODE_ERRORS as err:
            log.warning("class-accuracy classifier: skipping %s: %s", listing.ids[i], err)
            return None

    with reader, ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(indices), batch_size):
            chunk = [int(i) for i in indices[start:start + batch_size]]
            items = []
            for i in chunk:
                try:
                    items.append((i, reader.read(i)))
                except OSError as err:
                    log.warning("class-accuracy classifier: skipping %s: %s", listing.ids[i], err)
                    skipped.append(listing.ids[i])
            images = list(pool.map(decode, items))
            skipped += [listing.ids[i] for (i, _), img in zip(items, images) if img is None]
            kept += [i for (i, _), img in zip(items, images) if img is not None]
            good = [img for img in images if img is not None]
            if good:
                yield np.stack(good)


def _load(path: str) -> Optional[RealClassifier]:
    try:
        with np.load(path, allow_pickle=False) as z:
            protocol = json.loads(str(z["protocol"]))
            arrays = {k[4:]: z[k] for k in z.files if k.startswith("clf_")}
            if protocol.get("classifier_kind", "probe") == "cnn":
                from ideal_ray.eval.convnet import ConvClassifier

                clf = ConvClassifier.from_arrays(arrays, int(protocol["num_classes"]), protocol["classifier"])
            else:
                clf = LinearClassifier.from_arrays(arrays, protocol["classifier"])
            return RealClassifier(clf, [str(c) for c in z["class_names"]], protocol, from_cache=True, path=path)
    except (OSError, ValueError, KeyError, RuntimeError, zipfile.BadZipFile) as err:
        log.warning("ignoring unreadable classifier cache %s (%s); refitting it", path, err)
        return None


@dataclass
class ClassifierData:
    """The labelled real images a classifier is fitted on: a split's listing and the selected items."""

    listing: sources.Listing
    indices: np.ndarray  # sorted listing indices
    per_class: int
    kind: str = "probe"  # one of CLASSIFIER_KINDS

    @property
    def num_classes(self) -> int:
        return len(self.listing.classes)

    @property
    def where(self) -> str:
        return os.path.join(self.listing.root, self.listing.split)


def classifier_data(data_root: str, split: str = "train", per_class: Optional[int] = None, fmt: str = "auto",
                    class_index: str = "", kind: str = "probe") -> ClassifierData:
    """List ``split`` of ``data_root`` (reads no image) and select ``per_class`` images of each class (None:
    ``DEFAULT_PER_CLASS``, 0: every image) for a classifier of ``kind`` (module notes); one clear error when the kind
    is unknown, the split is missing or has fewer than 2 classes."""
    if kind not in CLASSIFIER_KINDS:
        raise ValueError(f"unknown class-accuracy classifier {kind!r}; choose one of {list(CLASSIFIER_KINDS)}.")
    per_class = DEFAULT_PER_CLASS if per_class is None else int(per_class)
    if not data_root:
        raise ValueError("class accuracy needs labelled real images: pass the data set root (its train split).")
    try:
        listing = sources.list_images(data_root, split=split, class_index=class_index, fmt=fmt)
    except (FileNotFoundError, ValueError) as err:
        raise FileNotFoundError(f"class accuracy needs labelled real images (split {split!r} of {data_root}): {err}")
    if len(listing.classes) < 2:
        raise ValueError(f"{listing.root}/{split} has {len(listing.classes)} class(es); a classifier needs at least 2.")
    return ClassifierData(listing, select_per_class(listing.labels, per_class), per_class, kind)


def real_classifier(data: ClassifierData, size: int, extractor: Optional[FidInception], cache_dir: str = "",
                    batch_size: int = 50) -> RealClassifier:
    """The classifier of ``data`` (module notes; its ``kind``) for samples of ``size`` px (the probe; the convnet works
    at its own size): loaded from ``cache_dir``
    when these images, this preprocessing and this evaluator (the probe's Inception ``extractor``; the convnet takes
    none) were seen before, else fitted and cached."""
    import torch

    from ideal_ray.eval import reference as ref_mod

    listing, indices = data.listing, data.indices
    cnn = data.kind == "cnn"
    if cnn:  # works at its own size: the samples are resized to it
        from ideal_ray.eval import convnet

        size = convnet.SIZE
    crop = size * 5 // 4 if cnn else size
    name = f"{os.path.basename(listing.root.rstrip(os.sep))}-{listing.split}"
    identity = {"kind": (f"class-cnn-v{CLASSIFIER_VERSION}.{convnet.VERSION}-{size}px" if cnn
                         else f"class-probe-v{CLASSIFIER_VERSION}"),
                "name": f"{name}-{data.kind}-classifier", "path": listing.root,
                "split": listing.split, "sha256": _listing_sha256(listing, indices),
                "sha256_of": "the selected listing (ids and labels)",
                "preprocess": f"ADM center crop to {crop} (BOX halvings, bicubic)",
                "selection": (f"{data.per_class} evenly spaced images per class" if data.per_class
                              else "every image")}
    if not cnn and extractor is None:
        raise ValueError("the probe classifier reads Inception features: pass the FID extractor.")
    evaluator = CNN_EVALUATOR if cnn else extractor.protocol()
    path = ref_mod.cache_path(identity, evaluator, cache_dir)
    if os.path.isfile(path):
        cached = _load(path)
        if cached is not None:
            return cached
    skipped: List[str] = []
    kept: List[int] = []
    batches = _images(listing, indices, crop, batch_size, skipped, kept)
    k = data.num_classes
    arrays: Dict[str, np.ndarray] = {}
    if cnn:
        chunks = list(batches)
        images = np.concatenate(chunks) if chunks else np.zeros((0, crop, crop, 3), np.uint8)
        labels = listing.labels[np.asarray(kept, dtype=np.int64)]
        clf: Union[LinearClassifier, "ConvClassifier"] = convnet.fit_conv_classifier(images, labels, k, size)
        what = {"features": "pixels (a convnet trained from scratch)"}
    else:
        feats = features(batches, batch_size=batch_size, extractor=extractor)["pool"]
        labels = listing.labels[np.asarray(kept, dtype=np.int64)]
        clf = fit_linear_classifier(torch.from_numpy(feats), torch.from_numpy(labels), num_classes=k)
        what = {"features": "FID Inception pool_3 (2048-d), the evaluator of gFID", "evaluator": evaluator}
        arrays["features"] = feats.astype(np.float32)
    protocol = {"real_images": {**identity, "num_images": int(len(kept)), "skipped": len(skipped),
                                "skipped_files": skipped[:20]},
                "classifier_kind": data.kind, **what, "classifier": clf.protocol, "num_classes": k,
                "cache_key": ref_mod.cache_key(identity, evaluator)}
    arrays.update({f"clf_{key}": v for key, v in clf.to_arrays().items()})
    arrays.update(labels=labels, class_names=np.array(listing.class_names), protocol=np.array(json.dumps(protocol)))
    ref_mod.save_npz(path, arrays)
    log.info("class-accuracy classifier of %s (%d images, %d classes) cached at %s", name, len(kept), k, path)
    return RealClassifier(clf, list(listing.class_names), protocol, from_cache=False, path=path)


def _listing_sha256(listing: sources.Listing, indices: np.ndarray) -> str:
    """Hex digest over the selected (id, label) pairs in order."""
    h = hashlib.sha256(len(indices).to_bytes(8, "little"))
    for i in indices:
        h.update(os.fsencode(listing.ids[i]) + b"\0" + int(listing.labels[i]).to_bytes(8, "little", signed=True))
    return h.hexdigest()


def check_sample_labels(labels: Any, num_images: int, num_classes: int, where: str, classes_of: str) -> np.ndarray:
    """The samples' labels as int64 (N,), or one clear error: wrong shape or type, or outside the classifier's
    classes."""
    labels = np.asarray(labels)
    if labels.shape != (num_images,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{where} labels are {labels.dtype} {labels.shape}; class accuracy needs one integer class "
                         f"id per image ({num_images},).")
    bad = np.unique(labels[(labels < 0) | (labels >= num_classes)])
    if len(bad):
        raise ValueError(f"{where} has labels {bad[:5].tolist()} outside the {num_classes} classes of {classes_of}; "
                         f"score samples of a generator trained on that data set's classes.")
    return labels.astype(np.int64)


def class_accuracy(clf: RealClassifier, pool: np.ndarray, labels: np.ndarray,
                   images: Optional[np.ndarray] = None) -> Dict[str, Any]:
    """``class_accuracy`` (top-1 of the samples: pool features (N, 2048) for the probe, uint8 ``images``
    (N, H, W, 3) for the convnet; labels (N,) already checked), ``class_chance``, ``class_accuracy_real`` (held-out
    real top-1, when measured) and per-class top-1."""
    import torch

    if clf.kind == "cnn":
        if images is None:
            raise ValueError("the cnn class-accuracy classifier scores the sample images: pass images=.")
        pred = clf.classifier.predict(np.asarray(images))  # (N,)
    else:
        pred = clf.classifier.predict(torch.from_numpy(np.asarray(pool))).cpu().numpy()  # (N,)
    hit = pred == labels
    out: Dict[str, Any] = {"class_accuracy": float(hit.mean()), "class_chance": 1.0 / clf.num_classes}
    if clf.real_top1 is not None:
        out["class_accuracy_real"] = float(clf.real_top1)
    out["class_accuracy_per_class"] = {
        str(int(k)): float(hit[labels == k].mean()) for k in np.unique(labels)}
    return out
