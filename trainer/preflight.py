"""What every worker checks before it joins the run: that it can read its data and write its run directory.

On a multi-node cluster each worker reads `data.train`/`data.test` and writes `output_dir/name` on its own node.
A path that exists only on the driver's disk (a relative path resolved elsewhere, shards written on the head, a
local `output_dir`) would otherwise surface much later as a stream error, a hang in a collective or a checkpoint
that cannot be resumed. Here it fails at once, with one line naming the worker's node and the path.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from trainer.config import Config
from trainer.data.formats import read_index
from trainer.data.remote import is_url, open_shard
from trainer.data.shardsets import is_pattern, open_data
from trainer.errors import DataError, UserError
from trainer.remote_runs import probe_run_storage, remote_of

SHARED_STORAGE_HINT = ("on a multi-node cluster every worker reads and writes on its own node: put shards and "
                       "output_dir on storage every node mounts (absolute paths on a shared file system) or on "
                       "object storage (s3://BUCKET/…, credentials in each node's environment)")


class WorkerPathError(UserError):
    """A data or run path that a worker cannot use on its node."""


def check_worker_paths(cfg: Config, rank: int) -> None:
    """Raise WorkerPathError, naming this node and the path, unless this worker can read every shard set of the
    run (index.json and the start of each shard) and write and read back a file in the run directory."""
    where = f"worker {rank} on node {node_name()}"
    for key, path in (("data.train", cfg.data.train), ("data.test", cfg.data.test)):
        if path is not None:
            _check_shards(key, path, where, cfg)
    _check_run_dir(cfg.run_dir, where)


def node_name() -> str:
    """`hostname (ip)` of this machine, as a user would look for it in the cluster's node list."""
    host = socket.gethostname()
    try:
        return f"{host} ({socket.gethostbyname(host)})"
    except OSError:
        return host


def _check_shards(key: str, spec: str, where: str, cfg: Config) -> None:
    if is_url(spec) or is_pattern(spec) or cfg.data.fields is not None:
        _check_shard_set(key, spec, where, cfg)
        return
    directory = Path(spec)
    shown = _shown(directory)
    try:
        index = read_index(directory)
    except DataError as error:
        raise WorkerPathError(f"{where}: {key} {shown}: {_reason(error, directory)}; {SHARED_STORAGE_HINT}") from None
    for shard in index.shards:
        try:
            with open(directory / shard.file, "rb") as handle:
                handle.read(1)
        except OSError as error:
            raise WorkerPathError(f"{where}: {key} {shown}: cannot read {shard.file} ({error.strerror}); "
                                  f"{SHARED_STORAGE_HINT}") from None


def _check_shard_set(key: str, spec: str, where: str, cfg: Config) -> None:
    # A remote or foreign set: its index opens here and its first shard can be read (not every shard: thousands
    # of remote objects would cost a request each at every start).
    try:
        index = open_data(spec, cfg.data, train=key == "data.train")
        with open_shard(index.url(index.shards[0].file)) as handle:
            handle.read(1)
    except (DataError, OSError) as error:
        raise WorkerPathError(f"{where}: {key} {spec}: {error}; {SHARED_STORAGE_HINT}") from None


def _check_run_dir(run_dir: Path, where: str) -> None:
    url = remote_of(run_dir)
    if url is not None:  # output_dir on object storage: this worker must reach it with its own credentials
        try:
            probe_run_storage(url, f"{where}: {socket.gethostname()}-{os.getpid()}")
        except DataError as error:
            raise WorkerPathError(f"{where}: output_dir {url}: {error}") from None
    probe = run_dir / f".preflight-{socket.gethostname()}-{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text(where)
        readable = probe.read_text() == where
        probe.unlink()
    except OSError as error:
        raise WorkerPathError(f"{where}: run directory {_shown(run_dir)} (output_dir/name) is not writable here "
                              f"({error.strerror or error}); {SHARED_STORAGE_HINT}") from None
    if not readable:
        raise WorkerPathError(f"{where}: run directory {_shown(run_dir)}: a file written there reads back "
                              f"differently; {SHARED_STORAGE_HINT}")


def _shown(path: Path) -> str:
    """The path as configured, and where it resolves on this node when it is relative."""
    return str(path) if path.is_absolute() else f"{path} (here {Path.cwd() / path})"


def _reason(error: DataError, directory: Path) -> str:
    if not directory.is_dir():
        return "no such directory on this node"
    text = str(error)
    return text.split(": ", 1)[1] if text.startswith(str(directory)) else text
