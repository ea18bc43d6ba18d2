"""The data NeMo users bring, read without conversion: NeMo manifests (plain and tarred), Lhotse cut manifests,
multi-turn conversations (NeMo JSONL, ShareGPT), text-only sets; mixing by input_cfg weights; token-aware and 2-D
bucketing; the exact-resume guarantee for each of them (a resumed task re-forms its batches from manifests); and
each of them converted to Shar (`data shar --type`) or checked where it is (`data inspect --type`)."""

from __future__ import annotations

import argparse
import gzip
import io
import itertools
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from orchestrator.cli.data import register as register_data_commands
from orchestrator.config.schema import DataConfig, DatasetConfig, InputConfig
from orchestrator.data.inspect import inspect_shar
from orchestrator.data.nemo_manifest import expand_paths
from orchestrator.data.plan import TRAIN, plan_dataset
from orchestrator.data.position import DataPosition, merge_positions
from orchestrator.data.read_task import run_read_task
from orchestrator.data.shar import SharLayoutError
from orchestrator.data.stream import BatchStream
from orchestrator.demo.formats import write_lhotse_manifest, write_nemo_tarred
from orchestrator.demo.synthetic_shar import write_synthetic_shar
from orchestrator.testing import WordTokenCollator

DURATIONS = [1.0, 2.2, 0.05, 1.7, 3.1, 9.0, 2.5, 0.8]  # 0.05 s too short, 9 s too long (max 6)
RATE = 16000


@pytest.fixture(scope="module")
def asr_dir(tmp_path_factory) -> Path:
    return write_synthetic_shar(
        tmp_path_factory.mktemp("asr") / "shar",
        n_cuts=30,
        shard_sizes=[4, 11, 9, 6],
        durations=DURATIONS,
        empty_text_every=9,
        sample_rate=8000,
    )


@pytest.fixture(scope="module")
def nemo_dir(tmp_path_factory, asr_dir) -> Path:
    out = tmp_path_factory.mktemp("nemo") / "tarred"
    write_nemo_tarred(out, asr_dir, shard_size=7)
    return out


@pytest.fixture(scope="module")
def lhotse_dir(tmp_path_factory, asr_dir) -> Path:
    out = tmp_path_factory.mktemp("lhotse") / "cuts"
    write_lhotse_manifest(out, asr_dir)
    return out


def tone(seconds: float, freq: float = 220.0) -> np.ndarray:
    t = np.arange(round(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def flac(audio: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, RATE, format="FLAC")
    return buf.getvalue()


@pytest.fixture(scope="module")
def conv_dir(tmp_path_factory) -> Path:
    """Conversations with two audio turns (one read at an offset), text-only ones, ShareGPT lines, and the same
    conversations tarred (NeMo's tar writer layout: each flac followed by its json)."""
    out = tmp_path_factory.mktemp("conversations")
    (out / "audio").mkdir()
    lines, tar_members = [], []
    for i in range(12):
        first, second = f"audio/c{i}_a.flac", f"audio/c{i}_b.flac"
        (out / first).write_bytes(flac(tone(1.0 + 0.1 * i, 200.0 + i)))
        (out / second).write_bytes(flac(tone(2.0, 300.0 + i)))
        turns = [
            {"from": "User", "type": "text", "value": "listen"},
            {"from": "User", "type": "audio", "value": first, "duration": round(1.0 + 0.1 * i, 4)},
            {"from": "Assistant", "type": "text", "value": f"first answer {i}"},
            {"from": "User", "type": "audio", "value": second, "duration": 1.5, "offset": 0.25},
            {"from": "Assistant", "type": "text", "value": f"second answer {i}"},
        ]
        lines.append({"id": f"conv-{i}", "conversations": turns})
        tar_members += [first, second]
    for i in range(6):
        lines.append(
            {
                "id": f"text-{i}",
                "conversations": [
                    {"from": "User", "type": "text", "value": f"what is {i} plus one"},
                    {"from": "Assistant", "type": "text", "value": f"it is {i + 1}"},
                ],
            }
        )
    (out / "conversations.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    # Tarred: the audio turns' files in order, named as the turns' values (base names, as NeMo's writer does).
    tarred = [dict(x, conversations=[dict(t, value=Path(t["value"]).name) for t in x["conversations"]]) for x in lines]
    (out / "tarred.jsonl").write_text("".join(json.dumps(x) + "\n" for x in tarred))
    with tarfile.open(out / "audio_0.tar", "w") as tar:
        for name in tar_members:
            for member, data in ((Path(name).name, (out / name).read_bytes()), (Path(name).stem + ".json", b"{}")):
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    sharegpt = [
        {
            "id": f"sg-{i}",
            "sound": f"audio/c{i}_a.flac",
            "conversations": [
                {"from": "human", "value": "Hear this: <sound> What is it?"},
                {"from": "gpt", "value": f"a tone {i}"},
            ],
        }
        for i in range(5)
    ]
    (out / "sharegpt.jsonl").write_text("".join(json.dumps(x) + "\n" for x in sharegpt))
    return out


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("text")
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]
    sentences = [" ".join(words[: 2 + i % 8]) for i in range(450)]
    sentences[7] = "   "  # an empty line: counted as empty_text
    (out / "sentences.txt").write_text("".join(s + "\n" for s in sentences))
    (out / "lines.jsonl").write_text(
        "".join(json.dumps({"text": s}) + "\n" for s in sentences[:20]) + json.dumps({"other": "x"}) + "\n"
    )
    sft = {
        "system": "be brief",
        "conversations": [{"from": "User", "value": "hi"}, {"from": "Assistant", "value": "hello there"}],
    }
    (out / "sft.jsonl").write_text(json.dumps(sft) + "\n")
    return out


class KeepExamples(WordTokenCollator):
    """Keeps the example dicts it collated (in-process tests)."""

    def __init__(self) -> None:
        self.examples: list[dict] = []

    def __call__(self, examples):
        self.examples += examples
        return super().__call__(examples)


def plan_of(inputs: list[InputConfig], epochs: int = 1, collate=None, **train):
    train = {"batch_size": 3, "max_duration": 6.0, **train}
    cfg = DataConfig(train_ds=DatasetConfig(input_cfg=inputs, **train))
    collate = collate or KeepExamples()
    return cfg, plan_dataset(TRAIN, cfg.train_ds, cfg, collate, epochs=epochs)


def read_all(plan) -> list:
    return [table for task in range(plan.num_tasks) for table in run_read_task(plan, task)]


def examples_of(inputs: list[InputConfig], **train) -> tuple[dict[str, dict], Counter]:
    collate = KeepExamples()
    _, plan = plan_of(inputs, collate=collate, **train)
    stream = BatchStream(read_all(plan))
    for _ in stream:
        pass
    return {e["id"]: e for e in collate.examples}, stream.totals


def nemo_input(nemo_dir: Path, shards: int = 5) -> InputConfig:
    return InputConfig(
        type="nemo_tarred",
        manifest_filepath=f"{nemo_dir}/manifest__OP_0..{shards - 1}_CL_.json",
        tarred_audio_filepaths=f"{nemo_dir}/audio_{{0..{shards - 1}}}.tar",
    )


# ---------------------------------------------------------------------------------------------- formats


def test_nemo_sharded_paths_expand_as_in_nemo():
    assert expand_paths("d/manifest__OP_0..2_CL_.json") == [f"d/manifest_{i}.json" for i in range(3)]
    assert expand_paths("s3://b/audio_{00..02}.tar") == [
        "s3://b/audio_00.tar",
        "s3://b/audio_01.tar",
        "s3://b/audio_02.tar",
    ]
    assert expand_paths(["a_[1..2].json", "b_{x,y}.json"]) == ["a_1.json", "a_2.json", "b_x.json", "b_y.json"]
    with pytest.raises(ValueError, match="unclosed brace"):
        expand_paths("a_{0..3.json")


def test_nemo_tarred_and_lhotse_manifests_give_the_examples_of_their_shar_set(asr_dir, nemo_dir, lhotse_dir):
    shar, shar_counts = examples_of([InputConfig(shar_path=str(asr_dir))])
    for inp in (nemo_input(nemo_dir), InputConfig(type="lhotse", cuts_path=f"{lhotse_dir}/cuts.jsonl.gz")):
        got, counts = examples_of([inp])
        assert sorted(got) == sorted(shar), inp.type
        same = ("cuts_read", "too_short", "too_long", "empty_text", "cuts_batched")
        assert [counts[k] for k in same] == [shar_counts[k] for k in same]  # the same filters and counters
        for cut_id, example in got.items():
            assert example["text"] == shar[cut_id]["text"] and example["duration"] == shar[cut_id]["duration"]
            np.testing.assert_array_equal(example["audio"], shar[cut_id]["audio"])  # 8 kHz FLAC read at 16 kHz


def test_nemo_tarred_shards_pair_by_number_and_a_missing_tar_is_named(nemo_dir, tmp_path):
    _, plan = plan_of([nemo_input(nemo_dir)])
    assert [Path(s.cuts).name for s in plan.inputs[0].shards] == [f"manifest_{i}.json" for i in range(5)]
    assert [Path(s.fields["tar"]).name for s in plan.inputs[0].shards] == [f"audio_{i}.tar" for i in range(5)]
    broken = InputConfig(
        type="nemo_tarred",
        manifest_filepath=f"{nemo_dir}/manifest__OP_0..4_CL_.json",
        tarred_audio_filepaths=[f"{nemo_dir}/audio_{i}.tar" for i in (0, 1, 2, 3, 7)],
    )
    with pytest.raises(SharLayoutError, match=r"tars without a manifest: \[7\]"):
        plan_of([broken])
    # One unsharded manifest for every tar: entries go with the tar of their shard_id, as in NeMo.
    whole = tmp_path / "manifest.json"
    whole.write_text("".join((nemo_dir / f"manifest_{i}.json").read_text() for i in range(5)))
    single = InputConfig(
        type="nemo_tarred", manifest_filepath=str(whole), tarred_audio_filepaths=f"{nemo_dir}/audio__OP_0..4_CL_.tar"
    )
    assert sorted(examples_of([single])[0]) == sorted(examples_of([nemo_input(nemo_dir)])[0])


def test_conversations_keep_every_turn_and_audio_tarred_or_not(conv_dir):
    plain, counts = examples_of(
        [InputConfig(type="multimodal_conversation", manifest_filepath=str(conv_dir / "conversations.jsonl"))]
    )
    assert counts["cuts_batched"] == 18 and len(plain) == 18
    conv = plain["conv-3"]
    assert [t["role"] for t in conv["turns"]] == ["user", "user", "assistant", "user", "assistant"]
    assert [t.get("audio") for t in conv["turns"]] == [None, 0, None, 1, None]
    assert [len(a) for a in conv["audios"]] == [round(1.3 * RATE), round(1.5 * RATE)]  # offset 0.25 s, 1.5 s long
    np.testing.assert_allclose(
        conv["audios"][1], tone(2.0, 303.0)[RATE // 4 : RATE // 4 + round(1.5 * RATE)], atol=1e-4
    )
    assert conv["text"] == "second answer 3" and conv["duration"] == pytest.approx(2.8)
    assert plain["text-2"]["audios"] == [] and plain["text-2"]["duration"] == 0.0  # text only: not too short
    tarred, _ = examples_of(
        [
            InputConfig(
                type="multimodal_conversation",
                manifest_filepath=str(conv_dir / "tarred.jsonl"),
                tarred_audio_filepaths=str(conv_dir / "audio_0.tar"),
            )
        ]
    )
    assert sorted(tarred) == sorted(plain)
    for key, example in plain.items():
        for a, b in zip(example["audios"], tarred[key]["audios"], strict=True):
            np.testing.assert_array_equal(a, b)
    sharegpt, _ = examples_of([InputConfig(type="share_gpt", manifest_filepath=str(conv_dir / "sharegpt.jsonl"))])
    assert sharegpt["sg-1"]["turns"] == [
        {"role": "user", "text": "Hear this:"},
        {"role": "user", "audio": 0},
        {"role": "user", "text": "What is it?"},
        {"role": "assistant", "text": "a tone 1"},
    ]
    assert len(sharegpt["sg-1"]["audios"][0]) == round(1.1 * RATE)  # no duration given: the file's header


def test_text_inputs_are_text_only_examples(text_dir):
    examples, counts = examples_of([InputConfig(type="txt", paths=str(text_dir / "sentences.txt"))])
    assert counts["empty_text"] == 1 and counts["cuts_batched"] == 449 and counts["too_short"] == 0
    assert examples["sentences-00000003"]["turns"] == [{"role": "assistant", "text": "alpha bravo charlie delta echo"}]
    _, counts = examples_of([InputConfig(type="txt_jsonl", paths=str(text_dir / "lines.jsonl"))])
    assert counts["cuts_read"] == 20  # the line without a text field is no example, as in NeMo
    sft, _ = examples_of([InputConfig(type="nemo_sft_jsonl", paths=str(text_dir / "sft.jsonl"))])
    (only,) = sft.values()
    assert [t["role"] for t in only["turns"]] == ["system", "user", "assistant"] and only["text"] == "hello there"


# ---------------------------------------------------------------------------------------------- mixing


def test_weights_set_each_inputs_share_of_the_examples_as_in_nemo(asr_dir, text_dir):
    """Speech 3 : text 1, whatever their sizes: the small speech set repeats within the epoch to keep its share."""
    inputs = [
        InputConfig(shar_path=str(asr_dir), weight=3.0),
        InputConfig(type="txt", paths=str(text_dir / "sentences.txt"), weight=1.0),
    ]
    tokens = dict(use_multimodal_sampling=True, batch_tokens=200, token_equivalent_duration=0.08)
    _, counts = examples_of(inputs, batch_size=None, **tokens)
    _, plan = plan_of(inputs, **tokens)
    speech, text = plan.inputs
    assert (speech.weight, text.weight) == (0.75, 0.25) and len(text.shards) == 3  # 450 lines read in 3 parts
    assert speech.reads > len(speech.shards) and text.reads == 3
    read = counts["cuts_read"]
    speech_read = read - 450
    assert 2.6 < speech_read / 450 < 3.4, (speech_read, read)
    # Inputs are interleaved over the epoch, not read one after the other.
    order = [i for i, _ in plan.epoch_order(0)]
    assert order != sorted(order)
    assert plan.epoch_order(1) != plan.epoch_order(0)


def test_one_entry_of_several_directories_reads_each_once(asr_dir, tmp_path):
    other = write_synthetic_shar(tmp_path / "other", n_cuts=6, n_shards=2, durations=(1.0, 2.0), id_prefix="other")
    _, plan = plan_of([InputConfig(shar_path=[str(asr_dir), str(other)])])
    assert [inp.reads_per_epoch for inp in plan.inputs] == [4, 2]
    _, plan = plan_of([InputConfig(shar_path=[[str(asr_dir), 1.0], [str(other), 1.0]])])
    assert plan.inputs[1].reads_per_epoch > 2  # [dir, weight] pairs: equal shares, the small one repeats


# ---------------------------------------------------------------------------------------------- token batching


def test_token_batches_hold_at_most_batch_tokens_padded_slots(conv_dir, text_dir):
    inputs = [
        InputConfig(type="multimodal_conversation", manifest_filepath=str(conv_dir / "conversations.jsonl")),
        InputConfig(type="txt", paths=str(text_dir / "sentences.txt")),
    ]
    common = dict(batch_size=None, use_multimodal_sampling=True, token_equivalent_duration=0.08, batch_tokens=120)
    _, plan = plan_of(
        inputs, use_bucketing=True, bucket_duration_bins=[6, 12, 40], num_buckets=3, max_tokens=60, **common
    )
    stream = BatchStream(read_all(plan))
    metas = [meta for _, meta in stream]
    assert all(m.padded_tokens <= 120 or m.num_examples == 1 for m in metas)
    assert sum(m.tokens for m in metas) / sum(m.padded_tokens for m in metas) > 0.8  # bucketed: little padding
    # Unweighted entries get equal shares (NeMo): the 18 conversations are read 25 times to match 449 lines.
    assert plan.inputs[0].reads == 25 and stream.totals["cuts_batched"] == 25 * 18 + 449
    _, plan = plan_of(inputs, max_tokens=30, **common)
    stream = BatchStream(read_all(plan))
    for _ in stream:
        pass
    assert stream.totals["too_many_tokens"] == 25 * 12  # the conversations: 2.8 s of audio is 35 frames


def test_2d_bins_with_a_batch_size_per_bucket(conv_dir, text_dir):
    inputs = [
        InputConfig(type="multimodal_conversation", manifest_filepath=str(conv_dir / "conversations.jsonl")),
        InputConfig(type="txt", paths=str(text_dir / "sentences.txt")),
    ]
    bins = [[4, 3], [4, 10], [50, 4]]  # [input tokens, output tokens]
    _, plan = plan_of(
        inputs,
        batch_size=None,
        use_bucketing=True,
        use_multimodal_sampling=True,
        token_equivalent_duration=0.08,
        bucket_duration_bins=bins,
        bucket_batch_size=[8, 5, 2],
    )
    stream = BatchStream(read_all(plan))
    sizes = Counter(meta.num_examples for _, meta in stream)
    assert max(sizes) <= 8
    # Text lines: 1 input token (none: an assistant-only turn has no prompt) and 2-9 output tokens; the
    # conversations (~37 input tokens, 3 output) go to [50, 4]; lines of more than 10 words fit no bucket.
    assert stream.totals["no_bucket"] == 0 and stream.totals["cuts_batched"] == 25 * 18 + 449


# ---------------------------------------------------------------------------------------------- exact resume


def _interleaved(plan) -> list:
    rows, task = [], 0
    while task < plan.num_tasks:
        first = plan.tasks[task].first_epoch
        group = [t for t in range(task, plan.num_tasks) if plan.tasks[t].first_epoch == first]
        running = [run_read_task(plan, t) for t in group]
        while running:
            for gen in list(running):
                row = next(gen, None)
                if row is None:
                    running.remove(gen)
                else:
                    rows.append(row)
        task = group[-1] + 1
    return rows


def _train(plan, world: int, steps: int | None, rows=None):
    rows = _interleaved(plan) if rows is None else rows
    ranks = [BatchStream(rows[r::world], start=plan.resume) for r in range(world)]
    consumed = []
    for stream in ranks:
        for _, meta in itertools.islice(stream, steps):
            consumed += [(meta.epoch, cut) for cut in meta.ids]
    return consumed, merge_positions([r.position for r in ranks])


@pytest.mark.parametrize("kind", ["nemo_tarred", "lhotse", "conversations_tarred", "speech_and_text"])
def test_a_resumed_stream_trains_every_example_of_every_epoch_once(
    kind, asr_dir, nemo_dir, lhotse_dir, conv_dir, text_dir
):
    inputs = {
        "nemo_tarred": [nemo_input(nemo_dir)],
        "lhotse": [InputConfig(type="lhotse", cuts_path=f"{lhotse_dir}/cuts.jsonl.gz")],
        "conversations_tarred": [
            InputConfig(
                type="multimodal_conversation",
                manifest_filepath=str(conv_dir / "tarred.jsonl"),
                tarred_audio_filepaths=str(conv_dir / "audio_0.tar"),
            )
        ],
        "speech_and_text": [
            InputConfig(shar_path=str(asr_dir), weight=3.0),
            InputConfig(type="txt", paths=str(text_dir / "sentences.txt"), weight=1.0),
        ],
    }[kind]
    tokens = dict(use_multimodal_sampling=True, token_equivalent_duration=0.08, batch_tokens=90, batch_size=None)
    settings = dict(use_bucketing=True, num_buckets=3, num_workers=2, **(tokens if kind != "lhotse" else {}))
    cfg, first = plan_of(inputs, epochs=3, **settings)
    everything, _ = _train(first, world=1, steps=None)
    per_epoch = [sorted(c for e, c in everything if e == epoch) for epoch in range(3)]
    consumed, position = _train(first, world=2, steps=2)
    assert position.epoch == 0 and position.segments, "the test should stop inside the first epoch"
    position = DataPosition.from_dict(json.loads(json.dumps(position.to_dict())))
    collate = KeepExamples()
    second = plan_dataset(TRAIN, cfg.train_ds, cfg, collate, epochs=3, start_position=position)
    rows = _interleaved(second)
    emitted = Counter(cut for _, meta in BatchStream(rows, start=second.resume) for cut in meta.ids)
    assert Counter(e["id"] for e in collate.examples) == emitted  # only batches not consumed were decoded
    more, final = _train(second, world=3, steps=None, rows=rows)
    consumed += more
    for epoch in range(3):
        assert sorted(c for e, c in consumed if e == epoch) == per_epoch[epoch], f"epoch {epoch}"
    assert final.epoch == 3 and not final.segments


# ---------------------------------------------------------------------------------------------- data shar / inspect


def run_data_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="speechlm")
    register_data_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", *argv])
    return args.func(args)


def _plain_nemo(lhotse_dir: Path, out: Path) -> Path:
    """A plain NeMo manifest of audio files (paths relative to it), one entry read at an offset."""
    out.mkdir()
    (out / "audio").symlink_to(lhotse_dir / "audio")
    files = sorted((lhotse_dir / "audio").glob("*.flac"))[:6]
    entries = [
        {"audio_filepath": f"audio/{f.name}", "duration": sf.info(f).duration, "text": f"say {i}"}
        for i, f in enumerate(files)
    ]
    entries[1] |= {"offset": 0.5, "duration": entries[1]["duration"] - 0.5}  # 2.2 s long
    (out / "manifest.json").write_text("".join(json.dumps(e) + "\n" for e in entries))
    return out / "manifest.json"


SOURCES = {  # name -> (type, key flags); paths relative to the fixtures' folders
    "nemo": ("nemo", {"manifest_filepath": "{plain_nemo}"}),
    "nemo_tarred": (
        "nemo_tarred",
        {
            "manifest_filepath": "{nemo}/manifest__OP_0..4_CL_.json",
            "tarred_audio_filepaths": "{nemo}/audio__OP_0..4_CL_.tar",
        },
    ),
    "lhotse": ("lhotse", {"cuts_path": "{lhotse}/cuts.jsonl.gz"}),
    "conversations": ("multimodal_conversation", {"manifest_filepath": "{conv}/conversations.jsonl"}),
    "conversations_tarred": (
        "multimodal_conversation",
        {"manifest_filepath": "{conv}/tarred.jsonl", "tarred_audio_filepaths": "{conv}/audio_0.tar"},
    ),
    "share_gpt": ("share_gpt", {"manifest_filepath": "{conv}/sharegpt.jsonl"}),
    "txt": ("txt", {"paths": "{text}/sentences.txt"}),
    "txt_jsonl": ("txt_jsonl", {"paths": "{text}/lines.jsonl"}),
    "nemo_sft_jsonl": ("nemo_sft_jsonl", {"paths": "{text}/sft.jsonl"}),
}


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_data_shar_of_any_input_type_holds_the_examples_training_reads_from_it(
    name, nemo_dir, lhotse_dir, conv_dir, text_dir, tmp_path
):
    """Converted with `data shar --type`, then read back as lhotse_shar: the same examples (turns, texts, audio
    sample for sample), the same filter counts; and `data inspect` finds the set whole."""
    kind, keys = SOURCES[name]
    where = dict(nemo=nemo_dir, lhotse=lhotse_dir, conv=conv_dir, text=text_dir)
    if name == "nemo":
        where["plain_nemo"] = _plain_nemo(lhotse_dir, tmp_path / "plain")
    keys = {k: v.format(**where) for k, v in keys.items()}
    out = tmp_path / "shar"
    flags = [x for k, v in keys.items() for x in ("--" + k.replace("_", "-"), v)]
    assert run_data_cli("shar", "--type", kind, *flags, "--out", str(out), "--shard-size", "7") == 0
    source, source_counts = examples_of([InputConfig(type=kind, **keys)])
    shar, shar_counts = examples_of([InputConfig(shar_path=str(out))])
    assert source and sorted(shar) == sorted(source)
    same = ("cuts_read", "too_short", "too_long", "empty_text", "cuts_batched")
    assert [shar_counts[k] for k in same] == [source_counts[k] for k in same]
    for cut_id, example in source.items():
        got = shar[cut_id]
        assert got["text"] == example["text"] and got.get("turns") == example.get("turns"), cut_id
        assert got["duration"] == pytest.approx(example["duration"], abs=1e-3)
        for a, b in zip(
            got.get("audios", [got.get("audio")]), example.get("audios", [example.get("audio")]), strict=True
        ):
            np.testing.assert_array_equal(a, b)
    report = inspect_shar(out)
    assert report.ok, report.problems
    assert report.num_cuts == source_counts["cuts_read"]
    if kind in ("multimodal_conversation", "share_gpt", "txt", "txt_jsonl", "nemo_sft_jsonl"):
        assert report.conversations == report.num_cuts


def test_data_shar_and_inspect_of_conversations_through_the_cli(conv_dir, tmp_path, capsys):
    manifest = str(conv_dir / "conversations.jsonl")
    assert run_data_cli("inspect", "--type", "multimodal_conversation", "--manifest-filepath", manifest) == 0
    out = capsys.readouterr().out
    assert "18 examples" in out and "conversations: 18 (6 text-only, 24 audio turns)" in out and "OK" in out
    shar = tmp_path / "shar"
    argv = ["shar", "--type", "multimodal_conversation", "--manifest-filepath", manifest, "--out", str(shar)]
    assert run_data_cli(*argv) == 0
    assert "wrote 18 cuts" in capsys.readouterr().out
    assert run_data_cli("inspect", str(shar)) == 0
    out = capsys.readouterr().out
    assert "conversations: 18 (6 text-only, 24 audio turns)" in out and "consistency: OK" in out
    # A turn pointing past its recording is named (a hand-edited or foreign set).
    cuts = shar / "cuts.000000.jsonl.gz"
    lines = [json.loads(x) for x in gzip.decompress(cuts.read_bytes()).decode().splitlines()]
    lines[0]["custom"]["conversation"][1]["duration"] += 5.0
    cuts.write_bytes(gzip.compress("".join(json.dumps(x) + "\n" for x in lines).encode()))
    assert run_data_cli("inspect", str(shar), "--no-decode") == 1
    assert f"conversation {lines[0]['id']!r} has audio turns up to" in capsys.readouterr().out


def test_data_shar_type_errors_name_the_flag_or_the_file_and_leave_nothing(conv_dir, tmp_path, capsys):
    out = tmp_path / "shar"
    assert run_data_cli("shar", "--type", "nemo_tarred", "--manifest-filepath", "m.json", "--out", str(out)) == 2
    assert "--tarred-audio-filepaths" in capsys.readouterr().err
    assert run_data_cli("shar", "--type", "share_gpt", "--out", str(out)) == 2
    assert "--type share_gpt needs --manifest-filepath" in capsys.readouterr().err
    assert run_data_cli("shar", "--type", "txt", "--paths", "a.txt", "--cuts-path", "c.jsonl", "--out", str(out)) == 2
    assert "--type txt does not read --cuts-path" in capsys.readouterr().err
    assert run_data_cli("shar", "--manifest", "c.jsonl.gz", "--paths", "a.txt", "--out", str(out)) == 2
    assert "--paths describes an input_cfg entry: give its --type" in capsys.readouterr().err
    # The 5th conversation's second audio is gone: the run stops naming it, and --out never appears.
    lines = (conv_dir / "conversations.jsonl").read_text().splitlines()
    broken = json.loads(lines[4])
    broken["conversations"][3]["value"] = "audio/gone.flac"
    manifest = tmp_path / "conversations.jsonl"
    manifest.write_text("\n".join([*lines[:4], json.dumps(broken), *lines[5:]]) + "\n")
    # Relative audio paths resolve against the manifest's folder: point the copy at the fixture's audio.
    (tmp_path / "audio").symlink_to(conv_dir / "audio")
    argv = ["--type", "multimodal_conversation", "--manifest-filepath", str(manifest)]
    assert run_data_cli("shar", *argv, "--out", str(out), "--shard-size", "2") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "conv-4" in err and "gone.flac does not exist" in err
    assert not out.exists() and not list(tmp_path.glob(".shar*"))
    assert run_data_cli("inspect", *argv) == 1
    assert "gone.flac does not exist" in capsys.readouterr().out
