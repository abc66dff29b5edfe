"""The stage commands are built from their configs (raysad/configs.py): every field with help is a flag of the
same name, the help and default come from the field, and a flag given wins over the --config file."""
from __future__ import annotations

import dataclasses

import pytest
from typer.testing import CliRunner

from raysad import configs
from raysad.cli import app, config_options
from raysad.config import ConfigError, build_config

COMMANDS = {"rollout": configs.RolloutConfig, "evaluate": configs.EvalConfig, "distill": configs.DistillConfig,
            "sft": configs.SFTConfig, "prune": configs.PruneConfig, "report": configs.ReportConfig}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_field_with_help_is_a_flag(command):
    config_cls = COMMANDS[command]
    with_help = {f.name for f in dataclasses.fields(config_cls) if f.metadata.get("help")}
    assert {p.name for p in config_options(config_cls)} == with_help
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for name in with_help:
        assert "--" + name.replace("_", "-") in result.output, name


def test_a_shared_part_means_the_same_in_every_stage():
    # evaluate has the engine placement and tracking flags rollout has (it lacked --tracking-uri and
    # --gpus-per-engine when each command declared its own)
    rollout = {p.name for p in config_options(configs.RolloutConfig)}
    evaluate = {p.name for p in config_options(configs.EvalConfig)}
    assert {"tracking_uri", "gpus_per_engine", "engine_resources", "task_ids"} <= rollout & evaluate
    for part in (configs.Tasks, configs.Policy, configs.Play):
        for field in dataclasses.fields(part):
            assert configs.RolloutConfig.__dataclass_fields__[field.name].metadata["help"]
    # a stage's own default (evaluate plays the test split) keeps the part's help
    split = configs.EvalConfig.__dataclass_fields__["split"]
    assert split.default == "test" and configs.RolloutConfig.__dataclass_fields__["split"].default == "train"


def test_flags_win_over_the_config_file(tmp_path):
    config = tmp_path / "eval.yaml"
    config.write_text("policy: random\nenv: hotpotqa\nepisodes: 2\nout: nowhere\n")
    result = CliRunner().invoke(app, ["evaluate", "--config", str(config), "--episodes", "0"])
    assert result.exit_code == 2 and "field 'episodes' must be >= 1" in result.output  # the flag, not the file's 2


def test_an_unknown_or_renamed_field_names_its_replacement(tmp_path):
    with pytest.raises(ConfigError, match=r"grad_clip \(did you mean max_grad_norm\?\)"):
        build_config(configs.SFTConfig, None, trajectories="t.jsonl", grad_clip=1.0)
    with pytest.raises(ConfigError, match=r"lamda_act \(did you mean lambda_act\?\)"):
        build_config(configs.DistillConfig, None, trajectories="t", student="s", lamda_act=1.0)


@pytest.mark.parametrize("command, config_cls, not_fields", [
    ("quickstart", "raysad.quickstart:QuickstartConfig", {"small", "config"}),
    ("tune", "raysad.sweep:SweepConfig", {"sweep", "resume"}),
])
def test_hand_written_commands_are_checked_against_their_configs(command, config_cls, not_fields):
    # quickstart (teacher presets, --small) and tune (a sweep file) keep hand-written flags: each must still
    # name a field of their config, with that field's default where the flag shows one
    import importlib

    import typer

    module, name = config_cls.split(":")
    fields = {f.name: f for f in dataclasses.fields(getattr(importlib.import_module(module), name))}
    click_command = typer.main.get_command(app).commands[command]
    for param in click_command.params:
        if param.name in not_fields:
            continue
        assert param.name in fields, f"{command} --{param.name}: no such field in {name}"
        field = fields[param.name]
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        if isinstance(param.show_default, str) and default not in (None, dataclasses.MISSING, [], {}):
            shown = ",".join(default) if isinstance(default, list) else str(default)
            assert param.show_default.startswith(shown), (command, param.name, param.show_default, default)


def test_envs_play_shows_every_admissible_action_grouped_by_verb():
    import raysad_envs

    from raysad.envs_cli import group_actions

    env = raysad_envs.make("alfworld", split="test")
    _, info = env.reset(seed=0)
    actions = info["admissible_actions"]
    shown = group_actions(actions)
    assert len(actions) >= 20  # the old display stopped at 20
    # every action can be read back from its verb's line
    lines = {line.strip().split(":")[0]: line for line in shown.splitlines()}
    for action in actions:
        verb = next(v for v in lines if action == v or action.startswith(v + " "))
        assert action[len(verb):].strip() in lines[verb]
