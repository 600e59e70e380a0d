"""Whole-object writes on local disk, as object stores give them.

GCS and S3 replace an object atomically: a reader sees the old bytes or the new
ones, never a part.  cloud-files writes ``file://`` objects in place (truncate,
then write), so a writer killed in between leaves a torn or empty file, and a
block or done marker that a redelivery then trusts.  :func:`install` makes every
``file://`` write of cloud-files (and so of cloud-volume) go to a temporary name
in the same folder, then ``os.replace`` it over the target: atomic on POSIX file
systems.  A writer killed before the rename leaves only a temporary file, which
:func:`sweep_temporaries` removes once the job is finished.

cloud-files has no hook for this, so its one method is replaced here, once, when
``chunk_ops`` is imported; ``tests/chunk_ops/test_reliability.py`` checks it.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

from cloudfiles import interfaces

TEMPORARY = re.compile(r"\.tmp-\d+-[0-9a-f]{8}$")


def _temporary_name(path: str) -> str:
    return f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _write_atomically(path: str, content) -> None:
    tmp = _temporary_name(path)
    try:
        try:
            f = open(tmp, "wb")
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            f = open(tmp, "wb")
        with f:
            if hasattr(content, "read"):
                shutil.copyfileobj(content, f)
            else:
                f.write(content)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _put_file(self, file_path, content, content_type, compress, cache_control=None, storage_class=None):
    """cloud-files' ``FileInterface.put_file``, with a temporary name and a rename."""
    path = self.get_path_to_file(file_path)
    lock_path = path
    extension = self.get_extension(compress)
    if os.path.splitext(path)[1] != extension:
        path += extension
    if isinstance(content, str) and content_type and re.search("json|te?xt", content_type):
        content = content.encode("utf-8")
    return self.io_with_lock(lambda: _write_atomically(path, content), lock_path, exclusive=True)


def install() -> None:
    if interfaces.FileInterface.put_file is not _put_file:
        interfaces.FileInterface.put_file = _put_file


def sweep_temporaries(folder: str | Path) -> int:
    """Remove the temporary files that killed writers left under a local folder."""
    removed = 0
    for root, _, names in os.walk(folder):
        for name in names:
            if TEMPORARY.search(name):
                try:
                    os.unlink(os.path.join(root, name))
                    removed += 1
                except FileNotFoundError:
                    pass
    return removed


def files_at(url: str, **options) -> "CloudFiles":
    """cloud-files at ``url``, with no thread pool on local disk: a ``puts`` of several files
    starts one (20 threads) per call, about 100 ms, and threads gain nothing there."""
    from cloudfiles import CloudFiles

    if local_path(url) is not None:
        options.setdefault("num_threads", 0)
    return CloudFiles(url, **options)


def get_all(files: "CloudFiles", names: list[str]) -> dict[str, bytes | None]:
    """The contents of several files by name (None: missing).  On local disk one by one:
    cloud-files' ``get`` of a list runs a one-thread pool there, about 100 ms a call."""
    if files.protocol == "file":
        return {name: files.get(name) for name in names}
    return {r["path"]: r["content"] for r in files.get(names)} if names else {}


def exists_all(files: "CloudFiles", names: list[str]) -> dict[str, bool]:
    """Whether each file exists; one by one on local disk, as :func:`get_all`."""
    if files.protocol == "file":
        return {name: files.exists(name) for name in names}
    return dict(files.exists(names)) if names else {}


def list_folder(files: "CloudFiles", prefix: str) -> list[str]:
    """The names directly in folder ``prefix`` (no deeper); none if it does not exist yet
    (cloud-files' flat listing of a missing local folder raises)."""
    try:
        return list(files.list(prefix=prefix, flat=True))
    except FileNotFoundError:
        return []


def local_path(url: str) -> Path | None:
    """The folder of a ``file://`` URL (or plain path); None for object stores."""
    if url.startswith("file://"):
        return Path(url[len("file://"):])
    if "://" not in url:
        return Path(url)
    return None


class StorageError(ValueError):
    """A location cannot be used: no credentials, no permission, not a folder."""


def describe_cloud_error(error: BaseException) -> str:
    """One line saying why a storage or AWS call failed, with what to set for the usual causes."""
    name = type(error).__name__
    if name == "NoCredentialsError":
        return ("no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile, "
                "or ~/.cloudvolume/secrets/aws-secret.json)")
    if name == "NoRegionError":
        return "no AWS region set (set AWS_DEFAULT_REGION, e.g. us-east-1)"
    if name == "DefaultCredentialsError":
        return ("no Google Cloud credentials found (set GOOGLE_APPLICATION_CREDENTIALS "
                "or ~/.cloudvolume/secrets/google-secret.json)")
    if name == "EndpointConnectionError":
        return f"cannot reach the endpoint: {error}"
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}" + (f": {error.filename}" if error.filename else "")
    code = getattr(error, "response", {}).get("Error", {}).get("Code") if hasattr(error, "response") else None
    if code in {"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"}:
        return f"access denied ({code})"
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{name}: {first}" if first else name


def probe_writable(url: str, *, what: str) -> None:
    """Write and remove a small object at ``url``: can this job write there?

    Raises :class:`StorageError` naming ``what`` and ``url``.  Leaves nothing behind: on
    local disk the probe goes to the nearest folder that exists (no folders are made).
    """
    folder = local_path(url)
    if folder is not None:
        existing = folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise StorageError(f"{what} {url} cannot be written: {existing} is a file, not a folder")
        try:
            fd, probe = tempfile.mkstemp(prefix=".chunk_ops-probe-", dir=existing)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise StorageError(f"{what} {url} cannot be written: {e.strerror or e} (in {existing})") from None
        return
    from cloudfiles import CloudFiles

    name = f".chunk_ops-probe-{uuid.uuid4().hex[:8]}"
    try:
        files = CloudFiles(url)
        files.put(name, b"probe", compress=None)
        files.delete(name)
    except Exception as e:  # credentials, permissions, a bucket that does not exist
        raise StorageError(f"{what} {url} cannot be written: {describe_cloud_error(e)}") from None


install()
