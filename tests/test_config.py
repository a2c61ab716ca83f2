"""Configs (nezha/config.py): dataclass defaults, a YAML file on top, CLI flags on top of that; values typed
from the annotations, and every refusal a ConfigError that names the field."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from nezha.config import ConfigError, add_config_arguments, from_dict, load_yaml, parse_config


@dataclass
class Example:
    """An entry point's config."""

    name: str = "base"
    steps: int = 10
    lr: float = 1e-3
    enabled: bool = False
    note: str | None = "kept"
    limit: int | None = 5
    sizes: list[int] = field(default_factory=lambda: [8, 8], metadata={"help": "codebook sizes"})
    shape: tuple[int, ...] = (1, 2)
    extra: dict[str, Any] = field(default_factory=dict)


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_no_file_and_no_flags_give_the_defaults() -> None:
    assert parse_config(Example, []) == Example()


def test_a_yaml_file_sets_fields_typed_by_their_annotations(tmp_path: Path) -> None:
    path = write(tmp_path, "name: big\nsteps: '20'\nlr: 0.5\nsizes: [4, 2]\nshape: [3, 4]\nextra: {a: 1}\n")
    cfg = parse_config(Example, ["--config", str(path)])
    assert cfg == Example(name="big", steps=20, lr=0.5, sizes=[4, 2], shape=(3, 4), extra={"a": 1})


def test_flags_override_the_yaml_file_and_leave_its_other_fields(tmp_path: Path) -> None:
    path = write(tmp_path, "name: big\nsteps: 20\n")
    cfg = parse_config(Example, ["--config", str(path), "--steps", "30", "--lr", "0.25"])
    assert (cfg.name, cfg.steps, cfg.lr) == ("big", 30, 0.25)


def test_list_flags_are_comma_separated() -> None:
    cfg = parse_config(Example, ["--sizes", "4,2,1", "--shape", "5,6"])
    assert cfg.sizes == [4, 2, 1] and cfg.shape == (5, 6)


def test_every_field_is_a_flag_with_its_help_and_default() -> None:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Example)
    help_text = parser.format_help()
    assert "--config" in help_text and "--sizes" in help_text
    assert "codebook sizes (default: [8, 8])" in " ".join(help_text.split())


@pytest.mark.parametrize("text", ["true", "True", "yes", "on", "1"])
def test_true_spellings(text: str) -> None:
    assert parse_config(Example, ["--enabled", text]).enabled is True


@pytest.mark.parametrize("text", ["false", "FALSE", "no", "off", "0"])
def test_false_spellings(text: str) -> None:
    assert parse_config(Example, ["--enabled", text]).enabled is False


def test_a_bare_bool_flag_means_true() -> None:
    assert parse_config(Example, ["--enabled"]).enabled is True


def test_yaml_booleans_are_taken_as_they_are(tmp_path: Path) -> None:
    assert parse_config(Example, ["--config", str(write(tmp_path, "enabled: yes\n"))]).enabled is True


def test_null_clears_an_optional_field(tmp_path: Path) -> None:
    cfg = parse_config(Example, ["--config", str(write(tmp_path, "note: null\nlimit: null\n"))])
    assert cfg.note is None and cfg.limit is None


@pytest.mark.parametrize("text", ["none", "None", "null"])
def test_none_on_the_command_line_clears_an_optional_text_field(text: str) -> None:
    assert parse_config(Example, ["--note", text]).note is None


def test_none_is_a_plain_string_where_the_field_is_not_optional() -> None:
    assert parse_config(Example, ["--name", "none"]).name == "none"


@pytest.mark.parametrize(("values", "message"), [
    ({"steps": None}, "^steps: may not be null$"),
    ({"steps": "ten"}, "^steps: expected int, got 'ten'$"),
    ({"lr": "fast"}, "^lr: expected float, got 'fast'$"),
    ({"enabled": "maybe"}, "^enabled: expected true/false, got 'maybe'$"),
    ({"sizes": "4,x"}, "^sizes: expected int, got 'x'$"),
    ({"limit": "none"}, "^limit: expected int, got 'none'$"),
    ({"extra": [1, 2]}, r"^extra: expected a mapping, got \[1, 2\]$"),
])
def test_a_value_that_does_not_fit_names_its_field(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_dict(Example, values)


def test_an_unknown_key_is_refused_with_its_source_and_the_known_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "stpes: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['stpes'\]; known: \[.*'steps'") as caught:
        from_dict(Example, load_yaml(path), source=str(path))
    assert str(caught.value).startswith(f"{path}: ")


def test_a_bad_value_on_the_command_line_exits_with_usage_and_the_message(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        parse_config(Example, ["--steps", "ten"])
    assert caught.value.code == 2
    assert "steps: expected int, got 'ten'" in capsys.readouterr().err


def test_a_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found: .*absent.yaml"):
        load_yaml(tmp_path / "absent.yaml")


def test_invalid_yaml_is_refused_with_the_file_name(tmp_path: Path) -> None:
    path = write(tmp_path, "steps: [1, 2\n")
    with pytest.raises(ConfigError, match=f"^{path}: not valid YAML"):
        load_yaml(path)


def test_a_yaml_file_must_hold_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "- steps\n- lr\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_yaml(path)


def test_an_empty_yaml_file_sets_nothing(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    assert load_yaml(path) == {}
    assert parse_config(Example, ["--config", str(path)]) == Example()
