"""Run outputs on rank 0: Weights & Biases (imported lazily) and the run directory's metric files.

W&B never blocks a run for long: with no API key (neither WANDB_API_KEY nor a `wandb login` in the netrc file)
it runs offline; with one it waits at most `log.init_timeout_s` for the server and then falls back to offline,
saying so once. Steps are always explicit, so a resumed run continues its step axis.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

from trainer.config import LogConfig

METRICS_FILE = "metrics.jsonl"
STEPS_FILE = "train_loss.jsonl"


class Tracker:
    """Where metrics go on rank 0: `metrics.jsonl` in the run directory and, when enabled, W&B."""

    def __init__(self, run_dir: Path, wandb_run: Any = None) -> None:
        self.run_dir = run_dir
        self.wandb_run = wandb_run
        self.steps_file: IO[str] | None = None

    def close_files(self) -> None:
        """Close train_loss.jsonl (a stopped run ends here; W&B then flushes on exit)."""
        if self.steps_file is not None:
            self.steps_file.close()
            self.steps_file = None

    @property
    def run_id(self) -> str | None:
        return None if self.wandb_run is None else str(self.wandb_run.id)

    def log_step(self, step: int, epoch: int, loss: float, lr: float, skipped: bool) -> None:
        """One line per training step in train_loss.jsonl (loss as its exact float; null when not finite)."""
        if self.steps_file is None:
            self.steps_file = open(self.run_dir / STEPS_FILE, "a")  # noqa: SIM115 (held open for the run)
        row = {"step": step, "epoch": epoch, "loss": loss if math.isfinite(loss) else None, "lr": lr}
        if skipped:
            row["skipped"] = True
        self.steps_file.write(json.dumps(row) + "\n")
        self.steps_file.flush()

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Training metrics (W&B only; they are frequent)."""
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def log_eval(self, metrics: dict[str, float], step: int) -> None:
        """Evaluation metrics: one JSON line in metrics.jsonl, and W&B under `eval/`."""
        with open(self.run_dir / METRICS_FILE, "a") as out:
            out.write(json.dumps({"step": step, **metrics}) + "\n")
        self.log({f"eval/{key}": value for key, value in metrics.items()}, step)

    def log_media(self, figures: dict[str, bytes], html: str | None, step: int) -> None:
        """The run report's figures (PNG bytes by name) as W&B images under `report/<name>`, and its page as
        `report/page` (W&B only)."""
        if self.wandb_run is None:
            return
        import io

        import wandb
        from PIL import Image

        media: dict[str, Any] = {}
        for name, png in figures.items():
            with Image.open(io.BytesIO(png)) as image:
                media[f"report/{name}"] = wandb.Image(image.convert("RGB"), caption=name)
        if html is not None:
            media["report/page"] = wandb.Html(html, inject=False)  # inject would link W&B's CSS: keep it whole
        self.wandb_run.log(media, step=step)

    def finish(self, summary: dict[str, Any]) -> None:
        """Record the final summary and close W&B."""
        self.close_files()
        if self.wandb_run is not None:
            self.wandb_run.summary.update(summary)
            self.wandb_run.finish()


def rewind_run_files(run_dir: Path, step: int) -> None:
    """Drop the lines of metrics.jsonl and train_loss.jsonl written after `step` (by a run that then crashed or
    was killed): the resumed run writes them again, so each file holds one line per step, as if uninterrupted."""
    for name in (METRICS_FILE, STEPS_FILE):
        path = run_dir / name
        if not path.is_file():
            continue
        lines = path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if _line_step(line) <= step]
        if len(kept) != len(lines):
            temporary = path.with_name(f".{name}.tmp")
            temporary.write_text("".join(kept))
            os.replace(temporary, path)


def _line_step(line: str) -> float:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf  # a line cut short by a kill: dropped


def start_tracker(cfg: LogConfig, run_dir: Path, run_config: dict[str, Any], resume_id: str | None) -> Tracker:
    """A tracker for rank 0, with W&B started unless disabled; online W&B falls back to offline, saying so once."""
    if not cfg.wandb:
        return Tracker(run_dir)
    import wandb

    mode = _mode(cfg)
    if mode == "online":
        problem = _unreachable(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"), cfg.init_timeout_s)
        if problem is None:
            try:
                return Tracker(run_dir, _init(wandb, cfg, run_dir, run_config, resume_id, mode))
            except Exception as error:  # any failure to reach or configure the server: keep training, offline
                problem = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
                _forget_server(wandb)
        print(f"W&B: cannot log online ({problem}); logging offline to {run_dir / 'wandb'} instead "
              f"(`wandb sync` uploads it later)", file=sys.stderr)
    return Tracker(run_dir, _init(wandb, cfg, run_dir, run_config, resume_id, "offline"))


def _forget_server(wandb: Any) -> None:
    """After a failed online start: stop wandb's service, and its analytics, from retrying the dead server at exit
    (measured: 20-30 s of a finished run's exit spent posting to a server that never answers)."""
    wandb.teardown()
    try:
        from wandb.analytics.opentelemetry import opentelemetry_proxy

        opentelemetry_proxy.disable()
    except (ImportError, AttributeError):  # another wandb version: nothing to switch off
        pass


def _unreachable(base_url: str, timeout_s: float) -> str | None:
    """Why the W&B server cannot be reached at all (no connection within the timeout), or None.

    A refused or unroutable address is known in milliseconds here, while wandb.init would keep retrying it."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")):
        return None  # the server is reached through a proxy: leave the judgement to wandb.init's timeout
    parsed = urlparse(base_url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout_s):
            return None
    except OSError as error:
        return f"{base_url}: {error.strerror or type(error).__name__}"


def _mode(cfg: LogConfig) -> str:
    if cfg.mode != "auto":
        return cfg.mode
    if os.environ.get("WANDB_MODE") in ("online", "offline"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    return "online" if netrc_api_key(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")) else "offline"


def netrc_path() -> Path:
    """The netrc file wandb reads its login from (wandb 0.31's `wbnetrc._get_netrc_file_path`): $NETRC, else
    ~/.netrc, else ~/_netrc, else ~/.netrc (where `wandb login` will write it)."""
    if os.environ.get("NETRC"):
        return Path(os.environ["NETRC"]).expanduser()
    for name in (".netrc", "_netrc"):
        if (Path("~").expanduser() / name).exists():
            return Path("~").expanduser() / name
    return Path("~/.netrc").expanduser()


def netrc_api_key(base_url: str) -> str | None:
    """The API key `wandb login` stored for the server at `base_url` (its netrc `machine` entry), or None.

    Read here, not through wandb, so that deciding the mode needs no wandb import; an unreadable or malformed
    netrc counts as not logged in (wandb itself then only warns)."""
    import netrc

    host = urlparse(base_url).netloc
    try:
        entry = netrc.netrc(str(netrc_path())).authenticators(host) if host else None
    except (OSError, netrc.NetrcParseError):
        return None
    return entry[2] or None if entry else None


def _init(wandb: Any, cfg: LogConfig, run_dir: Path, run_config: dict[str, Any], resume_id: str | None,
          mode: str) -> Any:
    return wandb.init(
        project=cfg.project, entity=cfg.entity, name=run_dir.name, dir=str(run_dir), config=run_config,
        id=resume_id, resume="allow" if resume_id else None, mode=mode,
        settings=wandb.Settings(init_timeout=cfg.init_timeout_s, console="off", silent=True),
    )
