"""Configuration: validation, config files, flag precedence, generated --help."""

from __future__ import annotations

import dataclasses

import pytest

from soulchat.options import SECTIONS, Config, ConfigError, build_parser, load_config_file, parse_args


def test_defaults_are_the_embedded_smoke_run():
    cfg = parse_args([])
    assert cfg.builtin_model and cfg.data.data == []
    assert cfg.optim.lr == 5e-3  # resolved for the built-in random model
    assert parse_args(["--model", "some/dir"]).optim.lr == 2e-5  # fine-tuning default
    assert cfg.train.tokens_per_step % cfg.train.tokens_per_micro_batch == 0


def test_flags_override_config_file_in_both_formats(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(
        "optim:\n  lr: 1.0e-4\n  schedule: linear\ntokens-per-micro-batch: 1024\ntokens_per_step: 4096\n"
        "data: [a.json, b.jsonl]\nactivation_checkpointing: true\n"
    )
    toml_file = tmp_path / "run.toml"
    toml_file.write_text(
        'steps = 7\n[optim]\nlr = 1e-4\nschedule = "linear"\n[train]\ntokens_per_micro_batch = 1024\n'
        'tokens_per_step = 4096\n[data]\ndata = ["a.json", "b.jsonl"]\n'
        "[model]\nactivation_checkpointing = true\n"
    )
    for path in (yaml_file, toml_file):
        cfg = parse_args(["--config", str(path), "--lr", "5e-4", "--no-activation-checkpointing"])
        assert cfg.optim.lr == 5e-4  # the flag wins
        assert cfg.optim.schedule == "linear"  # from the file
        assert cfg.train.tokens_per_micro_batch == 1024 and cfg.train.tokens_per_step == 4096
        assert cfg.data.data == ["a.json", "b.jsonl"]
        assert cfg.model.activation_checkpointing is False
    assert parse_args(["--config", str(toml_file)]).train.steps == 7


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--tokens-per-step", "3000", "--tokens-per-micro-batch", "1024"],
            "multiple of --tokens-per-micro-batch",
        ),
        (
            ["--max-length", "4096", "--tokens-per-micro-batch", "1024", "--tokens-per-step", "4096"],
            "must fit in one packed row",
        ),
        (["--lr", "-1"], "--lr must be positive"),
        (["--eval-fraction", "1.0"], "--eval-fraction"),
        (["--steps", "0"], "--steps"),
        (["--keep-last", "0"], "--keep-last"),
        (["--grad-clip", "-1"], "--grad-clip"),
        (["--beta2", "1.0"], "--beta1/--beta2"),
    ],
)
def test_impossible_configs_raise_clear_errors(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(argv)


def test_config_file_errors_name_the_problem(tmp_path):
    bad_key = tmp_path / "typo.yaml"
    bad_key.write_text("optim:\n  learning_rate: 1e-4\n")
    with pytest.raises(ConfigError, match="unknown key 'learning_rate'"):
        parse_args(["--config", str(bad_key)])
    flat_typo = tmp_path / "flat.yaml"
    flat_typo.write_text("tokens_per_stpe: 4096\n")
    with pytest.raises(ConfigError, match="did you mean 'tokens_per_step'"):
        parse_args(["--config", str(flat_typo)])
    bad_value = tmp_path / "value.toml"
    bad_value.write_text('[train]\nsteps = "many"\n')
    with pytest.raises(ConfigError, match="steps.*expects int"):
        parse_args(["--config", str(bad_value)])
    bad_choice = tmp_path / "choice.yaml"
    bad_choice.write_text("parallel: zero3\n")
    with pytest.raises(ConfigError, match="must be one of"):
        parse_args(["--config", str(bad_choice)])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.toml"
    broken.write_text("lr = = 1\n")
    with pytest.raises(ConfigError, match="could not be parsed"):
        load_config_file(broken)
    with pytest.raises(ConfigError, match="unknown extension"):
        load_config_file(_touch(tmp_path / "run.ini"))


def _touch(path):
    path.write_text("")
    return path


def test_help_lists_every_field_with_its_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for cls in SECTIONS.values():
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            assert flag in text, flag
            first_words = " ".join(f.metadata["help"].split()[:3])
            assert first_words in text, (flag, first_words)


def test_config_round_trips_through_its_dict():
    cfg = parse_args(["--lr", "1e-4", "--data", "x.json", "--steps", "3", "--parallel", "ddp"])
    again = Config.from_dict(cfg.to_dict())
    assert again == cfg


def test_a_runs_saved_config_json_is_a_valid_config_file(tmp_path):
    cfg = parse_args(["--lr", "1e-4", "--steps", "3", "--template", "soulchat"])
    saved = tmp_path / "config.json"
    saved.write_text(cfg.to_json())
    assert parse_args(["--config", str(saved)]) == cfg
