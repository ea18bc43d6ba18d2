"""`speechlm init-config`: write a ready-to-train config for your Shar data, LLM and encoder (see
`orchestrator.config.init_config` for why a command)."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from orchestrator.cli.common import EXIT_OK, bad_input, positive_int, warn


def cmd_init_config(args: argparse.Namespace) -> int:
    from orchestrator.config import ConfigError, experiment_from_dict
    from orchestrator.config.init_config import render, starter_config
    from orchestrator.config.sources import source_problems
    from orchestrator.storage import atomic

    out = Path(args.out)
    if out.exists() and not args.force:
        return bad_input(f"{out} exists; pass --force to replace it, or choose another --out")
    name = args.name or out.stem
    starter = starter_config(
        args.model,
        args.train,
        args.val,
        name=name,
        llm=args.llm,
        asr=args.asr,
        codec=args.codec,
        scoring_asr=args.scoring_asr,
        prompt=args.prompt,
        prompt_format=args.prompt_format,
        max_steps=args.max_steps,
        gpu={"gpu": True, "cpu": False}.get(args.accelerator),
    )
    loaded = experiment_from_dict(starter.data, source=str(out))  # refuses what `validate` would refuse
    notes: list[str] = []
    if problems := source_problems(loaded.cfg, notes):
        raise ConfigError(problems, str(out))
    atomic.write_text(out, render(starter, out, command_line(args)))
    for note in [*loaded.warnings, *notes, *starter.notes]:
        warn(note)
    t = loaded.cfg.trainer
    print(
        f"wrote {out} from {starter.base.name}: {args.train} (validation: {args.val}), LLM {loaded.cfg.model.pretrained_llm}, "
        f"{t.max_steps} steps on {'GPU' if t.accelerator == 'gpu' else 'CPU'}\n"
        f"next: speechlm train {out}"
    )
    return EXIT_OK


def command_line(args: argparse.Namespace) -> str:
    """The `speechlm init-config ...` that wrote a file, for its header (what to run again to remake it)."""
    words = ["speechlm", "init-config", args.model]
    for flag in ("train", "val", "out", "name", "llm", "asr", "codec", "scoring_asr", "prompt", "prompt_format"):
        if getattr(args, flag) is not None:
            words += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    words += ["--max-steps", str(args.max_steps)] + (
        ["--accelerator", args.accelerator] if args.accelerator != "auto" else []
    )
    return " ".join(shlex.quote(w) for w in words)


def register(subparsers: argparse._SubParsersAction) -> None:
    init = subparsers.add_parser(
        "init-config",
        help="write a ready-to-train config for your data (Shar dirs), LLM and encoder",
        description="Write a config from configs/BASE.yaml with your data, LLM and encoder set, the "
        "adapter sized to the encoder, validation every max_steps/10 and warmup as a fraction of the run, for the "
        "GPUs of this machine (or one CPU worker). It is checked like `speechlm validate` before it is written.",
    )
    from orchestrator.config.init_config import shipped_configs

    init.add_argument("model", metavar="BASE", choices=shipped_configs(), help="configs/BASE.yaml: %(choices)s")
    init.add_argument("--train", required=True, help="training Shar directory (speechlm data shar --out ...)")
    init.add_argument("--val", required=True, help="validation Shar directory; its name names the val metrics")
    init.add_argument("--out", required=True, help="the config file to write")
    init.add_argument("--name", help="run name: runs go to experiments/<name> (default: the --out file's stem)")
    init.add_argument("--llm", help="pretrained_llm: a hub id or local dir (default: the shipped config's)")
    init.add_argument("--asr", help="pretrained_asr: a Parakeet hub id, local dir or .nemo file")
    init.add_argument("--codec", help="duplex: pretrained_audio_codec (Mimi, EnCodec or DAC; hub id or dir)")
    init.add_argument("--scoring-asr", dest="scoring_asr", help="duplex: an ASR model for val_asr_bleu (default: none)")
    init.add_argument("--prompt", help="SALM: the text before the audio (training's context tag)")
    init.add_argument(
        "--prompt-format", dest="prompt_format", help="SALM: llama2 | llama3 | qwen | plain | chat_template"
    )
    init.add_argument("--max-steps", dest="max_steps", type=positive_int, default=1000, help="default 1000")
    init.add_argument(
        "--accelerator", choices=["auto", "gpu", "cpu"], default="auto", help="auto: GPU if this machine has one"
    )
    init.add_argument("--force", action="store_true", help="replace an existing --out file")
    init.set_defaults(func=cmd_init_config)
