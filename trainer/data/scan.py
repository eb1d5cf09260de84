"""Sample counts of a WebDataset shard set that has none: `twinscale scan SPEC --out index.json`.

Equal batches per rank need every shard's sample count before the first step. A set written by another tool has
no index, so each shard is counted once, from its tar headers: a local file is read by seeking from header to
header past the member data; a remote one is streamed once (one request, reconnecting where it stopped). Shards
are counted in a pool of processes (`processes`); `scan(counter=...)` takes another way to map shards to counts
(Ray tasks for thousands of remote shards).

Samples are counted as the stream groups members: consecutive members sharing a key (the member name up to its
first dot, directory included) are one sample; WebDataset's `__meta__` members are not samples.
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import re
import tarfile
import time
from collections.abc import Callable
from typing import Any

from trainer.data import remote
from trainer.data.shardsets import counts_index, expand
from trainer.errors import DataError

_MEMBER = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")  # key.ext, as WebDataset's base_plus_ext splits it


def count_samples(url: str) -> int:
    """Samples in one tar shard (path or URL), from its headers; DataError names the shard when it is unreadable."""
    for attempt in range(remote.RETRIES):
        try:
            # Local: seek from header to header. Remote: one sequential GET per shard; seeking there would cost a
            # range request per member (measured 4× slower for 25 kB members, docs/benchmarks.md).
            with _open(url) as handle, tarfile.open(fileobj=handle, mode="r|" if remote.is_url(url) else "r:") as tar:
                return _count_keys(tar)
        except (tarfile.TarError, EOFError) as error:
            raise DataError(f"{url}: not a readable tar file ({error})") from None
        except (FileNotFoundError, PermissionError) as error:
            raise DataError(f"{url}: cannot read ({type(error).__name__}: {error})") from None
        except Exception as error:  # a storage client's transient errors have no common base class
            if attempt + 1 == remote.RETRIES:
                raise DataError(f"{url}: failed {remote.RETRIES} times ({type(error).__name__}: {error})") from None
            time.sleep(remote.BACKOFF_S * 2**attempt)
    return 0  # unreachable


def _open(url: str) -> Any:
    return open(url, "rb") if not remote.is_url(url) else remote.open_shard(url)


def _count_keys(tar: tarfile.TarFile) -> int:
    count, previous = 0, None
    for member in tar:  # tarfile seeks over each member's data to the next header
        if not member.isreg():
            continue
        match = _MEMBER.match(member.name)
        if match is None or os.path.basename(member.name).startswith("__"):
            continue
        if match.group(1) != previous:
            count, previous = count + 1, match.group(1)
        tar.members = []  # type: ignore[attr-defined]  # flat memory over a shard of millions of members
    return count


def scan(spec: str, out: str, *, processes: int | None = None,
         counter: Callable[[list[str]], list[int]] | None = None) -> dict[str, Any]:
    """Count every shard of `spec`, write the counts index to `out` (a path or URL) and return it.

    `counter` maps the shard URLs to counts (default: a local process pool; `launch` passes Ray tasks)."""
    urls = expand(spec)
    counts = (counter or (lambda found: count_in_pool(found, processes)))(urls)
    index = counts_index(spec, urls, counts, out)
    remote.write_bytes(out, (json.dumps(index, indent=2) + "\n").encode())
    return index


def count_in_pool(urls: list[str], processes: int | None = None) -> list[int]:
    """`count_samples` of every URL, in a pool of processes (in this process for a handful of shards)."""
    workers = min(len(urls), processes or os.cpu_count() or 1)
    if workers <= 1 or (processes is None and len(urls) < 16):  # starting processes costs more than a few shards
        return [count_samples(url) for url in urls]
    # spawn, not fork: a forked storage client (an event loop, open connections) misbehaves in the child.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        return list(pool.map(count_samples, urls, chunksize=max(1, len(urls) // (workers * 8))))
