"""Import direction and packaging: trainer never imports ray/launch; models and loss math never import
torch.distributed or deepspeed; `trainer` resolves to this repository (PyPI has an unrelated `trainer`)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(package: Path) -> dict[Path, set[str]]:
    found: dict[Path, set[str]] = {}
    for path in package.rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
        found[path] = names
    return found


def test_trainer_never_imports_ray_or_launch() -> None:
    for path, names in imported_modules(ROOT / "trainer").items():
        bad = {n for n in names if n.split(".")[0] in ("ray", "launch")}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_models_and_loss_math_never_see_ranks() -> None:
    pure = list((ROOT / "trainer" / "models").rglob("*.py")) + [
        *(ROOT / "trainer" / "objectives" / name for name in ("objective.py", "selection.py", "terms.py", "memory.py")),
        ROOT / "trainer" / "evaluation.py"]
    for path in pure:
        names = imported_modules(path.parent)[path]
        bad = {n for n in names if n.startswith("torch.distributed") or n.startswith("deepspeed")}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_trainer_resolves_to_this_repository() -> None:
    import launch
    import trainer

    assert Path(trainer.__file__).resolve().parent == ROOT / "trainer"
    assert Path(launch.__file__).resolve().parent == ROOT / "launch"


def test_cli_help_is_light() -> None:
    """`twinscale --help` must not import torch, ray or deepspeed."""
    code = ("import sys; from launch import cli; cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'ray', 'deepspeed', 'wandb') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
