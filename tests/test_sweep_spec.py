"""Sweep specs: every shipped spec validates, mistakes are reported all at once with the key and a
did-you-mean, and the search space converts to Ray Tune's (presets, grids, ranges). Fast: no Ray cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config import ConfigError, load_experiment
from orchestrator.sweep.spec import load_sweep, schema_key_problem, split_overrides, sweep_from_dict

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_SPECS = sorted((ROOT / "sweeps").rglob("*.yaml"))
DEMO_SALM = ROOT / "configs" / "demo" / "salm.yaml"


def spec(**changes) -> dict:
    """A small valid spec over the demo SALM; `changes` replace top-level keys."""
    data = {
        "name": "t",
        "base": str(DEMO_SALM),
        "overrides": ["trainer.max_steps=40", "trainer.val_check_interval=10"],
        "search_space": {
            "model.optimizer.lr": {"loguniform": [1e-4, 1e-2]},
            "model.freeze_params": {"choice": {"none": [], "frozen_encoder": ["^perception\\.encoder\\..+$"]}},
        },
        "metric": "val_loss",
        "mode": "min",
        "scheduler": {"type": "asha", "grace_period": 10},
    }
    data.update(changes)
    return data


def problems_of(data: dict, overrides: list[str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        sweep_from_dict(data, overrides)
    return info.value.problems


def test_shipped_specs_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in SHIPPED_SPECS}
    assert {"sweeps/salm_lora_rank.yaml", "sweeps/salm_freeze_patterns.yaml", "sweeps/s2s_loss_weights.yaml"} <= names
    assert any(n.startswith("sweeps/demo/") for n in names)


@pytest.mark.parametrize("path", SHIPPED_SPECS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_spec_validates(path: Path):
    import yaml

    from orchestrator.sweep import search_space

    base = yaml.safe_load(path.read_text())["base"]
    if not (ROOT / base).is_file():
        pytest.skip(f"{base} is not in this checkout yet")
    loaded = load_sweep(path)
    assert loaded.params, "a shipped spec sweeps something"
    assert set(search_space.param_space(loaded)) == {p.key for p in loaded.params}
    assert load_sweep(path, smoke=True).spec.num_samples == loaded.spec.smoke.num_samples
    text = path.read_text()
    assert text.startswith("#") and "speechlm sweep" in text.split("\n\n")[0], "header: purpose + launch command"


def test_every_problem_is_reported_at_once_with_the_key_and_a_fix():
    data = spec(
        search_space={
            "model.lora.rank": {"choice": [4, 8]},  # typo of model.lora.r
            "model.optimizer.lr": {"loguniform": [0, 1e-2]},  # log scale needs low > 0
            "trainer.max_step": {"grid": [10, 20]},  # typo of trainer.max_steps
            "model.text_loss_weight": [1, 2],  # a bare list
            "model.audio_loss_weight": {"uniform": [1, 2], "choice": [1, 2]},  # two distributions
        },
        scheduler={"type": "ashaa"},
        metric="val_los",
        num_samples=0,
    )
    problems = problems_of(data)
    text = "\n".join(problems)
    assert "search_space.model.lora.rank: unknown config key 'model.lora.rank'" in text
    assert "Did you mean 'model.lora.r'?" in text
    assert "Did you mean 'trainer.max_steps'?" in text
    assert "search_space.model.optimizer.lr.loguniform: low (0.0) must be positive" in text
    assert "search_space.model.text_loss_weight: a bare list [1, 2]; write {choice: [...]}" in text
    assert "search_space.model.audio_loss_weight: give exactly one of" in text
    assert "scheduler.type: 'ashaa' is not allowed" in text and "Did you mean 'asha'?" in text
    assert "num_samples: 0 must be at least 1" in text
    assert len(problems) >= 8


def test_metric_and_mode_are_checked_against_the_model():
    problems = problems_of(spec(metric="val_los"))
    assert any(
        "metric: 'val_los' is not reported by a salm run" in p and "Did you mean 'val_loss'?" in p for p in problems
    )
    (problem,) = problems_of(spec(metric="val_wer", mode="max"))
    assert "val_wer is lower-is-better, use mode: min" in problem
    assert sweep_from_dict(spec(metric="val_acc_demo_val", mode="max")).spec.metric == "val_acc_demo_val"


def test_duplex_specs_may_rank_by_the_unweighted_loss_parts():
    duplex = dict(
        base=str(DEMO_SALM.with_name("s2s_duplex.yaml")), search_space={"model.audio_loss_weight": {"grid": [1, 4]}}
    )
    assert sweep_from_dict(spec(**duplex, metric="val_text_loss")).spec.metric == "val_text_loss"
    (problem,) = problems_of(spec(**duplex, metric="val_audio_loss", mode="max"))
    assert "val_audio_loss is lower-is-better, use mode: min" in problem
    (problem,) = problems_of(spec(metric="val_text_loss"))  # SALM has no text/audio split
    assert "'val_text_loss' is not reported by a salm run" in problem


def test_every_candidate_value_is_validated_against_the_base_config():
    data = spec(search_space={"model.lora.r": {"grid": [0, 8]}, "trainer.precision": {"choice": ["32", "fp8"]}})
    problems = problems_of(data)
    assert any(p.startswith("search_space.model.lora.r: value 0: model.lora.r: 0 must be at least 1") for p in problems)
    assert any(
        p.startswith("search_space.trainer.precision: value \"fp8\": trainer.precision: 'fp8'") for p in problems
    )
    assert len(problems) == 2


def test_base_config_problems_name_the_base():
    problems = problems_of(spec(overrides=["trainer.max_stepz=10"]))
    assert any(
        "base config" in p and "trainer.max_stepz: unknown key. Did you mean 'max_steps'?" in p for p in problems
    )
    (problem,) = problems_of(spec(base="configs/nope.yaml"))
    assert problem.startswith("base: config 'configs/nope.yaml' not found")


def test_swept_key_cannot_also_be_fixed():
    data = spec(overrides=["trainer.max_steps=40", "trainer.val_check_interval=10", "model.optimizer.lr=1e-3"])
    (problem,) = problems_of(data)
    assert problem.startswith("search_space.model.optimizer.lr: also set in the fixed overrides")


def test_list_valued_options_need_preset_names():
    (problem,) = problems_of(spec(search_space={"model.freeze_params": {"choice": [[], ["^llm\\..+$"]]}}))
    assert "list- or mapping-valued options need names" in problem


def test_presets_become_names_for_tune_and_values_for_the_trial():
    loaded = sweep_from_dict(spec())
    freeze = next(p for p in loaded.params if p.key == "model.freeze_params")
    assert freeze.options == ("none", "frozen_encoder")
    cfg = loaded.trial_config({"model.optimizer.lr": 1e-3, "model.freeze_params": "frozen_encoder"}).cfg
    assert cfg.model.freeze_params == ["^perception\\.encoder\\..+$"]
    assert cfg.model.optimizer["lr"] == pytest.approx(1e-3)
    assert cfg.trainer.max_steps == 40  # fixed overrides still apply


def test_search_space_converts_to_tune_domains():
    from ray import tune

    from orchestrator.sweep import search_space

    data = spec(
        search_space={
            "model.optimizer.lr": {"loguniform": [1e-4, 1e-2]},
            "model.lora.r": {"randint": [4, 17]},
            "model.lora.lora_dropout": {"quniform": [0.0, 0.3, 0.1]},
            "model.text_loss_weight": {"uniform": [0.5, 2.0]},
            "model.lora.lora_alpha": {"grid": [16, 32]},
            "model.freeze_params": {"choice": {"none": [], "all_llm": ["^llm\\..+$"]}},
        }
    )
    space = search_space.param_space(sweep_from_dict(data))
    assert isinstance(space["model.optimizer.lr"], tune.search.sample.Float)
    assert isinstance(space["model.optimizer.lr"].get_sampler(), tune.search.sample.LogUniform)
    assert (space["model.lora.r"].lower, space["model.lora.r"].upper) == (4, 17)
    assert isinstance(space["model.lora.lora_dropout"].get_sampler(), tune.search.sample.Quantized)
    assert space["model.lora.lora_alpha"] == {"grid_search": [16, 32]}
    assert space["model.freeze_params"].categories == ["none", "all_llm"]


def test_grid_search_alg_crosses_every_choice_and_rejects_ranges():
    from orchestrator.sweep import search_space

    data = spec(
        search_alg={"type": "grid"},
        search_space={"model.lora.r": {"choice": [4, 8]}, "model.freeze_params": {"choice": {"a": [], "b": ["^x$"]}}},
    )
    space = search_space.param_space(sweep_from_dict(data))
    assert space == {"model.lora.r": {"grid_search": [4, 8]}, "model.freeze_params": {"grid_search": ["a", "b"]}}
    problems = problems_of(spec(search_alg={"type": "grid"}))
    assert any("loguniform is a continuous range; search_alg grid needs" in p for p in problems)
    problems = problems_of(spec(search_alg={"type": "optuna"}, search_space={"model.lora.r": {"grid": [4, 8]}}))
    assert any("optuna samples its own points and cannot take grid values" in p for p in problems)


def test_scheduler_settings_are_checked_against_the_trainer():
    (problem,) = problems_of(spec(scheduler={"type": "asha", "grace_period": 40}))
    assert "scheduler.grace_period: 40 steps is not below max_t (40)" in problem
    from orchestrator.sweep import search_space

    asha = search_space.scheduler(sweep_from_dict(spec()))
    assert (asha._time_attr, asha._max_t) == ("step", 40)
    assert sorted(m for m, _ in asha._brackets[0]._rungs) == [10, 20, 40]  # grace 10, reduction factor 2


def test_smoke_turns_grids_into_a_few_short_trials():
    data = spec(search_alg={"type": "grid"}, search_space={"model.lora.r": {"grid": [4, 8, 16]}})
    loaded = sweep_from_dict(data, smoke=True)
    assert loaded.spec.search_alg.type == "random" and loaded.params[0].kind == "choice"
    assert loaded.spec.num_samples == 2 and loaded.max_steps == 4
    assert loaded.sweep_dir.endswith("experiments/sweeps/t-smoke")


def test_command_line_overrides_split_between_spec_and_config():
    spec_part, config_part = split_overrides(["num_samples=3", "scheduler.grace_period=20", "trainer.max_steps=80"])
    assert spec_part == ["num_samples=3", "scheduler.grace_period=20"]
    assert config_part == ["trainer.max_steps=80"]
    loaded = sweep_from_dict(spec(), ["num_samples=3", "trainer.max_steps=80"])
    assert loaded.spec.num_samples == 3 and loaded.max_steps == 80
    assert loaded.trial_overrides({"model.optimizer.lr": 1e-3, "model.freeze_params": "none"})[-3:] == [
        "trainer.max_steps=80",
        "model.optimizer.lr=0.001",
        "model.freeze_params=[]",
    ]


def test_schema_key_walk_handles_optionals_dicts_and_lists():
    assert schema_key_problem("model.lora.r") is None  # lora is Optional[LoraConfig]
    assert schema_key_problem("model.optimizer.lr") is None  # a free-form dict
    assert schema_key_problem("data.train_ds.input_cfg.0.weight") is None
    assert "is a list; index it with a number" in schema_key_problem("data.train_ds.input_cfg.weight")
    assert "is a value, it has no key" in schema_key_problem("trainer.max_steps.x")


# ------------------------------------------------------------------------------------ report (no Ray run)


def test_ranking_best_config_and_plot(tmp_path):
    from orchestrator.sweep.report import (
        TrialRecord,
        best_config_yaml,
        comparison_png,
        format_table,
        rank,
        results_rows,
    )

    loaded = sweep_from_dict(spec())
    records = rank(
        [
            TrialRecord(
                "a", "early_stopped", {"model.optimizer.lr": 1e-3, "model.freeze_params": "none"}, [(10, 5.0)], 10
            ),
            TrialRecord("b", "failed", {"model.optimizer.lr": 2e-3, "model.freeze_params": "none"}, [], None, "boom"),
            TrialRecord(
                "c",
                "finished",
                {"model.optimizer.lr": 3e-4, "model.freeze_params": "frozen_encoder"},
                [(10, 5.5), (20, 4.0), (30, 4.2)],
                30,
            ),
        ],
        "min",
    )
    assert [r.trial_id for r in records] == ["c", "a", "b"]
    header, rows = results_rows(records, loaded)
    table = format_table(header, rows)
    assert rows[0][:3] == ["1", "c", "finished"] and rows[0][-3:] == ["4.0000", "20", "30"]
    assert rows[2][0] == "-" and "failed" in table
    best = tmp_path / "best.yaml"
    best.write_text(best_config_yaml(records[0], loaded))
    cfg = load_experiment(best).cfg
    assert cfg.model.freeze_params == ["^perception\\.encoder\\..+$"]
    assert cfg.exp_manager.name == "t_best" and cfg.exp_manager.explicit_log_dir is None
    assert best.read_text().startswith("# Best trial of sweep 't'")
    png = comparison_png(records, loaded, tmp_path / "cmp.png")
    assert png is not None and png.stat().st_size > 10_000


def test_trial_run_dir_resumes_its_own_and_forks_for_pbt(tmp_path):
    from orchestrator.sweep.run import trial_run_dir

    sweep = str(tmp_path)
    assert trial_run_dir(sweep, "x_1", None) == (f"{sweep}/trials/x_1", None)
    own = {"trial_id": "x_1", "run_dir": f"{sweep}/trials/x_1", "checkpoint": "c", "step": 20}
    assert trial_run_dir(sweep, "x_1", own) == (f"{sweep}/trials/x_1", None)
    donor = {"trial_id": "x_0", "run_dir": f"{sweep}/trials/x_0", "checkpoint": "/ck/step=20", "step": 20}
    assert trial_run_dir(sweep, "x_1", donor) == (f"{sweep}/trials/x_1-from-x_0-step20", "/ck/step=20")


def test_error_summary_finds_the_root_cause():
    from orchestrator.sweep.report import error_summary

    error = (
        "Traceback (most recent call last):\n"
        "ray.exceptions.RayTaskError(TrialFailedError): ray::SweepTrial.train() (pid=1)\n"
        "orchestrator.sweep.run.TrialFailedError: trial a_1 failed; run dir /x: TrainingFailedError: workers failed\n"
        "    raise ValueError(f'Invalid learning rate: {lr}')\n"
        "ValueError: Invalid learning rate: -1.0\n"
    )
    assert error_summary(error) == "ValueError: Invalid learning rate: -1.0"
    assert error_summary(None) == ""


def test_pbt_refuses_keys_a_checkpoint_fixes():
    problems = problems_of(
        spec(
            scheduler={"type": "pbt"},
            num_samples=4,
            search_space={"model.lora.r": {"choice": [4, 8]}, "model.text_loss_weight": {"uniform": [0.5, 2.0]}},
        )
    )
    assert len(problems) == 1 and problems[0].startswith("search_space.model.lora.r: PBT copies checkpoints")


def test_cli_takes_overrides_after_flags_and_names_the_bad_metric(capsys: pytest.CaptureFixture[str], tmp_path: Path):
    from orchestrator.cli.main import main

    path = str(ROOT / "sweeps" / "demo" / "s2s_loss_weights.yaml")
    assert main(["sweep", path, "--validate", "metric=val_text_los"]) == 2
    err = capsys.readouterr().err
    assert "metric: 'val_text_los' is not reported by a duplex_s2s run" in err
    assert "Did you mean 'val_text_loss'?" in err
    # the base config's local data and models must exist: point them at a tiny set
    from orchestrator.demo.synthetic_shar import write_synthetic_shar

    shar = write_synthetic_shar(tmp_path / "s2s", n_cuts=2, n_shards=1, with_target_audio=True)
    for model_dir in ("llm", "codec"):  # a model directory is one with a config.json (issue 20)
        (tmp_path / model_dir).mkdir()
        (tmp_path / model_dir / "config.json").write_text("{}")
    paths = [
        f"data.train_ds.input_cfg.0.shar_path={shar}",
        f"data.validation_ds.datasets.demo_val.shar_path={shar}",
        f"model.pretrained_llm={tmp_path / 'llm'}",
        f"model.pretrained_audio_codec={tmp_path / 'codec'}",
    ]
    missing = f"data.train_ds.input_cfg.0.shar_path={tmp_path / 'no_such_shar'}"  # whether or not data/demo exists
    assert main(["sweep", path, "--validate", "num_samples=2", *paths[1:], missing]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["sweep", path, "--validate", "num_samples=2", *paths]) == 0
    with pytest.raises(SystemExit):
        main(["sweep", path, "--validate", "--no-such-flag"])
