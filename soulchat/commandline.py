"""Options -> command lines and config files: the machinery under the sections of soulchat.options.

A section is a dataclass whose fields are declared with ``option(help, default)``; ``check_types`` runs in
its ``__post_init__`` (types strictly: a bool is not an int, a float must be finite; one path -> [path]).
A command is a list of sections (``Command``), each offered whole or in part (``Section``: some fields,
this command's defaults, extra flag spellings, required fields). Every field is a command-line flag
(``lr`` -> ``--lr``, ``tokens_per_step`` -> ``--tokens-per-step``) with its help, and a key of an
optional YAML/TOML/JSON ``--config`` file. Precedence: built-in defaults < config file < flags. A config
file may group keys by section (``optim: {lr: 1e-4}``) or list them flat (``lr: 1e-4``); field names are
unique within a command, so both spellings mean the same thing. Option errors are ConfigErrors with one
line that names the flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

class ConfigError(ValueError):
    """An impossible or malformed configuration; the message says which field and how to fix it."""


def option(
    text: str,
    default: Any = dataclasses.MISSING,
    *,
    aliases: Sequence[str] = (),
    metavar: str | None = None,
    **kwargs: Any,
) -> Any:
    """A section field: its default and its help text, which the flag, the config file and the errors
    share (``aliases``: other flag spellings that still work; ``metavar``: the value's name in --help).
    A list or dict default is copied for every instance."""
    metadata = {"help": text, "aliases": tuple(aliases), "metavar": metavar}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


def require(ok: bool, message: str) -> None:
    """A section's check: ConfigError(message) unless ``ok``."""
    if not ok:
        raise ConfigError(message)


def flag_of(name: str) -> str:
    """The command-line spelling of a field: ``tokens_per_step`` -> ``--tokens-per-step``."""
    return "--" + name.replace("_", "-")


# --------------------------------------------------------------------------------------------------
# Field types: one description used by the type check, the config-file reader and the parser
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldType:
    base: type  # str, int, float or bool
    optional: bool  # None allowed
    choices: tuple[Any, ...] | None  # Literal[...] values
    is_list: bool  # list[base]

    def describe(self) -> str:
        if self.choices is not None:
            text = f"one of {list(self.choices)}"
        else:
            text = f"a list of {self.base.__name__}" if self.is_list else self.base.__name__
        return text + (" or null" if self.optional else "")


def field_type(cls: type, name: str) -> FieldType:
    hint = typing.get_type_hints(cls)[name]
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0]
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        return FieldType(type(choices[0]), optional, choices, False)
    if origin is list:
        return FieldType(typing.get_args(hint)[0], optional, None, True)
    return FieldType(hint, optional, None, False)


def _strict_value(value: Any, base: type) -> Any:
    """``value`` as ``base`` when it already is one (an int is a float; a bool is never a number), else
    raise ValueError. Floats must be finite: inf/nan reach no learning rate, fraction or temperature."""
    if base is bool:
        if isinstance(value, bool):
            return value
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ValueError("must be a finite number")
            return float(value)
    elif isinstance(value, base):
        return value
    raise ValueError(f"expects {base.__name__}")


def check_types(section: Any) -> None:
    """Check (and normalise int -> float, one path -> [path]) every field of a section instance."""
    cls = type(section)
    for f in dataclasses.fields(cls):
        t = field_type(cls, f.name)
        value = getattr(section, f.name)
        if value is None:
            require(t.optional, f"{flag_of(f.name)} cannot be empty (null); expects {t.describe()}")
            continue
        if t.is_list and isinstance(value, (str, Path)):
            value = [value]
        items = list(value) if t.is_list and isinstance(value, (list, tuple)) else None
        try:
            if t.is_list:
                if items is None:
                    raise ValueError(f"expects {t.describe()}")
                value = [str(v) if isinstance(v, Path) else _strict_value(v, t.base) for v in items]
            else:
                value = _strict_value(value, t.base)
        except ValueError as err:
            raise ConfigError(f"{flag_of(f.name)} {err}, got {getattr(section, f.name)!r}") from None
        if t.choices is not None and value not in t.choices:
            raise ConfigError(f"{flag_of(f.name)} must be one of {list(t.choices)}, got {value!r}")
        object.__setattr__(section, f.name, value)


# --------------------------------------------------------------------------------------------------
# Commands: a list of sections -> an argparse parser -> section instances
# --------------------------------------------------------------------------------------------------


# An extra flag: "--out" (means what the field's own flag means) or ("--greedy", False) (sets a constant).
Alias = str | tuple[str, Any]


@dataclass(frozen=True)
class Section:
    """A section as one command offers it: all its fields or ``only`` some, with this command's ``aliases``
    (field -> extra flags), ``defaults`` (field -> value, where commands differ by design), ``required``
    fields (unset after the config file and the flags -> an error naming the flag) and ``help`` (field ->
    this command's wording, where the shared one speaks of another command's job)."""

    cls: type
    only: tuple[str, ...] | None = None
    aliases: Mapping[str, tuple[Alias, ...]] = field(default_factory=dict)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    required: tuple[str, ...] = ()
    help: Mapping[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.cls.section

    def fields(self) -> list[dataclasses.Field]:
        every = {f.name: f for f in dataclasses.fields(self.cls)}
        for name in (*(self.only or ()), *self.aliases, *self.defaults, *self.required, *self.help):
            assert name in every, f"{self.cls.__name__} has no field {name!r}"
        return [every[n] for n in self.only] if self.only is not None else list(every.values())

    def default(self, f: dataclasses.Field) -> Any:
        if f.name in self.defaults:
            return self.defaults[f.name]
        return f.default if f.default is not dataclasses.MISSING else f.default_factory()

    def build(self, values: Mapping[str, Any]) -> Any:
        instance = self.cls(**{**self.defaults, **values})
        for name in self.required:
            require(getattr(instance, name) not in (None, []), f"{flag_of(name)} is required")
        return instance


class OptionParser(argparse.ArgumentParser):
    """argparse, with its errors raised as one-line ConfigErrors (no usage block) and a --debug flag."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument(
            "--debug",
            action="store_true",
            help="on an error, show the traceback (errors are one line without)",
        )

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(f"{message} (see {self.prog} --help)")


class Command:
    """One command line: its sections in order. ``parse(argv)`` -> {section name: section instance}."""

    def __init__(
        self, prog: str, description: str, sections: Sequence[type | Section], *, config_file: bool = True
    ) -> None:
        self.prog = prog
        self.description = description
        self.sections = tuple(s if isinstance(s, Section) else Section(s) for s in sections)
        self.config_file = config_file
        self.owner: dict[str, Section] = {}  # field name -> its section
        for section in self.sections:
            for f in section.fields():
                assert f.name not in self.owner, f"{prog}: field {f.name!r} is in two sections"
                self.owner[f.name] = section
        self.by_name = {s.name: s for s in self.sections}
        assert len(self.by_name) == len(self.sections), f"{prog}: a section is listed twice"

    # ---- parser -----------------------------------------------------------------------------------

    def parser(self) -> OptionParser:
        parser = OptionParser(
            prog=self.prog, description=self.description, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        self.add_arguments(parser)
        return parser

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Every field as a flag (with --config), on ``parser`` (e.g. a subcommand's)."""
        if self.config_file:
            parser.add_argument(
                "--config",
                default=None,
                metavar="FILE",
                help="YAML, TOML or JSON file with any of the options below (flat or by section); "
                "flags given on the command line override it",
            )
        for section in self.sections:
            group = parser.add_argument_group(section.name)
            for f in section.fields():
                _add_flag(group, section, f)

    def normalize_argv(self, argv: Sequence[str]) -> list[str]:
        """Attach a negative number to its flag (``--lr -1e-3`` -> ``--lr=-1e-3``).

        argparse takes a token starting with '-' for an option unless it looks like a negative number by
        its own rule (``-1`` and ``-0.5`` do, ``-1e-3`` and ``-inf`` do not); attached, every value reaches
        the field's validation and its message.
        """
        out: list[str] = []
        for i, token in enumerate(argv):
            if token == "--":  # everything after it is positional
                return [*out, *argv[i:]]
            last = out[-1] if out else ""
            if last.startswith("--") and "=" not in last and token.startswith("-") and _is_number(token):
                out[-1] = f"{last}={token}"
            else:
                out.append(token)
        return out

    # ---- values -----------------------------------------------------------------------------------

    def parse(self, argv: Sequence[str] | None = None) -> dict[str, Any]:
        """Defaults < --config file < flags, validated: {section name: instance}."""
        import sys

        argv = sys.argv[1:] if argv is None else argv
        return self.from_namespace(self.parser().parse_args(self.normalize_argv(argv)))

    def from_namespace(self, namespace: argparse.Namespace) -> dict[str, Any]:
        values: dict[str, Any] = {}
        where = "command line"
        config = getattr(namespace, "config", None) if self.config_file else None
        if config:
            values = load_config_file(config)
            where = f"config file {config} + command line"
        merged = self.sectioned(values, where)
        for dest, value in vars(namespace).items():
            if "." in dest:
                section, name = dest.split(".", 1)
                merged[section][name] = value  # a flag given on the command line wins over the file
        return self.build(merged, where)

    def from_dict(self, values: Mapping[str, Any], where: str = "config") -> dict[str, Any]:
        """Sections from sectioned and/or flat keys (a config file, a saved config.json)."""
        return self.build(self.sectioned(values, where), where)

    def sectioned(self, values: Mapping[str, Any], where: str) -> dict[str, dict[str, Any]]:
        """{section: {field: value}} from sectioned and/or flat keys; unknown keys name the closest one."""
        out: dict[str, dict[str, Any]] = {name: {} for name in self.by_name}
        for key, value in values.items():
            if key in self.by_name and isinstance(value, Mapping):
                valid = {f.name for f in self.by_name[key].fields()}
                for sub_key, sub_value in value.items():
                    name = _field_name(sub_key)
                    if name not in valid:
                        raise ConfigError(
                            f"{where}: unknown key {sub_key!r} in section {key!r}{_suggest(name, valid)}; "
                            f"valid keys: {sorted(valid)}"
                        )
                    out[key][name] = sub_value
                continue
            name = _field_name(key)
            if name not in self.owner:
                raise ConfigError(f"{where}: unknown key {key!r}{_suggest(name, self.owner)}")
            out[self.owner[name].name][name] = value
        return out

    def build(self, values: Mapping[str, Mapping[str, Any]], where: str) -> dict[str, Any]:
        """Instances from {section: {field: value}}; text values are converted first (``_coerce``)."""
        out: dict[str, Any] = {}
        for name, section in self.by_name.items():
            fields = {k: _coerce(section.cls, k, v, where) for k, v in values.get(name, {}).items()}
            try:
                out[name] = section.build(fields)
            except ConfigError as err:
                raise ConfigError(
                    f"{where}: {err}" if where.startswith("config file") else str(err)
                ) from None
        return out


def _field_name(key: Any) -> str:
    return str(key).replace("-", "_")


def _suggest(name: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _add_flag(group: argparse._ArgumentGroup, section: Section, f: dataclasses.Field) -> None:
    t = field_type(section.cls, f.name)
    flag = flag_of(f.name)
    aliases = (*f.metadata.get("aliases", ()), *section.aliases.get(f.name, ()))
    names = [flag, *(a for a in aliases if isinstance(a, str))]
    kwargs: dict[str, Any] = {
        "dest": f"{section.name}.{f.name}",
        # SUPPRESS: only flags actually given override the config file.
        "default": argparse.SUPPRESS,
        "help": f"{section.help.get(f.name, f.metadata['help'])} (default: {section.default(f)})".replace("%", "%%"),
    }
    if t.base is bool and not t.is_list:
        group.add_argument(*names, action=argparse.BooleanOptionalAction, **kwargs)
    else:
        if t.is_list:
            # extend: `--data a b` and `--data a --data b` both give [a, b]
            kwargs.update(nargs="+", action="extend")
        elif t.choices is not None:
            kwargs["choices"] = t.choices
        if t.choices is None:
            kwargs["metavar"] = f.metadata.get("metavar") or f.name.upper()
        kwargs["type"] = _flag_parser(t.base, t.optional)
        group.add_argument(*names, **kwargs)
    for alias in aliases:
        if not isinstance(alias, str):
            alias_flag, value = alias
            same = (
                {True: flag, False: "--no-" + flag[2:]}.get(value, f"{flag} {value}")
                if t.base is bool
                else (f"{flag} {value}")
            )
            group.add_argument(
                alias_flag, action="store_const", const=value, dest=kwargs["dest"], default=argparse.SUPPRESS,
                help=f"same as {same}",
            )  # fmt: skip


def _flag_parser(base: type, optional: bool) -> typing.Callable[[str], Any]:
    """Text -> value for one flag; ranges and finiteness are the section's to check."""

    def parse(text: str) -> Any:
        if optional and text.lower() in ("none", "null"):
            return None
        if base is int:
            try:
                return int(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expects an integer, got {text!r}") from None
        return base(text)

    parse.__name__ = base.__name__  # argparse names it in "invalid float value: 'x'"
    return parse


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _coerce(cls: type, name: str, value: Any, where: str) -> Any:
    """A config-file value in the field's type where the file format spells it as text (YAML 1.1 reads
    ``1e-4`` as a string, "none" is null); everything else is left to the section's strict type check."""
    t = field_type(cls, name)
    if value is None or not isinstance(value, str) or t.is_list:
        return value
    if t.optional and value.lower() in ("none", "null", ""):
        return None
    flag = flag_of(name)
    if t.base is bool:
        if value.lower() not in (*_TRUE, *_FALSE):
            raise ConfigError(f"{where}: {name} ({flag}) expects true or false, got {value!r}")
        return value.lower() in _TRUE
    if t.base in (int, float) and t.choices is None:
        try:
            number = float(value) if t.base is float else int(value)
        except ValueError:
            raise ConfigError(f"{where}: {name} ({flag}) expects {t.base.__name__}, got {value!r}") from None
        return number
    return value


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a .yaml/.yml/.toml/.json config file into a plain dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (check the --config path)")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    try:
        if suffix in (".yaml", ".yml"):
            values = _load_yaml_unique(text, path)
        elif suffix == ".toml":
            try:
                import tomllib  # Python >= 3.11
            except ImportError:  # Python 3.10: the same parser as the `tomli` package
                try:
                    import tomli as tomllib
                except ImportError as err:
                    raise ConfigError(
                        f"config file {path}: reading TOML on Python 3.10 needs `pip install tomli` "
                        "(or use a .yaml config)"
                    ) from err
            values = tomllib.loads(text)
        elif suffix == ".json":
            values = json.loads(text, object_pairs_hook=lambda pairs: _unique_keys(pairs, path))
        else:
            raise ConfigError(
                f"config file {path}: unknown extension {suffix!r}; use .yaml, .yml, .toml or .json"
            )
    except ConfigError:
        raise
    except Exception as err:  # yaml.YAMLError, tomllib.TOMLDecodeError, json.JSONDecodeError
        raise ConfigError(f"config file {path} could not be parsed: {' '.join(str(err).split())}") from err
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of keys to values, got {type(values).__name__}"
        )
    return values


def _unique_keys(pairs: list[tuple[Any, Any]], path: Path, lines: list[int] | None = None) -> dict[Any, Any]:
    """A mapping of a config file; a key given twice is refused (YAML and JSON parsers keep the last one
    silently, so `lr` twice would train with whichever came last). TOML refuses it itself."""
    out: dict[Any, Any] = {}
    for i, (key, value) in enumerate(pairs):
        if key in out:
            at = "" if lines is None else f" (lines {lines[[k for k, _ in pairs].index(key)]} and {lines[i]})"
            raise ConfigError(f"config file {path}: key {key!r} is given twice{at}; keep one of them")
        out[key] = value
    return out


def _load_yaml_unique(text: str, path: Path) -> Any:
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        pass

    def mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
        explicit = sum(k.tag != "tag:yaml.org,2002:merge" for k, _ in node.value)
        loader.flatten_mapping(node)  # "<<" merges go first: the mapping's own keys may override them
        pairs = [(loader.construct_object(k, deep=True), loader.construct_object(v, deep=True))
                 for k, v in node.value]  # fmt: skip
        own = len(pairs) - explicit
        _unique_keys(pairs[own:], path, [k.start_mark.line + 1 for k, _ in node.value[own:]])
        return dict(pairs)

    UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader subclass: no arbitrary objects
