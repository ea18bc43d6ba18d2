"""Config contract: every shipped YAML validates, NeMo's documented YAML validates unchanged, and every class
of mistake is reported with the key, the value and the fix, all mistakes at once."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from orchestrator.cli.main import main
from orchestrator.config import ConfigError, experiment_from_dict, load_experiment, to_yaml
from orchestrator.config.overrides import OverrideError, apply_overrides
from orchestrator.config.targets import resolve_target, target_problem

ROOT = Path(__file__).resolve().parents[1]
NEMO_DOCS = Path(__file__).parent / "fixtures" / "nemo_docs"
SHIPPED_CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
SALM = ROOT / "configs" / "salm.yaml"


def problems_of(overrides: list[str], config: Path = SALM) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_experiment(config, overrides)
    return info.value.problems


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_validates(path: Path) -> None:
    loaded = load_experiment(path)
    assert loaded.cfg.model.pretrained_llm
    # The resolved config round-trips: what checkpoints and sweeps save is accepted back unchanged.
    again = experiment_from_dict(OmegaConf.to_container(OmegaConf.create(to_yaml(loaded.cfg))))
    assert again.cfg == loaded.cfg


@pytest.mark.parametrize(
    ("model_block", "model_type"),
    [
        (["salm_model.yaml"], "salm"),
        (["duplex_s2s_model.yaml", "data_s2s.yaml"], "duplex_s2s"),
        (["duplex_s2s_speech_decoder_model.yaml", "data_s2s.yaml"], "duplex_s2s_speech_decoder"),
    ],
)
def test_nemo_documentation_blocks_validate_unchanged(model_block: list[str], model_type: str) -> None:
    parts = [
        OmegaConf.load(NEMO_DOCS / name) for name in [*model_block, "trainer.yaml", "exp_manager.yaml", "data.yaml"]
    ]
    merged = OmegaConf.to_container(OmegaConf.merge(*parts))
    cfg = experiment_from_dict(merged, source="nemo docs").cfg
    assert cfg.model.resolved_model_type() == model_type
    assert cfg.trainer.precision == "bf16-true"
    assert cfg.exp_manager.name == "speechlm"  # ${name} resolves against the schema default
    assert cfg.data.validation_ds.datasets["val_set_name"].shar_path == "/path/to/validation_data"
    # Named validation sets inherit validation_ds's shared settings, as in NeMo.
    assert cfg.data.validation_ds.datasets["val_set_name"].batch_size == 1


def test_nemo_documented_speech_decoder_keys_are_translated_to_its_code_keys() -> None:
    """The schema has the keys NeMo's code takes (the shipped config); NeMo's documentation page lists others."""
    cfg = load_experiment(
        ROOT / "configs" / "s2s_duplex_speech_decoder.yaml",
        ["~model.speech_decoder.d_ffn", "+model.speech_decoder.d_ff=2048", "+model.speech_decoder.d_kv=64"],
    )
    assert cfg.cfg.model.speech_decoder.d_ffn == 2048
    assert any("d_ff -> d_ffn" in w for w in cfg.warnings) and any("d_kv" in w for w in cfg.warnings)


def test_nemo_options_that_are_not_implemented_are_refused_by_name() -> None:
    problems = problems_of(
        ["+model.perception.preprocessor.frame_splicing=3", "model.perception.encoder.use_bias=false"]
    )
    assert len(problems) == 1 and "model.perception.preprocessor.frame_splicing: 3 is not supported" in problems[0]
    problems = problems_of(["model.speech_decoder.has_xattn=true"], ROOT / "configs" / "s2s_duplex_speech_decoder.yaml")
    assert problems == [
        "model.speech_decoder.has_xattn: True is not supported (cross-attention is not implemented here); set it "
        "to False or remove the key"
    ]


@pytest.mark.parametrize(
    ("checkpoint", "base", "model_type"),
    [
        ("salm/nemo_salm", "salm.yaml", "salm"),
        ("salm_lora/nemo_salm", "salm.yaml", "salm"),
        ("duplex_s2s/nemo_model", "s2s_duplex.yaml", "duplex_s2s"),
        ("duplex_s2s_speech_decoder/nemo_model", "s2s_duplex_speech_decoder.yaml", "duplex_s2s_speech_decoder"),
    ],
)
def test_a_nemo_checkpoint_config_json_validates_as_it_stands(checkpoint: str, base: str, model_type: str) -> None:
    """A NeMo save_pretrained config.json, pasted as the model section, validates (hub metadata ignored)."""
    import json

    nemo_model = json.loads((ROOT / "tests" / "fixtures" / "nemo" / checkpoint / "config.json").read_text())
    assert nemo_model["model_type"] == "nemo_speechlm" and "_target_" in nemo_model["perception"]["preprocessor"]
    config = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / base))
    cfg = experiment_from_dict({**config, "model": nemo_model}, source="config.json").cfg
    assert cfg.model.resolved_model_type() == model_type and cfg.model.perception.encoder.d_model == 64


def test_unknown_key_suggests_the_right_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(SALM), "model.freez_params=[]"]) == 2
    err = capsys.readouterr().err
    assert "model.freez_params: unknown key" in err
    assert "Did you mean 'freeze_params'?" in err


def test_bad_enum_lists_allowed_values(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(SALM), "trainer.precision=bf17"]) == 2
    err = capsys.readouterr().err
    assert "trainer.precision: 'bf17' is not allowed" in err
    for allowed in ("bf16-true", "bf16-mixed", "16-mixed", "32"):
        assert allowed in err


def test_three_mistakes_in_one_file_are_reported_together(tmp_path: Path) -> None:
    text = SALM.read_text()
    text = text.replace("precision: bf16-true", "precision: bf17")
    text = text.replace("max_steps: 100000", "max_stepz: 100000")
    text = text.replace("    r: 8\n", "    r: 0\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_experiment(bad)
    message = str(info.value)
    assert "3 problems" in message
    assert "trainer.precision" in message
    assert "trainer.max_stepz: unknown key. Did you mean 'max_steps'?" in message
    assert "model.lora.r: 0 must be at least 1" in message


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("trainer.max_steps=abc", "trainer.max_steps: expected an integer, got 'abc'"),
        ("trainer.accelerator=tpu", "trainer.accelerator: 'tpu' is not allowed; choose one of: cpu, gpu"),
        ("trainer.strategy=deepspeed", "trainer.strategy: 'deepspeed' is not allowed"),
        ("model.perception.encoder.self_attention_model=rel", "self_attention_model: 'rel' is not"),
        ("model.perception.encoder.conv_context_size=sideways", "conv_context_size: 'sideways' is not valid"),
        ("model.perception.encoder.conv_context_size=[1,1]", "left + right + 1 == conv_kernel_size"),
        ("data.train_ds.batch_duration=null", "neither batch_size nor batch_duration is set"),
        ("data.train_ds.bucket_duration_bins=[5,3,8,9,10]", "must be strictly increasing"),
        ("data.train_ds.bucket_duration_bins=[1,2,3]", "3 bins do not match num_buckets (5)"),
        ("model.lora.r=0", "model.lora.r: 0 must be at least 1"),
        ("model.freeze_params=['^llm\\.(']", "model.freeze_params[0]: regex"),
        ("data.train_ds.input_cfg.0.shar_path=???", "data.train_ds.input_cfg[0].shar_path: is required"),
        ("data.train_ds.input_cfg.0.shar_path=null", "shar_path: missing; point it at a Lhotse Shar directory"),
        ("model.optimizer._target_=os.system", "'os.system' is not an allowed optimizer"),
        ("model.lr_scheduler.max_steps=${trainer.nope}", "model.lr_scheduler.max_steps: cannot resolve interpolation"),
        ("trainer.devices=0", "trainer.devices: 0 must be a positive worker count"),
        ("trainer.min_nodes=3", "trainer.min_nodes: 3 must be between 1 and trainer.num_nodes (1)"),
        ("trainer.min_nodes=1", "trainer.min_nodes: elastic training needs a fixed worker count per node"),
        ("model.encoder_chunk_size_seconds=0", "model.encoder_chunk_size_seconds: 0.0 must be positive"),
    ],
)
def test_each_class_of_error_names_the_key(override: str, expected: str) -> None:
    problems = problems_of([override])
    assert any(expected in p for p in problems), problems


def test_unknown_lightning_strategy_is_an_error() -> None:
    problems = problems_of(["trainer.strategy={_target_: my.Strategy}"])
    assert any("trainer.strategy._target_: 'my.Strategy' is not a known strategy" in p for p in problems)


def test_overrides_set_add_delete_and_interpolate() -> None:
    cfg = load_experiment(
        SALM,
        [
            "trainer.max_steps=500",
            "trainer.val_check_interval=100",
            "model.lora.r=16",
            "model.freeze_params=[]",
            "+model.lora.bias=all",
            "~model.perception.spec_augment",
            "model.optimizer.lr=1e-4",
        ],
    ).cfg
    assert cfg.trainer.max_steps == 500
    assert cfg.model.lr_scheduler["max_steps"] == 500  # ${trainer.max_steps} follows the override
    assert cfg.model.lora.r == 16 and cfg.model.lora.bias == "all"
    assert cfg.model.freeze_params == []
    assert cfg.model.perception.spec_augment is None
    assert cfg.model.optimizer["lr"] == pytest.approx(1e-4)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.max_steps", "has no '='"),
        ("+trainer.max_steps=3", "already exists; drop the '+'"),
        ("~trainer.nothing", "there is no key 'trainer.nothing' to delete"),
    ],
)
def test_malformed_overrides_are_explained(override: str, message: str) -> None:
    with pytest.raises(OverrideError, match=message.replace("(", r"\(").replace("+", r"\+")):
        apply_overrides(OmegaConf.load(SALM), [override])


@pytest.fixture(scope="module")
def data_overrides(tmp_path_factory) -> list[str]:
    """configs/salm.yaml's data paths pointed at a tiny Shar set: `validate` checks that local data exists."""
    from orchestrator.demo.synthetic_shar import write_synthetic_shar

    shar = write_synthetic_shar(tmp_path_factory.mktemp("shar") / "set", n_cuts=2, n_shards=1)
    return [
        f"data.train_ds.input_cfg.0.shar_path={shar}",
        f"data.validation_ds.datasets.val_set_0.input_cfg.0.shar_path={shar}",
    ]


def test_nemo_command_line_form(capsys: pytest.CaptureFixture[str], data_overrides: list[str]) -> None:
    code = main(
        [
            "validate",
            f"--config-path={ROOT / 'configs'}",
            "--config-name=salm",
            "trainer.max_steps=1000",
            *data_overrides,
        ]
    )
    assert code == 0
    assert "max_steps=1000" in capsys.readouterr().out


def test_missing_config_file_lists_what_exists(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(ROOT / "configs" / "slam.yaml")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "salm.yaml" in err


def test_validate_prints_a_summary(capsys: pytest.CaptureFixture[str], data_overrides: list[str]) -> None:
    assert main(["validate", str(SALM), *data_overrides]) == 0
    out = capsys.readouterr().out
    assert "model        salm" in out
    assert "run dir" in out and "mlflow" in out


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("train", "sweep", "validate", "data", "eval", "export"):
        assert command in out


def test_targets_map_nemo_classes_and_refuse_arbitrary_code() -> None:
    assert target_problem("nemo.core.optim.lr_scheduler.CosineAnnealing") is None
    assert resolve_target("torch.optim.AdamW").__name__ == "AdamW"
    assert resolve_target("nemo.core.optim.lr_scheduler.CosineAnnealing").__name__ == "CosineAnnealing"
    for evil in (
        "os.system",
        "subprocess.Popen",
        "builtins.eval",
        "torch.load",
        "transformers.dynamic_module_utils.get_class_in_module",
        "torch.optim.lr_scheduler.LambdaLR",  # takes a Python callable: not configurable from YAML
    ):
        assert "is not an allowed target" in target_problem(evil)


def test_elastic_workers_plan_and_off_critical_path_keys() -> None:
    from orchestrator.training.resources import plan_resources

    cfg = load_experiment(SALM, ["trainer.devices=4", "trainer.num_nodes=4", "trainer.min_nodes=2"]).cfg
    resources = plan_resources(cfg, {"CPU": 64, "GPU": 8})
    assert resources.ray_num_workers == (8, 16) and resources.describe().startswith("8..16 x (1 GPU")
    fixed = plan_resources(load_experiment(SALM, ["trainer.devices=4"]).cfg, {"CPU": 64, "GPU": 8})
    assert fixed.ray_num_workers == 4
    problems = problems_of(["trainer.async_validation=true", "exp_manager.create_checkpoint_callback=false"])
    assert any("trainer.async_validation: validates each checkpoint" in p for p in problems), problems
