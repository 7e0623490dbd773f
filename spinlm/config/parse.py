"""Reading a config: YAML files, `--section.key=value` flags, type coercion, the merge, the reference.

build() layers them: dataclass defaults < base (e.g. the demo's) < YAML file < command-line flags.
Each layer is merged under an origin label (a file name, "command line", "built-in defaults") that
starts every error it causes; an unknown name is an error naming the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from spinlm.config.schema import SECTIONS, Config
from spinlm.errors import UserError


def nearest(name: str, options: list[str], prefix: str = "") -> str:
    """The tail of an unknown-name error: the closest option, or every option when none is close."""
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.4)
    if close:
        return f"; did you mean '{prefix}{close[0]}'?"
    return f"; valid keys: {', '.join(prefix + o for o in options)}"


class Raw(str):
    """A command-line value as typed: text fields take it verbatim, others parse it as YAML."""


def _as_text(hint: Any) -> Any:
    """A choice field (Literal[...] of strings) is read, coerced and named as a plain string:
    whether its value is one of the choices is validate()'s check, reported with the others."""
    return str if typing.get_origin(hint) is Literal else hint


def _accepts_str(hint: Any) -> bool:
    return hint is str or (typing.get_origin(hint) is not dict and str in typing.get_args(hint))


def _from_flag(value: Raw, hint: Any, key: str) -> Any:
    if value == "" and type(None) in typing.get_args(hint):
        return None
    if _accepts_str(hint) and not (value.startswith("[") or value.lower() in ("null", "~", "none")):
        return str(value)
    try:
        return yaml.safe_load(value) if value != "" else None
    except yaml.YAMLError:
        raise UserError(f"{key}: cannot read {str(value)!r} as {_type_name(hint)}") from None


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check and convert one value against its type hint; UserError when it does not fit."""
    hint = _as_text(hint)
    if isinstance(value, Raw):
        value = _from_flag(value, hint, key)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, hint, key)
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{key}: expected {_type_name(hint)}, got {value!r}")
        key_hint, value_hint = typing.get_args(hint)
        return {_coerce(k, key_hint, key): _coerce(v, value_hint, f"{key}.{k}") for k, v in value.items()}
    return _coerce_scalar(value, hint, key)


def _coerce_union(value: Any, hint: Any, key: str) -> Any:
    """The first option the value fits; else the most telling of the options' errors."""
    options = typing.get_args(hint)
    if value is None and type(None) in options:
        return None
    errors = []
    for option in (o for o in options if o is not type(None)):
        try:
            return _coerce(value, option, key)
        except UserError as e:
            errors.append(str(e))
    # a non-finite number is the real problem whatever the other options say; with `X | None` the
    # one option's own message is more precise than the union's
    finite = [e for e in errors if "finite" in e]
    raise UserError(finite[0] if finite else errors[-1] if len(options) == 2 and type(None) in options else
                    f"{key}: expected {_type_name(hint)}, got {value!r}")


def _coerce_scalar(value: Any, hint: Any, key: str) -> Any:
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):  # bool is an int subclass
        return value
    if hint is float:
        number = _number(value)
        if number is not None:
            if not math.isfinite(number):
                raise UserError(f"{key}: expected a finite number, got {value!r}")
            return number
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # YAML 1.1 reads an unquoted `no` / `yes` as a boolean
            return "yes" if value else "no"
        if isinstance(value, (int, float)):  # e.g. a revision written as 20240101
            return str(value)
    raise UserError(f"{key}: expected {_type_name(hint)}, got {value!r} ({type(value).__name__})")


def _number(value: Any) -> float | None:
    """value as a float, or None when it is not a number."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):  # YAML 1.1 reads "5e-7" as a string
        try:
            return float(value)
        except ValueError:
            pass
    return None


def _type_name(hint: Any) -> str:
    hint = _as_text(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    if typing.get_origin(hint) is dict:
        key_hint, value_hint = typing.get_args(hint)
        return f"a mapping of {_type_name(key_hint)} to {_type_name(value_hint)}"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string",
            type(None): "null"}.get(hint, str(hint))


def merge(cfg: Config, data: dict[str, Any], origin: str) -> Config:
    """Apply a nested {section: {key: value}} mapping onto cfg, checking names and types."""
    if not isinstance(data, dict):
        raise UserError(f"{origin}: expected a mapping of sections (run, model, data, ...), got {type(data).__name__}")
    for section, values in data.items():
        if section not in SECTIONS:
            raise UserError(f"{origin}: unknown section '{section}'{nearest(str(section), list(SECTIONS))}")
        if not isinstance(values, dict):
            raise UserError(f"{origin}: section '{section}' must be a mapping of keys, got {values!r}")
        target = getattr(cfg, section)
        hints = typing.get_type_hints(type(target))
        for key, value in values.items():
            if key not in hints:
                hint = nearest(str(key), list(hints), section + ".")
                raise UserError(f"{origin}: unknown key '{section}.{key}'{hint}")
            setattr(target, key, _coerce(value, hints[key], f"{origin}: {section}.{key}"))
    return cfg


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`--section.key=value` (or `--section.key value`) flags -> nested dict; values read as YAML."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise UserError(f"unrecognized argument '{arg}': overrides look like --section.key=value")
        name, eq, raw = arg[2:].partition("=")
        if not eq:
            # a negative number is a value, not the next flag
            if i + 1 >= len(args) or (args[i + 1].startswith("--") and not _is_number(args[i + 1])):
                raise UserError(f"--{name} needs a value: --{name}=VALUE")
            i += 1
            raw = args[i]
        section, _, key = name.partition(".")
        if not section or not key or "." in key:
            raise UserError(f"unrecognized argument '{arg}': overrides look like --section.key=value")
        # kept as typed until merge knows the field's type (a text field takes it verbatim)
        out.setdefault(section, {})[key] = Raw(raw)
        i += 1
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file safely (yaml.safe_load only)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid YAML: {e}") from None
    return data or {}


def build(yaml_path: str | Path | None = None, overrides: list[str] | None = None,
          base: dict[str, Any] | None = None) -> Config:
    """defaults < base (e.g. the demo's) < YAML file < command-line overrides."""
    cfg = Config()
    if base:
        merge(cfg, base, "built-in defaults")
    if yaml_path is not None:
        merge(cfg, load_yaml(yaml_path), str(yaml_path))
    if overrides:
        merge(cfg, parse_overrides(overrides), "command line")
    return cfg


def to_yaml(cfg: Config) -> str:
    """The config as YAML, sections and keys in schema order (build() reads it back to an equal Config)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def reference() -> str:
    """Every config key with its type, default and help: for --help and `spinlm config`."""
    lines = []
    for section, cls in SECTIONS.items():
        lines.append(f"{section}:")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {f.name} ({_type_name(hints[f.name])}, default {default!r}): {f.metadata['help']}")
    return "\n".join(lines)


def reference_markdown() -> str:
    """docs/config.md: every key as a table per section (`spinlm config --markdown > docs/config.md`)."""
    lines = ["# Config reference", "",
             "<!-- Generated by `spinlm config --markdown > docs/config.md` from spinlm/config/schema.py; "
             "tests/test_config.py fails when it is stale. -->", "",
             "Precedence: defaults < `CONFIG.yaml` < `--section.key=value` flags. An unknown key is an error that "
             "names the closest valid key. `train.learning_rate` and `spin.beta` take one value or a list with one "
             "per iteration. `spinlm config` prints the same list as text."]
    for section, cls in SECTIONS.items():
        lines += ["", f"## {section}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            cells = [f"`{section}.{f.name}`", _type_name(hints[f.name]), f"`{default!r}`", f.metadata["help"]]
            lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines) + "\n"
