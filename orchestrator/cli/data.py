"""`speechlm data demo|shar|add-codes|inspect|estimate-bins|plan-batches`: build demo assets, convert data to Lhotse
Shar, cache a codec's codes of S2S data, check data sets, estimate bucket bins from a config's data, and plan the
batch size of every bucket on a device.

Exit codes follow `orchestrator.cli.common`: 0 success, 1 broken data found, 2 bad input.
Heavy imports (lhotse, transformers) happen inside the commands so `speechlm --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys

from orchestrator.cli.common import EXIT_FAILED, EXIT_OK, bad_input, positive_float, positive_int

# Errors a user fixes by changing arguments or files; anything else is a bug and keeps its traceback.
_INPUT_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError)


def cmd_demo(args: argparse.Namespace) -> int:
    from orchestrator.demo.assets import make_demo_assets

    try:
        summary = make_demo_assets(
            args.out,
            hours=args.hours,
            seed=args.seed,
            llm_size=args.llm_size,
            s2s_hours=args.s2s_hours,
            shard_size=args.shard_size,
            num_workers=args.workers,
            progress=not args.no_progress,
        )
    except _INPUT_ERRORS as err:
        return bad_input(err)
    print(summary.format())
    return EXIT_OK


def cmd_demo_parts(args: argparse.Namespace) -> int:
    from orchestrator.demo.parts import EncoderRecipe, LMRecipe, make_demo_parts

    try:
        make_demo_parts(
            args.out,
            args.work,
            seed=args.seed,
            lm=LMRecipe(steps=args.lm_steps),
            encoder=EncoderRecipe(train_hours=args.hours, char_steps=args.char_steps, token_steps=args.token_steps),
            num_workers=args.workers,
            overwrite=args.overwrite,
        )
    except _INPUT_ERRORS as err:
        return bad_input(err)
    return EXIT_OK


def _source_keys(args: argparse.Namespace) -> dict:
    """The input_cfg keys given as flags; a flag given once is a string, as in a config."""
    from orchestrator.data.convert_inputs import SOURCE_KEYS

    keys = {key: getattr(args, key, None) for key in SOURCE_KEYS}
    return {k: v[0] if isinstance(v, list) and len(v) == 1 else v for k, v in keys.items()}


def _keys_without_type(args: argparse.Namespace) -> str | None:
    from orchestrator.data.convert_inputs import flag

    given = [flag(k) for k, v in _source_keys(args).items() if v is not None]
    return given[0] if given and not args.type else None


def cmd_shar(args: argparse.Namespace) -> int:
    from orchestrator.data.convert import convert_audio_dir_to_shar, convert_manifest_to_shar
    from orchestrator.data.convert_inputs import convert_source_to_shar, source_entry

    common = dict(
        shard_size=args.shard_size, sample_rate=args.sample_rate, audio_format=args.format, overwrite=args.overwrite
    )
    if args.allow_command_sources and not args.manifest:
        return bad_input("--allow-command-sources only applies to --manifest")
    if stray := _keys_without_type(args):
        return bad_input(f"{stray} describes an input_cfg entry: give its --type too (e.g. --type nemo)")
    try:
        if args.type:
            entry = source_entry(args.type, language=args.language, **_source_keys(args))
            summary = convert_source_to_shar(entry, args.out, **common)
        elif args.manifest:
            summary = convert_manifest_to_shar(
                args.manifest, args.out, allow_commands=args.allow_command_sources, **common
            )
        else:
            summary = convert_audio_dir_to_shar(args.wav_dir, args.out, language=args.language, **common)
    except _INPUT_ERRORS as err:
        return bad_input(err)
    print(summary.format())
    return EXIT_OK


def cmd_add_codes(args: argparse.Namespace) -> int:
    from orchestrator.data.codes import add_codes
    from orchestrator.data.shar import SharLayoutError

    try:
        summary = add_codes(
            args.path, args.codec, frame_length=args.frame_length, overwrite=args.overwrite, workers=args.workers
        )
    except (*_INPUT_ERRORS, SharLayoutError) as err:
        return bad_input(err)
    print(summary.format())
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    from orchestrator.data.convert_inputs import inspect_source, source_entry
    from orchestrator.data.inspect import inspect_shar
    from orchestrator.data.shar import SharLayoutError, find_shar_dirs
    from orchestrator.storage.atomic import is_partial_dir, partial_dir_for
    from orchestrator.storage.paths import is_url

    if stray := _keys_without_type(args):
        return bad_input(f"{stray} describes an input_cfg entry: give its --type too (e.g. --type nemo)")
    if args.type:
        if args.path:
            return bad_input(f"give a Shar PATH or --type with its keys, not both (got {args.path} and --type)")
        try:
            source = inspect_source(source_entry(args.type, **_source_keys(args)), decode=not args.no_decode)
        except (SharLayoutError, *_INPUT_ERRORS) as err:
            return bad_input(err)
        print(source.format())
        if not source.ok:
            print(f"broken: --type {args.type}", file=sys.stderr)
            return EXIT_FAILED
        return EXIT_OK
    if not args.path:
        return bad_input(
            "give a Shar directory to inspect, or --type with its keys (e.g. --type nemo "
            "--manifest-filepath manifest.json)"
        )
    try:
        shar_dirs = find_shar_dirs(args.path)
    except FileNotFoundError as err:
        if not is_url(args.path) and is_partial_dir(partial_dir_for(args.path)):
            return bad_input(
                f"{args.path} does not exist: the write that makes it was interrupted and left "
                f"{partial_dir_for(args.path)}; re-run that command (it starts over)"
            )
        return bad_input(err)
    if not shar_dirs:
        return bad_input(f"no Shar data (cuts.NNNNNN.jsonl.gz) at or below {args.path}")
    broken = []
    for shar_dir in shar_dirs:
        report = inspect_shar(shar_dir, num_threads=args.threads, decode=not args.no_decode)
        print(report.format())
        if not report.ok:
            broken.append(shar_dir)
    if len(shar_dirs) > 1:
        print(f"\n{len(shar_dirs)} Shar directories, {len(broken)} broken")
    if broken:
        print("broken: " + ", ".join(broken), file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def cmd_estimate_bins(args: argparse.Namespace) -> int:
    from orchestrator.cli.main import load_from_args
    from orchestrator.data.bins import estimate_bins
    from orchestrator.data.shar import SharLayoutError

    loaded = load_from_args(args)
    try:
        estimate = estimate_bins(
            loaded.cfg, args.dataset, args.buckets, args.sub_buckets, args.num_examples, seed=args.seed
        )
    except (SharLayoutError, *_INPUT_ERRORS) as err:
        return bad_input(err)
    print(estimate.format())
    return EXIT_OK


def cmd_plan_batches(args: argparse.Namespace) -> int:
    import json

    from orchestrator.cli.main import load_from_args
    from orchestrator.training.batch_planner import plan_batches

    loaded = load_from_args(args)
    try:
        bins = json.loads(args.bins) if args.bins else None
    except json.JSONDecodeError as err:
        return bad_input(f"--bins {args.bins!r} is not a JSON list ({err}); e.g. --bins '[4.0, 8.0, 16.0]'")
    try:
        plan = plan_batches(
            loaded.cfg,
            device=args.device,
            memory_gb=args.memory_gb,
            memory_fraction=args.memory_fraction,
            ratio=args.ratio,
            bins=bins,
            start_batch_size=args.start_batch_size,
            max_batch_size=args.max_batch_size,
            threshold=args.threshold,
            progress=None if args.quiet else print,
        )
    except _INPUT_ERRORS as err:
        return bad_input(err)
    print(plan.format())
    return EXIT_OK


def _source_types() -> tuple[str, ...]:
    from orchestrator.data.convert_inputs import SOURCE_TYPES

    return SOURCE_TYPES


def _add_source_keys(parser: argparse.ArgumentParser) -> None:
    """input_cfg keys as flags (--type ...); list-valued keys take several values, as lists in a config."""
    keys = parser.add_argument_group("input_cfg keys (with --type; as in a config entry)")
    for key, what in (
        ("manifest_filepath", "nemo, nemo_tarred, multimodal_conversation, share_gpt: the JSONL manifest(s)"),
        ("tarred_audio_filepaths", "nemo_tarred (and tarred conversations): the audio tars"),
        ("cuts_path", "lhotse, lhotse_as_conversation: the cuts manifest(s)"),
        ("shar_path", "lhotse_shar: Shar directories (re-shard or resample a set)"),
        ("paths", "txt, txt_jsonl, nemo_sft_jsonl: the text files"),
        ("audio_placeholders", "share_gpt: marks of the audio in a turn (default <sound> <speech>)"),
    ):
        keys.add_argument("--" + key.replace("_", "-"), dest=key, nargs="+", default=None, help=what)
    for key, what in (
        ("text_field", "nemo*, txt_jsonl: the key holding the text (default text)"),
        ("lang_field", "nemo*: the key holding the language (default lang)"),
        ("audio_root", "share_gpt: where relative sound paths live"),
    ):
        keys.add_argument("--" + key.replace("_", "-"), dest=key, default=None, help=what)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Register the `data` command group (demo, shar, inspect) on the top-level subparsers."""
    data = subparsers.add_parser("data", help="demo assets, data conversion and checks, bucket and batch planning")
    sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)

    demo = sub.add_parser(
        "demo",
        help="synthesise demo ASR/S2S Shar sets with eSpeak NG and build a tiny LLM (offline)",
        description="Writes <out>/{llm,codec,asr/{train,val,test},s2s/{train,val,test},DONE.json}. "
        "Idempotent: finished splits are skipped; deterministic for a seed. An llm/ or codec/ directory that "
        "this command did not make is never replaced: it stops before synthesising anything.",
    )
    demo.add_argument("--out", default="data/demo", help="output directory (default: data/demo)")
    demo.add_argument("--hours", type=positive_float, default=1.0, help="ASR train hours; val/test get 5%% each")
    demo.add_argument("--s2s-hours", type=positive_float, default=None, help="S2S train hours (default: hours / 2)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--llm-size", choices=("tiny", "small"), default="tiny")
    demo.add_argument("--shard-size", type=positive_int, default=200, help="cuts per Shar shard")
    demo.add_argument("--workers", type=positive_int, default=2, help="synthesis processes")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=cmd_demo)

    parts = sub.add_parser(
        "demo-parts",
        help="make the demo's pretrained parts (a CTC ASR encoder .nemo and a small LLM) from scratch, offline",
        description="Re-makes what configs/demo/pretrained/ ships: synthesises demo speech into --work, pretrains "
        "the tiny LLM on the demo grammar's text (save_pretrained dir), then trains a FastConformer CTC model on "
        "characters and on the LLM's tokens (a .nemo archive). About 40 CPU minutes with the defaults.",
    )
    parts.add_argument("--out", default="configs/demo/pretrained", help="where llm/ and asr_ctc.nemo go")
    parts.add_argument("--work", default="data/demo_parts", help="synthesised speech (kept for re-runs)")
    parts.add_argument("--hours", type=positive_float, default=8.0, help="hours of speech to train the encoder on")
    parts.add_argument("--char-steps", type=positive_int, default=1000, help="encoder steps on characters")
    parts.add_argument("--token-steps", type=positive_int, default=3000, help="encoder steps on the LLM's tokens")
    parts.add_argument("--lm-steps", type=positive_int, default=1500, help="LLM pretraining steps")
    parts.add_argument("--seed", type=int, default=0)
    parts.add_argument("--workers", type=positive_int, default=2, help="synthesis processes")
    parts.add_argument("--overwrite", action="store_true", help="replace parts already in --out")
    parts.set_defaults(func=cmd_demo_parts)

    shar = sub.add_parser(
        "shar",
        help="convert any input type (NeMo, NeMo tarred, Lhotse manifests, conversations, text), a Lhotse cuts "
        "manifest or a folder of audio + .txt transcripts to Shar",
        description="Every cut is checked first (audio present, decodable, finite, as long as its manifest or WAV "
        "header says); the first bad one stops the run, naming it. The set is written aside and appears in --out "
        "only when complete, so an interrupted run leaves nothing that looks finished, and a re-run starts over. "
        "--type reads the source as an input_cfg entry of that type with the keys given as flags (the pipeline's "
        "own readers); conversations and text-only examples are kept as such (read back with type lhotse_shar).",
    )
    source = shar.add_mutually_exclusive_group(required=True)
    source.add_argument("--type", choices=_source_types(), help="an input_cfg type; give its keys as flags below")
    source.add_argument("--manifest", help="Lhotse cuts manifest (CUTS.jsonl.gz), read by lhotse itself")
    source.add_argument("--wav-dir", help="folder of audio files (wav/flac/ogg/mp3) with same-named .txt")
    _add_source_keys(shar)
    shar.add_argument("--out", required=True, help="output Shar directory (must hold no shards, unless --overwrite)")
    shar.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the Shar files already in --out (once the new set is complete)",
    )
    shar.add_argument(
        "--allow-command-sources",
        action="store_true",
        help="--manifest only: run the shell commands of Lhotse `type: command` audio sources (refused by default; "
        "only for manifests you trust)",
    )
    shar.add_argument("--shard-size", type=positive_int, default=200, help="cuts per shard")
    shar.add_argument("--sample-rate", type=positive_int, default=None, help="resample the recording to this rate")
    shar.add_argument("--format", default="flac", choices=("flac", "wav"), help="audio codec")
    shar.add_argument("--language", default=None, help="language tag of supervisions without one (--wav-dir, --type)")
    shar.set_defaults(func=cmd_shar)

    codes = sub.add_parser(
        "add-codes",
        help="cache the audio-codec codes of S2S Shar data (target_audio) so duplex training does not re-encode them",
        description="Encodes every cut's target_audio with the duplex model's codec once and stores the codes in the "
        "Shar directory as a target_codes field (target_codes.NNNNNN.tar, lhotse's array format) with "
        "target_codes.json naming the codec. Training then reads the codes instead of encoding the agent audio on "
        "every step; a model with another codec refuses them. PATH may hold several Shar directories (e.g. "
        "data/demo/s2s). Directories already encoded with this codec are skipped; the files are renamed into "
        "place only when a directory is complete.",
    )
    codes.add_argument("path", help="a Shar directory, or a directory holding several (local)")
    codes.add_argument("--codec", required=True, help="model.pretrained_audio_codec: hub id or local directory")
    codes.add_argument(
        "--frame-length", type=positive_float, default=0.08, help="data.frame_length in seconds (default: 0.08)"
    )
    codes.add_argument("--workers", type=positive_int, default=2, help="encoding processes (default: 2)")
    codes.add_argument(
        "--overwrite", action="store_true", help="replace codes that another codec made (refused by default)"
    )
    codes.set_defaults(func=cmd_add_codes)

    inspect = sub.add_parser(
        "inspect",
        help="summarise Shar sets, or a source of any input type, and check them (exit 1 naming each broken shard)",
        description="PATH: Shar directories (conversations and text-only cuts written by `data shar --type` "
        "included). --type with its keys as flags: the source read as training reads it, every audio decoded.",
    )
    inspect.add_argument("path", nargs="?", help="Shar directory or a parent of several, local or fsspec URL")
    inspect.add_argument("--type", choices=_source_types(), help="inspect a source of this input_cfg type instead")
    _add_source_keys(inspect)
    inspect.add_argument("--threads", type=positive_int, default=8, help="shards read in parallel")
    inspect.add_argument(
        "--no-decode", action="store_true", help="do not decode the audio (faster; damaged audio goes unnoticed)"
    )
    inspect.set_defaults(func=cmd_inspect)

    from orchestrator.cli.main import add_config_arguments

    bins = sub.add_parser(
        "estimate-bins",
        help="bucket_duration_bins from a sample of a config's data (NeMo's estimate_duration/token_bins)",
        description="Reads the dataset as training does (inputs, mixing shares, filters, prompt format, tokenizer; "
        "manifests only, no audio decoded) and prints num_buckets and bucket_duration_bins: seconds, or tokens with "
        "use_multimodal_sampling; with --sub-buckets, NeMo's 2-D [first, second] bins for plan-batches.",
    )
    add_config_arguments(bins)
    bins.add_argument("--dataset", default="train", help="train (default) or a validation set name")
    bins.add_argument("--buckets", type=positive_int, default=None, help="buckets (default: the config's num_buckets)")
    bins.add_argument("--sub-buckets", type=positive_int, default=None, help="2-D: sub-buckets per bucket")
    bins.add_argument("--num-examples", type=positive_int, default=10000, help="examples to measure")
    bins.add_argument("--seed", type=int, default=0, help="which shards are sampled")
    bins.set_defaults(func=cmd_estimate_bins)

    plan = sub.add_parser(
        "plan-batches",
        help="the largest batch per bucket that fits the device, by running training steps (NeMo's OOMptimizer)",
        description="Builds the config's model on the device and, bucket by bucket from the longest, searches the "
        "largest batch whose training step (forward, backward, optimizer) fits the memory budget; prints "
        "bucket_duration_bins and bucket_batch_size. Run it on the GPU type of the long job. On CPU the peak of "
        "live tensors is measured against --memory-gb.",
    )
    add_config_arguments(plan)
    plan.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:1, ...")
    plan.add_argument("--memory-gb", type=positive_float, default=None, help="memory budget (default: a fraction)")
    plan.add_argument("--memory-fraction", type=positive_float, default=0.9, help="of the device memory (0.9)")
    plan.add_argument("--ratio", type=positive_float, default=0.25, help="answer tokens per input token (1-D bins)")
    plan.add_argument("--bins", default=None, help="JSON list of bins (default: the config's bucket_duration_bins)")
    plan.add_argument("--start-batch-size", type=positive_int, default=1)
    plan.add_argument("--max-batch-size", type=positive_int, default=1024)
    plan.add_argument("--threshold", type=positive_float, default=0.05, help="stop when the gap is this relative")
    plan.add_argument("--quiet", action="store_true", help="print only the result")
    plan.set_defaults(func=cmd_plan_batches)
