"""Shar tooling: writers, the manifest / audio-folder converters, and `inspect` on healthy and broken sets."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from orchestrator.cli.data import register as add_data_commands
from orchestrator.data.convert import convert_audio_dir_to_shar, convert_manifest_to_shar
from orchestrator.data.inspect import inspect_shar
from orchestrator.data.shar import field_lists, find_shar_dirs, safe_cut_id, write_shar
from orchestrator.demo.assets import write_demo_split

NUM_ASR, NUM_S2S, SHARD = 10, 6, 4  # 3 + 2 shards


@pytest.fixture(scope="module")
def shar_root(tmp_path_factory) -> Path:
    """<root>/asr (recording) and <root>/s2s (recording + target_audio), made with the demo builders."""
    root = tmp_path_factory.mktemp("shar")
    write_demo_split(root / "asr", "asr", "train", seed=0, target_s=0, min_cuts=NUM_ASR, shard_size=SHARD)
    write_demo_split(root / "s2s", "s2s", "train", seed=0, target_s=0, min_cuts=NUM_S2S, shard_size=SHARD)
    return root


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="speechlm")
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def broken_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------- inspect


def test_inspect_reports_a_healthy_set(shar_root: Path, capsys):
    report = inspect_shar(shar_root / "s2s")
    assert report.ok, report.problems
    assert report.num_cuts == NUM_S2S and report.num_shards == 2
    assert report.fields == {"cuts": 2, "recording": 2, "target_audio": 2}
    assert report.sample_rates == {"recording": [16000], "target_audio": [22050]}
    assert report.hours == pytest.approx(sum(report.durations) / 3600) and report.hours > 0
    text = report.format()
    assert "consistency: OK" in text and "target_audio" in text and "#" in text

    assert run_cli("data", "inspect", str(shar_root)) == 0
    out = capsys.readouterr().out
    assert f"Shar {shar_root / 'asr'}" in out and f"Shar {shar_root / 's2s'}" in out


def test_inspect_names_a_truncated_tar(shar_root: Path, tmp_path: Path, capsys):
    bad = broken_copy(shar_root / "asr", tmp_path / "asr")
    tar = bad / "recording.000001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    report = inspect_shar(bad)
    assert not report.ok
    assert any(str(tar) in p and "truncated" in p for p in report.problems), report.problems
    assert all("000000" not in p and "000002" not in p for p in report.problems)

    assert run_cli("data", "inspect", str(bad)) == 1
    captured = capsys.readouterr()
    assert str(tar) in captured.out and str(bad) in captured.err


def test_inspect_names_a_missing_field_shard(shar_root: Path, tmp_path: Path):
    bad = broken_copy(shar_root / "s2s", tmp_path / "s2s")
    (bad / "target_audio.000001.tar").unlink()
    report = inspect_shar(bad)
    assert not report.ok
    assert any("2 cuts shards but 1 target_audio shards" in p for p in report.problems)
    assert any(str(bad / "target_audio.000001.tar") in p for p in report.problems)
    assert run_cli("data", "inspect", str(bad)) == 1


def test_inspect_notices_a_field_with_no_shards_at_all(shar_root: Path, tmp_path: Path):
    bad = broken_copy(shar_root / "s2s", tmp_path / "s2s")
    for tar in bad.glob("target_audio.*.tar"):
        tar.unlink()
    (problem,) = inspect_shar(bad).problems
    assert "reference field 'target_audio'" in problem


def test_inspect_names_shards_whose_ids_do_not_match(shar_root: Path, tmp_path: Path):
    bad = broken_copy(shar_root / "asr", tmp_path / "asr")
    shutil.copy(bad / "recording.000001.tar", bad / "recording.000000.tar")
    (problem,) = inspect_shar(bad).problems
    assert str(bad / "recording.000000.tar") in problem and "first difference at position 0" in problem


def test_inspect_reads_fsspec_urls(shar_root: Path):
    import fsspec

    fs = fsspec.filesystem("memory")
    for path in (shar_root / "s2s").iterdir():
        fs.pipe(f"/bucket/s2s/{path.name}", path.read_bytes())
    assert find_shar_dirs("memory://bucket") == ["memory://bucket/s2s"]
    report = inspect_shar("memory://bucket/s2s")
    assert report.ok and report.num_cuts == NUM_S2S
    fields = field_lists("memory://bucket/s2s")
    assert fields["cuts"] == ["memory://bucket/s2s/cuts.000000.jsonl.gz", "memory://bucket/s2s/cuts.000001.jsonl.gz"]
    fs.rm("/bucket", recursive=True)


def test_inspect_rejects_a_path_without_shar(tmp_path: Path, capsys):
    assert run_cli("data", "inspect", str(tmp_path)) == 2
    assert "no Shar data" in capsys.readouterr().err
    assert run_cli("data", "inspect", str(tmp_path / "missing")) == 2


# ---------------------------------------------------------------------------------------------- writers


def test_write_shar_refuses_dotted_ids_and_existing_shards(shar_root: Path, tmp_path: Path):
    from lhotse import CutSet, fastcopy

    cut = next(iter(CutSet.from_shar(in_dir=shar_root / "asr")))
    with pytest.raises(ValueError, match="contains a dot"):
        write_shar([fastcopy(cut, id="a.b")], tmp_path / "x", {"recording": "flac"})
    with pytest.raises(FileExistsError, match="already holds Shar files"):
        write_shar([cut], shar_root / "asr", {"recording": "flac"})
    assert safe_cut_id("spk1/utt.01 take 2") == "spk1_utt_01_take_2"


# ---------------------------------------------------------------------------------------------- converters


def _write_audio(path: Path, seconds: float, sample_rate: int, text: str | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    sf.write(path, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), sample_rate)
    if text is not None:
        path.with_suffix(".txt").write_text(text + "\n")


def test_convert_wav_dir_resamples_and_keeps_transcripts(tmp_path: Path, capsys):
    from lhotse import CutSet

    src = tmp_path / "wavs"
    _write_audio(src / "a.wav", 1.0, 22050, "hello  there")
    _write_audio(src / "spk" / "b.flac", 0.5, 22050, "second one")
    _write_audio(src / "c.take.wav", 0.75, 22050, "dotted name")
    assert run_cli("data", "shar", "--wav-dir", str(src), "--out", str(tmp_path / "out"), "--sample-rate", "16000") == 0
    assert "wrote 3 cuts" in capsys.readouterr().out
    cuts = {c.id: c for c in CutSet.from_shar(in_dir=tmp_path / "out")}
    assert set(cuts) == {"a", "spk_b", "c_take"}
    assert cuts["a"].supervisions[0].text == "hello there"
    assert cuts["spk_b"].sampling_rate == 16000
    assert cuts["c_take"].load_audio().shape == (1, 12000)
    assert inspect_shar(tmp_path / "out").ok


def test_convert_wav_dir_names_audio_without_transcripts(tmp_path: Path, capsys):
    _write_audio(tmp_path / "wavs" / "a.wav", 0.5, 16000, "ok")
    _write_audio(tmp_path / "wavs" / "b.wav", 0.5, 16000, None)
    with pytest.raises(FileNotFoundError, match=r"1 of 2 audio files .* have no transcript \(b\.wav\)"):
        convert_audio_dir_to_shar(tmp_path / "wavs", tmp_path / "out")
    assert run_cli("data", "shar", "--wav-dir", str(tmp_path / "wavs"), "--out", str(tmp_path / "o2")) == 2
    assert "b.wav" in capsys.readouterr().err


def test_convert_manifest_keeps_target_audio_and_renames_dotted_ids(shar_root: Path, tmp_path: Path):
    """Materialise demo S2S cuts as files + a manifest (the usual starting point), then convert back."""
    from lhotse import CutSet, Recording, fastcopy

    cuts = []
    for cut in CutSet.from_shar(in_dir=shar_root / "s2s"):
        user, agent = tmp_path / f"{cut.id}.user.wav", tmp_path / f"{cut.id}.agent.wav"
        sf.write(user, cut.load_audio()[0], cut.sampling_rate)
        sf.write(agent, cut.load_target_audio()[0], cut.target_audio.sampling_rate)
        new = fastcopy(cut, id=cut.id + ".v1", recording=Recording.from_file(user, recording_id=cut.id))
        new.custom = {"target_audio": Recording.from_file(agent, recording_id=cut.id)}
        cuts.append(new)
    manifest = tmp_path / "cuts.jsonl.gz"
    CutSet.from_cuts(cuts).to_file(manifest)

    summary = convert_manifest_to_shar(manifest, tmp_path / "out", shard_size=4, sample_rate=8000)
    assert (summary.num_cuts, summary.num_shards, summary.renamed_ids) == (NUM_S2S, 2, NUM_S2S)
    back = list(CutSet.from_shar(in_dir=tmp_path / "out"))
    assert [c.id for c in back] == [c.id.replace(".", "_") for c in cuts]
    for orig, cut in zip(cuts, back, strict=True):
        assert cut.sampling_rate == 8000 and cut.load_audio().shape == (1, round(cut.duration * 8000))
        assert cut.target_audio.sampling_rate == 22050
        np.testing.assert_allclose(cut.load_target_audio(), orig.load_target_audio(), atol=1e-4)
        assert [s.speaker for s in cut.supervisions] == ["user", "agent"]
    assert inspect_shar(tmp_path / "out").ok


def test_convert_manifest_errors_name_the_file(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_manifest_to_shar(tmp_path / "nope.jsonl.gz", tmp_path / "out")
