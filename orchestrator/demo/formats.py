"""Demo data in the formats NeMo users bring besides Shar: multi-turn spoken conversations, text-only sets, a NeMo
tarred manifest and a Lhotse cut manifest, so each input type trains end to end on the demo assets.

Layout, next to the demo's Shar sets (`orchestrator.demo.assets`)::

    <out>/conversations/{train,val}/  conversations.jsonl   NeMo multimodal conversations: two spoken questions
                                      sharegpt.jsonl        and their text answers per line; the same audio as
                                      audio/*.flac          ShareGPT lines (one question each)
    <out>/text/{train,val}/           sentences.txt         plain text, one sentence per line (type txt)
                                      qa.jsonl              text-only question/answer conversations
    <out>/nemo_tarred/{train,val}/    manifest_N.json + audio_N.tar   the ASR split as a NeMo tarred dataset
    <out>/lhotse/{train,val}/         cuts.jsonl.gz + audio/*.flac    the ASR split as a Lhotse cut manifest

Questions and answers come from the demo grammar (answers follow from questions, so a tiny model can learn them);
questions are spoken with eSpeak NG voices like the ASR set. The NeMo and Lhotse sets re-package the ASR split's
audio, so their figures compare with the Shar runs. Every set is written aside and renamed into place when
complete (`storage.atomic`), and is a function of the seed: a re-run skips sets that exist.
"""

from __future__ import annotations

import gzip
import io
import itertools
import json
import random
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from orchestrator.demo import grammar, synth
from orchestrator.storage.atomic import atomic_dir

SPLITS = ("train", "val")
AUDIO_FORMAT = "flac"


@dataclass(frozen=True)
class FormatSizes:
    """How many examples each format set gets per split."""

    conversations: int
    text_lines: int
    qa_pairs: int
    nemo_shard_size: int = 20


def sizes_for(hours: float, heldout: int, split: str) -> FormatSizes:
    """Sizes that scale with the demo's ASR hours (about 200 conversations per ASR hour)."""
    if split == "train":
        return FormatSizes(conversations=max(24, round(200 * hours)), text_lines=2000, qa_pairs=1000)
    return FormatSizes(conversations=max(8, heldout // 2), text_lines=max(40, heldout), qa_pairs=max(40, heldout))


# ----------------------------------------------------------------------------------------------
# Spoken conversations
# ----------------------------------------------------------------------------------------------


def conversation_jobs(split: str, seed: int) -> Iterator[tuple[str, list[grammar.QAPair], list]]:
    """Endless (conversation id, two Q/A pairs, their two question AsrJobs): one user voice per conversation."""
    from orchestrator.demo.assets import AsrJob

    rng = random.Random(f"conversations-{split}-{seed}")
    pairs = grammar.generate_qa_pairs(split, seed + 1)
    for i in itertools.count():
        conv_id = f"conv-{split}-{i:06d}"
        qa = [next(pairs), next(pairs)]
        style = synth.sample_style(rng)
        jobs = [
            AsrJob(f"{conv_id}_q{k}", pair.question, style, round(rng.uniform(0.05, 0.2), 3), round(rng.uniform(0.1, 0.3), 3))
            for k, pair in enumerate(qa)
        ]  # fmt: skip
        yield conv_id, qa, jobs


def write_conversations(out_dir: str | Path, split: str, seed: int, count: int, pool=None) -> int:
    """`count` two-question conversations as NeMo multimodal-conversation and ShareGPT JSONL with FLAC files."""
    from orchestrator.demo.assets import USER_SAMPLE_RATE, encode_asr

    conversations = list(itertools.islice(conversation_jobs(split, seed), count))
    jobs = [job for _, _, pair_jobs in conversations for job in pair_jobs]
    encoded = list(pool.imap(encode_asr, jobs, chunksize=8) if pool else map(encode_asr, jobs))
    by_id = {job.cut_id: enc for job, enc in zip(jobs, encoded, strict=True)}
    with atomic_dir(Path(out_dir)) as tmp:
        (tmp / "audio").mkdir()
        lines, sharegpt = [], []
        for conv_id, qa, pair_jobs in conversations:
            turns = []
            for pair, job in zip(qa, pair_jobs, strict=True):
                enc = by_id[job.cut_id]
                name = f"audio/{job.cut_id}.{AUDIO_FORMAT}"
                (tmp / name).write_bytes(enc.audio["recording"])
                seconds = round(enc.num_samples["recording"] / USER_SAMPLE_RATE, 4)
                turns += [
                    {"from": "User", "type": "audio", "value": name, "duration": seconds},
                    {"from": "Assistant", "type": "text", "value": pair.answer},
                ]
            lines.append({"id": conv_id, "conversations": turns})
            first = turns[0]
            sharegpt.append(
                {
                    "id": f"{conv_id}-sharegpt",
                    "sound": first["value"],
                    "conversations": [
                        {"from": "human", "value": "<sound>", "duration": first["duration"]},
                        {"from": "gpt", "value": qa[0].answer},
                    ],
                }
            )
        _write_jsonl(tmp / "conversations.jsonl", lines)
        _write_jsonl(tmp / "sharegpt.jsonl", sharegpt)
    return len(lines)


# ----------------------------------------------------------------------------------------------
# Text only
# ----------------------------------------------------------------------------------------------


def write_text_sets(out_dir: str | Path, split: str, seed: int, sizes: FormatSizes) -> int:
    """Plain sentences (type txt) and text question/answer conversations (multimodal_conversation, no audio)."""
    sentences = itertools.islice(grammar.generate_sentences(split, seed + 2), sizes.text_lines)
    pairs = itertools.islice(grammar.generate_qa_pairs(split, seed + 3), sizes.qa_pairs)
    qa = [
        {
            "id": f"qa-{split}-{i:06d}",
            "conversations": [
                {"from": "User", "type": "text", "value": pair.question},
                {"from": "Assistant", "type": "text", "value": pair.answer},
            ],
        }
        for i, pair in enumerate(pairs)
    ]
    with atomic_dir(Path(out_dir)) as tmp:
        (tmp / "sentences.txt").write_text("".join(f"{s}\n" for s in sentences))
        _write_jsonl(tmp / "qa.jsonl", qa)
    return len(qa)


# ----------------------------------------------------------------------------------------------
# The ASR split, re-packaged
# ----------------------------------------------------------------------------------------------


def _asr_cuts(shar_dir: Path):
    """(cut id, duration, text, FLAC bytes) of every cut of a demo ASR Shar split, in shard order."""
    from orchestrator.data.shar import discover_dir, read_shard

    for shard in discover_dir(str(shar_dir)):
        for cut in read_shard(shard):
            yield cut.id, cut.duration, cut.text, cut.audio["recording"].data


def write_nemo_tarred(out_dir: str | Path, shar_dir: str | Path, shard_size: int = 20) -> int:
    """The ASR split as a NeMo tarred dataset: manifest_N.json (audio_filepath, duration, text, shard_id) with
    audio_N.tar holding `<id>.flac` members, N = 0, 1, ..."""
    count = 0
    with atomic_dir(Path(out_dir)) as tmp:
        cuts = _asr_cuts(Path(shar_dir))
        for shard_id in itertools.count():
            chunk = list(itertools.islice(cuts, shard_size))
            if not chunk:
                break
            entries = []
            with tarfile.open(tmp / f"audio_{shard_id}.tar", "w") as tar:
                for cut_id, duration, text, data in chunk:
                    name = f"{cut_id}.{AUDIO_FORMAT}"
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                    entries.append(
                        {"audio_filepath": name, "duration": duration, "text": text, "shard_id": shard_id, "lang": "en"}
                    )
            _write_jsonl(tmp / f"manifest_{shard_id}.json", entries)
            count += len(entries)
    return count


def write_lhotse_manifest(out_dir: str | Path, shar_dir: str | Path) -> int:
    """The ASR split as a Lhotse cut manifest (cuts.jsonl.gz) whose recordings are FLAC files in audio/, named
    relative to the manifest (as NeMo resolves them)."""
    import soundfile as sf
    from lhotse import AudioSource, MonoCut, Recording, SupervisionSegment

    count = 0
    with atomic_dir(Path(out_dir)) as tmp:
        (tmp / "audio").mkdir()
        with gzip.open(tmp / "cuts.jsonl.gz", "wt") as manifest:
            for cut_id, duration, text, data in _asr_cuts(Path(shar_dir)):
                name = f"audio/{cut_id}.{AUDIO_FORMAT}"
                (tmp / name).write_bytes(data)
                info = sf.info(io.BytesIO(data))
                recording = Recording(
                    id=cut_id,
                    sources=[AudioSource(type="file", channels=[0], source=name)],
                    sampling_rate=int(info.samplerate),
                    num_samples=int(info.frames),
                    duration=info.frames / info.samplerate,
                )
                cut = MonoCut(
                    id=cut_id,
                    start=0.0,
                    duration=duration,
                    channel=0,
                    recording=recording,
                    supervisions=[
                        SupervisionSegment(
                            id=cut_id, recording_id=cut_id, start=0.0, duration=duration, text=text, language="en"
                        )
                    ],
                )
                manifest.write(json.dumps(cut.to_dict()) + "\n")
                count += 1
    return count


# ----------------------------------------------------------------------------------------------
# All of them
# ----------------------------------------------------------------------------------------------


def make_format_demos(out_dir: str | Path, hours: float, seed: int, heldout: int, pool=None) -> dict[str, int]:
    """Every format set of the layout above that does not exist yet; {set name: examples written}."""
    out = Path(out_dir)
    made: dict[str, int] = {}
    for split in SPLITS:
        sizes = sizes_for(hours, heldout, split)
        asr = out / "asr" / split
        jobs = {
            f"conversations/{split}": lambda d, s=split, n=sizes.conversations: write_conversations(
                d, s, seed, n, pool
            ),
            f"text/{split}": lambda d, s=split, z=sizes: write_text_sets(d, s, seed, z),
            f"nemo_tarred/{split}": lambda d, a=asr, z=sizes: write_nemo_tarred(d, a, z.nemo_shard_size),
            f"lhotse/{split}": lambda d, a=asr: write_lhotse_manifest(d, a),
        }
        for name, write in jobs.items():
            target = out / name
            if target.is_dir():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            made[name] = write(target)
    return made


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
