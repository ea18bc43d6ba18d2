"""The data sections NeMo users write: NeMo's released configs and documented data block validate with their
optional blocks uncommented; every new input type and the token-batching keys are checked with the key, the value
and the fix."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from orchestrator.config import ConfigError, experiment_from_dict, load_experiment

ROOT = Path(__file__).resolve().parents[1]
NEMO_CONFIGS = Path(__file__).parent / "fixtures" / "nemo_configs"
NEMO_DOCS = Path(__file__).parent / "fixtures" / "nemo_docs"
_KEY_LINE = re.compile(r"^(?P<indent>\s*)# (?P<key>[a-z_][a-z0-9_]*):(?P<rest>.*)$")


def uncomment_optional_block(text: str) -> str:
    """What a user does with NeMo's "# Optional bucketing:" block: uncomment its key lines (its prose stays a
    comment) and drop the keys they replace, so that the file has no duplicate keys."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("# Optional bucketing"))
    uncommented: dict[str, str] = {}
    for i in range(start + 1, len(lines)):
        if not lines[i].strip().startswith("#"):
            break
        if match := _KEY_LINE.match(lines[i]):
            lines[i] = f"{match['indent']}{match['key']}:{match['rest']}"
            uncommented[match["key"]] = match["indent"]
    section = max(i for i in range(start) if lines[i].strip().endswith(":") and not lines[i].startswith(" " * 5))
    for i in range(section, start):
        key = lines[i].strip().split(":")[0]
        if key in uncommented and lines[i].startswith(uncommented[key] + key + ":"):
            lines[i] = f"{uncommented[key]}# (replaced by the optional block) {lines[i].strip()}"
    return "\n".join(lines) + "\n"


def released_salm(tmp_path: Path) -> Path:
    path = tmp_path / "salm.yaml"
    path.write_text(uncomment_optional_block((NEMO_CONFIGS / "salm.yaml").read_text()))
    return path


def test_nemos_released_salm_config_validates_with_its_optional_bucketing_block(tmp_path: Path) -> None:
    cfg = load_experiment(
        released_salm(tmp_path),
        [
            "data.train_ds.input_cfg.0.cuts_path=/data/train_cuts.jsonl.gz",
            "data.validation_ds.datasets.val_set_0.input_cfg.0.cuts_path=/data/dev_cuts.jsonl.gz",
        ],
    ).cfg
    train = cfg.data.train_ds
    assert train.use_multimodal_sampling and train.measure_total_length and train.batch_size is None
    assert (train.batch_tokens, train.max_tokens, train.num_buckets) == (4000, 2048, 10)
    assert train.bucket_duration_bins[-1] == 2048 and train.token_equivalent_duration == 0.08
    assert train.input_cfg[0].type == "lhotse_as_conversation"
    assert train.input_cfg[0].audio_locator_tag == cfg.model.audio_locator_tag


def test_nemos_released_duplex_config_validates_as_shipped() -> None:
    raw = OmegaConf.to_container(OmegaConf.load(NEMO_CONFIGS / "s2s_duplex.yaml"))
    raw["data"]["train_ds"]["input_cfg"][0]["shar_path"] = "/data/s2s/train"
    raw["data"]["validation_ds"]["datasets"]["val_set_0"]["shar_path"] = "/data/s2s/dev"
    raw["model"]["pretrained_audio_codec"] = "/models/codec"  # "???  # to be released" in NeMo's file
    cfg = experiment_from_dict(raw, source="s2s_duplex.yaml").cfg
    assert cfg.data.train_ds.batch_duration == 100 and cfg.data.train_ds.use_bucketing


def test_nemos_documented_data_block_validates_with_its_optional_bucketing_lines() -> None:
    parts = [OmegaConf.load(NEMO_DOCS / name) for name in ("salm_model.yaml", "trainer.yaml", "exp_manager.yaml")]
    data = OmegaConf.to_container(OmegaConf.load(NEMO_DOCS / "data.yaml"))
    data["data"]["train_ds"].update(  # the documentation's commented lines, uncommented
        batch_duration=100,
        bucket_duration_bins=[8.94766, 10.1551, 11.64118, 19.30376, 42.85],
        use_bucketing=True,
        num_buckets=5,
        bucket_buffer_size=5000,
    )
    merged = OmegaConf.to_container(OmegaConf.merge(*parts, data))
    cfg = experiment_from_dict(merged, source="nemo docs").cfg
    assert cfg.data.train_ds.bucket_duration_bins[-1] == 42.85


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (
            {"type": "nemo_tarred", "manifest_filepath": "/d/manifest__OP_0..3_CL_.json"},
            "tarred_audio_filepaths: missing",
        ),
        ({"type": "multimodal_conversation"}, "manifest_filepath: missing; point it at a JSONL file of NeMo"),
        ({"type": "txt", "manifest_filepath": "/d/x.jsonl", "paths": "/d/a.txt"}, "type txt does not read manifest"),
        ({"type": "group", "input_cfg": [{"type": "share_gpt"}]}, "input_cfg[0].input_cfg[0].manifest_filepath"),
        ({"type": "nemo_tarred_x"}, "choose one of"),
    ],
)
def test_input_entries_are_checked_by_type(entry: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_experiment(ROOT / "configs" / "salm.yaml", [f"data.train_ds.input_cfg=[{_flow(entry)}]"])
    assert any(expected in p for p in info.value.problems), info.value.problems


def _flow(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    return str(value)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data.train_ds.use_multimodal_sampling=true"], "neither batch_tokens nor batch_size is set"),
        (
            ["data.train_ds.use_multimodal_sampling=true", "data.train_ds.batch_tokens=4000"],
            "token_equivalent_duration: not set",
        ),
        (["+data.train_ds.bucket_batch_size=[4,8]"], "bucket_batch_size: 2 sizes for 5 buckets"),
        (
            ["data.train_ds.bucket_duration_bins=[[5,10],[10,20]]", "data.train_ds.batch_duration=null"],
            "2-D bins need bucket_batch_size",
        ),
        (
            [
                "data.train_ds.input_cfg=[{type: txt, paths: /d/a.txt}]",
                "data.train_ds.batch_size=null",
            ],
            "text-only inputs have no audio duration",
        ),
    ],
)
def test_token_batching_keys_are_checked_together(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_experiment(ROOT / "configs" / "salm.yaml", overrides)
    assert any(expected in p for p in info.value.problems), info.value.problems


def test_a_duplex_model_refuses_conversations_and_token_batching() -> None:
    with pytest.raises(ConfigError) as info:
        load_experiment(
            ROOT / "configs" / "s2s_duplex.yaml",
            [
                "data.train_ds.input_cfg=[{type: multimodal_conversation, manifest_filepath: /d/c.jsonl}]",
                "+data.train_ds.use_multimodal_sampling=true",
                "+data.train_ds.batch_tokens=1000",
                "data.train_ds.token_equivalent_duration=0.08",
            ],
        )
    problems = " | ".join(info.value.problems)
    assert (
        "type multimodal_conversation holds conversations or text, which the duplex_s2s model does not read" in problems
    )
    assert "collator cannot" in problems
