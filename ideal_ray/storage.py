"""The one way to reach a path or an object-store URI: a local or NFS path, or ``s3://`` / ``gs://`` through pyarrow
file systems. Run folders (``dist.storage_path``), image sources, token shards and their manifests all go through
:func:`filesystem`, so a stage reads and writes a bucket exactly as it does a folder.

An S3 URI takes its endpoint, region and credentials from the environment, as the AWS SDK does; a URI never carries
them. Standard library (and ``ideal_ray.errors``) at import time, pyarrow imported by the functions: every layer
may import it.
"""
from __future__ import annotations

import os
import posixpath
import re
from datetime import timedelta

from ideal_ray.errors import InputError

STORAGE_CHECK_TIMEOUT_S = 5.0  # how long a quick file system waits for an answer to one request (one attempt)
STORAGE_PROBE = ".ideal-ray-storage-check"  # the object the pre-flight check writes and deletes (check_store)


class StoreAccessError(InputError, OSError):
    """The object store cannot be used at a URI (no such bucket, no credentials, denied, unreachable endpoint): one
    sentence naming the URI and what was tried. An ``OSError`` too, so a reader counts it as an unreadable file."""


def is_uri(path: str) -> bool:
    """True for ``scheme://...`` (an object store), False for a local or NFS path."""
    return "://" in str(path)


def join(base: str, *parts: str) -> str:
    """``base/part/...``: ``/``-joined for a URI, ``os.path.join`` for a local path."""
    return posixpath.join(base, *parts) if is_uri(base) else os.path.join(base, *parts)


def filesystem(uri: str, quick: bool = False):
    """(pyarrow filesystem, path) for a local path, NFS path, or s3:// / gs:// URI. An S3 URI takes its endpoint,
    region and credentials from the environment, as the AWS SDK does (AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL for an
    S3-compatible store, AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or another source of the SDK's
    chain): the one way to point a run at a store; Ray Train's controller and workers resolve the same URI in their
    environment. ``quick``: an S3 or GCS file system that gives up soon (S3: one attempt, short timeouts; GCS: 5 s of
    retries), for the pre-flight check (``train.run_storage.check_storage``)."""
    import pyarrow.fs

    if not is_uri(uri):
        uri = os.path.abspath(uri)
        return pyarrow.fs.LocalFileSystem(), uri
    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    if quick and isinstance(fs, (pyarrow.fs.S3FileSystem, pyarrow.fs.GcsFileSystem)):
        options = fs.__reduce__()[1][0]  # what from_uri resolved (endpoint, region, ...); credentials stay unresolved
        if isinstance(fs, pyarrow.fs.S3FileSystem):
            fs = pyarrow.fs.S3FileSystem(**{**options, "connect_timeout": 2.0,
                                            "request_timeout": STORAGE_CHECK_TIMEOUT_S,
                                            "retry_strategy": pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=1)})
        else:  # GCS retries for 15 minutes by default
            fs = pyarrow.fs.GcsFileSystem(**{**options,
                                             "retry_time_limit": timedelta(seconds=STORAGE_CHECK_TIMEOUT_S)})
    return fs, path


# ------------------------------------------------------------------------------------- can this machine write there
def _aws_credentials() -> str:
    """Where the AWS SDK's default chain will find credentials ('' when nowhere): the environment, a web identity
    token (EKS IRSA), container credentials (ECS, EKS Pod Identity), a shared credentials or config file, or the EC2
    instance metadata service (asked once, 1 s at most, unless AWS_EC2_METADATA_DISABLED=true)."""
    import urllib.request

    env = os.environ
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        return "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
    if env.get("AWS_WEB_IDENTITY_TOKEN_FILE") and env.get("AWS_ROLE_ARN"):
        return "AWS_WEB_IDENTITY_TOKEN_FILE"
    if env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") or env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        return "the container credentials endpoint"
    for var, default in (("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"), ("AWS_CONFIG_FILE", "~/.aws/config")):
        path = os.path.expanduser(env.get(var) or default)
        if os.path.isfile(path):
            return f"{path} (profile {env.get('AWS_PROFILE', 'default')})"
    if env.get("AWS_EC2_METADATA_DISABLED", "").lower() != "true":
        imds = env.get("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://169.254.169.254").rstrip("/")
        ask = urllib.request.Request(imds + "/latest/api/token", method="PUT",
                                     headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
        try:
            with urllib.request.urlopen(ask, timeout=1):
                return "the EC2 instance metadata service"
        except Exception:
            pass
    return ""


def check_store(setting: str, uri: str, folder: str = "") -> None:
    """Refuse an object-store ``uri`` (the value of ``setting``, e.g. ``dist.storage_path`` or ``out``) this machine
    cannot write, before any work starts: a query string (the endpoint and credentials come from the environment
    only), no AWS credentials anywhere the AWS SDK looks, or a test object (:data:`STORAGE_PROBE` in ``folder``,
    default ``uri``) that cannot be written and deleted (a wrong bucket, an unreachable endpoint, refused credentials:
    one attempt, short timeouts). One :class:`StoreAccessError` sentence naming the URI and what was tried. A local
    path passes (the jobs check folders where they parse their paths)."""
    if not is_uri(uri):
        return
    if "?" in uri:
        raise StoreAccessError(f"{setting} {uri} has a query string; give the bare URI (s3://bucket/path) and set "
                               f"an S3-compatible endpoint with AWS_ENDPOINT_URL_S3 and the credentials with "
                               f"AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the environment.")
    s3 = uri.startswith("s3://")
    source = _aws_credentials() if s3 else ""
    if s3 and not source:
        raise StoreAccessError(f"{setting} {uri} needs AWS credentials and none were found (tried "
                               f"AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_WEB_IDENTITY_TOKEN_FILE, container "
                               f"credentials, ~/.aws/credentials and ~/.aws/config, the EC2 instance metadata "
                               f"service); set them in the environment of this driver and of every Ray node.")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
    how = (f"through {endpoint} with credentials from {source}" if s3 else
           f"through pyarrow's {uri.split('://')[0]}:// file system with its default credentials")
    probe = (folder or uri).rstrip("/") + "/" + STORAGE_PROBE
    try:
        fs, path = filesystem(probe, quick=True)
        with fs.open_output_stream(path) as f:
            f.write(b"ok")
        fs.delete_file(path)
    except Exception as e:  # pyarrow's OSError / ArrowInvalid, whatever the SDK said
        text = str(e)
        reason = ("its bucket does not exist" if "NO_SUCH_BUCKET" in text else
                  f"the endpoint did not answer within {STORAGE_CHECK_TIMEOUT_S:g} s" if "curlCode: 28" in text else
                  "the endpoint could not be reached" if "NETWORK_CONNECTION" in text or "curlCode" in text else
                  "access was denied" if re.search(r"ACCESS_DENIED|INVALID_ACCESS_KEY|SIGNATURE|\b403\b", text)
                  else text.splitlines()[0][:200] if text else type(e).__name__)
        raise StoreAccessError(f"{setting} {uri} is not usable: {reason} (tried writing and deleting {probe} "
                               f"{how}).") from None


# ------------------------------------------------------------------------------------- whole files in a folder or store
def absolute(path: str) -> str:
    """A URI as it is (less a trailing ``/``); a local path with ``~`` expanded, made absolute (what a Ray worker
    with another working directory must be given)."""
    path = os.fspath(path)
    return path.rstrip("/") if is_uri(path) else os.path.abspath(os.path.expanduser(path))


def staging_dir(uri: str) -> str:
    """This machine's own folder for a URI's writer (``<tmp>/ideal-ray-staging/<hash of the URI>``, made if
    missing): where it writes a file whole before uploading it, keeps its lock and a log. Standard library only."""
    import hashlib
    import tempfile

    key = hashlib.sha256(absolute(uri).encode()).hexdigest()[:16]
    folder = os.path.join(tempfile.gettempdir(), "ideal-ray-staging", key)
    os.makedirs(folder, exist_ok=True)
    return folder


def file_size(fs, path: str):
    """The size of the file ``path`` of ``fs``, or None when there is none (nothing there, or a folder)."""
    import pyarrow.fs

    info = fs.get_file_info(path)
    return info.size if info.type == pyarrow.fs.FileType.File else None


def list_files(fs, path: str, recursive: bool = False) -> dict:
    """``{name: size}`` of the files directly in folder ``path`` of ``fs`` (an object store's keys one level below
    the prefix); ``{}`` when there is no such folder. ``recursive``: every file below ``path``, named by its path
    relative to ``path`` (``/``-separated; one paginated listing on an object store)."""
    import pyarrow.fs

    infos = fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=recursive, allow_not_found=True))
    base = path.rstrip("/") + "/"
    return {(i.path[len(base):] if recursive else i.base_name): i.size for i in infos
            if i.type == pyarrow.fs.FileType.File}


def read_bytes(fs, path: str) -> bytes:
    """The whole content of file ``path`` of ``fs``."""
    with fs.open_input_stream(path) as f:
        return f.read()


def upload_bytes(fs, path: str, data: bytes) -> None:
    """Store ``data`` as object ``path`` with one write to one output stream. An object store shows an object only
    once its upload completes: a writer killed midway leaves no object (and any older object under the key stays
    as it was); a single write call means no interrupt can land between two parts of it and close a partial upload.
    The stored size is checked afterwards (a mismatch deletes the object and raises OSError)."""
    with fs.open_output_stream(path) as f:
        f.write(data)
    size = file_size(fs, path)
    if size != len(data):
        fs.delete_file(path)
        raise OSError(f"the upload of {path} stored {size} of {len(data)} bytes; it was deleted, rerun to redo it.")


def upload_file(local: str, fs, path: str) -> int:
    """Upload the finished local file ``local`` to ``path`` of ``fs`` whole (:func:`upload_bytes`); returns its
    size."""
    with open(local, "rb") as f:
        data = f.read()
    upload_bytes(fs, path, data)
    return len(data)


def glob_names(names, pattern: str) -> list:
    """The ``names`` (of one folder's listing) that ``pattern`` matches as ``glob.glob`` would: hidden names (a
    leading ``.``) never match ``*``; sorted."""
    import fnmatch

    return fnmatch.filter(sorted(n for n in names if not n.startswith(".")), pattern)


# ------------------------------------------------------------------------------------- a dataset's files in a store
class StorePath:
    """A file or folder under an object-store URI (``s3://bucket/imagenet/train``) with the part of
    :class:`pathlib.Path` that listing an image source uses (``/``, ``name``, ``suffix``, ``is_dir``, ``is_file``,
    ``glob``, ``read_text``, plus ``scandir`` and ``open_input_file``), so one listing code reads a local folder and a
    bucket. ``str()`` is the URI; ``path`` and ``fs`` are the pyarrow file system's path (``bucket/imagenet/train``)
    and file system (:func:`filesystem`: endpoint and credentials from the environment).

    Paths made from one another with ``/`` share what was listed: the first :meth:`scandir` of a folder lists it and
    everything below it with one (paginated) recursive listing, and every folder under it is then answered from that
    listing, so listing a split of 1,000 class folders is one listing call, not one request per folder or file. A
    single ``is_dir`` / ``is_file`` outside a listed folder is one request. The listing is a snapshot: a dataset is
    listed once, before it is read."""

    def __init__(self, uri: str, _tree: "_StoreTree | None" = None, _path: str = "") -> None:
        if _tree is None:
            if not is_uri(uri):
                raise ValueError(f"{uri} is not an object-store URI (scheme://bucket/key).")
            if "?" in uri:
                raise ValueError(f"{uri} carries a query string; pass the bare URI, the endpoint and credentials come "
                                 f"from the environment (AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, ...).")
            fs, path = filesystem(uri)
            _tree, _path = _StoreTree(fs, uri[:uri.index("://") + 3]), path.rstrip("/")
        self._tree, self.path = _tree, _path

    @property
    def fs(self):
        return self._tree.fs

    def __str__(self) -> str:
        return self._tree.scheme + self.path

    def __repr__(self) -> str:
        return f"StorePath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StorePath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __truediv__(self, part: "str | os.PathLike") -> "StorePath":
        path = posixpath.normpath(posixpath.join(self.path, os.fspath(part).lstrip("/")))
        return StorePath("", self._tree, path)

    def expanduser(self) -> "StorePath":
        return self

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1]

    @property
    def parent(self) -> "StorePath":
        return StorePath("", self._tree, posixpath.dirname(self.path))

    def is_dir(self) -> bool:
        return self._tree.type_of(self.path, str(self)) == "dir"

    def is_file(self) -> bool:
        return self._tree.type_of(self.path, str(self)) == "file"

    def exists(self) -> bool:
        return self._tree.type_of(self.path, str(self)) != ""

    def scandir(self) -> "list[_StoreEntry]":
        """The entries directly in this folder (like ``os.scandir``: ``name``, ``is_dir()``, ``is_file()``), from
        the recursive listing of the nearest folder already scanned, or of this one."""
        return [_StoreEntry(name, kind) for name, kind in self._tree.children(self.path, str(self)).items()]

    def glob(self, pattern: str) -> "list[StorePath]":
        """The entries directly in this folder whose name matches ``pattern`` (one level: ``*.tar``)."""
        import fnmatch

        return [self / e.name for e in self.scandir() if fnmatch.fnmatchcase(e.name, pattern)]

    def open_input_file(self):
        """A seekable pyarrow input file of this object (``read_at(size, offset)``: one ranged read)."""
        return self._tree.ask(str(self), lambda: self.fs.open_input_file(self.path))

    def read_bytes(self) -> bytes:
        return self._tree.ask(str(self), lambda: read_bytes(self.fs, self.path))

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)


class _StoreEntry:
    """One entry of :meth:`StorePath.scandir` (the part of ``os.DirEntry`` a listing uses)."""

    def __init__(self, name: str, kind: str) -> None:
        self.name, self._kind = name, kind

    def is_dir(self) -> bool:
        return self._kind == "dir"

    def is_file(self) -> bool:
        return self._kind == "file"


class _StoreTree:
    """What the :class:`StorePath` objects of one URI share: the file system, the URI's scheme, and the folders
    listed so far (folder path -> {name: "file" | "dir"})."""

    def __init__(self, fs, scheme: str) -> None:
        self.fs, self.scheme = fs, scheme
        self._listed: dict[str, dict[str, str]] = {}
        self._types: dict[str, str] = {}  # path -> type, of single requests

    def ask(self, uri: str, request):
        """``request()``; a store error other than "not found" becomes one :class:`StoreAccessError` naming ``uri``."""
        try:
            return request()
        except FileNotFoundError:
            raise
        except OSError as e:
            if isinstance(e, InputError):
                raise
            raise StoreAccessError(f"cannot read {uri} from the object store ({e}); check the URI, the endpoint and "
                                   f"the credentials in the environment (AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, "
                                   f"...).") from e

    def type_of(self, path: str, uri: str) -> str:
        """``"file"``, ``"dir"`` or ``""`` (nothing there) of ``path``."""
        parent, name = posixpath.split(path)
        if parent in self._listed:
            return self._listed[parent].get(name, "")
        if path not in self._types:
            self._types[path] = _kind(self.ask(uri, lambda: self.fs.get_file_info(path)).type)
        return self._types[path]

    def children(self, path: str, uri: str) -> dict[str, str]:
        """{name: kind} of the entries directly in folder ``path`` ({} when there is none)."""
        import pyarrow.fs

        if path not in self._listed:
            selector = pyarrow.fs.FileSelector(path, recursive=True, allow_not_found=True)
            listed: dict[str, dict[str, str]] = {path: {}}
            for info in self.ask(uri, lambda: self.fs.get_file_info(selector)):
                kind = _kind(info.type)
                if not kind:
                    continue
                parent, name = posixpath.split(info.path.rstrip("/"))
                listed.setdefault(parent, {})[name] = kind
                if kind == "dir":
                    listed.setdefault(info.path.rstrip("/"), {})
            self._listed.update(listed)
        return self._listed[path]


def _kind(file_type) -> str:
    """``"file"``, ``"dir"`` or ``""`` (nothing there, or another kind) of a pyarrow ``FileType``."""
    import pyarrow.fs

    return ("file" if file_type == pyarrow.fs.FileType.File
            else "dir" if file_type == pyarrow.fs.FileType.Directory else "")
