"""The one place that resolves ``s3://`` URIs and local paths into pyarrow filesystems.

Everything that reads or writes goes through :func:`resolve`; no other module branches on the
URI scheme. pyarrow's S3 filesystem is used (not s3fs) because inside Ray Data it measured
1.5-2.4x faster here for the same reads and writes, and it pickles cleanly to workers.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import posixpath
import tempfile
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from pydantic import Field

from curation.config_fields import Section, Text, ranged

S3_SCHEME = "s3://"

log = logging.getLogger(__name__)


class StorageConfig(Section):
    """S3-compatible storage. Unset fields fall back to the standard AWS environment variables
    (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``).
    Secrets are never logged nor written to ``run.json``.

    Attributes:
        max_attempts: tries per S3 request (the AWS standard retry mode: exponential backoff
            with jitter on throttling -- 503 SlowDown --, 5xx and dropped connections).
    """

    endpoint_url: Text | None = None
    region: Text | None = None
    access_key_id: Text | None = Field(None, repr=False)
    secret_access_key: Text | None = Field(None, repr=False)
    max_attempts: int = ranged(10, 1, 100)


class StorageError(OSError):
    """A read, write or listing failed; the message names the URI."""


def is_s3(uri: str) -> bool:
    return uri.startswith(S3_SCHEME)


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    return value or None


@dataclass(frozen=True)
class S3Settings:
    """Endpoint, region and credentials: the ``storage`` keys first, then the ``AWS_*``
    environment (the one place these fallbacks live; both S3 clients are built from it)."""

    endpoint: str | None
    region: str
    access_key: str | None
    secret_key: str | None
    session_token: str | None

    @classmethod
    def of(cls, storage: StorageConfig) -> "S3Settings":
        return cls(endpoint=storage.endpoint_url or _env("AWS_ENDPOINT_URL_S3") or _env("AWS_ENDPOINT_URL"),
                   region=storage.region or _env("AWS_REGION") or _env("AWS_DEFAULT_REGION") or "us-east-1",
                   access_key=storage.access_key_id or _env("AWS_ACCESS_KEY_ID"),
                   secret_key=storage.secret_access_key or _env("AWS_SECRET_ACCESS_KEY"),
                   session_token=_env("AWS_SESSION_TOKEN"))

    def __repr__(self) -> str:  # never print the secrets
        return f"S3Settings(endpoint={self.endpoint!r}, region={self.region!r})"


def make_s3_filesystem(storage: StorageConfig) -> pafs.S3FileSystem:
    """Build a pyarrow S3 filesystem from config, falling back to AWS_* environment variables."""
    settings = S3Settings.of(storage)
    endpoint = settings.endpoint
    kwargs: dict = {"region": settings.region}
    if settings.access_key and settings.secret_key:
        kwargs["access_key"] = settings.access_key
        kwargs["secret_key"] = settings.secret_key
        if settings.session_token:
            kwargs["session_token"] = settings.session_token
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme or "https"
    # Fail fast instead of retrying an unreachable endpoint for minutes.
    kwargs["connect_timeout"] = 5
    kwargs["request_timeout"] = 60
    kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=storage.max_attempts)
    return pafs.S3FileSystem(**kwargs)


@dataclass(frozen=True)
class Location:
    """A resolved URI: the filesystem, the path inside it, and the URI as the user wrote it."""

    filesystem: pafs.FileSystem
    path: str
    uri: str

    def child(self, *parts: str) -> "Location":
        path = posixpath.join(self.path, *parts)
        return Location(self.filesystem, path, to_uri(self.filesystem, path))

    @property
    def local_path(self) -> str | None:
        """The path on this machine's disk, for libraries that read files themselves (None on S3)."""
        return self.path if isinstance(self.filesystem, pafs.LocalFileSystem) else None


def to_uri(filesystem: pafs.FileSystem, path: str) -> str:
    """Full URI of ``path`` on ``filesystem`` (``s3://bucket/key`` or an absolute local path)."""
    if isinstance(filesystem, pafs.S3FileSystem):
        return S3_SCHEME + path.lstrip("/")
    return path


def resolve(uri: str, storage: StorageConfig | None = None) -> Location:
    """Resolve ``uri`` (``s3://bucket/key`` or a local path) to a :class:`Location`."""
    return Resolver(storage).resolve(uri)


def read_bytes(location: Location) -> bytes:
    with location.filesystem.open_input_stream(location.path) as fh:
        return fh.read()


def write_bytes(location: Location, data: bytes) -> None:
    parent = posixpath.dirname(location.path)
    if parent:
        location.filesystem.create_dir(parent, recursive=True)
    with location.filesystem.open_output_stream(location.path) as fh:
        fh.write(data)


def write_bytes_atomic(location: Location, data: bytes) -> None:
    """Write ``data`` so that ``location`` holds either its old content or all of ``data``, never
    a part: a temporary sibling renamed over it on a local disk (an S3 PUT is already atomic)."""
    if location.local_path is None:
        write_bytes(location, data)
        return
    parent = os.path.dirname(location.path) or "."
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(location.path)}.", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make the output private
        os.replace(tmp, location.path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@dataclass(frozen=True)
class ListedFile:
    """One file found by :func:`list_files`.

    Attributes:
        path: the path inside its filesystem (a name that is not valid UTF-8 is spelled with
            ``\\xNN`` escapes: it names no readable object).
        size / mtime_ns: from the listing (None when unknown); they change when it is rewritten.
        problem: None for a regular file that can be read; otherwise why it cannot be an input,
            phrased as a ``rejected`` reason.
    """

    path: str
    size: int | None = None
    mtime_ns: int | None = None
    problem: str | None = None

    @property
    def base_name(self) -> str:
        return posixpath.basename(self.path)


def list_files(location: Location, *, follow_symlinks: bool = False) -> list[ListedFile]:
    """Recursively list the files under a folder or prefix, sorted by path.

    On a local folder, links to files are listed as files; a broken link, a FIFO, socket or
    device, and a name that is not valid UTF-8 are listed with their ``problem`` (inputs that
    cannot be read, never silently left out). Links to directories are not followed unless
    ``follow_symlinks``; then each real directory is listed once (loops end) and a link to the
    folder itself or above it is not followed.
    """
    try:
        if isinstance(location.filesystem, pafs.LocalFileSystem):
            listed = _list_local(location, follow_symlinks)
        else:
            infos = location.filesystem.get_file_info(pafs.FileSelector(location.path, recursive=True))
            listed = [ListedFile(i.path, i.size, i.mtime_ns) for i in infos if i.type == pafs.FileType.File]
    except (OSError, pa.ArrowException) as exc:
        raise StorageError(f"{location.uri}: cannot list ({exc})") from exc
    listed.sort(key=lambda f: f.path)
    return listed


def _list_local(location: Location, follow_symlinks: bool) -> list[ListedFile]:
    paths = _walk_local(location.path, follow_symlinks)
    readable, listed = [], []
    for path in paths:
        try:
            path.encode("utf-8")
            readable.append(path)
        except UnicodeEncodeError:
            escaped = path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            listed.append(ListedFile(escaped, problem="not a plain name: not valid UTF-8"))
    for info in location.filesystem.get_file_info(readable) if readable else []:
        if info.type == pafs.FileType.File:
            listed.append(ListedFile(info.path, info.size, info.mtime_ns))
        elif info.type == pafs.FileType.NotFound:
            listed.append(ListedFile(info.path, problem="missing: a broken symbolic link"))
        else:
            listed.append(ListedFile(info.path, problem="not an image: not a regular file (a FIFO, socket or device)"))
    return listed


def _walk_local(root: str, follow_symlinks: bool) -> list[str]:
    """Paths of the files (and file links, broken links) under ``root``. Plain folders are
    walked first and links to folders afterwards, so a folder reachable both ways is listed
    under its own path."""
    real_root = os.path.realpath(root)
    seen = {real_root}
    files: list[str] = []
    links: list[str] = []  # links to directories, in the order met
    not_followed: list[str] = []

    def walk(top: str) -> None:
        stack = [top]
        while stack:
            folder = stack.pop()
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
            folders = []
            for entry in entries:
                if not entry.is_dir():  # a file, a link to one, a broken link, a socket...
                    files.append(entry.path)
                elif entry.is_symlink():
                    links.append(entry.path)
                else:
                    seen.add(os.path.realpath(entry.path))
                    folders.append(entry.path)
            stack.extend(reversed(folders))

    walk(root)
    while links:
        link = links.pop(0)
        real = os.path.realpath(link)
        above = real_root.startswith(real.rstrip(os.sep) + os.sep)
        if not follow_symlinks or above or real in seen:
            not_followed.append(link)
            continue
        seen.add(real)
        walk(link)
    if not_followed:
        why = ("input.follow_symlinks is false" if not follow_symlinks
               else "each points at a folder listed already, or at the input root or above it")
        log.warning("%s: %d link(s) to directories not followed (%s): %s", root, len(not_followed), why,
                    ", ".join(os.path.relpath(p, root) for p in not_followed[:5])
                    + (" ..." if len(not_followed) > 5 else ""))
    return files


def check_readable(location: Location, *, want: str) -> None:
    """Raise :class:`StorageError` unless ``location`` exists as ``want`` ('file' or 'dir')."""
    try:
        info = location.filesystem.get_file_info(location.path)
    except (OSError, pa.ArrowException) as exc:
        raise StorageError(f"{location.uri}: unreachable ({exc})") from exc
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{location.uri}: does not exist")
    if want == "file" and info.type != pafs.FileType.File:
        raise StorageError(f"{location.uri}: expected a file, found a folder")
    if want == "dir" and info.type != pafs.FileType.Directory:
        raise StorageError(f"{location.uri}: expected a folder or prefix, found a file")


def open_text(location: Location) -> io.StringIO:
    return io.StringIO(read_bytes(location).decode("utf-8-sig"))


class Resolver:
    """Resolves many URIs with one S3 filesystem per storage config (clients are costly to build).

    Picklable: the S3 filesystem is built lazily in each process that uses it.
    """

    def __init__(self, storage: StorageConfig | None = None):
        self.storage = storage or StorageConfig()
        self._s3: pafs.S3FileSystem | None = None

    def __getstate__(self):
        return {"storage": self.storage, "_s3": None}

    def resolve(self, uri: str) -> Location:
        """``s3://bucket/key`` or a local path (made absolute) as a :class:`Location`."""
        if not uri:
            raise StorageError("empty URI")
        if is_s3(uri):
            path = uri[len(S3_SCHEME):].rstrip("/")
            if not path:
                raise StorageError(f"{uri}: no bucket in S3 URI")
            if self._s3 is None:
                self._s3 = make_s3_filesystem(self.storage)
            return Location(self._s3, path, S3_SCHEME + path)
        if "://" in uri:
            raise StorageError(f"{uri}: unsupported scheme (expected s3:// or a local path)")
        path = os.path.abspath(os.path.expanduser(uri))
        return Location(pafs.LocalFileSystem(), path, path)


class PreconditionFailed(StorageError):
    """A conditional write found the object changed since it was read."""


def read_tagged(location: Location, storage: StorageConfig | None = None) -> tuple[bytes | None, str | None]:
    """An object's bytes and a tag that changes whenever it is rewritten (the S3 ETag; a content
    hash locally); ``(None, None)`` when it does not exist."""
    if isinstance(location.filesystem, pafs.S3FileSystem):
        client = _s3_client(storage or StorageConfig())
        bucket, key = location.path.split("/", 1)
        import botocore.exceptions

        try:
            reply = client.get_object(Bucket=bucket, Key=key)
            return reply["Body"].read(), reply["ETag"]
        except client.exceptions.NoSuchKey:
            return None, None
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise StorageError(f"{location.uri}: cannot read ({exc})") from None
    try:
        data = read_bytes(location)
    except FileNotFoundError:
        return None, None
    return data, hashlib.sha256(data).hexdigest()


def write_if_unchanged(location: Location, data: bytes, expected_tag: str | None,
                       storage: StorageConfig | None = None) -> None:
    """Write ``data`` only if the object still has ``expected_tag`` (None: only if it does not
    exist) -- a compare-and-swap. On S3 this is one conditional PutObject (``If-Match`` /
    ``If-None-Match: *``), atomic on the server; locally an exclusive lock file guards the
    compare and an atomic rename. Raises :class:`PreconditionFailed` when the object changed."""
    if isinstance(location.filesystem, pafs.S3FileSystem):
        client = _s3_client(storage or StorageConfig())
        bucket, key = location.path.split("/", 1)
        condition = {"IfMatch": expected_tag} if expected_tag else {"IfNoneMatch": "*"}
        try:
            client.put_object(Bucket=bucket, Key=key, Body=data, **condition)
        except client.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                raise PreconditionFailed(f"{location.uri} changed since it was read") from None
            raise StorageError(f"{location.uri}: conditional write failed ({code or exc})") from None
        except Exception as exc:  # botocore's transport errors, after its retries
            raise StorageError(f"{location.uri}: conditional write failed ({exc})") from None
        return
    lock = location.path + ".lock"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        raise PreconditionFailed(f"{location.uri} is being written by another run ({lock} exists)") from None
    try:
        os.close(fd)
        if read_tagged(location)[1] != expected_tag:
            raise PreconditionFailed(f"{location.uri} changed since it was read")
        temp = f"{location.path}.{os.getpid()}.tmp"
        with open(temp, "wb") as fh:
            fh.write(data)
        os.replace(temp, location.path)
    finally:
        os.unlink(lock)


def _s3_client(storage: StorageConfig):
    """A botocore S3 client with the same settings as :func:`make_s3_filesystem` (pyarrow's
    filesystem cannot send conditional headers)."""
    import botocore.session
    from botocore.config import Config as BotoConfig

    settings = S3Settings.of(storage)
    session = botocore.session.get_session()
    return session.create_client(
        "s3", endpoint_url=settings.endpoint or None, region_name=settings.region,
        aws_access_key_id=settings.access_key, aws_secret_access_key=settings.secret_key,
        aws_session_token=settings.session_token,
        config=BotoConfig(connect_timeout=5, read_timeout=60,
                          retries={"mode": "standard", "max_attempts": storage.max_attempts}))


def copy_file(source: Location, target: Location) -> None:
    """Copy one file within a filesystem (S3: a server-side copy, no bytes through this process)."""
    parent = posixpath.dirname(target.path)
    if parent:
        target.filesystem.create_dir(parent, recursive=True)
    try:
        target.filesystem.copy_file(source.path, target.path)
    except (OSError, pa.ArrowException) as exc:
        raise StorageError(f"cannot copy {source.uri} to {target.uri} ({exc})") from exc
