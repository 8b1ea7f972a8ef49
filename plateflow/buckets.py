"""Buckets through fsspec: a folder or any fsspec URL (``s3://``, ``gs://``, ``az://``,
``file://``) as a place to list and read (ingest) or to write (tiles).

- **Credentials** come from the environment (what s3fs, gcsfs and adlfs read themselves:
  ``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ``GOOGLE_APPLICATION_CREDENTIALS``,
  ``AZURE_STORAGE_CONNECTION_STRING`` …) or from a Prefect block named by its slug
  (``s3-bucket/scans``, ``aws-credentials/lab``, ``minio-credentials/lab``, ``gcs-bucket/scans``,
  ``gcp-credentials/lab``; the blocks of prefect-aws and prefect-gcp). They are handed to the
  filesystem only: never logged, never written, never part of a URL or an error message.
- **No partial object is ever visible.** Object stores show an object only once its upload is
  complete (an S3 PUT, or a multipart upload that s3fs completes only on success and aborts on
  an error; a GCS upload is finalised at its end; an Azure blob's blocks are committed at its
  end), so ``put`` uploads straight to the name. A local folder gets plateflow's atomic write
  (temp file, then rename); any other filesystem gets a temp name, then a move.
- Nothing here deletes or changes a source: a ``Location`` used for reading only lists and reads.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

from plateflow.atomic import temp_file, write_bytes, write_bytes_if_changed
from plateflow.errors import ConfigError
from plateflow.layout import natural_key

# Protocols whose objects appear only whole, once their upload completes.
WHOLE_OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl"}


def is_url(source: str | os.PathLike) -> bool:
    """True for an fsspec URL other than a plain path (``file://`` included)."""
    return isinstance(source, str) and "://" in source


# botocore's: a connection refused or a silent endpoint is given up on after about half a minute.
S3_TIMEOUTS = {"connect_timeout": 5, "read_timeout": 30, "retries": {"max_attempts": 2, "mode": "standard"}}


def storage_options(credentials_block: str | None) -> dict[str, Any]:
    """The filesystem options a Prefect credentials block gives (empty without one: the
    environment's credentials, which the filesystems read themselves)."""
    if not credentials_block:
        return {}
    block = _load_block(credentials_block)
    creds = getattr(block, "credentials", None) or getattr(block, "gcp_credentials", None) or block
    kind = type(creds).__name__
    if kind == "AwsCredentials":
        secret = creds.aws_secret_access_key
        options: dict[str, Any] = {"key": creds.aws_access_key_id,
                                   "secret": secret.get_secret_value() if secret else None,
                                   "token": creds.aws_session_token, "profile": creds.profile_name}
        return _s3_client(options, creds)
    if kind == "MinIOCredentials":
        return _s3_client({"key": creds.minio_root_user, "secret": creds.minio_root_password.get_secret_value()}, creds)
    if kind == "GcpCredentials":
        info = creds.service_account_info
        token = info.get_secret_value() if info else (str(creds.service_account_file) if creds.service_account_file else None)
        return {k: v for k, v in {"token": token, "project": creds.project}.items() if v is not None}
    raise ConfigError(f"block {credentials_block!r} is a {type(block).__name__}: plateflow takes credentials from "
                      f"s3-bucket, aws-credentials, minio-credentials, gcs-bucket or gcp-credentials blocks")


def _s3_client(options: dict, creds) -> dict[str, Any]:
    params = creds.aws_client_parameters
    client = {k: v for k, v in {"region_name": creds.region_name, "endpoint_url": params.endpoint_url,
                                "verify": params.verify}.items() if v is not None}
    options = {k: v for k, v in options.items() if v is not None}
    return {**options, "client_kwargs": client} if client else options


def _load_block(slug: str):
    if slug.count("/") != 1:
        raise ConfigError(f"credentials block {slug!r}: give it as <block-type>/<name>, e.g. s3-bucket/scans")
    for module in ("prefect_aws", "prefect_gcp"):  # registers their block types
        with contextlib.suppress(ImportError):
            __import__(module)
    from prefect.blocks.core import Block

    try:
        return Block.load(slug)
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"credentials block {slug!r} cannot be loaded: {exc}") from None


@dataclass(frozen=True)
class RemoteFile:
    """One object of a listing: where it is, its size and time, and its URL for messages."""

    location: "Location"
    path: str
    size: int
    mtime_ns: int | None

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def url(self) -> str:
        return self.location.url_of(self.path)

    def read(self) -> bytes:
        """The object's bytes; ``FileNotFoundError`` if it went away since it was listed."""
        return self.location.fs.cat_file(self.path)


class Location:
    """A folder or fsspec URL, opened with its credentials."""

    def __init__(self, url: str | os.PathLike, credentials_block: str | None = None):
        url = os.fspath(url)
        options = storage_options(credentials_block) if is_url(url) else {}
        if url.split("://", 1)[0] in ("s3", "s3a"):  # a dead endpoint fails in seconds, not after minutes of retries
            options.setdefault("config_kwargs", S3_TIMEOUTS)
        try:
            self.fs, self.path = fsspec.core.url_to_fs(url, **options)
        except (ImportError, ValueError) as exc:  # an unknown protocol, or its package is not installed
            raise ConfigError(f"cannot open {url}: {exc}") from None
        self.path = self.path.rstrip("/") or self.path
        self.protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self.local = Path(self.path) if isinstance(self.fs, LocalFileSystem) else None
        self.url = os.fspath(self.local) if self.local is not None else f"{self.protocol}://{self.path}"

    def url_of(self, path: str) -> str:
        return path if self.local is not None else f"{self.protocol}://{path}"

    def join(self, name: str) -> str:
        return f"{self.path}/{name}"

    # -- reading -------------------------------------------------------------------------------

    def walk_files(self) -> Iterator[RemoteFile]:
        """Every object under the location (or the object it names), in natural order; hidden
        names (a component starting with a dot) left out."""
        found = self.fs.find(self.path, detail=True)
        for path in sorted(found, key=lambda p: natural_key(p)):
            info = found[path]
            rel = path[len(self.path):].lstrip("/") if path != self.path else self.path.rsplit("/", 1)[-1]
            if info.get("type") == "directory" or any(part.startswith(".") for part in rel.split("/")):
                continue
            yield RemoteFile(self, path, int(info.get("size") or 0), _mtime_ns(info))

    def read_bytes(self, name: str) -> bytes | None:
        """The bytes of ``name`` under the location, or None if there is no such object."""
        try:
            return self.fs.cat_file(self.join(name))
        except FileNotFoundError:
            return None

    # -- writing -------------------------------------------------------------------------------

    def _upload(self, name: str, send) -> None:
        """``send(remote_path)`` uploads to the bucket: straight to ``name`` on an object store,
        which shows an object only whole; elsewhere to a temp name, then a move."""
        if self.protocol in WHOLE_OBJECT_STORES:
            send(self.join(name))
            return
        tmp = self.join(f".{name}.partial")
        send(tmp)
        self.fs.mv(tmp, self.join(name))

    @contextlib.contextmanager
    def writing(self, name: str, staging: Path) -> Iterator[Any]:
        """A binary file to fill; on a clean exit it becomes ``name`` whole, on an error nothing
        is left. A bucket's object is staged in a local temp file under ``staging`` first."""
        target = self.local / name if self.local is not None else Path(staging) / name
        with temp_file(target) as (fd, tmp), open(os.dup(fd), "wb") as fh:
            yield fh
            fh.flush()
            if self.local is None:
                self._upload(name, lambda path: self.fs.put_file(os.fspath(tmp), path))
        if self.local is None:
            target.unlink(missing_ok=True)

    def abort_stale_uploads(self, started_before: float) -> int:
        """Abort the multipart uploads under the location that began before ``started_before``
        (a UNIX time): what a killed run leaves, invisible but billed. S3 only; their number."""
        if self.protocol not in ("s3", "s3a"):
            return 0
        bucket, _, prefix = self.path.partition("/")
        aborted = 0
        for upload in self.fs.list_multipart_uploads(bucket):
            initiated = upload.get("Initiated")
            if (upload["Key"].startswith(prefix + "/" if prefix else "") and initiated is not None
                    and initiated.timestamp() < started_before):
                self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                aborted += 1
        return aborted

    def put_bytes(self, name: str, data: bytes) -> None:
        if self.local is not None:
            write_bytes(self.local / name, data)
        else:
            self._upload(name, lambda path: self.fs.pipe_file(path, data))

    def put_bytes_if_changed(self, name: str, data: bytes) -> bool:
        if self.local is not None:
            return write_bytes_if_changed(self.local / name, data)
        if self.read_bytes(name) == data:
            return False
        self.put_bytes(name, data)
        return True

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.join(name))

    def names(self) -> set[str]:
        """The names of the objects directly under the location."""
        try:
            return {p.rsplit("/", 1)[-1] for p in self.fs.ls(self.path, detail=False)}
        except FileNotFoundError:
            return set()


def _mtime_ns(info: dict) -> int | None:
    t = info.get("LastModified") or info.get("mtime") or info.get("updated") or info.get("last_modified")
    if t is None:
        return None
    if isinstance(t, (int, float)):
        return int(t * 1e9)
    if isinstance(t, str):
        from datetime import datetime

        with contextlib.suppress(ValueError):
            t = datetime.fromisoformat(t.replace("Z", "+00:00"))
    return int(t.timestamp() * 1e9) if hasattr(t, "timestamp") else None
