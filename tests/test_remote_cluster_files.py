"""Cluster runs with nothing on a shared disk, out of the box: the KubeRay manifest docker/rayjob-s3.yaml and the
recipe configs/digits_s3.yaml put shards and runs on object storage and take credentials from a Secret; no file
(docker/, configs/, README) holds a credential; their commands are valid twinscale commands; `twinscale submit`
of that recipe passes credentials by name only (runtime_env env_vars, from --env) and warns about nothing."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from launch import jobs
from launch.cli import build_parser
from launch.cli import main as twinscale
from trainer import config

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "docker" / "rayjob-s3.yaml"
CREDENTIAL_LITERALS = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),  # an AWS access key id
    re.compile(r"(?i)(secret[_-]?access[_-]?key|access[_-]?key[_-]?id|api[_-]?key|token)\s*[:=]\s*['\"]?"
               r"(?![$<{(]|\.\.\.|…|\"\$|'\$)[A-Za-z0-9/+]{12,}"),  # NAME=literal value (not $VAR, <…>, …)
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]


def pods(job: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = job["spec"]["rayClusterSpec"]
    return [cluster["headGroupSpec"]["template"]] + [group["template"] for group in cluster["workerGroupSpecs"]]


def test_rayjob_on_object_storage_needs_no_shared_volume_and_takes_keys_from_a_secret() -> None:
    job = yaml.safe_load(MANIFEST.read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    for pod in pods(job):
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        assert all("persistentVolumeClaim" not in volume for volume in pod["spec"].get("volumes", []))
        for container in pod["spec"]["containers"]:
            env = {item["name"]: item for item in container["env"]}
            for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "WANDB_API_KEY"):
                assert "value" not in env[name] and "secretKeyRef" in env[name]["valueFrom"], name
            assert env["TWINSCALE_RUN_CACHE"]["value"].startswith("/scratch/")  # the pod's own scratch mirror
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "twinscale"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "train" and args.address == "auto"
    cfg = config.load(ROOT / args.config, args.overrides)
    for path in (cfg.data.train, cfg.data.test, cfg.output_dir):
        assert path is not None and path.startswith("s3://"), path
    resume = next(line for line in MANIFEST.read_text().splitlines() if "twinscale resume" in line)
    resumed = build_parser().parse_args(shlex.split(resume.lstrip("# "))[1:])
    assert resumed.run_dir == f"{cfg.output_dir}/{cfg.name}"


def documented_files() -> list[Path]:
    return [*sorted((ROOT / "docker").iterdir()), *sorted((ROOT / "configs").rglob("*.yaml")), ROOT / "README.md"]


@pytest.mark.parametrize("path", documented_files(), ids=lambda path: str(path.relative_to(ROOT)))
def test_no_credential_is_written_into_cluster_files_recipes_or_docs(path: Path) -> None:
    text = path.read_text()
    for pattern in CREDENTIAL_LITERALS:
        found = pattern.search(text)
        assert found is None, f"{path.name}: {found.group(0) if found else ''}"


def test_credential_check_can_fail() -> None:
    """The check above finds a key pasted into a manifest or a command, and passes references and placeholders."""
    for leaked in ("value: AKIAIOSFODNN7EXAMPLE", "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY",
                   "api-key: 0123456789abcdef0123"):
        assert any(pattern.search(leaked) for pattern in CREDENTIAL_LITERALS), leaked
    for fine in ('--from-literal=secret-access-key="$AWS_SECRET_ACCESS_KEY"', "export RAY_AUTH_TOKEN=...",
                 "key: secret-access-key", "WANDB_API_KEY=$(cat key)"):
        assert not any(pattern.search(fine) for pattern in CREDENTIAL_LITERALS), fine


def test_readme_commands_for_object_storage_are_valid() -> None:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    lines = [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    commands = [line for line in lines if line.startswith("twinscale ") and ("digits_s3" in line or "s3://" in line)]
    assert any(command.startswith("twinscale submit configs/digits_s3.yaml") for command in commands), commands
    for command in commands:
        argv = shlex.split(command.split(" #")[0])
        args = build_parser().parse_args(argv[1:])
        if getattr(args, "config", None) is not None:
            config.load(ROOT / args.config, getattr(args, "overrides", []))  # every override is a real key


class RecordingClient:
    """What `twinscale submit` sends to the Job Submission API."""

    def __init__(self) -> None:
        self.jobs: list[dict[str, Any]] = []

    def submit_job(self, **job: Any) -> str:
        self.jobs.append(job)
        return str(job["submission_id"])


def test_submit_of_an_object_storage_run_sends_credentials_by_name_only(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    client = RecordingClient()
    monkeypatch.setattr(jobs, "connect", lambda address: client)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "submitter-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "submitter-secret")
    monkeypatch.chdir(ROOT)
    assert twinscale(["submit", "configs/digits_s3.yaml", "--address", "http://127.0.0.1:8265", "--set",
                      "name=nightly", "--env", "AWS_ACCESS_KEY_ID", "--env", "AWS_SECRET_ACCESS_KEY"]) == 0
    err = capsys.readouterr().err
    assert "warning" not in err and "credentials" not in err, err  # nothing relative, credentials were lent
    (job,) = client.jobs
    assert job["runtime_env"]["env_vars"] == {"AWS_ACCESS_KEY_ID": "submitter-key-id",
                                              "AWS_SECRET_ACCESS_KEY": "submitter-secret"}
    assert not any("s3:" in exclude for exclude in job["runtime_env"]["excludes"])
    assert "submitter" not in job["entrypoint"] and "submitter" not in (ROOT / "configs/digits_s3.yaml").read_text()
    argv = shlex.split(job["entrypoint"])
    assert argv[:3] == ["python", "-m", "launch.cli"]
    args = build_parser().parse_args(argv[3:])
    cfg = config.load(ROOT / args.config, args.overrides)
    assert (args.command, args.address, cfg.output_dir, cfg.name) == ("train", "auto", "s3://twinscale-demo/runs",
                                                                     "nightly")

    # Without --env: nothing secret is sent; the job uses the cluster's own credentials, and submit says so.
    assert twinscale(["submit", "configs/digits_s3.yaml", "--address", "http://127.0.0.1:8265",
                      "--set", "name=cluster-keys"]) == 0
    assert client.jobs[-1]["runtime_env"]["env_vars"] == {}
    assert "cluster's own credentials" in capsys.readouterr().err
