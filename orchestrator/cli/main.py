"""`speechlm` / `python -m orchestrator`: train, sweep, validate, data, eval, infer, export.

Every command takes NeMo's config forms: `speechlm train CONFIG.yaml key=value ...` or
`speechlm train --config-path=DIR --config-name=NAME key=value ...`. Exit codes: 0 success, 1 the run
failed, 2 bad input (config, arguments, data).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from orchestrator import __version__, console
from orchestrator.cli.common import EXIT_FAILED, EXIT_OK, bad_input, warn
from orchestrator.config import ConfigError, LoadedConfig, find_config_file, load_experiment


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """CONFIG, NeMo's --config-path/--config-name, and trailing key=value overrides."""
    parser.add_argument("config", nargs="?", help="experiment YAML (NeMo speechlm2 keys)")
    parser.add_argument("overrides", nargs="*", help="key=value, +key=value (add), ~key (delete)")
    parser.add_argument("--config-path", dest="config_path", help="NeMo form: directory of the config")
    parser.add_argument("--config-name", dest="config_name", help="NeMo form: config name, with or without .yaml")


def load_from_args(args: argparse.Namespace) -> LoadedConfig:
    """The validated config named on the command line; a bare `key=value` in CONFIG's place is an override."""
    config, overrides = args.config, list(args.overrides)
    if config and "=" in config and (args.config_path or args.config_name):
        config, overrides = None, [config, *overrides]
    path = find_config_file(config, args.config_path, args.config_name)
    return load_experiment(path, overrides)


def cmd_validate(args: argparse.Namespace) -> int:
    from orchestrator.config.sources import source_problems
    from orchestrator.config.summary import summarize

    loaded = load_from_args(args)
    notes: list[str] = []
    if problems := source_problems(loaded.cfg, notes):
        raise ConfigError(problems, loaded.source)
    for warning in [*loaded.warnings, *notes]:
        warn(warning)
    print(summarize(loaded.cfg, loaded.source))
    print(f"\n{loaded.source}: OK")
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    from orchestrator.data.shar import SharLayoutError
    from orchestrator.training.driver import run_training

    loaded = load_from_args(args)
    for warning in loaded.warnings:
        warn(warning)
    try:
        result = run_training(loaded.cfg, source=loaded.source)
    except SharLayoutError as exc:  # shards that do not pair up: the data's problem, named, not a traceback
        return bad_input(exc)
    return EXIT_OK if result.ok else EXIT_FAILED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="speechlm",
        description="Train and sweep speech-augmented LLMs (SALM, duplex S2S) on Ray. "
        "The same program runs as `python -m orchestrator` (e.g. under `ray job submit`).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="debug logging, and all of Ray's and the libraries' output (by default known noise is filtered)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = sub.add_parser("train", help="train a model on Ray Train from a YAML config")
    add_config_arguments(train)
    train.set_defaults(func=cmd_train)

    validate = sub.add_parser("validate", help="check a config and print its resolved summary (exit 2 on errors)")
    add_config_arguments(validate)
    validate.set_defaults(func=cmd_validate)

    _add_command_groups(sub)
    return parser


def _add_command_groups(sub: argparse._SubParsersAction) -> None:
    """Command groups that live in their own modules (data, sweep, eval/infer/export), each registering its
    own arguments; they import their heavy dependencies only when their command runs."""
    from orchestrator.cli.data import register as register_data
    from orchestrator.cli.init_config import register as register_init_config
    from orchestrator.cli.models import register as register_models
    from orchestrator.cli.sweep import register as register_sweep

    for register in (register_init_config, register_data, register_sweep, register_models):
        register(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # --verbose is taken after the command too (`speechlm train my.yaml --verbose`), where a user adds it.
    verbose = "--verbose" in argv[1:]
    argv = argv[:1] + [a for a in argv[1:] if a != "--verbose"]
    # Overrides may also follow a flag (`speechlm sweep SPEC --smoke num_samples=2`), which argparse alone
    # rejects: whatever it leaves over is taken as more overrides when the command has them.
    args, leftover = parser.parse_known_args(argv)
    if leftover:
        if not isinstance(getattr(args, "overrides", None), list) or any(a.startswith("-") for a in leftover):
            parser.error(f"unrecognized arguments: {' '.join(leftover)}")
        args.overrides.extend(leftover)
    console.configure(args.verbose or verbose)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ConfigError as exc:
        return bad_input(exc)
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
