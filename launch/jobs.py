"""Training runs as Ray jobs on a running cluster, through Ray's Job Submission API (the dashboard, port 8265).

    twinscale submit configs/default.yaml --address http://HEAD:8265 --set output_dir=/shared/runs --follow
    twinscale submit configs/digits_s3.yaml --address http://HEAD:8265 --set output_dir=s3://BUCKET/runs --follow
    twinscale jobs list|logs|stop [JOB_ID] --address http://HEAD:8265

The job runs `python -m launch.cli train CONFIG --address auto` on the head node with a runtime environment:
the working directory (uploaded; the config must lie inside it), optionally pinned pip packages or a container
image, and environment variables taken from your environment at submit time (the W&B key and settings, and any
named with --env) — sent with the job, never written into files. Ray 2.60 clusters require a token by default:
it is read from RAY_AUTH_TOKEN, the file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from trainer import config
from trainer.data.remote import is_url
from trainer.errors import UserError

FORWARDED_ENV = ("WANDB_API_KEY", "WANDB_ENTITY", "WANDB_PROJECT", "WANDB_MODE", "WANDB_BASE_URL")
"""Environment variables a job takes from the submitter's environment when they are set there."""
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                  "GOOGLE_APPLICATION_CREDENTIALS")
"""Object-storage credentials: a job gets them only when named with --env (else the cluster's own are used)."""
EXCLUDES = [".git", "**/__pycache__", "*.egg-info", ".mypy_cache", ".ruff_cache", "wandb"]
"""Never uploaded with the working directory (run outputs are excluded too: see `submit`)."""
FINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def is_job_address(address: str | None) -> bool:
    """A dashboard address (http[s]://HEAD:8265): the Job Submission API, not a Ray client or GCS address."""
    return address is not None and address.startswith(("http://", "https://"))


def auth_token() -> str | None:
    """The cluster token, from where Ray itself looks for it."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        raise UserError(f"RAY_AUTH_TOKEN_PATH={path}: no token in that file")
    return None


def connect(address: str | None) -> Any:
    """A JobSubmissionClient for the cluster at `address`, with the token when there is one."""
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_API_SERVER_ADDRESS")
    if address is None:
        raise UserError("no cluster address: pass --address http://HEAD:8265 or set RAY_API_SERVER_ADDRESS")
    if not is_job_address(address):
        raise UserError(f"--address {address}: expected the cluster's dashboard address, http://HEAD:8265")
    token = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        client = JobSubmissionClient(address, headers=headers)
        client.list_jobs()  # the first authenticated request: a wrong or missing token fails here
    except Exception as error:  # connection refused, DNS, HTTP 401/403: one line for the user
        raise UserError(f"{address}: {describe_connection_error(error, token is not None)}") from None
    return client


def describe_connection_error(error: Exception, had_token: bool) -> str:
    text = str(error)
    # Ray answers a missing token either with HTTP 401/403 or, client-side, with an AuthenticationError whose
    # message says "Token authentication is enabled ...".
    if "401" in text or "403" in text or "authentication" in f"{type(error).__name__} {text}".lower():
        fix = ("the token was refused; use the head's token (`ray get-auth-token` on the head)" if had_token else
               "the cluster requires a token; set RAY_AUTH_TOKEN or copy the head's ~/.ray/auth_token")
        return f"authentication failed: {fix}"
    return f"cannot reach the Ray dashboard ({type(error).__name__}: {text.strip().splitlines()[0][:200]})"


def runtime_env(working_dir: Path, output_dir: str, pip: Path | None, image: str | None,
                env_names: list[str]) -> dict[str, Any]:
    """What the job runs with: the working directory, packages or image, and forwarded environment variables."""
    excludes = list(EXCLUDES)
    if not is_url(output_dir) and not Path(output_dir).is_absolute():
        excludes.append(f"/{Path(output_dir).as_posix().strip('/')}")  # earlier runs' outputs are not code
    env: dict[str, str] = {}  # the job's `ray.init` adds its own (QUIET_ENV): Ray refuses a key set twice
    for name in (*FORWARDED_ENV, *env_names):
        if name in os.environ:
            env[name] = os.environ[name]
        elif name in env_names:
            raise UserError(f"--env {name}: not set in your environment")
    spec: dict[str, Any] = {"working_dir": str(working_dir), "excludes": excludes, "env_vars": env}
    if pip is not None and image is not None:
        raise UserError("--pip and --image: choose one (an image brings its own packages)")
    if pip is not None:
        if not pip.is_file():
            raise UserError(f"--pip {pip}: requirements file not found")
        lines = [line.split("#")[0].strip() for line in pip.read_text().splitlines()]
        packages = [line for line in lines if line]
        unpinned = [line for line in packages if "==" not in line]
        if unpinned:
            raise UserError(f"--pip {pip}: pin every package with ==; unpinned: {', '.join(unpinned[:5])}")
        spec["pip"] = {"packages": packages}
    if image is not None:
        spec["image_uri"] = image
    return spec


def submit(config_path: Path | None, overrides: list[str], address: str, *, working_dir: Path, follow: bool,
           pip: Path | None = None, image: str | None = None, env_names: list[str] | None = None,
           command: str = "train") -> int:
    """Validate the run here, submit it as a Ray job, print its id; with `follow`, stream its logs to the end."""
    working_dir = working_dir.resolve()
    if not working_dir.is_dir():
        raise UserError(f"--working-dir {working_dir}: not a directory")
    recipe = config_path or config.DEFAULT_RECIPE
    cfg = config.load(recipe, overrides)  # bad keys or values stop here, before anything is sent
    if cfg.name is None:
        stem = config_path.stem if config_path else "digits"
        overrides = [*overrides, config.string_override("name", f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")]
        cfg = config.load(recipe, overrides)
    try:
        relative = recipe.resolve().relative_to(working_dir)
    except ValueError:
        raise UserError(f"{recipe}: the config must lie inside the uploaded working directory {working_dir} "
                        "(or pass --working-dir)") from None
    entrypoint = " ".join(["python -m launch.cli", command, shlex.quote(relative.as_posix()), "--address auto",
                           *(f"--set {shlex.quote(item)}" for item in overrides)])
    client = connect(address)
    env = runtime_env(working_dir, cfg.output_dir, pip, image, list(env_names or []))
    if not is_url(cfg.output_dir) and not Path(cfg.output_dir).is_absolute():
        print(f"twinscale: warning: output_dir {cfg.output_dir} is relative, so the run lands in the job's temporary "
              "working directory on the head; for checkpoints you can resume, use object storage "
              "(--set output_dir=s3://BUCKET/runs) or shared storage (--set output_dir=/shared/runs)", file=sys.stderr)
    local_data = [key for key, path in (("data.train", cfg.data.train), ("data.test", cfg.data.test))
                  if path is not None and not is_url(path) and not Path(path).is_absolute()]
    storage = [path for path in (cfg.output_dir, cfg.data.train, cfg.data.test) if path and is_url(path)]
    if storage and not set(CREDENTIAL_ENV) & set(env["env_vars"]):
        print(f"twinscale: {storage[0]}: the job reaches object storage with the cluster's own credentials (its "
              "nodes' environment, a Kubernetes Secret, an instance role); to lend it yours, add "
              f"{' '.join(f'--env {name}' for name in CREDENTIAL_ENV[:2])} (sent with the job, never written to a "
              "file)", file=sys.stderr)
    if local_data and cfg.data.source is not None:
        print(f"twinscale: warning: {' and '.join(local_data)} are relative and data.source writes missing shards on "
              "the head after the upload, so workers on other nodes will not find them; on a multi-node cluster "
              "use shared storage (--set data.train=/shared/data/NAME/train --set data.test=/shared/data/NAME/test)",
              file=sys.stderr)
    job_id = f"twinscale-{cfg.name}"
    try:
        client.submit_job(entrypoint=entrypoint, runtime_env=env, submission_id=job_id,
                          metadata={"twinscale_run": str(cfg.run_dir)})
    except RuntimeError as error:
        raise UserError(f"{address}: the cluster refused the job ({str(error).strip().splitlines()[-1]})") from None
    print(job_id)
    print(f"twinscale: submitted {job_id}: run {cfg.run_dir} (relative to the job's working directory unless "
          f"output_dir is absolute); follow it with `twinscale jobs logs {job_id} --follow --address {address}`",
          file=sys.stderr)
    return follow_job(client, job_id) if follow else 0


def submit_command(argv: list[str], address: str, *, working_dir: Path, follow: bool) -> int:
    """Run any twinscale command as a job (e.g. `resume RUN_DIR` on the cluster's shared storage)."""
    client = connect(address)
    env = runtime_env(working_dir.resolve(), "runs", None, None, [])
    entrypoint = " ".join(["python -m launch.cli", *map(shlex.quote, argv), "--address auto"])
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=env,
                               submission_id=f"twinscale-{argv[0]}-{time.strftime('%Y%m%d-%H%M%S')}")
    print(job_id)
    return follow_job(client, job_id) if follow else 0


def follow_job(client: Any, job_id: str) -> int:
    """Stream the job's logs until it ends; exit status 0 only if it succeeded."""
    async def stream() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        asyncio.run(stream())
        status = wait_for_end(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job goes on (stop it with `twinscale jobs stop {job_id}`)", file=sys.stderr)
        return 130
    print(f"twinscale: job {job_id} {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def wait_for_end(client: Any, job_id: str, timeout_s: float = 60.0) -> str:
    deadline = time.time() + timeout_s
    status = str(client.get_job_status(job_id))
    while status not in FINAL and time.time() < deadline:
        time.sleep(0.5)
        status = str(client.get_job_status(job_id))
    return status


def list_jobs(address: str | None) -> int:
    client = connect(address)
    rows = [("job", "status", "started", "entrypoint")]
    for job in sorted(client.list_jobs(), key=lambda j: j.start_time or 0):
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.start_time / 1000)) if job.start_time else ""
        rows.append((job.submission_id or job.job_id or "", str(job.status), started, job.entrypoint[:70]))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def job_logs(address: str | None, job_id: str, follow: bool) -> int:
    client = connect(address)
    require_job(client, job_id, address)
    if follow:
        return follow_job(client, job_id)
    sys.stdout.write(client.get_job_logs(job_id))
    return 0


def stop_job(address: str | None, job_id: str) -> int:
    client = connect(address)
    require_job(client, job_id, address)
    if str(client.get_job_status(job_id)) in FINAL:
        print(f"{job_id} already ended: {client.get_job_status(job_id)}")
        return 0
    client.stop_job(job_id)
    print(f"{job_id} {wait_for_end(client, job_id)}")
    return 0


def require_job(client: Any, job_id: str, address: str | None) -> None:
    try:
        client.get_job_info(job_id)
    except RuntimeError:
        raise UserError(f"{address}: no job {job_id} (see `twinscale jobs list`)") from None
