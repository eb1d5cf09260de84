"""The container and cluster files in docker/: they parse, Ray's own schema accepts the cluster-launcher file,
the image installs exactly the project's pins, and the commands they run are valid twinscale commands."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from launch.cli import build_parser
from trainer import config

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"


def constraint_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[normalize(name)] = version
    return pins


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.split("[")[0]).lower()


def project_version() -> str:
    match = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert match
    return match.group(1)


def load_yaml(name: str) -> Any:
    return yaml.safe_load((DOCKER / name).read_text())


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (DOCKER / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_every_pin_in_the_image_matches_constraints() -> None:
    pins = constraint_pins()
    runs = [args for kind, args in dockerfile_instructions() if kind == "RUN"]
    installs = [command for args in runs for command in args.split("&&") if "pip install" in command]
    assert installs, "the Dockerfile installs nothing with pip"
    for command in installs:
        assert "-c constraints.txt" in command, f"pip install without the project's constraints: {command}"
        for name, version in re.findall(r"([A-Za-z0-9_.\-\[\],]+)==([0-9][^\s\"']*)", command):
            assert pins.get(normalize(name)) == version, f"{name}=={version} in the Dockerfile, constraints.txt " \
                                                        f"pins {pins.get(normalize(name))}"
    torch_pin = pins["torch"]
    assert f'"torch=={torch_pin}"' in (ROOT / "pyproject.toml").read_text()


def test_image_is_cuda_based_non_root_with_compiled_deepspeed_op() -> None:
    instructions = dockerfile_instructions()
    args = dict((args.split("=", 1)[0], args.split("=", 1)[1]) for kind, args in instructions if kind == "ARG")
    assert args["BASE"].startswith("nvidia/cuda:") and "devel" in args["BASE"]  # nvcc for DeepSpeed's ops
    kinds = [kind for kind, _ in instructions]
    users = [args for kind, args in instructions if kind == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert kinds.index("USER") < kinds.index("ENTRYPOINT")
    # installs happen as that user, after constraints.txt and the sources are in the image
    first_install = next(i for i, (kind, a) in enumerate(instructions) if kind == "RUN" and "pip install" in a)
    copies = [a for kind, a in instructions[:first_install] if kind == "COPY"]
    assert any("constraints.txt" in a for a in copies) and kinds.index("USER") < first_install
    assert any("ShareMemCommBuilder().load()" in a for kind, a in instructions if kind == "RUN")


def test_cluster_launcher_file_passes_rays_schema() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load_yaml("ray-cluster-aws.yaml")
    validate_config(prepare_config(raw))
    assert raw["provider"]["type"] == "aws"
    assert raw["docker"]["image"].endswith(f"twinscale:{project_version()}")
    commands = " ".join(raw["head_start_ray_commands"] + raw["worker_start_ray_commands"])
    assert commands.count("RAY_AUTH_MODE=token") == 2


def test_cluster_launcher_schema_check_rejects_a_misspelled_key() -> None:
    """The check above can fail: Ray's schema refuses unknown top-level keys."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load_yaml("ray-cluster-aws.yaml")
    raw["idle_timeout_minute"] = raw.pop("idle_timeout_minutes")
    with pytest.raises(jsonschema.ValidationError, match="idle_timeout_minute"):
        validate_config(prepare_config(raw))


def test_compose_runs_a_head_and_two_workers_on_one_shared_volume() -> None:
    compose = load_yaml("compose.yaml")
    services = compose["services"]
    assert sorted(services) == ["head", "worker-1", "worker-2"]
    assert "--head" in services["head"]["command"]
    for name in ("worker-1", "worker-2"):
        assert "--address=head:6379" in services[name]["command"]
    for service in services.values():
        assert service["image"] == "twinscale:latest"
        assert "shared:/shared" in service["volumes"]
        assert service["environment"]["RAY_AUTH_MODE"] == "token"
        assert service["environment"]["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN")  # from the environment
    assert services["head"]["build"]["dockerfile"] == "docker/Dockerfile"


def test_rayjob_takes_the_wandb_key_from_a_secret_and_runs_a_valid_command() -> None:
    job = load_yaml("rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == constraint_pins()["ray"]
    pods = [cluster["headGroupSpec"]["template"]] + [group["template"] for group in cluster["workerGroupSpecs"]]
    for pod in pods:
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        for container in pod["spec"]["containers"]:
            assert container["image"].endswith(f"twinscale:{project_version()}")
            env = {item["name"]: item for item in container["env"]}
            assert "value" not in env["WANDB_API_KEY"]
            assert env["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "wandb", "key": "api-key"}
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "twinscale"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "train" and args.address == "auto"
    cfg = config.load(ROOT / args.config, args.overrides)  # the overrides name real keys with valid values
    # The head has no CPUs, so every worker runs on another pod: data and runs must be on the shared claim.
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    mounts = {mount["mountPath"] for mount in pods[1]["spec"]["containers"][0]["volumeMounts"]}
    for path in (cfg.data.train, cfg.data.test, cfg.output_dir):
        assert path is not None and Path(path).is_absolute() and Path(path).parts[1] == "shared", path
    assert "/shared" in mounts


@pytest.mark.parametrize("name", ["compose.yaml", "ray-cluster-aws.yaml"])
def test_cluster_files_point_data_and_runs_at_shared_storage(name: str) -> None:
    """The documented submit command of each multi-node file puts shards and runs on the shared mount."""
    text = (ROOT / "docker" / name).read_text()
    lines = [line for line in text.splitlines()
             if line.startswith("#") and ("twinscale submit configs/" in line or line.startswith("#       --"))]
    command = " ".join(line.lstrip("# ").rstrip("\\ ") for line in lines)
    argv = shlex.split(command[command.index("twinscale submit"):])
    args = build_parser().parse_args(argv[1:])
    cfg = config.load(ROOT / args.config, args.overrides)
    for path in (cfg.data.train, cfg.data.test, cfg.output_dir):
        assert path is not None and path.startswith("/shared/"), (name, path)
