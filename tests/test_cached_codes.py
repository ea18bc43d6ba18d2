"""`speechlm data add-codes`: codec codes cached with S2S Shar data train exactly as the codes the model would make,
are refused when another codec made them, and leave the user's files as they were."""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator.data.codes import CODES_FIELD, add_codes, decode_codes
from orchestrator.data.examples import to_example
from orchestrator.data.plan import InputPlan
from orchestrator.data.shar import discover_dir, read_shard
from speech_models.duplex_data import DuplexS2SCollator
from speech_models.duplex_s2s import DuplexS2SModel
from speech_models.testing import build_tiny_codec_dir, tiny_duplex_model_config

SOURCE_RATE, TARGET_RATE = 16000, 22050


@pytest.fixture
def s2s_dir(tiny_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh copy of the tiny demo's S2S train split (shards of 20 cuts) to write codes into."""
    out = tmp_path_factory.mktemp("codes") / "train"
    shutil.copytree(tiny_demo / "s2s" / "train", out)
    return out


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def _examples(directory: Path) -> list[dict]:
    shards = discover_dir(str(directory))
    plan = InputPlan(tuple(shards), 1.0, {}, SOURCE_RATE, TARGET_RATE)
    return [to_example(record, plan) for shard in shards for record in read_shard(shard)]


def _model(tiny_demo: Path) -> DuplexS2SModel:
    torch.manual_seed(0)
    return DuplexS2SModel(tiny_duplex_model_config(tiny_demo / "llm", tiny_demo / "codec")).eval()


def _collator(model: DuplexS2SModel) -> DuplexS2SCollator:
    data = {
        "frame_length": 0.08,
        "source_sample_rate": SOURCE_RATE,
        "target_sample_rate": TARGET_RATE,
        "input_roles": ["user"],
        "output_roles": ["agent"],
    }
    return DuplexS2SCollator(model.cfg, type("Data", (), data))


def test_cached_codes_train_exactly_as_the_codes_the_model_makes(tiny_demo: Path, s2s_dir: Path) -> None:
    before = _digests(s2s_dir)
    audio_examples = _examples(s2s_dir)

    summary = add_codes(str(s2s_dir), str(tiny_demo / "codec"), workers=1, progress=lambda _: None)

    assert summary.written == {str(s2s_dir): len(audio_examples)}
    after = _digests(s2s_dir)
    assert {k: v for k, v in after.items() if k in before} == before  # the user's files are untouched
    shards = sorted(name.split(".")[1] for name in before if name.startswith("cuts."))
    assert sorted(set(after) - set(before)) == [f"target_codes.{index}.tar" for index in shards]

    code_examples = _examples(s2s_dir)
    assert all("target_audio" not in e and e[CODES_FIELD].dtype == np.int64 for e in code_examples)
    model = _model(tiny_demo)
    collate = _collator(model)
    with torch.no_grad():
        from_audio = collate(audio_examples[:6])
        from_codes = collate(code_examples[:6])
        assert "target_audio" not in from_codes
        losses_audio, losses_codes = model._losses(from_audio), model._losses(from_codes)
    for key in ("loss", "text_loss", "audio_loss", "num_frames", "audio_correct"):
        assert torch.equal(losses_audio[key], losses_codes[key]), key

    # lhotse reads the new field as its own array format
    from lhotse import CutSet

    cut = next(iter(CutSet.from_shar(in_dir=s2s_dir)))
    assert np.array_equal(cut.load_target_codes(), code_examples[0][CODES_FIELD])


def test_add_codes_skips_what_is_current_and_replaces_another_codec_only_when_asked(
    tiny_demo: Path, s2s_dir: Path, tmp_path: Path
) -> None:
    add_codes(str(s2s_dir), str(tiny_demo / "codec"), workers=1, progress=lambda _: None)
    digests = _digests(s2s_dir)
    again = add_codes(str(s2s_dir.parent), str(tiny_demo / "codec"), workers=1, progress=lambda _: None)
    assert again.skipped_current == [str(s2s_dir)] and not again.written
    assert _digests(s2s_dir) == digests

    other_codec = build_tiny_codec_dir(tmp_path / "other_codec", seed=1)
    with pytest.raises(FileExistsError, match="--overwrite"):
        add_codes(str(s2s_dir), str(other_codec), workers=1, progress=lambda _: None)
    assert _digests(s2s_dir) == digests

    # A model whose codec is not the one that made the codes refuses them, naming the cut and the fix.
    model = DuplexS2SModel(tiny_duplex_model_config(tiny_demo / "llm", other_codec)).eval()
    batch = _collator(model)(_examples(s2s_dir)[:2])
    with pytest.raises(ValueError, match=r"cut .+ another codec .+ speechlm data add-codes .+ --overwrite"):
        model._losses(batch)

    replaced = add_codes(str(s2s_dir), str(other_codec), overwrite=True, workers=1, progress=lambda _: None)
    assert replaced.written == {str(s2s_dir): len(_examples(s2s_dir))}
    model._losses(_collator(model)(_examples(s2s_dir)[:2]))  # now its own codec's codes
    assert not any(p.name.startswith(".") for p in s2s_dir.parent.iterdir())  # nothing left aside


def test_cached_codes_never_unpickle() -> None:
    payload = io.BytesIO()
    np.save(payload, np.array([{"run": "code"}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"not a \.npy array"):
        decode_codes(payload.getvalue())
    floats = io.BytesIO()
    np.save(floats, np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match="not \\(frames, codebooks\\) integers"):
        decode_codes(floats.getvalue())


def test_add_codes_cli_names_a_bad_path(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator", "data", "add-codes", str(tmp_path / "nope"), "--codec", "x"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert f"{tmp_path / 'nope'} is not a directory" in result.stderr


def test_inspect_checks_cached_codes_as_arrays(tiny_demo: Path, s2s_dir: Path, tmp_path: Path) -> None:
    from orchestrator.data.inspect import inspect_shar

    add_codes(str(s2s_dir), str(tiny_demo / "codec"), workers=1, progress=lambda _: None)
    report = inspect_shar(s2s_dir)
    assert report.ok, report.problems
    assert CODES_FIELD in report.fields

    # A codes member swapped for a pickled object array is named, and never unpickled.
    broken = tmp_path / "broken"
    shutil.copytree(s2s_dir, broken)
    tar_path = sorted(broken.glob("target_codes.*.tar"))[0]
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    payload = io.BytesIO()
    np.save(payload, np.array([{"run": "code"}], dtype=object), allow_pickle=True)
    with tarfile.open(tar_path, "w") as tar:
        for index, (member, data) in enumerate(members):
            data = payload.getvalue() if index == 0 else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    report = inspect_shar(broken)
    assert not report.ok
    assert "does not load as a .npy array" in " ".join(report.problems)


def test_a_corrupt_shard_is_counted_and_the_set_stays_whole(tiny_demo: Path, s2s_dir: Path) -> None:
    tars = sorted(s2s_dir.glob("target_audio.*.tar"))
    assert len(tars) >= 2
    tars[0].write_bytes(tars[0].read_bytes()[:3000])  # truncated mid-member

    summary = add_codes(str(s2s_dir), str(tiny_demo / "codec"), workers=1, progress=lambda _: None)

    assert len(summary.corrupt_shards[str(s2s_dir)]) == 1 and tars[0].name in summary.corrupt_shards[str(s2s_dir)][0]
    assert summary.written[str(s2s_dir)] > 0  # the other shards' cuts
    assert len(list(s2s_dir.glob("target_codes.*.tar"))) == len(tars)  # one per shard: the set still reads
    discover_dir(str(s2s_dir))
    assert "corrupt shard(s)" in summary.format()
