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


@pytest.mark.parametrize("netrc_text,base_url,mode", [
    (None, None, "offline"),
    ("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n", None, "online"),  # what `wandb login` writes
    ("machine other.example.com login user password secret\n", None, "offline"),
    ("machine wandb.corp:8080 login user password secret\n", "http://wandb.corp:8080", "online"),
    ("machine api.wandb.ai login user\n", None, "offline"),  # an entry without a key: not logged in
    ("nonsense api.wandb.ai password secret\n", None, "offline"),  # malformed: not logged in
])
def test_auto_mode_is_online_after_wandb_login(netrc_text: str | None, base_url: str | None, mode: str,
                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.config import LogConfig
    from trainer.tracking import _mode

    for name in ("WANDB_API_KEY", "WANDB_MODE", "NETRC", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    if base_url is not None:
        monkeypatch.setenv("WANDB_BASE_URL", base_url)
    if netrc_text is not None:
        (tmp_path / ".netrc").write_text(netrc_text)
    assert _mode(LogConfig()) == mode
    assert _mode(LogConfig(mode="offline")) == "offline"


def test_netrc_variable_names_the_login_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.config import LogConfig
    from trainer.tracking import _mode

    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "elsewhere").write_text("machine api.wandb.ai login user password secret\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "elsewhere"))
    assert _mode(LogConfig()) == "online"
