"""Options: validation, config files, flag precedence, generated --help, one schema for every command,
one-line errors."""

from __future__ import annotations

import argparse
import dataclasses
import sys

import pytest

from soulchat.cli import run_cli
from soulchat.commandline import Command, Section, field_type, load_config_file
from soulchat.options import ConfigError, DataConfig, GenerationConfig, ModelConfig, OptimConfig, TrainConfig
from soulchat.train_options import SECTIONS, TRAIN_COMMAND, Config, build_parser, parse_args


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


@pytest.mark.parametrize(
    "name, text, where",
    [
        ("flat.yaml", "lr: 1.0e-4\nsteps: 3\nlr: 2.0e-4\n", " (lines 1 and 3)"),
        ("nested.yaml", "optim:\n  lr: 1.0e-4\n  lr: 2.0e-4\n", " (lines 2 and 3)"),
        ("run.json", '{"optim": {"lr": 0.1, "lr": 0.2}}', ""),
    ],
)
def test_config_file_key_given_twice_is_refused_naming_key_and_file(tmp_path, name, text, where):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        parse_args(["--config", str(path)])
    assert str(err.value) == f"config file {path}: key 'lr' is given twice{where}; keep one of them"


def test_yaml_merge_keys_may_be_overridden_once(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("defaults: &d\n  lr: 1.0e-4\n  warmup_steps: 2\noptim:\n  <<: *d\n  lr: 3.0e-4\n")
    assert load_config_file(path)["optim"] == {"lr": 3.0e-4, "warmup_steps": 2}


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


# --------------------------------------------------------------------------------------------------
# Values are checked at the boundary, whatever their source
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        # argparse alone reads "-1e-3" as an option ("expected one argument"): both spellings must reach
        # the field's own check.
        (["--lr", "-1e-3"], "--lr must be positive, got -0.001"),
        (["--lr=-1e-3"], "--lr must be positive, got -0.001"),
        (["--warmup-steps", "-5"], "--warmup-steps must be >= 0, got -5"),
        (["--eval-fraction", "-1e-3"], r"--eval-fraction must be in \[0, 1\)"),
        (["--lr", "inf"], "--lr must be a finite number, got inf"),
        (["--lr", "-inf"], "--lr must be a finite number, got -inf"),
        (["--lr", "nan"], "--lr must be a finite number, got nan"),
        (["--eval-fraction", "nan"], "--eval-fraction must be a finite number"),
        (["--epochs", "inf"], "--epochs must be a finite number"),
        (["--steps", "abc"], "argument --steps: expects an integer, got 'abc'"),
        (["--steps", "2.5"], "argument --steps: expects an integer, got '2.5'"),
        (["--parallel", "zero3"], "invalid choice: 'zero3'"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--lr"], "argument --lr: expected one argument"),
        (["--row-size", "512"], r"--row-size \(512\) is smaller than --max-length \(1024\)"),
        (["--row-size", "4096"], "in training a packed row is one micro-batch"),
        (["--workers", "0"], "--workers: must be a positive integer"),
        (["--counselor-role", " "], "--counselor-role names must not be empty"),
    ],
)
def test_flag_values_are_checked_with_our_messages(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(argv)


def test_negative_values_are_attached_only_to_a_preceding_flag():
    argv = ["--lr", "-1e-3", "--data", "a.json", "--", "-1"]
    assert TRAIN_COMMAND.normalize_argv(argv) == ["--lr=-1e-3", "--data", "a.json", "--", "-1"]
    assert TRAIN_COMMAND.normalize_argv(["--lr=-1", "--seed", "-3"]) == ["--lr=-1", "--seed=-3"]
    assert parse_args(["--seed", "-3"]).train.seed == -3  # a negative value where one is allowed


@pytest.mark.parametrize(
    "text, message",
    [
        ("steps: true\n", r"--steps expects int, got True"),  # YAML true is not 1 step
        ("lr: .inf\n", "--lr must be a finite number"),
        ("lr: .nan\n", "--lr must be a finite number"),
        ("max_length: 512.0\n", "--max-length expects int"),
        ("resume: 1\n", "--resume expects bool, got 1"),
        ("resume: maybe\n", "resume .--resume. expects true or false"),
        ("data: 3\n", "--data expects a list of str, got 3"),
        ("data: [a.json, 2]\n", r"--data expects str, got \['a.json', 2\]"),
        ("template: 7\n", "--template expects str"),
        ("eval_fraction: 1.5\n", r"--eval-fraction must be in \[0, 1\)"),
        ("output_dir: null\n", "--output-dir cannot be empty"),
    ],
)
def test_config_file_types_are_checked_strictly(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        parse_args(["--config", str(path)])
    assert str(path) in str(info.value)  # the file is named


def test_config_file_numbers_written_as_text_still_parse(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1e-4\nwarmup_steps: '7'\nmodel: none\nresume: 'yes'\n")  # YAML 1.1: 1e-4 is a string
    cfg = parse_args(["--config", str(path)])
    assert cfg.optim.lr == 1e-4 and cfg.optim.warmup_steps == 7 and cfg.model.model is None
    assert cfg.checkpoint.resume is True


def test_a_file_where_a_directory_belongs_is_refused(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match=r"--output-dir .*file is a file, not a directory"):
        parse_args(["--output-dir", str(a_file)])
    with pytest.raises(ConfigError, match=r"--cache-dir .*file is a file, not a directory"):
        parse_args(["--cache-dir", str(a_file)])
    assert parse_args(["--output-dir", str(tmp_path / "new")]).train.output_dir == str(tmp_path / "new")


def test_sections_check_values_built_in_python_too():
    with pytest.raises(ConfigError, match="--steps expects int, got True"):
        TrainConfig(steps=True)
    with pytest.raises(ConfigError, match="--lr must be a finite number"):
        OptimConfig(lr=float("inf"))
    assert OptimConfig(lr=1).lr == 1.0 and isinstance(OptimConfig(lr=1).lr, float)
    assert DataConfig(data="one.json").data == ["one.json"]  # one path is a list of one


def test_list_flags_accept_repeats_and_several_values():
    cfg = parse_args(["--data", "a.json", "b.json", "--data", "c.json", "--client-role", "patient"])
    assert cfg.data.data == ["a.json", "b.json", "c.json"] and cfg.data.client_role == ["patient"]
    assert "patient" in cfg.data.role_map().client and "user" in cfg.data.role_map().client


def test_train_row_size_is_the_micro_batch():
    assert parse_args(["--tokens-per-micro-batch", "2048", "--tokens-per-step", "4096"]).data.row_size == 2048
    cfg = parse_args(["--row-size", "2048", "--tokens-per-micro-batch", "2048", "--tokens-per-step", "4096"])
    assert cfg.data.row_size == 2048


# --------------------------------------------------------------------------------------------------
# One schema for every command
# --------------------------------------------------------------------------------------------------


def _flags(parser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings}


def test_prepare_and_train_offer_the_same_data_options():
    from soulchat.data.__main__ import PREPARE

    train_flags, prepare_flags = _flags(build_parser()), _flags(PREPARE.parser())
    for f in dataclasses.fields(DataConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in train_flags and flag in prepare_flags, flag
        assert train_flags[flag].help == prepare_flags[flag].help, flag
    for flag in ("--tokenizer", "--seed", "--no-progress", "--force", "--out", "--config", "--debug"):
        assert flag in prepare_flags, flag
    assert prepare_flags["--out"].dest == prepare_flags["--cache-dir"].dest  # the old name still works
    assert "--out" not in train_flags  # in train `--out` stays an abbreviation of --output-dir
    defaults = PREPARE.parse([])
    assert (
        defaults["data"] == DataConfig()
        and defaults["data"].eval_fraction == 0.05 == parse_args([]).data.eval_fraction
    )
    assert PREPARE.parse(["--out", "x", "--seed", "-2"])["data"].cache_dir == "x"
    assert PREPARE.parse(["--seed", "-2", "--force"])["train"].seed == -2
    with pytest.raises(ConfigError, match="--max-length must be at least 2"):
        PREPARE.parse(["--max-length", "1"])


def test_choices_are_the_data_packages():
    from soulchat.data.readers import FORMATS
    from soulchat.data.render import LOSS_WEIGHTING, OVERFLOW, TEMPLATES

    assert field_type(DataConfig, "format").choices == ("auto", *FORMATS)
    assert field_type(DataConfig, "template").choices == TEMPLATES
    assert field_type(DataConfig, "overflow").choices == OVERFLOW
    assert field_type(DataConfig, "loss_weighting").choices == LOSS_WEIGHTING


def test_options_import_no_data_code():
    # The options stand below the data package: reading and checking them (--columns, the role map)
    # loads none of it.
    import subprocess

    code = (
        "import sys, soulchat.options as o, soulchat.train_options as t; "
        "o.DataConfig(columns='messages=dialog').role_map(); t.parse_args([]); "
        "print(sorted(m for m in sys.modules if m.startswith(('soulchat.data.', 'soulchat.model', 'torch', "
        "'transformers'))))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_role_map_is_the_readers_role_map():
    from soulchat.data.conversation import RoleMap

    role_map = DataConfig(counselor_role=["doctor"]).role_map()
    assert isinstance(role_map, RoleMap) and role_map.canonical("Doctor", "here") == "counselor"
    assert role_map.client == RoleMap().client and role_map.counselor[-1] == "doctor"


def test_a_command_is_a_list_of_sections():
    command = Command(
        "gen",
        "generation only",
        [
            Section(
                GenerationConfig,
                defaults={"do_sample": False},
                aliases={"do_sample": (("--greedy", False), "--sample")},
            )
        ],
        config_file=False,
    )
    assert command.parse([])["generation"].do_sample is False  # this command's default
    assert command.parse(["--sample"])["generation"].do_sample is True
    assert command.parse(["--sample", "--greedy"])["generation"].do_sample is False
    g = command.parse(["--temperature", "0.5", "--top-k", "0", "--sample"])["generation"]
    assert g.generate_kwargs() == {
        "max_new_tokens": 256, "do_sample": True, "repetition_penalty": 1.0, "num_beams": 1,
        "temperature": 0.5, "top_p": 0.75, "top_k": 0,
    }  # fmt: skip
    assert "--config" not in _flags(command.parser())
    with pytest.raises(ConfigError, match="--temperature must be > 0 when sampling"):
        command.parse(["--sample", "--temperature", "0"])
    with pytest.raises(ConfigError, match=r"--top-p must be in \(0, 1\]"):
        command.parse(["--top-p", "-1e-3"])
    needs_model = Command("x", "", [Section(ModelConfig, only=("model",), required=("model",))])
    with pytest.raises(ConfigError, match="--model is required"):
        needs_model.parse([])
    assert needs_model.parse(["--model", "m"])["model"].model == "m"
    with pytest.raises(AssertionError, match="in two sections"):
        Command("x", "", [TrainConfig, GenerationConfig])  # both have `seed`


# --------------------------------------------------------------------------------------------------
# Errors end as one line and exit status 2
# --------------------------------------------------------------------------------------------------


def _stderr_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr", "-1e-3"], "error: --lr must be positive, got -0.001"),
        (["--lr", "inf"], "error: --lr must be a finite number, got inf"),
        (["--steps", "x"], "error: argument --steps: expects an integer, got 'x'"),
        (["--nonsense"], "error: unrecognized arguments: --nonsense"),
    ],
)
def test_train_command_line_errors_are_one_line(monkeypatch, capsys, argv, message):
    from soulchat import train

    monkeypatch.setattr(sys, "argv", ["soulchat.train", *argv])
    with pytest.raises(SystemExit) as info:
        train.cli()
    assert info.value.code == 2
    lines = _stderr_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith(message), lines


def test_data_command_line_errors_are_one_line(tmp_path, capsys):
    from soulchat.data.__main__ import main

    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [
        (["prepare", "--eval-fraction", "-1e-3"], "error: --eval-fraction must be in [0, 1)"),
        (["prepare", "--out", str(a_file)], "error: --cache-dir"),
        (["prepare", "--max-length", "inf"], "error: argument --max-length: expects an integer"),
        (["bogus"], "error: argument command: invalid choice: 'bogus'"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as info:
            main(argv)
        lines = _stderr_lines(capsys)
        assert info.value.code == 2 and len(lines) == 1 and lines[0].startswith(message), (argv, lines)
    # An error while preparing (not an option): status 2, one line; --debug adds the traceback.
    missing = [
        "prepare",
        "--data",
        str(tmp_path / "missing.json"),
        "--out",
        str(tmp_path / "c"),
        "--no-progress",
    ]
    assert main(missing) == 2
    lines = _stderr_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "missing.json" in lines[0]
    assert main([*missing, "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().splitlines()[-1].startswith("error: ")


def test_run_cli_names_unexpected_errors_and_joins_lines(capsys):
    def boom(argv):
        raise KeyError("x")

    def multi(argv):
        raise ValueError("first line\n  second line")

    assert run_cli(boom, []) == 2
    assert _stderr_lines(capsys) == ["error: KeyError: 'x' (run with --debug for the traceback)"]
    assert run_cli(multi, []) == 2
    assert _stderr_lines(capsys) == ["error: first line; second line"]
    assert run_cli(lambda argv: 0, []) == 0 and run_cli(lambda argv: {"summary": 1}, []) == 0
