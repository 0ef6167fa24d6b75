"""The one way to reach a path or an object-store URI: a local or NFS path, or ``s3://`` / ``gs://`` through pyarrow
file systems. Run folders (``dist.storage_path``), image sources, token shards and their manifests all go through
:func:`filesystem`, so a stage reads and writes a bucket exactly as it does a folder.

An S3 URI takes its endpoint, region and credentials from the environment, as the AWS SDK does; a URI never carries
them. Standard library at import time (pyarrow is imported by the functions): every layer may import it.
"""
from __future__ import annotations

import os
import posixpath
from datetime import timedelta

STORAGE_CHECK_TIMEOUT_S = 5.0  # how long a quick file system waits for an answer to one request (one attempt)


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
