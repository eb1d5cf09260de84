"""Hyperparameter sweeps on Ray Tune: every trial is a whole distributed TorchTrainer run.

`twinscale sweep configs/sweeps/digits.yaml` samples configurations from the sweep file's space (random or
Optuna), runs each as a Train V2 trial — Tune runs `run_trial`, which builds and fits a TorchTrainer (a
TorchTrainer cannot be handed to a Tuner under Train V2) — and stops laggards with ASHA counted in steps or
epochs (Tune's own iteration counter restarts after a resume; steps do not). Rank 0 forwards each evaluation
to the trial, which reports it to Tune. A sweep directory holds:

    sweep.json       the spec, the resolved base config and the raw recipe (what `--resume` needs)
    trials/<id>/     each trial's run directory (config, metrics.jsonl, checkpoints, model, W&B run)
    results.json     the ranked trials;  best.yaml: the best configuration as a ready-to-run recipe

`twinscale sweep --resume DIR` continues an interrupted sweep: finished trials keep their results, unfinished
ones start again from their newest checkpoint. W&B runs of one sweep share a group (the sweep's name).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from launch.sweep_spec import SweepSpec, flatten, get_dotted, grid_size, load_sweep, set_dotted, tune_space
from trainer import config
from trainer.errors import UserError

SWEEP_STATE = "sweep.json"


def start_sweep(path: Path, address: str | None, verbose: bool) -> int:
    """Validate the sweep file, write the sweep directory's plan, run all trials."""
    from launch.cli import absolute_paths, ensure_shards

    spec, recipe = load_sweep(path)
    name = spec.name or f"{path.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    sweep_dir = (Path(spec.output_dir) / name).resolve()
    if sweep_dir.exists():
        raise UserError(f"{sweep_dir} already exists: continue it with `twinscale sweep --resume {sweep_dir}`, or "
                        "set another name")
    base = absolute_paths(config.from_dict(recipe, origin=str(path)))
    ensure_shards(base)
    state = {"name": name, "sweep_file": str(path.resolve()), "spec": spec.model_dump(mode="json"),
             "recipe": recipe, "base": config.to_dict(base)}
    sweep_dir.mkdir(parents=True)
    (sweep_dir / SWEEP_STATE).write_text(json.dumps(state, indent=1))
    return run_sweep(sweep_dir, state, address, verbose, restore=False)


def resume_sweep(sweep_dir: Path, address: str | None, verbose: bool) -> int:
    """Continue the sweep in `sweep_dir` where it stopped."""
    state_file = sweep_dir / SWEEP_STATE
    if not state_file.is_file():
        raise UserError(f"{sweep_dir}: not a sweep directory (no {SWEEP_STATE})")
    return run_sweep(sweep_dir.resolve(), json.loads(state_file.read_text()), address, verbose, restore=True)


def run_sweep(sweep_dir: Path, state: dict[str, Any], address: str | None, verbose: bool, restore: bool) -> int:
    import ray
    from ray import tune

    from launch.ray_launch import start_ray
    from launch.sweep_table import TrialTable, ranked_rows, render_ranked

    spec = SweepSpec.model_validate(state["spec"])
    base = config.from_dict(state["base"], origin=str(sweep_dir / SWEEP_STATE))
    plan = base_plan(base)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=state["base"], sweep_dir=str(sweep_dir), group=state["name"]),
        # A trial's driver only waits on its TorchTrainer, which reserves the workers' CPUs and GPUs itself; a
        # sliver of the head node's own resource places drivers on the head without holding a CPU (Tune refuses
        # an empty request, and a CPU each would leave a 2-CPU node unable to host a 2-worker trial).
        {"node:__internal_head__": 0.001})
    table = TrialTable(spec, sys.stderr)
    run_config = tune.RunConfig(name=sweep_dir.name, storage_path=str(sweep_dir.parent), verbose=0,
                                callbacks=[table], log_to_file=True)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's own reporter, silenced by verbose=0: our table
    start_ray(address, verbose, dashboard=True)
    try:
        if restore:
            tuner = tune.Tuner.restore(str(sweep_dir), trainable=trainable, resume_unfinished=True,
                                       resume_errored=True)
        else:
            tuner = tune.Tuner(trainable, param_space=tune_space(spec),
                               tune_config=tune_config(spec, state["base"], plan), run_config=run_config)
        print(f"twinscale: sweep {sweep_dir} — {expected_trials(spec)} trials of {base.dist.workers} workers, "
              f"{spec.concurrent} at a time, {spec.search} search, scheduler {spec.scheduler.name} on "
              f"{spec.metric} ({spec.mode})", file=sys.stderr)
        with interruption_flag() as interrupted:
            try:
                results = tuner.fit()
            except (RuntimeError, ray.exceptions.RayError) as error:  # e.g. the node ran out of memory
                print(f"twinscale: sweep stopped by an error ({str(error).strip().splitlines()[-1][:300]}); its "
                      f"state is saved: continue it with `twinscale sweep --resume {sweep_dir}`", file=sys.stderr)
                return 1
        held = resources_still_held(ray)
    finally:
        ray.shutdown()
    rows = ranked_rows(results, spec)
    summary = {"sweep_dir": str(sweep_dir), "metric": spec.metric, "mode": spec.mode, "trials": rows,
               "resources_held_after_trials": held}
    (sweep_dir / "results.json").write_text(json.dumps(summary, indent=1))
    print(render_ranked(rows, spec))
    if interrupted.is_set() or results.num_terminated + results.num_errors < expected_trials(spec):
        print(f"twinscale: sweep interrupted; continue it with `twinscale sweep --resume {sweep_dir}`",
              file=sys.stderr)
        return 130
    best = next((row for row in rows if row.get("metric") is not None), None)
    if best is None:
        raise UserError(f"sweep {sweep_dir}: no trial reported {spec.metric}; see the trials' errors above")
    write_best_recipe(sweep_dir / "best.yaml", state, best, spec)
    print(f"best: {best['trial']} {spec.metric} {best['metric']:.4f} → {sweep_dir / 'best.yaml'}  "
          f"(run it: twinscale train {sweep_dir / 'best.yaml'})")
    return 0


@contextlib.contextmanager
def interruption_flag() -> Iterator[threading.Event]:
    """Ctrl+C (SIGINT) sets the flag and asks Tune, through SIGUSR1 (its other stop signal), to stop after saving
    the sweep's state; Tune's own SIGINT handler would leave no trace of the interruption in the results."""
    interrupted = threading.Event()

    def on_interrupt(signum: int, frame: Any) -> None:
        interrupted.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl+C stops at once
        os.kill(os.getpid(), signal.SIGUSR1)

    previous = signal.signal(signal.SIGINT, on_interrupt)
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)


def tune_config(spec: SweepSpec, base: dict[str, Any], plan: Any) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    base_point = [{key: get_dotted(base, key) for key in spec.space}] if spec.include_base else []
    nested_points = [nest(point) for point in base_point]
    if spec.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        flat_points = [{key.replace(".", "/"): value for key, value in point.items()} for point in base_point]
        search: Any = OptunaSearch(points_to_evaluate=flat_points or None, seed=spec.seed)  # Tune's flat names
    else:
        from ray.tune.search import BasicVariantGenerator

        search = BasicVariantGenerator(points_to_evaluate=nested_points or None, random_state=spec.seed,
                                       max_concurrent=spec.concurrent)
    scheduler: Any = FIFOScheduler()
    if spec.scheduler.name == "asha":
        length = plan.total_steps if spec.scheduler.time_attr == "step" else plan.total_steps / plan.steps_per_epoch
        max_t: Any = spec.scheduler.max_t or length  # fractional epochs work: ASHA only compares and multiplies
        grace: Any = min(spec.scheduler.grace_period, max_t)
        scheduler = ASHAScheduler(time_attr=spec.scheduler.time_attr, max_t=max_t, grace_period=grace,
                                  reduction_factor=spec.scheduler.reduction_factor)
    return tune.TuneConfig(metric=spec.metric, mode=spec.mode, search_alg=search, scheduler=scheduler,
                           num_samples=spec.trials,
                           # Optuna is wrapped in a ConcurrencyLimiter; the random search limits itself (above)
                           max_concurrent_trials=spec.concurrent if spec.search == "optuna" else None,
                           trial_name_creator=lambda trial: f"trial_{trial.trial_id}",
                           trial_dirname_creator=lambda trial: f"tune_{trial.trial_id}")


def run_trial(params: dict[str, Any], *, base: dict[str, Any], sweep_dir: str, group: str) -> None:
    """One trial (a Tune function trainable): a whole TorchTrainer run of the base config with `params` set.

    An unfinished trial that Tune starts again (after `sweep --resume`) continues from its newest checkpoint.
    """
    from ray import tune
    from ray.util.queue import Queue

    from launch.ray_launch import ProgressPump, build_trainer
    from trainer.checkpoint import latest_checkpoint

    trial_id = tune.get_context().get_trial_id()
    raw = base
    for key, value in flatten(params).items():
        raw = set_dotted(raw, key, value)
    raw = set_dotted(set_dotted(raw, "name", trial_id), "output_dir", str(Path(sweep_dir) / "trials"))
    cfg = config.from_dict(raw, origin=f"trial {trial_id} {flatten(params)}")
    plan = base_plan(cfg)

    def report(step: int, metrics: dict[str, Any]) -> None:
        tune.report({**metrics, "step": step, "epoch": step / plan.steps_per_epoch, "total_steps": plan.total_steps,
                     "run_dir": str(cfg.run_dir)})

    queue = Queue(actor_options={"num_cpus": 0})  # inside the trial's placement group, which holds no CPU
    resume = latest_checkpoint(cfg.run_dir) is not None
    trainer = build_trainer(cfg, queue, resume=resume, wandb_group=group)
    pump = ProgressPump(queue, on_evaluated=report, console=False)
    pump.start()
    try:
        trainer.fit()
    finally:
        pump.stop(timeout=60)  # the last evaluation may still be in the queue: report it before returning


def base_plan(cfg: Any) -> Any:
    from trainer.engine.build import plan_run

    return plan_run(cfg)


def nest(point: dict[str, Any]) -> dict[str, Any]:
    from launch.sweep_spec import set_dotted_object

    tree: dict[str, Any] = {}
    for key, value in point.items():
        tree = set_dotted_object(tree, key, value)
    return tree


def expected_trials(spec: SweepSpec) -> int:
    return spec.trials * grid_size(spec)


def resources_still_held(ray: Any, timeout_s: float = 30.0) -> dict[str, float]:
    """CPUs/GPUs not yet returned once all trials ended (early-stopped ones included); {} when all are back."""
    deadline = time.time() + timeout_s
    while True:
        total, free = ray.cluster_resources(), ray.available_resources()
        held = {k: total[k] - free.get(k, 0.0) for k in ("CPU", "GPU") if total.get(k, 0.0) - free.get(k, 0.0) > 1e-6}
        if not held or time.time() > deadline:
            return held
        time.sleep(0.5)


def write_best_recipe(path: Path, state: dict[str, Any], best: dict[str, Any], spec: SweepSpec) -> None:
    """The base recipe with the best trial's values: a recipe for `twinscale train`, validated first."""
    recipe = state["recipe"]
    for key, value in best["params"].items():
        recipe = set_dotted(recipe, key, value)
    config.from_dict(recipe, origin=str(path))
    header = (f"# Best of sweep {state['name']} ({state['sweep_file']}): trial {best['trial']}, "
              f"{spec.metric} {best['metric']:.4f} at step {best['step']}.\n"
              f"# Swept values: {', '.join(f'{k}={v!r}' for k, v in best['params'].items())}\n")
    path.write_text(header + yaml.safe_dump(recipe, sort_keys=False))
