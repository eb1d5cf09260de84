"""`twinscale scan SPEC --out index.json --address ray://HEAD:10001`: the shards of a large set counted by Ray tasks.

Each task counts a batch of shards with `trainer.data.scan.count_samples` (tar headers; remote shards streamed
once), on whichever node has a free CPU; credentials reach the tasks through the environment variables named in
`CREDENTIAL_ENV` (passed by value in the runtime environment of this job only, never written to a file).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
                  "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "GOOGLE_APPLICATION_CREDENTIALS")
SHARDS_PER_TASK = 16


def ray_counter(address: str | None, verbose: bool = False) -> Callable[[list[str]], list[int]]:
    """A `counter` for `trainer.data.scan.scan` that maps shard URLs to counts with Ray tasks."""

    def count(urls: list[str]) -> list[int]:
        import ray

        from launch.ray_launch import start_ray

        start_ray(address, verbose)
        env = {name: os.environ[name] for name in CREDENTIAL_ENV if name in os.environ}
        task: Any = ray.remote(num_cpus=1)(_count_batch).options(runtime_env={"env_vars": env})
        batches = [urls[i:i + SHARDS_PER_TASK] for i in range(0, len(urls), SHARDS_PER_TASK)]
        try:
            return [n for counted in ray.get([task.remote(batch) for batch in batches]) for n in counted]
        except ray.exceptions.RayTaskError as error:  # a DataError inside a task: its one line, exit code 2
            from trainer.errors import DataError

            cause = error.cause if isinstance(error.cause, DataError) else None
            raise cause or DataError(f"scan: a counting task failed ({error})") from None
        finally:
            ray.shutdown()

    return count


def _count_batch(urls: list[str]) -> list[int]:
    from trainer.data.scan import count_samples

    return [count_samples(url) for url in urls]
