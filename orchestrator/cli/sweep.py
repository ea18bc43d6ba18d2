"""`speechlm sweep SPEC [overrides] [--resume] [--smoke]`: a hyperparameter sweep on Ray Tune.

Overrides whose first key is a spec key (num_samples=8, scheduler.grace_period=100) change the spec; any
other (trainer.max_steps=200) is a fixed override of the base config for every trial.
Exit codes follow `orchestrator.cli.common`: 0 the sweep ran (failed trials are reported, not fatal), 1 every trial
failed or the sweep was interrupted, 2 bad input (spec, base config, --resume mismatch).
"""

from __future__ import annotations

import argparse

from orchestrator.cli.common import EXIT_FAILED, EXIT_OK, warn


def cmd_sweep(args: argparse.Namespace) -> int:
    from orchestrator.config import ConfigError
    from orchestrator.config.sources import source_problems, url_problem
    from orchestrator.storage.paths import is_url
    from orchestrator.sweep.spec import load_sweep

    loaded = load_sweep(args.spec, args.overrides, smoke=args.smoke)
    problems = [f"base config {loaded.base_path}: {p}" for p in source_problems(loaded.base.cfg)]
    if is_url(loaded.sweep_dir) and (problem := url_problem(loaded.sweep_dir)):
        problems.append(f"output_dir: {problem}")
    if problems:
        raise ConfigError(problems, loaded.source)
    for warning in loaded.warnings:
        warn(warning)
    if args.validate_only:
        from orchestrator.sweep.search_space import describe

        print(describe(loaded))
        print(f"\n{loaded.source}: OK ({len(loaded.params)} swept keys, every candidate value validated)")
        return EXIT_OK
    from orchestrator.sweep.run import run_sweep

    outcome = run_sweep(loaded, resume=args.resume, retry_failed=args.retry_failed)
    return EXIT_OK if outcome.ok else EXIT_FAILED


def register(subparsers: argparse._SubParsersAction) -> None:
    sweep = subparsers.add_parser(
        "sweep",
        help="hyperparameter sweep on Ray Tune from a sweep spec (sweeps/*.yaml), tracked in MLflow",
        description="Run every trial of a sweep spec as a Ray Train run (the same path as `speechlm train`), "
        "stop weak trials early (ASHA), and write a ranked table, the best config and a comparison plot.",
    )
    sweep.add_argument("spec", help="sweep spec YAML (see sweeps/)")
    sweep.add_argument(
        "overrides",
        nargs="*",
        help="spec keys (num_samples=8, scheduler.grace_period=100) or base config keys (trainer.max_steps=500)",
    )
    sweep.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted sweep: finished trials are kept, unfinished ones resume",
    )
    sweep.add_argument(
        "--retry-failed",
        dest="retry_failed",
        action="store_true",
        help="with --resume: run failed trials again (from their last checkpoint)",
    )
    sweep.add_argument(
        "--smoke",
        action="store_true",
        help="a tiny version of the spec (its smoke: section) in <output_dir>-smoke, to check it end to end",
    )
    sweep.add_argument(
        "--validate",
        dest="validate_only",
        action="store_true",
        help="only validate the spec and every candidate value, then exit (2 on problems)",
    )
    sweep.set_defaults(func=cmd_sweep)
