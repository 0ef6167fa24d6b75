"""Unreadable input files: the rule that stops a run, the list a run keeps of them, and ``skipped.tsv``.

Training and token extraction treat a file that cannot be read or decoded alike (why here, in the data layer:
both ``pipelines/`` and ``train/`` use it, and neither may be imported by the other's data code):

* it is skipped and listed once, ``image_id <TAB> reason`` in ``skipped.tsv`` (:func:`write_skipped`), the reason
  being the phrase of :func:`ideal_ray.data.folder.skip_reason` ("empty file (0 bytes)", ...);
* when more than ``MAX_SKIP_FRACTION`` of one unit of work is unreadable, and more than ``MIN_SKIPS_TO_ABORT``
  files, the run stops with one sentence naming the first bad file and the fraction (:func:`too_many_skipped`,
  :func:`skip_fraction_error`). ImageNet has a handful of bad files in 1.28M, so that many means a missing mount or
  a wrong format, not bad luck. The unit is a shard for extraction and a decode call (one step of one rank) for
  training.

Training's decode actors are many processes on many nodes; :class:`SkipLedger` is where they report what they met,
each file once: a plain object in an in-process run, the same class as a Ray actor on Ray (:func:`remote_ledger`);
:func:`ledger_call` calls either.
"""

from __future__ import annotations

import csv
import os
from typing import Any, Iterable

from ideal_ray.errors import InputError
from ideal_ray.io import atomic_write

MAX_SKIP_FRACTION = 0.05
MIN_SKIPS_TO_ABORT = 10
SKIPPED_FILE = "skipped.tsv"  # image_id <TAB> reason, one per line under a header


class UnreadableDataError(InputError, RuntimeError):
    """Too many files of one unit of work could not be read: the data is likely missing, not a few bad files (refused
    input: a job exits 2 with the sentence)."""


def too_many_skipped(skipped: int, total: int, max_fraction: float = MAX_SKIP_FRACTION) -> bool:
    """The stop rule: more than ``MIN_SKIPS_TO_ABORT`` unreadable files, and more than ``max_fraction`` of ``total``."""
    return skipped > MIN_SKIPS_TO_ABORT and skipped > max_fraction * total


def skip_fraction_error(skipped: int, total: int, what: str, first: str, reason: str, limit: str,
                        then: str) -> UnreadableDataError:
    """The stop rule's one sentence: ``{skipped} of the {total} {what} could not be read or decoded (first: ...)``,
    that this is more than ``limit`` (the fraction, as the caller names it), why that stops the run, and ``then``
    (what was kept and what to do)."""
    return UnreadableDataError(
        f"{skipped} of the {total} {what} could not be read or decoded (first: {first}: {reason}); that is more than "
        f"{limit}, so the data is likely missing (an unmounted folder?) rather than a few bad files. {then}")


def write_skipped(path: str, skipped: Iterable[dict]) -> None:
    """``image_id <TAB> error`` per skipped file (tabs/newlines in errors flattened), written atomically."""
    lines = ["image_id\terror\n"] + [f"{x['image_id']}\t{' '.join(str(x['error']).split())}\n" for x in skipped]
    atomic_write(path, "".join(lines))


def read_skipped(path: str) -> list[dict]:
    """The entries of a ``skipped.tsv`` (``[]`` when there is none): ``[{"image_id", "error"}]``."""
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [{"image_id": r[0], "error": r[1] if len(r) > 1 else ""} for r in rows[1:] if r]


class SkipLedger:
    """The unreadable files of one run, each once (by its index in the run's image list), and the sentence that
    stopped the run, if one did. Reporters add as they meet files; the driver reads it when the run ends."""

    def __init__(self) -> None:
        self._reasons: dict[int, str] = {}
        self._stopped: str | None = None

    def add(self, index: int, reason: str) -> None:
        self._reasons.setdefault(int(index), str(reason))

    def stop(self, sentence: str) -> None:
        """Record why the run stops (the first sentence is kept: later ones are echoes of a restarted worker)."""
        if self._stopped is None:
            self._stopped = str(sentence)

    def items(self) -> dict[int, str]:
        """index -> reason."""
        return dict(self._reasons)

    def stopped(self) -> str | None:
        return self._stopped


def remote_ledger():
    """A :class:`SkipLedger` as a Ray actor (no CPU of its own), owned by the calling process (the driver) and kept
    on its node: the ledger must outlive any worker node the run loses (its record is the run's, read at the end)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(SkipLedger).options(scheduling_strategy=here).remote()


def ledger_call(ledger, method: str, *args: Any) -> Any:
    """``ledger.method(*args)`` for a plain :class:`SkipLedger`, or the same on its Ray actor, waited for (a report
    is done before the batch that met the file is handed on, so the driver never misses one)."""
    fn = getattr(ledger, method)
    if hasattr(fn, "remote"):
        import ray

        return ray.get(fn.remote(*args))
    return fn(*args)
