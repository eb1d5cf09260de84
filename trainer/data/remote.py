"""Reading shards and small files from local paths or remote URLs (`s3://`, `gs://`, `https://`, `pipe:CMD`).

Remote storage goes through fsspec (s3fs for S3). Credentials and endpoints come from the environment only
(`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`, `AWS_DEFAULT_REGION`,
or fsspec's own configuration), never from a Twinscale file, so nothing secret is ever written into a run.

A shard is read through `RetryingReader`: a transient error (a dropped connection, a timeout, a 5xx) reopens the
object at the byte where reading stopped, after an exponential backoff, so the tar stream continues unchanged
(the same samples, in the same order: exact resume holds). A shard that still fails after `RETRIES` attempts
raises `ShardReadError`, which the stream counts and skips like a corrupt tar section; timeouts on every request
mean a dead server is an error after a bounded wait, never a hang.
"""

from __future__ import annotations

import io
import os
import subprocess
import time
from typing import IO, Any

from trainer.errors import DataError

RETRIES = 4
"""Attempts to open or continue reading one object before it counts as failed."""
BACKOFF_S = 0.2
"""First wait between attempts; doubled after each failure."""
TIMEOUT_S = 20.0
"""Connect and read timeout of one request to object storage."""
S3FS_RETRIES = 2
"""Attempts s3fs makes per request before this module's own retry (which reopens at the current byte)."""
REMOTE_SCHEMES = ("s3", "gs", "gcs", "http", "https", "az", "abfs")


class ShardReadError(OSError):
    """An object that could not be read after every retry."""


def is_url(location: str) -> bool:
    """Whether `location` names remote storage or a command rather than a local path."""
    return location.startswith("pipe:") or location.partition("://")[0] in REMOTE_SCHEMES and "://" in location


def join(location: str, name: str) -> str:
    """`name` inside the directory `location` (a path or a URL); an absolute `name` or a URL is kept as is."""
    if is_url(name) or name.startswith("/"):
        return name
    return f"{location.rstrip('/')}/{name}" if is_url(location) else os.path.join(location, name)


def parent(location: str) -> str:
    """The directory holding `location` (a path or a URL)."""
    return location.rstrip("/").rsplit("/", 1)[0] if is_url(location) else os.path.dirname(location) or "."


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem of `url` and the path within it, configured from the environment."""
    import fsspec  # late: local shard sets never need it

    protocol = url.partition("://")[0]
    options: dict[str, Any] = {}
    if protocol == "s3":
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        # s3fs retries each request itself (5 times by default) and botocore again: with this module's retries on
        # top, a dead endpoint would take minutes to give up on. One layer of botocore, two of s3fs, ours outside.
        options = {"config_kwargs": {"connect_timeout": TIMEOUT_S, "read_timeout": TIMEOUT_S,
                                     "retries": {"max_attempts": 1}}}
        if endpoint:
            options["endpoint_url"] = endpoint
    elif protocol in ("http", "https"):
        import aiohttp

        options = {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=TIMEOUT_S,
                                                                      sock_read=TIMEOUT_S)}}
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except (ImportError, ValueError) as error:
        raise DataError(f"{url}: no storage backend for this URL ({error})") from None
    if protocol == "s3":
        fs.retries = S3FS_RETRIES
    return fs, path


def exists(location: str) -> bool:
    """Whether a file exists at `location`; a storage that cannot be reached raises DataError naming it."""
    if not is_url(location):
        return os.path.isfile(location)
    if location.startswith("pipe:"):
        return True
    fs, path = filesystem(location)
    return bool(with_retries(location, lambda: fs.isfile(path)))


def read_bytes(location: str) -> bytes:
    """The whole content of a small file (an index), with retries; DataError names the location."""
    try:
        with open_shard(location) as handle:
            return handle.read()
    except (ShardReadError, OSError) as error:
        raise DataError(f"{location}: cannot read ({error})") from None


def write_bytes(location: str, payload: bytes) -> None:
    """Write a small file (an index) to a path or URL; the object appears whole or not at all."""
    if not is_url(location):
        temporary = f"{location}.tmp-{os.getpid()}"
        with open(temporary, "wb") as out:
            out.write(payload)
        os.replace(temporary, location)
        return
    fs, path = filesystem(location)
    try:
        with_retries(location, lambda: fs.pipe_file(path, payload))  # one PUT: S3 objects are never partial
    except FileNotFoundError:
        raise DataError(f"{location}: cannot write there (no such bucket or container)") from None


def list_files(pattern: str) -> list[str]:
    """Files matching a glob pattern (`*`, `?`, `[..]`) on local or remote storage, sorted, as paths/URLs."""
    if not is_url(pattern):
        import glob

        return sorted(glob.glob(pattern))
    fs, path = filesystem(pattern)
    found = with_retries(pattern, lambda: fs.glob(path))
    protocol = pattern.partition("://")[0]
    return sorted(f"{protocol}://{name}" if "://" not in name else name for name in found)


def open_shard(location: str) -> IO[bytes]:
    """A binary file object reading `location` front to back, reconnecting on transient errors."""
    if location.startswith("pipe:"):
        process = subprocess.Popen(location[5:], shell=True, stdout=subprocess.PIPE)  # noqa: S602 (user's command)
        assert process.stdout is not None
        return io.BufferedReader(_PipeReader(process))
    if not is_url(location):
        return open(location, "rb")
    fs, path = filesystem(location)
    return io.BufferedReader(RetryingReader(location, fs, path), buffer_size=1 << 20)


class _PipeReader(io.RawIOBase):
    """stdout of a `pipe:` command; a non-zero exit status is a read error (a failed download, a missing file)."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        assert self.process.stdout is not None
        count = self.process.stdout.readinto(buffer)  # type: ignore[attr-defined]
        if count == 0 and self.process.wait() != 0:
            raise ShardReadError(f"pipe: command exited with status {self.process.returncode}")
        return int(count or 0)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        super().close()


class RetryingReader(io.RawIOBase):
    """Sequential reads of one remote object; a failed read reopens it at the current offset after a backoff."""

    def __init__(self, location: str, fs: Any, path: str) -> None:
        self.location, self.fs, self.path = location, fs, path
        self.position, self.handle = 0, None  # type: tuple[int, Any]
        self.retries = 0
        """Reconnections so far (reported by tests and benchmarks)."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        for attempt in range(RETRIES):
            try:
                if self.handle is None:
                    self.handle = self.fs.open(self.path, "rb", block_size=1 << 22, cache_type="readahead")
                    self.handle.seek(self.position)
                data = self.handle.read(len(buffer))
            except FileNotFoundError:
                raise ShardReadError(f"{self.location}: not found") from None
            except PermissionError as error:
                raise ShardReadError(f"{self.location}: access denied ({error})") from None
            except Exception as error:  # the storage client's transient errors have no common base class
                self._drop()
                if attempt + 1 == RETRIES:
                    raise ShardReadError(f"{self.location}: failed {RETRIES} times at byte {self.position} "
                                         f"({type(error).__name__}: {error})") from None
                self.retries += 1
                time.sleep(BACKOFF_S * 2**attempt)
                continue
            buffer[: len(data)] = data
            self.position += len(data)
            return len(data)
        return 0  # unreachable: the loop returns or raises

    def _drop(self) -> None:
        handle, self.handle = self.handle, None
        if handle is not None:
            try:
                handle.close()
            except Exception:  # noqa: S110 (a broken connection may fail to close; it is dropped either way)
                pass

    def close(self) -> None:
        self._drop()
        super().close()


def with_retries(location: str, call: Any) -> Any:
    """`call()` with retries and backoff; DataError naming `location` once it keeps failing."""
    for attempt in range(RETRIES):
        try:
            return call()
        except FileNotFoundError:
            raise
        except PermissionError as error:
            raise DataError(f"{location}: access denied ({error}); check the credentials in the environment "
                            f"(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, or fsspec's configuration)") from None
        except Exception as error:  # see RetryingReader.readinto
            if attempt + 1 == RETRIES:
                raise DataError(f"{location}: unreachable, failed {RETRIES} times ({type(error).__name__}: "
                                f"{error})") from None
            time.sleep(BACKOFF_S * 2**attempt)
    return None
