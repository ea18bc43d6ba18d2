"""README.md's "Train on your own data" section, run as written (issue 20).

Every shell and Python block of the section's SALM and duplex parts runs in order, in a fresh directory that
holds "your data" as the section describes it (clips with same-named transcripts; conversations listed in
JSON lines), made from the tiny demo assets. The one change: the hub ids the section names are replaced by
tiny local models (`HUB_TO_LOCAL`), since tests never download. The train commands' output is held to the
quiet-output contract: no Python warning from this project, at most 5 lines before the first progress line.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SECTION = "## Train on your own data"
TESTED_PARTS = ("### SALM", "### Duplex")
HUB_IDS = ("Qwen/Qwen2.5-0.5B", "nvidia/parakeet-ctc-0.6b", "kyutai/mimi")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
PROJECT_WARNING = re.compile(r"(orchestrator|speech_models)/[\w/]+\.py:\d+: \w*Warning")
MAX_LINES_BEFORE_PROGRESS = 5


def section_parts() -> dict[str, list[tuple[str, str]]]:
    """{subsection heading: [(language, code), ...]} for the section's `###` parts, in README order."""
    text = README.read_text()
    start = text.index(SECTION + "\n")
    end = text.find("\n## ", start + len(SECTION))
    section = text[start : end if end != -1 else len(text)]
    parts: dict[str, list[tuple[str, str]]] = {}
    for chunk in re.split(r"^(?=### )", section, flags=re.M)[1:]:
        heading = chunk.splitlines()[0]
        parts[heading] = [(lang, code) for lang, code in FENCE.findall(chunk)]
    return parts


def blocks_of(prefix: str) -> list[tuple[str, str]]:
    (heading,) = [h for h in section_parts() if h.startswith(prefix)]
    return section_parts()[heading]


def shell_commands(code: str) -> list[str]:
    """A bash block's commands, continuation lines joined."""
    return [c.strip() for c in code.replace("\\\n", " ").splitlines() if c.strip() and not c.startswith("#")]


def test_every_code_block_of_the_section_is_run_by_this_file():
    """No block slips through untested: code lives only in the parts the integration tests run (JSON samples
    are data, checked against what the tests write)."""
    for heading, blocks in section_parts().items():
        runnable = [lang for lang, _ in blocks if lang in ("bash", "python")]
        assert not runnable or heading.startswith(TESTED_PARTS), f"{heading} has code that no test runs"
    commands = " ".join(c for prefix in TESTED_PARTS for lang, c in blocks_of(prefix) if lang == "bash")
    for flag in ("--llm", "--asr", "--codec"):
        for value in re.findall(rf"{flag} (\S+)", commands):
            assert value in HUB_IDS, f"{flag} {value}: add it to HUB_IDS with a tiny local stand-in"


# ------------------------------------------------------------------------------------- "your data"


# Clips / conversations per split: enough for several batches, few enough that generating text with a random
# tiny LLM (which never says EOS) in eval and infer stays short.
SPLIT_SIZES = {"train": 30, "val": 4}


def write_clips(demo: Path, out: Path) -> None:
    """my_audio/{train,val}/<id>.wav + <id>.txt from the demo's ASR Shar sets."""
    import soundfile as sf
    from lhotse import CutSet

    for split, size in SPLIT_SIZES.items():
        directory = out / "my_audio" / split
        directory.mkdir(parents=True)
        for cut in CutSet.from_shar(in_dir=demo / "asr" / split).subset(first=size):
            sf.write(directory / f"{cut.id}.wav", cut.load_audio()[0], cut.sampling_rate)
            (directory / f"{cut.id}.txt").write_text(cut.supervisions[0].text + "\n")


def write_conversations(demo: Path, out: Path) -> list[dict]:
    """conversations/{train,val}.jsonl (+ the WAVs they name) from the demo's S2S Shar sets; returns the records."""
    import soundfile as sf
    from lhotse import CutSet

    records = []
    for split, size in SPLIT_SIZES.items():
        directory = out / "conversations" / split
        directory.mkdir(parents=True)
        lines = []
        for cut in CutSet.from_shar(in_dir=demo / "s2s" / split).subset(first=size):
            user, agent = directory / f"{cut.id}.user.wav", directory / f"{cut.id}.agent.wav"
            sf.write(user, cut.load_audio()[0], cut.recording.sampling_rate)
            sf.write(agent, cut.load_target_audio()[0], cut.target_audio.sampling_rate)
            turns = [
                {"speaker": s.speaker, "start": s.start, "end": round(s.end, 4), "text": s.text}
                for s in cut.supervisions
            ]
            record = {
                "id": cut.id,
                "user_audio": str(user.relative_to(out)),
                "agent_audio": str(agent.relative_to(out)),
                "turns": turns,
            }
            records.append(record)
            lines.append(json.dumps(record))
        (out / "conversations" / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return records


@pytest.fixture(scope="module")
def stand_ins(tiny_demo: Path, tmp_path_factory) -> dict[str, str]:
    """Hub id -> a tiny local model of the same kind."""
    from speech_models.testing import build_tiny_parakeet_dir

    parakeet = build_tiny_parakeet_dir(tmp_path_factory.mktemp("asr") / "parakeet")
    return {
        "Qwen/Qwen2.5-0.5B": str(tiny_demo / "llm"),
        "nvidia/parakeet-ctc-0.6b": str(parakeet),
        "kyutai/mimi": str(tiny_demo / "codec"),
    }


def environment() -> dict[str, str]:
    """`speechlm` and `python` of this interpreter on PATH, this checkout importable, never the hub."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    env.pop("SPEECHLM_VERBOSE", None)
    return env


def run_blocks(blocks: list[tuple[str, str]], cwd: Path, stand_ins: dict[str, str]) -> dict[str, str]:
    """Run each bash command and Python block in order; returns {command: its output} for the bash commands."""
    outputs: dict[str, str] = {}
    env = environment()
    for index, (lang, code) in enumerate(blocks):
        for hub_id, local in stand_ins.items():
            code = code.replace(hub_id, local)
        if lang == "python":
            script = cwd / f"readme_block_{index}.py"
            script.write_text(code)
            commands = [f"{sys.executable} {script.name}"]
        elif lang == "bash":
            commands = shell_commands(code)
        else:
            continue
        for command in commands:
            done = subprocess.run(  # one stream, unbuffered: the terminal's order of lines
                ["bash", "-c", command],
                cwd=cwd,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=900,
            )
            output = done.stdout
            assert done.returncode == 0, f"README command failed ({done.returncode}): {command}\n{output[-4000:]}"
            outputs[command] = output
    return outputs


def check_train_output(outputs: dict[str, str]) -> None:
    """Every `speechlm train` run: quiet (issue 20's acceptance)."""
    trains = {c: o for c, o in outputs.items() if c.startswith("speechlm train")}
    assert trains
    for command, output in trains.items():
        lines = output.splitlines()
        first_progress = next(i for i, line in enumerate(lines) if re.search(r"\bstep \d+/\d+ \(\d+%\)", line))
        assert first_progress <= MAX_LINES_BEFORE_PROGRESS, f"{command}: too chatty:\n" + "\n".join(
            lines[: first_progress + 1]
        )
        assert not PROJECT_WARNING.search(output), f"{command} printed a Python warning of this project:\n{output}"
        assert "training finished" in output


@pytest.mark.integration
@pytest.mark.timeout(1800)  # ten commands, two of them start Ray
def test_salm_on_your_own_clips_runs_as_written(tiny_demo, stand_ins, tmp_path):
    write_clips(tiny_demo, tmp_path)
    outputs = run_blocks(blocks_of("### SALM"), tmp_path, stand_ins)
    check_train_output(outputs)
    assert (tmp_path / "exported" / "my_salm" / "model.safetensors").is_file()
    infer = next(o for c, o in outputs.items() if c.startswith("speechlm infer"))
    assert "file(s)" in infer and "error:" not in infer
    python = next(o for c, o in outputs.items() if "readme_block_" in c)
    assert python.strip().splitlines()[-1].startswith("["), python  # the list of two transcripts


@pytest.mark.integration
@pytest.mark.timeout(1800)
def test_duplex_on_your_own_conversations_runs_as_written(tiny_demo, stand_ins, tmp_path):
    records = write_conversations(tiny_demo, tmp_path)
    (sample,) = [json.loads(code) for lang, code in blocks_of("### Duplex") if lang == "json"]
    assert set(sample) == set(records[0]) and set(sample["turns"][0]) == set(records[0]["turns"][0])
    outputs = run_blocks(blocks_of("### Duplex"), tmp_path, stand_ins)
    check_train_output(outputs)
    assert list((tmp_path / "shar" / "s2s_train").glob("target_codes.*.tar"))  # `data add-codes`: trained on codes
    assert list((tmp_path / "replies").glob("*.agent.wav"))
    assert (tmp_path / "reply.wav").is_file()
