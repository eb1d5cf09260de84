"""Runs whose `output_dir` is a URL (`s3://bucket/runs`): written locally, published to object storage.

Training writes a run directory with plain file operations (DeepSpeed's checkpoint files among them), so a run
with a remote `output_dir` works in a local mirror — `$TWINSCALE_RUN_CACHE` (default `~/.cache/twinscale/runs`)
`/<scheme>/<bucket>/<path>/<name>` — and publishes it:

- a checkpoint is uploaded file by file, each node uploading the files its own ranks wrote (nodes need not
  share a disk), and `run_state.json` last, by rank 0, once every node's upload succeeded: as locally, a remote
  checkpoint is complete exactly when its `run_state.json` exists, so a crash during an upload leaves an
  incomplete prefix that is never resumed from (and is removed by the next upload). Older remote checkpoints
  are pruned to `keep_last` only after the new one is complete, each by deleting its `run_state.json` first;
- the run's other outputs (config.yaml, metrics.jsonl, train_loss.jsonl, final_metrics.json, model/) are
  uploaded with each checkpoint and at the end of the run; the W&B directory is not (W&B syncs itself);
- a resume (`twinscale resume s3://bucket/runs/NAME`, or `--resume` with the same output_dir on any machine)
  first brings the newest complete remote checkpoint and the outputs into the local mirror.

Credentials come from the environment (trainer.data.remote), never from a file of the run.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from trainer.data import remote
from trainer.errors import CheckpointError, DataError

STATE_FILE = "run_state.json"
SKIPPED_OUTPUTS = ("checkpoints", "wandb", "ray")
"""Not run outputs: checkpoints go their own way; W&B syncs itself; `ray/` is Ray Train's own state, which Ray
writes straight to the URL (launch.ray_launch.ray_storage)."""


def cache_root() -> Path:
    """Where local mirrors of remote runs live."""
    return Path(os.environ.get("TWINSCALE_RUN_CACHE", "~/.cache/twinscale/runs")).expanduser().resolve()


def local_mirror(url: str) -> Path:
    """The local directory mirroring the remote run directory `url`."""
    scheme, _, rest = url.partition("://")
    return cache_root() / scheme / rest.strip("/")


def remote_of(run_dir: Path) -> str | None:
    """The URL a local run directory mirrors, or None for a run that is local only."""
    try:
        parts = Path(run_dir).resolve().relative_to(cache_root()).parts
    except ValueError:
        return None
    return f"{parts[0]}://{'/'.join(parts[1:])}" if len(parts) > 1 else None


def upload_checkpoint(checkpoint: Path, url: str, keep_last: int) -> None:
    """Publish a complete local checkpoint under `url/checkpoints/`, run_state.json last; prune older ones."""
    upload_files(checkpoint, url, checkpoint.name)
    finish_checkpoint(checkpoint, url, keep_last)


def upload_files(directory: Path, url: str, name: str) -> None:
    """Upload a checkpoint's files but its run_state.json to `url/checkpoints/name/` (each node its own ranks')."""
    fs, root = remote.filesystem(url)
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != STATE_FILE):
        remote.with_retries(url, lambda p=path: fs.put_file(str(p), f"{root}/checkpoints/{name}/"
                                                                     f"{p.relative_to(directory).as_posix()}"))


def finish_checkpoint(checkpoint: Path, url: str, keep_last: int) -> None:
    """Mark a remote checkpoint complete (its run_state.json, last), then tidy: incomplete prefixes left by a
    crashed upload go, complete ones beyond `keep_last` go, each by its run_state.json first."""
    fs, root = remote.filesystem(url)
    target = f"{root}/checkpoints/{checkpoint.name}"
    remote.with_retries(url, lambda: fs.put_file(str(checkpoint / STATE_FILE), f"{target}/{STATE_FILE}"))
    complete, incomplete = remote_checkpoints(url)
    for name in incomplete:
        if name != checkpoint.name:
            remote.with_retries(url, lambda n=name: fs.rm(f"{root}/checkpoints/{n}", recursive=True))
    for name in complete[:-keep_last]:
        remote.with_retries(url, lambda n=name: fs.rm_file(f"{root}/checkpoints/{n}/{STATE_FILE}"))
        remote.with_retries(url, lambda n=name: fs.rm(f"{root}/checkpoints/{n}", recursive=True))


def upload_outputs(run_dir: Path, url: str) -> None:
    """Publish the run's outputs besides checkpoints (each object replaced whole)."""
    fs, root = remote.filesystem(url)
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file()):
        relative = path.relative_to(run_dir)
        if relative.parts[0] in SKIPPED_OUTPUTS or relative.name.startswith("."):
            continue
        remote.with_retries(url, lambda p=path, r=relative: fs.put_file(str(p), f"{root}/{r.as_posix()}"))


def remote_checkpoints(url: str) -> tuple[list[str], list[str]]:
    """Names of the complete and the incomplete checkpoints under `url/checkpoints/`, oldest first."""
    fs, root = remote.filesystem(url)
    try:
        names = remote.with_retries(url, lambda: fs.ls(f"{root}/checkpoints", detail=False, refresh=True))
    except FileNotFoundError:
        return [], []
    steps = sorted(name.rstrip("/").rsplit("/", 1)[-1] for name in names)
    steps = [name for name in steps if name.startswith("step_")]
    states = set(remote.list_files(f"{url.rstrip('/')}/checkpoints/step_*/{STATE_FILE}"))
    complete = [s for s in steps if f"{url.rstrip('/')}/checkpoints/{s}/{STATE_FILE}" in states]
    return complete, [s for s in steps if s not in complete]


def probe_run_storage(url: str, text: str) -> None:
    """Write, read back and delete a small object under `url`; DataError when the storage refuses or is away."""
    probe = f"{url.rstrip('/')}/.preflight-{abs(hash(text)) % 10**8}"
    remote.write_bytes(probe, text.encode())
    fs, path = remote.filesystem(probe)
    try:
        readable = remote.with_retries(probe, lambda: fs.cat_file(path)) == text.encode()
        remote.with_retries(probe, lambda: fs.rm_file(path))
    except FileNotFoundError:
        readable = False
    if not readable:
        raise DataError(f"{probe}: an object written there reads back differently")


def fetch_run(url: str) -> Path:
    """Bring the newest complete remote checkpoint and the run's outputs into the local mirror; return it.

    A newer checkpoint in the mirror (this node was rank 0's when a save crashed before the storage marked it
    complete) is removed: the storage decides which checkpoint every node resumes.

    CheckpointError when `url` holds no run; DataError when the storage cannot be reached."""
    run_dir = fetch_outputs(url)
    fs, root = remote.filesystem(url)
    complete, _ = remote_checkpoints(url)
    if complete:
        newest = run_dir / "checkpoints" / complete[-1]
        for local in (run_dir / "checkpoints").glob("step_*"):
            if local.name > newest.name:  # saved on this node but never marked complete on the storage: every
                shutil.rmtree(local)      # node must resume the same one, the newest the storage holds
        if not (newest / STATE_FILE).is_file():
            staging = newest.with_name(f".fetching-{newest.name}")
            _download(fs, url, f"{root}/checkpoints/{complete[-1]}", staging)
            if not (staging / STATE_FILE).is_file():
                raise DataError(f"{url}/checkpoints/{complete[-1]}: incomplete download")
            os.replace(staging, newest)
        else:  # complete here, as rank 0 saw it: the files of ranks that ran on other nodes may be missing
            _fill_in(fs, url, f"{root}/checkpoints/{complete[-1]}", newest)
    return run_dir


def _fill_in(fs: Any, url: str, source: str, target: Path) -> None:
    """Download the files of the remote checkpoint `source` that `target` lacks (or holds at another size), each
    under a temporary name first: ranks may land on other nodes than the ones that saved their files."""
    found = remote.with_retries(url, lambda: fs.find(source, detail=True))
    for name, info in sorted(found.items()):
        local = target / name[len(source):].lstrip("/")
        if local.is_file() and local.stat().st_size == info.get("size"):
            continue
        local.parent.mkdir(parents=True, exist_ok=True)
        partial = local.with_name(f".fetching-{local.name}")
        remote.with_retries(url, lambda n=name, p=partial: fs.get_file(n, str(p)))
        os.replace(partial, local)


def fetch_outputs(url: str) -> Path:
    """Bring the run's outputs but its checkpoints (config.yaml, metrics, final_metrics.json, model/) into the
    local mirror, e.g. on the driver once workers on other nodes published them; return the mirror.

    CheckpointError when `url` holds no run; DataError when the storage cannot be reached."""
    run_dir = local_mirror(url)
    fs, root = remote.filesystem(url)
    if not remote.exists(f"{url.rstrip('/')}/config.yaml"):
        raise CheckpointError(f"{url}: not a run directory (no config.yaml)")
    _download(fs, url, root, run_dir, skip=SKIPPED_OUTPUTS)
    return run_dir


def _download(fs: Any, url: str, source: str, target: Path, skip: tuple[str, ...] = ()) -> None:
    for name in remote.with_retries(url, lambda: fs.find(source)):
        relative = name[len(source):].lstrip("/")
        if not relative or relative.split("/")[0] in skip:
            continue
        local = target / relative
        local.parent.mkdir(parents=True, exist_ok=True)
        remote.with_retries(url, lambda n=name, p=local: fs.get_file(n, str(p)))
