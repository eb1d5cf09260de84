"""Logger faults (item 7): with an API key but no usable W&B server, the run falls back to offline within a few
seconds (the default wandb.init would block for 90 s) and says so exactly once.

Two servers: a closed loopback port (connection refused) and one that accepts connections but never answers.
A real process starts the tracker with the real wandb; the time is measured from after wandb's import.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from faultrun import environment

START = """\
import json, sys, time
from pathlib import Path
import wandb  # imported before the clock starts: its import time is not what is measured
from trainer.config import LogConfig
from trainer.tracking import start_tracker
started = time.monotonic()
tracker = start_tracker(LogConfig(init_timeout_s=3.0), Path(sys.argv[1]), {"seed": 0}, None)
elapsed = time.monotonic() - started
tracker.log({"train/loss": 0.5}, 1)
tracker.finish({"done": 1})
print(json.dumps({"elapsed": elapsed, "mode": tracker.wandb_run.settings.mode}))
"""


@pytest.mark.parametrize("server", ["refused", "silent"])
def test_unreachable_wandb_falls_back_to_offline_once(server: str, tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        if server == "silent":
            listener.listen(8)  # the kernel completes the handshake; nobody ever answers
        port = listener.getsockname()[1]  # "refused": bound, not listening: connections are refused
        env = {**environment(WANDB_BASE_URL=f"http://127.0.0.1:{port}"), "WANDB_API_KEY": "a" * 40}
        env.pop("WANDB_MODE")
        result = subprocess.run([sys.executable, "-c", START, str(tmp_path)], env=env, capture_output=True,
                                text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["mode"] == "offline"
    assert outcome["elapsed"] < 30  # a few seconds (init_timeout_s=3), not wandb's 90 s
    assert result.stderr.count("W&B: cannot log online") == 1, result.stderr[-4000:]
    assert f"127.0.0.1:{port}" in result.stderr
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))  # the metrics are kept, to sync later
