"""Stopping a Ray run cleanly: the driver's SIGTERM/SIGINT reach every worker, which saves and stops.

Ray Train's own SIGINT handler aborts the workers without a checkpoint, and a signal to the driver never reaches
worker processes on other nodes. So `fit` runs in a thread (Ray installs no handler there), the driver's main
thread keeps its own handlers, and a small async actor carries the request to a thread in each worker, which
calls `trainer.engine.loop.request_stop`: the workers agree on the step at the next boundary, save and return.
"""

from __future__ import annotations

import functools
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from trainer.errors import UserError


@functools.cache
def stop_flag_class() -> Any:
    import ray

    @ray.remote(num_cpus=0)
    class StopFlag:
        """Set by the driver on SIGTERM/SIGINT; every worker waits on it in a thread (async actor)."""

        def __init__(self) -> None:
            import asyncio

            self.event, self.signum = asyncio.Event(), 0

        async def wait(self) -> int:
            await self.event.wait()
            return self.signum

        async def set(self, signum: int) -> None:
            self.signum = self.signum or signum
            self.event.set()

    return StopFlag


def forward_stop(flag: Any) -> None:
    """In a worker: turn the driver's stop request into the trainer's (save at the next step boundary)."""
    import ray

    from trainer.engine.loop import request_stop

    def wait() -> None:
        try:
            request_stop(ray.get(flag.wait.remote()))
        except Exception:  # the flag actor is gone: the run is over
            return

    threading.Thread(target=wait, daemon=True, name="twinscale-stop").start()


class DriverSignals:
    """The driver's SIGTERM/SIGINT: the first asks every worker to save and stop after its step; a second one
    aborts at once. Ray Train's own SIGINT handler would abort without a checkpoint, so `fit` runs in a thread
    (where Ray installs none) and the main thread keeps these handlers."""

    def __init__(self, flag: Any) -> None:
        self.flag, self.signum = flag, 0

    def __enter__(self) -> DriverSignals:
        self.previous = {}
        if threading.current_thread() is threading.main_thread():  # e.g. not when a sweep launches from a thread
            self.previous = {signum: signal.signal(signum, self.handle) for signum in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def handle(self, signum: int, frame: Any) -> None:
        if self.signum:
            raise KeyboardInterrupt  # the second signal: stop waiting, shut Ray down
        self.signum = signum
        print(f"twinscale: {signal.Signals(signum).name}: the workers save a checkpoint after their current step "
              f"and stop (send it again to abort without saving)", file=sys.stderr)
        self.flag.set.remote(signum)


def fit_in_thread(trainer: Any) -> None:
    """`trainer.fit()` in a thread, the main thread staying free for signal handlers; errors re-raised here."""
    outcome: dict[str, BaseException] = {}

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as error:  # noqa: B036 (re-raised in the main thread)
            outcome["error"] = error

    thread = threading.Thread(target=fit, daemon=True, name="twinscale-fit")
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.2)
    if "error" in outcome:
        raise user_error(outcome["error"]) or outcome["error"]


def user_error(error: BaseException) -> UserError | None:
    """A worker's UserError (bad shards, a non-finite loss, ...) inside Ray's TrainingFailedError, if any."""
    for failure in getattr(error, "worker_failures", {}).values():
        seen: BaseException | None = failure
        while seen is not None:
            cause = getattr(seen, "cause", None)  # a RayTaskError holds the worker's own exception
            if isinstance(cause, UserError):
                return cause
            if isinstance(seen, UserError) and type(seen).__module__.startswith("trainer."):
                return seen
            seen = cause if isinstance(cause, BaseException) else seen.__cause__
    return None


def stopped_run(run_dir: Path, signum: int) -> dict[str, Any]:
    """What a run stopped by a signal reports: the signal and the checkpoint it saved."""
    from trainer.checkpoint import latest_checkpoint
    from trainer.remote_runs import remote_checkpoints, remote_of

    url = remote_of(run_dir)
    if url is not None:  # saved and published by the workers' nodes, not necessarily into this one's mirror
        complete, _ = remote_checkpoints(url)
        newest = f"{url}/checkpoints/{complete[-1]}" if complete else None
        return {"stopped_by": signal.Signals(signum).name, "checkpoint": str(newest)}
    return {"stopped_by": signal.Signals(signum).name, "checkpoint": str(latest_checkpoint(run_dir))}


