"""`speechlm eval | infer | export`: use a trained model (a checkpoint, a run dir, or an exported dir).

    speechlm eval   MODEL --data SHAR [SHAR ...] [--batch-size N] [--num-workers N]   WER / BLEU / ASR-BLEU, RTF
    speechlm infer  MODEL AUDIO [AUDIO ...] [--prompt TEXT] [--out-dir DIR]          text (+ agent WAV for duplex)
    speechlm export MODEL --out DIR [--format nemo] [--merge-lora] [--register NAME]  self-contained model dir

MODEL is a `step=...` checkpoint directory, a run directory (its best checkpoint by exp_manager's monitor,
or --checkpoint latest), a directory written by `speechlm export`, or a NeMo speechlm2 checkpoint directory
(`save_pretrained` output: config.json + model.safetensors; a local dir or a hub repo id).
"""

from __future__ import annotations

import argparse
import sys

from orchestrator import console
from orchestrator.cli.common import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, bad_input, positive_float, positive_int
from orchestrator.redaction import redact


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="checkpoint dir (step=...), run dir, exported model dir, or NeMo checkpoint dir")
    parser.add_argument(
        "--checkpoint",
        choices=("best", "latest"),
        default="best",
        help="for a run dir: the best checkpoint by exp_manager.checkpoint_callback_params.monitor, or the latest",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override the checkpoint's saved config, e.g. --set model.pretrained_llm=/models/llm (repeatable; "
        "for a NeMo checkpoint that names its LLM by hub id)",
    )


# ------------------------------------------------------------------------------------------------- eval


def cmd_eval(args: argparse.Namespace) -> int:
    from orchestrator.inference.evaluate import evaluate
    from orchestrator.inference.sources import SourceError

    console.quiet_model_loading()

    try:
        report = evaluate(
            args.model,
            args.data,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            cpus_per_worker=args.cpus_per_worker,
            use_gpu=True if args.gpu else None,
            out_dir=args.out,
            which=args.checkpoint,
            overrides=args.overrides,
            max_new_tokens=args.max_new_tokens,
            scoring_asr=args.scoring_asr,
            save_audio=args.save_audio,
            mlflow=not args.no_mlflow,
            tracking_uri=args.tracking_uri,
        )
    except (SourceError, FileNotFoundError) as exc:
        return bad_input(exc)
    return EXIT_OK if all(s.metrics["num_cuts"] > 0 for s in report.sets) else EXIT_FAILED


# ------------------------------------------------------------------------------------------------ infer


def cmd_infer(args: argparse.Namespace) -> int:
    from orchestrator.inference.infer import infer
    from orchestrator.inference.sources import SourceError, describe, resolve_source

    console.quiet_model_loading()

    try:
        source = resolve_source(args.model, args.checkpoint, args.overrides)
        print(f"using {describe(source)}", file=sys.stderr, flush=True)
        results = infer(
            source,
            args.audio,
            prompt=args.prompt,
            system_prompt=args.system_prompt,
            out_dir=args.out_dir,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            device=args.device,
        )
    except (SourceError, FileNotFoundError) as exc:
        return bad_input(exc)
    for r in results:
        if r.error:
            print(f"error: {r.error}", file=sys.stderr, flush=True)
            continue
        line = f"{r.audio_path}\t{r.text}"
        if r.output_audio:
            line += f"\t-> {r.output_audio}"
        print(line, flush=True)
    seconds, audio = sum(r.seconds for r in results), sum(r.audio_seconds for r in results)
    failed = sum(r.error is not None for r in results)
    print(
        f"{len(results) - failed} file(s), {audio:.1f} s of audio in {seconds:.2f} s (rtf {seconds / max(audio, 1e-9):.3f})"
        + (f"; {failed} file(s) could not be read (above)" if failed else ""),
        file=sys.stderr,
    )
    return EXIT_BAD_INPUT if failed else EXIT_OK


# ----------------------------------------------------------------------------------------------- export


def cmd_export(args: argparse.Namespace) -> int:
    from orchestrator.inference.export import ExportCheckError, export_model
    from orchestrator.inference.sources import SourceError

    console.quiet_model_loading()

    try:
        result = export_model(
            args.model,
            args.out,
            export_format=args.format,
            merge_lora=args.merge_lora,
            which=args.checkpoint,
            overrides=args.overrides,
            verify=not args.no_verify,
            atol=args.atol,
            rtol=args.rtol,
            register=args.register,
            tracking_uri=args.tracking_uri,
        )
    except (SourceError, FileNotFoundError, FileExistsError) as exc:
        return bad_input(exc)
    except ExportCheckError as exc:
        print(f"export check failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"exported {result.model_class} to {result.out_dir} ({result.format} format)")
    if result.merged_lora:
        print(f"  LoRA merged; merged vs unmerged logits: max |diff| {result.merge_max_diff:.3g}")
    if result.reload_max_diff is not None:
        print(f"  reloaded export vs checkpoint logits: max |diff| {result.reload_max_diff:.3g}")
    if result.registered:
        print(f"  registered in MLflow as {result.registered} ({redact(result.tracking_uri or '')})")
    print(f"  load it with: {result.model_class}.from_pretrained({result.out_dir!r})", end="")
    print("  (here, or in NeMo 3.0's speechlm2)" if result.format == "nemo" else "")
    return EXIT_OK


# --------------------------------------------------------------------------------------------- register


def register(sub: argparse._SubParsersAction) -> None:
    """Add `eval`, `infer` and `export` to the `speechlm` command."""
    ev = sub.add_parser("eval", help="score a trained model on Shar data on Ray (WER / BLEU / ASR-BLEU, RTF)")
    _add_model_arguments(ev)
    ev.add_argument(
        "--data", nargs="+", required=True, metavar="SHAR", help="Lhotse Shar dir(s) or URL(s), one set each"
    )
    ev.add_argument("--batch-size", type=positive_int, help="cuts per batch (default: the validation set's batching)")
    ev.add_argument(
        "--num-workers", type=positive_int, help="model replicas (default: one per GPU; CPU-only: CPUs / 4)"
    )
    ev.add_argument(
        "--cpus-per-worker", type=positive_float, default=1.0, help="CPUs per replica (also its torch threads)"
    )
    ev.add_argument("--gpu", action="store_true", help="one GPU per replica (default: when the cluster has GPUs)")
    ev.add_argument("--out", help="output dir (default: <run dir>/eval/<checkpoint>/)")
    ev.add_argument("--max-new-tokens", type=positive_int, help="SALM: generation cap (default: validation's rule)")
    ev.add_argument(
        "--scoring-asr",
        help="duplex: ASR for ASR-BLEU, a SALM checkpoint/run dir or a transformers ASR (default: model.scoring_asr)",
    )
    ev.add_argument("--save-audio", action="store_true", help="duplex: write the generated agent speech as WAVs")
    ev.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    ev.add_argument("--tracking-uri", help="MLflow tracking URI (default: the training run's)")
    ev.set_defaults(func=cmd_eval)

    inf = sub.add_parser("infer", help="transcribe / answer audio files (duplex: also write the agent's speech)")
    _add_model_arguments(inf)
    inf.add_argument("audio", nargs="+", help="audio files (any format soundfile reads), resampled as needed")
    inf.add_argument("--prompt", help="SALM: text before the audio in the user turn (default: training's context)")
    inf.add_argument("--system-prompt", help="SALM: system prompt (default: training's)")
    inf.add_argument(
        "--out-dir",
        default=".",
        help="duplex: where <audio stem>.agent.wav files go (default: .); an existing file is never overwritten: "
        "the next free name (<stem>.agent2.wav, ...) is used and printed",
    )
    inf.add_argument("--max-new-tokens", type=positive_int, help="SALM: generation cap (default 128)")
    inf.add_argument("--batch-size", type=positive_int, default=8)
    inf.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    inf.set_defaults(func=cmd_infer)

    ex = sub.add_parser("export", help="write a self-contained model directory (this project's or NeMo's format)")
    _add_model_arguments(ex)
    ex.add_argument("--out", required=True, help="new (or empty) output directory")
    ex.add_argument(
        "--format",
        choices=("speechlm", "nemo"),
        default="speechlm",
        help="speechlm: this project's format; nemo: NeMo speechlm2's save_pretrained layout, which NeMo 3.0's "
        "SALM.from_pretrained loads (SALM only: NeMo's duplex models need NeMo's own codec)",
    )
    ex.add_argument("--merge-lora", action="store_true", help="merge LoRA adapters into the LLM (checks logits)")
    ex.add_argument("--no-verify", action="store_true", help="skip reloading the export to compare its logits")
    ex.add_argument("--atol", type=float, default=1e-4, help="logit check: absolute tolerance")
    ex.add_argument("--rtol", type=float, default=1e-4, help="logit check: tolerance relative to max |logit|")
    ex.add_argument("--register", metavar="NAME", help="register the export in the MLflow model registry as NAME")
    ex.add_argument("--tracking-uri", help="MLflow tracking URI (default: the training run's)")
    ex.set_defaults(func=cmd_export)
