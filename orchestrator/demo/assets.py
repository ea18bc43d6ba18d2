"""Build the demo assets: synthetic ASR and S2S Shar sets plus a tiny LLM, all made locally.

Layout (other parts of the project rely on it)::

    <out>/llm/                  tokenizer + random-init Llama (save_pretrained)
    <out>/codec/                random-init tiny DAC codec at 22.05 kHz, 25 Hz frames (save_pretrained)
    <out>/asr/{train,val,test}/ Shar: cuts + recording (16 kHz FLAC), one supervision per cut
    <out>/s2s/{train,val,test}/ Shar: cuts + recording (user, 16 kHz) + target_audio (agent, 22.05 kHz)
    <out>/{conversations,text,nemo_tarred,lhotse}/{train,val}/  the other input formats (orchestrator.demo.formats)
    <out>/DONE.json             written last

Each split is written into a hidden ``.<split>.partial`` directory and renamed when complete
(``storage.atomic``), so a re-run skips finished splits and redoes interrupted ones. Everything is a function of the seed:
job lists come from seeded RNGs and eSpeak audio is a pure function of (text, voice style).

Speed: workers synthesise, resample and FLAC-encode; the main process only writes tar members and
cut manifests (``EncodedSharWriter``), so it never decodes and re-encodes audio.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from orchestrator.demo import grammar, synth
from orchestrator.storage import atomic
from speech_models.audio import resample_array

USER_SAMPLE_RATE = 16000
AGENT_SAMPLE_RATE = synth.SAMPLE_RATE  # 22050: agent audio stays at eSpeak's native rate
FIELD_SAMPLE_RATES = {"recording": USER_SAMPLE_RATE, "target_audio": AGENT_SAMPLE_RATE}
# Conversations are padded to whole 80 ms frames: the duplex models' frame, and a multiple of
# 1/50 s, so both 16 kHz and 22.05 kHz channels get an integer number of samples.
S2S_FRAME_SECONDS = 0.08
S2S_TAIL_SECONDS = 0.24
# The agent's turn opens this long before its voice. The demo codec's encoder looks 4 frames (0.32 s) ahead, so the
# codes of the last silent frames before a voice already change; were the turn (its BOS frame) to start at the voice,
# teacher forcing would let the model learn "answer when the fed-back codes stir", a cue it never gets when it
# generates (its own codes stay silent until it decides to speak), and it would never start its answer. With the
# turn opening first, only the user's audio says when to answer, at training and at inference alike.
AGENT_LEAD_IN_SECONDS = 0.4
# The agent speaks with one fixed voice, as a deployed assistant would; users vary.
AGENT_STYLE = synth.VoiceStyle(voice="en-us+f3", rate=165, pitch=50, word_gap=0)
HELDOUT_FRACTION = 0.05
# Test sentences in voices no split uses: a Shar split for `speechlm eval`, and a few WAVs for `speechlm infer`.
NEW_VOICE_SPLIT, NEW_VOICE_CUTS = "test_new_voice", 40
NEW_VOICE_WAVS, NEW_VOICE_WAV_COUNT = "new_voice_wav", 3
_PARAMS_FILE = ".demo_params.json"
# Bumped when the same parameters would make different data, so that older assets are refused, not mixed in.
# 2: the agent's turn opens AGENT_LEAD_IN_SECONDS before its voice (1: at its voice).
LAYOUT_VERSION = 2


@dataclass
class SplitSummary:
    cuts: int
    hours: float
    skipped: bool = False


@dataclass
class DemoSummary:
    """What ``make_demo_assets`` made; ``audio_hours_made`` counts only this run's new audio."""

    out_dir: str
    seed: int
    hours: float
    splits: dict[str, dict[str, SplitSummary]] = field(default_factory=dict)
    audio_hours_made: float = 0.0
    seconds: float = 0.0
    llm_dir: str = ""

    def format(self) -> str:
        lines = [f"demo assets in {self.out_dir} (seed {self.seed})"]
        for task, splits in self.splits.items():
            for split, s in splits.items():
                note = " (existed, skipped)" if s.skipped else ""
                lines.append(f"  {task}/{split:<14} {s.cuts:6d} cuts {s.hours:7.3f} h{note}")
        lines.append(f"  llm: {self.llm_dir}")
        if self.audio_hours_made:
            rate = self.seconds / self.audio_hours_made
            lines.append(
                f"made {self.audio_hours_made:.3f} audio-hours in {self.seconds:.1f} s wall ({rate:.1f} s per audio-hour)"
            )
        else:
            lines.append(f"nothing new to synthesise: every split existed ({self.seconds:.1f} s)")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Jobs: what to say, who says it (deterministic for a seed)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AsrJob:
    cut_id: str
    text: str
    style: synth.VoiceStyle
    lead_s: float
    trail_s: float

    def turns(self) -> list[tuple[str, str]]:
        """(speaker, text) per supervision."""
        return [(self.style.voice, self.text)]


@dataclass(frozen=True)
class S2sJob:
    cut_id: str
    question: str
    answer: str
    user_style: synth.VoiceStyle
    gap_s: float

    def turns(self) -> list[tuple[str, str]]:
        return [("user", self.question), ("agent", self.answer)]


def asr_jobs(split: str, seed: int) -> Iterator[AsrJob]:
    """Endless ASR jobs for a split: unique sentences, random speakers and silences."""
    rng = random.Random(f"asr-{split}-{seed}")
    for i, text in enumerate(grammar.generate_sentences(split, seed)):
        style = synth.sample_style(rng)
        lead, trail = rng.uniform(0.05, 0.4), rng.uniform(0.1, 0.5)
        yield AsrJob(f"asr-{split}-{i:06d}", text, style, round(lead, 3), round(trail, 3))


def new_voice_jobs(seed: int) -> Iterator[AsrJob]:
    """Test-split sentences (a stream of their own) spoken by voices no split uses (`synth.NEW_VOICE_VARIANTS`)."""
    rng = random.Random(f"asr-new-voice-{seed}")
    for i, text in enumerate(grammar.generate_sentences("test", seed + 7)):
        style = synth.sample_new_voice_style(rng)
        lead, trail = rng.uniform(0.05, 0.4), rng.uniform(0.1, 0.5)
        yield AsrJob(f"asr-new-voice-{i:06d}", text, style, round(lead, 3), round(trail, 3))


def s2s_jobs(split: str, seed: int) -> Iterator[S2sJob]:
    """Endless S2S jobs for a split: Q/A pairs, random user speakers, 0.2-0.5 s turn gaps."""
    rng = random.Random(f"s2s-{split}-{seed}")
    for i, pair in enumerate(grammar.generate_qa_pairs(split, seed)):
        style = synth.sample_style(rng)
        gap = round(rng.uniform(0.2, 0.5), 3)
        yield S2sJob(f"s2s-{split}-{i:06d}", pair.question, pair.answer, style, gap)


# ----------------------------------------------------------------------------------------------
# Rendering (worker processes: numpy, scipy and soundfile only)
# ----------------------------------------------------------------------------------------------


def _to_16k(audio: np.ndarray) -> np.ndarray:
    return resample_array(audio, synth.SAMPLE_RATE, USER_SAMPLE_RATE)


def render_asr(job: AsrJob) -> np.ndarray:
    """16 kHz speech of ``job.text`` with a little silence around it, at least 1 s long."""
    speech = _to_16k(synth.synthesize(job.text, job.style))
    lead = int(job.lead_s * USER_SAMPLE_RATE)
    total = max(lead + len(speech) + int(job.trail_s * USER_SAMPLE_RATE), USER_SAMPLE_RATE)
    audio = np.zeros(total, dtype=np.float32)
    audio[lead : lead + len(speech)] = speech
    return audio


@dataclass
class Conversation:
    user: np.ndarray  # 16 kHz, whole conversation
    agent: np.ndarray  # 22.05 kHz, whole conversation
    turns: list[tuple[float, float]]  # (start, duration) of the user and the agent turn
    duration: float


@functools.lru_cache(maxsize=2048)
def _agent_speech(answer: str) -> np.ndarray:
    """The agent's voice is fixed and most answers recur, so each is synthesised once per process."""
    return synth.synthesize(answer, AGENT_STYLE)


def render_s2s(job: S2sJob) -> Conversation:
    """User asks, a short gap, the agent's turn opens and its voice follows AGENT_LEAD_IN_SECONDS later; two channels
    of the same length."""
    user = _to_16k(synth.synthesize(job.question, job.user_style))
    agent = _agent_speech(job.answer)
    user_seconds = len(user) / USER_SAMPLE_RATE
    agent_start = round((user_seconds + job.gap_s) * AGENT_SAMPLE_RATE) / AGENT_SAMPLE_RATE
    agent_offset = round((agent_start + AGENT_LEAD_IN_SECONDS) * AGENT_SAMPLE_RATE)  # the voice's first sample
    agent_seconds = AGENT_LEAD_IN_SECONDS + len(agent) / AGENT_SAMPLE_RATE
    frames = math.ceil((agent_start + agent_seconds + S2S_TAIL_SECONDS) / S2S_FRAME_SECONDS)
    duration = round(frames * S2S_FRAME_SECONDS, 6)
    user_track = np.zeros(round(duration * USER_SAMPLE_RATE), dtype=np.float32)
    user_track[: len(user)] = user
    agent_track = np.zeros(round(duration * AGENT_SAMPLE_RATE), dtype=np.float32)
    agent_track[agent_offset : agent_offset + len(agent)] = agent
    turns = [(0.0, user_seconds), (agent_start, agent_seconds)]
    return Conversation(user_track, agent_track, turns, duration)


@dataclass
class Encoded:
    """One example ready for Shar: FLAC bytes and sample count per field, supervision timing."""

    audio: dict[str, bytes]
    num_samples: dict[str, int]
    turns: list[tuple[float, float]]  # (start, duration) per supervision

    @property
    def duration(self) -> float:
        return self.num_samples["recording"] / USER_SAMPLE_RATE


def encode_asr(job: AsrJob) -> Encoded:
    from orchestrator.data.shar import encode_audio

    audio = render_asr(job)
    duration = len(audio) / USER_SAMPLE_RATE
    return Encoded({"recording": encode_audio(audio, USER_SAMPLE_RATE)}, {"recording": len(audio)}, [(0.0, duration)])


def encode_s2s(job: S2sJob) -> Encoded:
    from orchestrator.data.shar import encode_audio

    conv = render_s2s(job)
    return Encoded(
        audio={
            "recording": encode_audio(conv.user, USER_SAMPLE_RATE),
            "target_audio": encode_audio(conv.agent, AGENT_SAMPLE_RATE),
        },
        num_samples={"recording": len(conv.user), "target_audio": len(conv.agent)},
        turns=conv.turns,
    )


def shar_cut(job: AsrJob | S2sJob, encoded: Encoded):
    """The cut manifest for an encoded example: Shar placeholder recordings plus supervisions.

    ``target_audio`` (S2S) is a custom Recording field, so ``cut.load_target_audio()`` works.
    """
    from lhotse import MonoCut, SupervisionSegment

    from orchestrator.data.shar import shar_recording

    recordings = {
        name: shar_recording(job.cut_id, FIELD_SAMPLE_RATES[name], n) for name, n in encoded.num_samples.items()
    }
    recording = recordings.pop("recording")
    supervisions = [
        SupervisionSegment(
            id=job.cut_id if len(encoded.turns) == 1 else f"{job.cut_id}-{i}-{speaker}",
            recording_id=job.cut_id,
            start=round(start, 4),
            duration=round(duration, 4),
            text=text,
            speaker=speaker,
            language="en",
        )
        for i, ((start, duration), (speaker, text)) in enumerate(zip(encoded.turns, job.turns(), strict=True))
    ]
    return MonoCut(
        id=job.cut_id,
        start=0.0,
        duration=recording.duration,
        channel=0,
        recording=recording,
        supervisions=supervisions,
        custom=recordings or None,
    )


# ----------------------------------------------------------------------------------------------
# Writing splits (main process)
# ----------------------------------------------------------------------------------------------

TASKS: dict[str, dict] = {
    "asr": {"jobs": asr_jobs, "encode": encode_asr, "fields": {"recording": "flac"}},
    "s2s": {"jobs": s2s_jobs, "encode": encode_s2s, "fields": {"recording": "flac", "target_audio": "flac"}},
}


def _encoded_stream(jobs: Iterator, encode: Callable, pool, target_s: float, min_cuts: int) -> Iterator[tuple]:
    """Encode jobs in order until ``target_s`` seconds and ``min_cuts`` cuts are reached.

    Jobs go to the pool in batches sized from the running mean duration, so little work is wasted
    past the target; the stopping point is decided in job order, so it does not depend on batching.
    """
    done_s, done_n = 0.0, 0
    while done_s < target_s or done_n < min_cuts:
        mean = done_s / done_n if done_n else 2.5
        need = max(min_cuts - done_n, math.ceil((target_s - done_s) / mean) + 1, 1)
        batch = list(itertools.islice(jobs, min(need, 512)))
        results = pool.imap(encode, batch, chunksize=8) if pool else map(encode, batch)
        for job, encoded in zip(batch, results, strict=False):  # stops early on purpose
            yield job, encoded
            done_s += encoded.duration
            done_n += 1
            if done_s >= target_s and done_n >= min_cuts:
                break


def write_demo_split(
    out_dir: str | Path,
    task: str,
    split: str,
    seed: int,
    target_s: float,
    min_cuts: int = 1,
    shard_size: int = 200,
    pool=None,
    progress: bool = False,
    jobs: Iterator | None = None,
) -> SplitSummary:
    """Write one demo split (``task`` "asr" or "s2s") as Shar into ``out_dir``, atomically.

    Stops at the first job that brings it to ``target_s`` seconds and ``min_cuts`` cuts.
    ``pool``: an optional ``synth.worker_pool`` to render in; None renders in-process.
    ``jobs``: the jobs to render (default: the task's jobs for ``split``).
    """
    from tqdm.auto import tqdm

    from orchestrator.data.shar import EncodedSharWriter

    spec = TASKS[task]
    cuts, seconds = 0, 0.0
    with (
        tqdm(total=round(target_s), unit="s", desc=f"{task}/{split}", disable=not progress) as bar,
        EncodedSharWriter(out_dir, spec["fields"], shard_size) as writer,  # atomic: appears when complete
    ):
        jobs = spec["jobs"](split, seed) if jobs is None else jobs
        for job, encoded in _encoded_stream(jobs, spec["encode"], pool, target_s, min_cuts):
            writer.write(shar_cut(job, encoded), encoded.audio)
            cuts, seconds = cuts + 1, seconds + encoded.duration
            bar.update(round(seconds) - bar.n)
    return SplitSummary(cuts, seconds / 3600)


def _existing_split(split_dir: Path) -> SplitSummary:
    """Counts of a finished split, from its cuts shards only (cheap)."""
    import gzip

    cuts, seconds = 0, 0.0
    for path in sorted(split_dir.glob("cuts.*.jsonl.gz")):
        with gzip.open(path, "rt") as f:
            for line in f:
                cuts += 1
                seconds += json.loads(line)["duration"]
    return SplitSummary(cuts, seconds / 3600, skipped=True)


def write_new_voice_wavs(out_dir: Path, seed: int) -> None:
    """The first NEW_VOICE_WAV_COUNT sentences of the new-voice split as WAV files, with their text beside them
    (`<id>.txt`), for `speechlm infer --audio`. Skipped when they exist."""
    import soundfile as sf

    if out_dir.is_dir() and len(list(out_dir.glob("*.wav"))) == NEW_VOICE_WAV_COUNT:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    for job in itertools.islice(new_voice_jobs(seed), NEW_VOICE_WAV_COUNT):
        atomic.write_text(out_dir / f"{job.cut_id}.txt", job.text + "\n")
        wav = io.BytesIO()
        sf.write(wav, render_asr(job), USER_SAMPLE_RATE, format="WAV")
        atomic.write_bytes(out_dir / f"{job.cut_id}.wav", wav.getvalue())


def tokenizer_corpus(seed: int, num_sentences: int = 4000, num_pairs: int = 2000) -> list[str]:
    """Text the demo tokenizer is trained on: train-split sentences, Q/A pairs and every word."""
    sentences = itertools.islice(grammar.generate_sentences("train", seed), num_sentences)
    pairs = itertools.islice(grammar.generate_qa_pairs("train", seed), num_pairs)
    texts = list(sentences) + [t for p in pairs for t in (p.question, p.answer)]
    return texts + sorted(grammar.vocabulary())


def make_demo_assets(
    out_dir: str | Path,
    hours: float = 1.0,
    seed: int = 0,
    llm_size: str = "tiny",
    s2s_hours: float | None = None,
    min_heldout_cuts: int = 50,
    shard_size: int = 200,
    num_workers: int = 2,
    progress: bool = True,
) -> DemoSummary:
    """Synthesise the demo data set and tiny LLM into ``out_dir``; skips splits that exist.

    ``hours`` is the ASR train size; val/test get 5% of it each (at least ``min_heldout_cuts``
    cuts); S2S train gets ``s2s_hours`` (default ``hours / 2``) of conversation.
    """
    from speech_models.testing import build_tiny_codec_dir, build_tiny_llm_dir, check_replaceable

    started = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; give a directory for the demo assets")
    if shard_size < 1:
        raise ValueError(f"--shard-size {shard_size} must be at least 1 (cuts per shard)")
    # llm/ and codec/ are replaced when rebuilt: refuse now, before minutes of synthesis, if they are not ours.
    check_replaceable(out / "llm", "llm")
    check_replaceable(out / "codec", "codec")
    out.mkdir(parents=True, exist_ok=True)
    s2s_hours = hours / 2 if s2s_hours is None else s2s_hours
    params = {
        "seed": seed,
        "hours": hours,
        "s2s_hours": s2s_hours,
        "llm_size": llm_size,
        "min_heldout_cuts": min_heldout_cuts,
        "shard_size": shard_size,
        "layout": LAYOUT_VERSION,
    }
    params_file = out / _PARAMS_FILE
    if params_file.exists():
        previous = json.loads(params_file.read_text())
        previous_layout = previous.get("layout", 1)  # files written before the version existed hold layout 1
        if previous_layout != LAYOUT_VERSION:
            raise FileExistsError(
                f"{out} holds demo assets in layout {previous_layout} of an earlier version of this "
                f"command (now {LAYOUT_VERSION}); remake them: `rm -r {out}` (your runs under experiments/ stay) or "
                "choose another --out"
            )
        if previous != params:
            raise FileExistsError(
                f"{out} holds demo assets made with {previous}, not {params}; "
                "remove the directory or choose another --out"
            )
    else:
        atomic.write_text(params_file, json.dumps(params, indent=1))
    (out / "DONE.json").unlink(missing_ok=True)

    summary = DemoSummary(out_dir=str(out), seed=seed, hours=hours)
    train_seconds = {"asr": hours * 3600, "s2s": s2s_hours * 3600}
    made_s = 0.0
    pool = synth.worker_pool(num_workers, preload=[__name__]) if num_workers > 1 else None
    try:
        for task in TASKS:
            summary.splits[task] = {}
            for split in grammar.SPLITS:
                split_dir = out / task / split
                if split_dir.is_dir():
                    summary.splits[task][split] = _existing_split(split_dir)
                    continue
                split_dir.parent.mkdir(parents=True, exist_ok=True)
                heldout = split != "train"
                result = write_demo_split(
                    split_dir,
                    task,
                    split,
                    seed,
                    target_s=train_seconds[task] * (HELDOUT_FRACTION if heldout else 1.0),
                    min_cuts=min_heldout_cuts if heldout else 1,
                    shard_size=shard_size,
                    pool=pool,
                    progress=progress,
                )
                summary.splits[task][split] = result
                made_s += result.hours * 3600
        new_voice = out / "asr" / NEW_VOICE_SPLIT
        if new_voice.is_dir():
            summary.splits["asr"][NEW_VOICE_SPLIT] = _existing_split(new_voice)
        else:
            result = write_demo_split(
                new_voice, "asr", "test", seed, target_s=0.0, min_cuts=NEW_VOICE_CUTS, shard_size=shard_size,
                pool=pool, progress=progress, jobs=new_voice_jobs(seed),
            )  # fmt: skip
            summary.splits["asr"][NEW_VOICE_SPLIT] = result
            made_s += result.hours * 3600
        write_new_voice_wavs(out / "asr" / NEW_VOICE_WAVS, seed)
        from orchestrator.demo.formats import make_format_demos

        make_format_demos(out, hours, seed, min_heldout_cuts, pool=pool)
    finally:
        if pool is not None:
            pool.close()
            pool.join()

    llm_dir = build_tiny_llm_dir(out / "llm", tokenizer_corpus(seed), size=llm_size, seed=seed)
    summary.llm_dir = str(llm_dir)
    # The duplex demo models need an audio codec; a random tiny one is enough to exercise the pipeline.
    build_tiny_codec_dir(out / "codec", kind="dac", seed=seed)
    summary.audio_hours_made = made_s / 3600
    summary.seconds = time.perf_counter() - started
    done = {
        **params,
        "counts": {
            task: {split: {"cuts": s.cuts, "hours": round(s.hours, 4)} for split, s in splits.items()}
            for task, splits in summary.splits.items()
        },
        "audio_hours_made": round(summary.audio_hours_made, 4),
        "seconds": round(summary.seconds, 2),
    }
    atomic.write_text(out / "DONE.json", json.dumps(done, indent=1))
    return summary
