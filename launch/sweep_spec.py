"""The sweep file: a base recipe, fixed overrides and a search space over dotted config keys.

    recipe: ../default.yaml          # relative to the sweep file (default: the digits demo)
    set: {optim.epochs: 4}           # fixed overrides applied to every trial
    metric: map_at_r                 # an evaluation metric; mode: max or min
    search: optuna                   # or random
    trials: 8                        # sampled configurations (grid keys multiply them)
    concurrent: 2                    # trials running at once
    scheduler: {name: asha, time_attr: step, grace_period: 16}
    space:
      optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
      loss.temperature: {uniform: [0.05, 0.3]}
      model.embedding_dim: {choice: [32, 64, 128]}

`load_sweep` validates all of it before anything starts: unknown sweep keys, space keys that are not config
keys, and every value the space can take (choices, grid values, range ends) checked against the run config, so
a sweep never fails hours in on a value that could never run. Errors name the file and the key (exit code 2).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from trainer import config
from trainer.config import Config
from trainer.errors import ConfigError

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")


class SweepSection(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True, frozen=True)


class SchedulerSpec(SweepSection):
    """Early stopping of trials that fall behind."""

    name: Literal["asha", "none"] = "asha"
    """`asha`: asynchronous successive halving on the sweep metric; `none`: every trial runs to its end."""
    time_attr: Literal["step", "epoch"] = "step"
    """What ASHA counts: optimizer steps or (fractional) epochs, both carried by every report."""
    grace_period: float = Field(1.0, gt=0)
    """A trial runs at least this long (in `time_attr` units) before it can be stopped."""
    reduction_factor: float = Field(2.0, gt=1)
    """At each rung only the best 1/reduction_factor of trials go on."""
    max_t: float | None = Field(None, gt=0)
    """Length of the longest trial in `time_attr` units (default: the base recipe's run length)."""


class SweepSpec(SweepSection):
    """A hyperparameter sweep."""

    recipe: str | None = None
    """Base recipe, relative to the sweep file (null: configs/default.yaml)."""
    set: dict[str, Any] = Field(default_factory=dict)
    """Dotted config keys fixed for every trial, e.g. `optim.epochs: 4`."""
    space: dict[str, dict[str, Any]]
    """Dotted config key → one distribution: choice, grid (lists) or uniform, loguniform, randint ([low, high])."""
    name: str | None = None
    """Sweep name: outputs go to `<output_dir>/<name>/` (default: `<file stem>-<date>-<time>`)."""
    output_dir: str = "runs/sweeps"
    """Parent directory of sweep directories (on a multi-node cluster: a path every node shares)."""
    metric: str = "map_at_r"
    """Evaluation metric that ranks trials (a key of the run's metrics.jsonl lines)."""
    mode: Literal["max", "min"] = "max"
    """Whether a larger or smaller metric is better."""
    search: Literal["random", "optuna"] = "random"
    """`random`: Ray Tune's random/grid sampling; `optuna`: Optuna's TPE sampler (no grid keys)."""
    trials: int = Field(4, ge=1)
    """Configurations sampled from the space (each grid value multiplies them)."""
    concurrent: int = Field(1, ge=1)
    """Trials running at the same time (each one is a whole distributed run of `dist.workers` workers)."""
    seed: int = 0
    """Seed of the search algorithm."""
    include_base: bool = True
    """Run the base recipe's own values as the first trial, so the table compares the sweep with it."""
    scheduler: SchedulerSpec = SchedulerSpec()

    @model_validator(mode="after")
    def _check_space(self) -> SweepSpec:
        if not self.space:
            raise ValueError("space: empty; name at least one config key to search")
        for key, distribution in self.space.items():
            check_distribution(key, distribution)
            if self.search == "optuna" and "grid" in distribution:
                raise ValueError(f"space.{key}: Optuna does not take grid values; use choice, or search: random")
        return self


def check_distribution(key: str, distribution: dict[str, Any]) -> None:
    """One distribution per key, with arguments of the right shape."""
    if len(distribution) != 1 or next(iter(distribution)) not in DISTRIBUTIONS:
        raise ValueError(f"space.{key}: expected one of {', '.join(DISTRIBUTIONS)}, e.g. {{choice: [32, 64]}}; "
                         f"got {distribution}")
    kind, args = next(iter(distribution.items()))
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ValueError(f"space.{key}.{kind}: expected a non-empty list of values")
        return
    if not (isinstance(args, list) and len(args) == 2 and all(isinstance(a, int | float) for a in args)):
        raise ValueError(f"space.{key}.{kind}: expected [low, high]")
    low, high = args
    if not low < high:
        raise ValueError(f"space.{key}.{kind}: low {low} must be below high {high}")
    if kind == "loguniform" and low <= 0:
        raise ValueError(f"space.{key}.loguniform: low must be > 0")
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise ValueError(f"space.{key}.randint: expected integers [low, high) (high excluded)")


def probe_values(distribution: dict[str, Any]) -> list[Any]:
    """Values that bound what a distribution can sample: every choice, both ends of a range."""
    kind, args = next(iter(distribution.items()))
    if kind in ("choice", "grid"):
        return list(args)
    return [args[0], args[1] - 1] if kind == "randint" else list(args)


def contains(distribution: dict[str, Any], value: Any) -> bool:
    kind, args = next(iter(distribution.items()))
    if kind in ("choice", "grid"):
        return value in args
    if not isinstance(value, int | float):
        return False
    return args[0] <= value < args[1] if kind == "randint" else args[0] <= value <= args[1]


def get_dotted(raw: dict[str, Any], key: str) -> Any:
    node: Any = raw
    for part in key.split("."):
        node = node[part]
    return node


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of `raw` with the dotted key set (sections created as needed)."""
    merged = yaml.safe_load(yaml.safe_dump(raw))
    node = merged
    *sections, leaf = key.split(".")
    for part in sections:
        node = node.setdefault(part, {})
    node[leaf] = value
    return merged


def check_config_key(key: str, origin: str) -> None:
    """`key` must name a leaf of the run config (a section is not a value)."""
    section: type[BaseModel] = Config
    parts = key.split(".")
    for depth, part in enumerate(parts):
        field = section.model_fields.get(part)
        if field is None:
            prefix = ".".join(parts[:depth]) or "the config"
            raise ConfigError(f"{origin}: {key}: {prefix} has no key {part!r} "
                              f"(keys: {', '.join(section.model_fields)})")
        annotation = field.annotation
        child = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        if depth == len(parts) - 1 and child is not None:
            example = next(iter(child.model_fields))
            raise ConfigError(f"{origin}: {key}: is a section; name one of its keys, e.g. {key}.{example}")
        if depth < len(parts) - 1:
            if child is None:
                raise ConfigError(f"{origin}: {key}: {'.'.join(parts[:depth + 1])} is a value, not a section")
            section = child


def load_sweep(path: Path) -> tuple[SweepSpec, dict[str, Any]]:
    """Read and validate a sweep file; returns the spec and the raw base recipe with the fixed `set` applied."""
    raw = config.read_yaml(path)
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as error:
        problems = []
        for problem in error.errors():
            key = ".".join(str(part) for part in problem["loc"])
            message = problem["msg"].removeprefix("Value error, ")
            problems.append(f"{path}: {message}" if problem["type"] == "value_error" else f"{path}: {key}: {message}")
        raise ConfigError("\n".join(problems)) from None
    recipe_path = config.DEFAULT_RECIPE if spec.recipe is None else (path.parent / spec.recipe)
    base = config.read_yaml(recipe_path)
    for key, value in spec.set.items():
        check_config_key(key, f"{path}: set")
        base = set_dotted(base, key, value)
    base_config = config.from_dict(base, origin=f"{path} (recipe {recipe_path} with set)")
    resolved = config.to_dict(base_config)
    for key, distribution in spec.space.items():
        check_config_key(key, f"{path}: space")
        for value in probe_values(distribution):
            config.from_dict(set_dotted(base, key, value), origin=f"{path}: space.{key}={value!r}")
        if spec.include_base and not contains(distribution, get_dotted(resolved, key)):
            raise ConfigError(f"{path}: space.{key}: the base recipe's value {get_dotted(resolved, key)!r} is "
                              f"outside {distribution}; widen the space, or set include_base: false")
    return spec, base


def tune_space(spec: SweepSpec) -> dict[str, Any]:
    """Ray Tune's param_space: dotted keys become nested dicts (Tune flattens them back as `optim/lr`)."""
    from ray import tune

    makers = {"choice": tune.choice, "grid": tune.grid_search,
              "uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a),
              "randint": lambda a: tune.randint(*a)}
    space: dict[str, Any] = {}
    for key, distribution in spec.space.items():
        kind, args = next(iter(distribution.items()))
        space = set_dotted_object(space, key, makers[kind](args))
    return space


def set_dotted_object(tree: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    node = tree
    *sections, leaf = key.split(".")
    for part in sections:
        node = node.setdefault(part, {})
    node[leaf] = value
    return tree


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested trial params → {dotted key: value}."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def grid_size(spec: SweepSpec) -> int:
    return math.prod(len(d["grid"]) for d in spec.space.values() if "grid" in d)
