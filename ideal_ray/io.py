"""Writing files so that a crash never leaves half of one and nothing a user made is replaced by surprise; and the
one rule for a rerun under an existing name: the same settings resume, other settings are refused.

- :func:`atomic_path` gives a temporary path beside the target to write to (``torch.save``, ``np.savez``, PIL, ...);
  the finished file is renamed onto the target, or, with ``overwrite=False``, published without ever replacing an
  existing one (:func:`publish`). :func:`atomic_write` / :func:`atomic_write_json` write text, bytes or JSON
  through it. A reader sees the old file or the new one, whole, never a mix.
- :func:`record_settings` writes a run's or sweep's settings (JSON) on the first run and, on a rerun, refuses changed
  ones with a :class:`SettingsChangedError` naming the keys (:func:`changed_keys`).

Local paths only (object storage: :mod:`ideal_ray.storage`, where a store shows an object only once its upload is
complete). Standard library only: every layer may import it.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from typing import Any, Callable, Iterable, Iterator, List, Mapping, Optional, Union

from ideal_ray.errors import InputError

TMP_SUFFIX = ".tmp"  # every temporary file of a writer ends so (``.<name>.<random>.tmp``)
# the errors of a file system without hard links, where publish falls back to check-then-rename
_NO_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS)


class SettingsChangedError(InputError, ValueError):
    """A rerun under an existing name with other settings (refused: Tune, Ray Train and the shard writers would
    otherwise mix the two)."""


def _fsync_dir(path: str) -> None:
    """Make a rename in ``path`` durable (best effort: not every file system allows opening a folder)."""
    try:
        fd = os.open(path or os.curdir, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish(tmp: str, path: str, exists: str = "") -> None:
    """Move the finished file ``tmp`` to ``path`` without ever replacing an existing ``path`` (a hard link, which
    fails atomically when ``path`` exists, even against a racing writer; check-then-rename where the file system has
    no hard links). An existing ``path`` removes ``tmp`` and raises FileExistsError with ``exists`` (default: a
    sentence naming ``path``)."""
    refusal = exists or f"{path} exists; refusing to overwrite it (choose a new path, or move it away)."
    try:
        os.link(tmp, path)
    except FileExistsError:
        os.remove(tmp)
        raise FileExistsError(refusal) from None
    except OSError as e:
        if e.errno not in _NO_LINKS:
            raise
        if os.path.exists(path):
            os.remove(tmp)
            raise FileExistsError(refusal) from None
        os.replace(tmp, path)
    else:
        os.remove(tmp)
    _fsync_dir(os.path.dirname(path))


@contextlib.contextmanager
def atomic_path(path: str, overwrite: bool = True, exists: str = "") -> Iterator[str]:
    """A temporary path in ``path``'s folder (made if missing) for the block to write ``path``'s content to; when the
    block ends without an error it becomes ``path`` (replacing it, or with ``overwrite=False`` refused if ``path``
    exists: :func:`publish` and its ``exists`` sentence), else it is removed. The temporary name is hidden and ends
    in :data:`TMP_SUFFIX`, which folder cleaners (the shard writer's resume) treat as litter of a killed writer; so a
    writer that picks its format from the file name must be told the format."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    base = os.path.basename(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=TMP_SUFFIX, dir=folder)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are meant to be shared like any other file
    try:
        yield tmp
        if overwrite:
            os.replace(tmp, path)
        else:
            publish(tmp, path, exists)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write(path: str, data: Union[str, bytes], overwrite: bool = True, exists: str = "") -> str:
    """Write ``data`` (text or bytes) to ``path`` through :func:`atomic_path`; returns ``path``."""
    with atomic_path(path, overwrite, exists) as tmp:
        with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return path


def atomic_write_json(path: str, obj: Any, overwrite: bool = True, **dump: Any) -> str:
    """``json.dumps(obj, indent=1, **dump)`` plus a newline, written through :func:`atomic_write`."""
    return atomic_write(path, json.dumps(obj, **{"indent": 1, **dump}) + "\n", overwrite)


def changed_keys(old: Mapping[str, Any], new: Mapping[str, Any], ignore: Iterable[str] = (),
                 same: Callable[[Any, Any], bool] = lambda a, b: a == b,
                 defaults: Optional[Mapping[str, Any]] = None) -> List[str]:
    """The keys whose values differ between two flat settings dicts (sorted; a key in one only counts), less those
    starting with a prefix in ``ignore``. ``defaults``: a key the old record lacks counts as unchanged when its new
    value is this default (a setting added since the old record was written, at the value the old code had)."""
    skip = tuple(ignore)
    old = {**{k: v for k, v in (defaults or {}).items() if k not in old and k in new}, **old}
    return sorted(k for k in set(old) | set(new)
                  if not (skip and k.startswith(skip)) and not same(old.get(k), new.get(k)))


def settings_changed(what: str, where: str, keys: List[str], fix: str) -> SettingsChangedError:
    """The one sentence of a changed rerun: ``{what} already exists at {where} with a different k1, k2; {fix}``."""
    return SettingsChangedError(f"{what} already exists at {where} with a different {', '.join(keys[:5])}; {fix}")


def record_settings(path: str, settings: Mapping[str, Any], what: str,
                    fix: str = "choose a new name, or pass the same settings to resume it.",
                    compare: bool = True) -> bool:
    """Record ``settings`` as JSON at ``path``; on a rerun (``path`` exists and ``compare``) refuse other settings
    (:func:`settings_changed`), compared as JSON reads them back (tuples as lists). Returns True when ``path`` held
    the same settings (a resume)."""
    new = json.loads(json.dumps(settings, default=str))  # as it will read back
    if compare and os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        keys = changed_keys(old, new)
        if keys:
            raise settings_changed(what, os.path.dirname(path), keys, fix)
        return True
    atomic_write_json(path, new, sort_keys=True)
    return False
