"""Command lines from config dataclasses: every field becomes a flag (`batch_size` -> `--batch-size`), checked.

Each script declares one dataclass whose fields are made with `option(default, help, ...)`: the help text, and
the allowed values (`choices`) or range (`minimum`, `maximum`, `below`, `above`) that `check_options` enforces for
every instance, from the command line or from code (call it in `__post_init__`). Booleans get `--flag /
--no-flag`; a default of None means "decided by another setting" (the help says which) and is checked once set.

A field made with `overrides(ConfigClass, presets)` holds a dict of settings of another, plain dataclass (the
model's `MaCoConfig`, which knows nothing of command lines): each of its fields becomes a flag too, with the comment
beside the field as its help; `--help` shows the value every preset gives it, and only the flags given end up in
the dict (train.py's model settings: `--img-size 96` overrides the preset's image size).
"""

import argparse
import dataclasses
import functools
import inspect
import math
import re
import sys
import typing

from util.checkpoint import WriteError


def option(default, help: str, *, choices=None, minimum=None, maximum=None, below=None, above=None):
    """A dataclass field with its help text and allowed values (checked by check_options)."""
    rules = {k: v for k, v in dict(choices=choices, minimum=minimum, maximum=maximum, below=below,
                                    above=above).items() if v is not None}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **rules})
    return dataclasses.field(default=default, metadata={"help": help, **rules})


def overrides(config_class, presets: dict, help: str):
    """A dict field of settings of `config_class` (flags of their own; presets: name -> settings dict)."""
    return dataclasses.field(default_factory=dict, metadata={"help": help, "config_class": config_class,
                                                             "presets": presets})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def as_flags(message, config_class) -> str:
    """A message that names fields of `config_class` (`img_size`) as the command line names them (`--img-size`)."""
    names = "|".join(spec.name for spec in dataclasses.fields(config_class))
    return re.sub(rf"\b({names})\b", lambda match: flag(match[1]), str(message))


@functools.cache
def field_comments(cls) -> dict[str, str]:
    """The comment beside each field of a plain dataclass (`depth: int = 12  # encoder blocks`): its help text."""
    return dict(re.findall(r"^\s+(\w+): [^=\n]+=[^#\n]+#\s*(.+)$", inspect.getsource(cls), flags=re.M))


def _allowed(spec: dataclasses.Field) -> str:
    meta = spec.metadata
    if "choices" in meta:
        return "one of " + ", ".join(map(str, meta["choices"]))
    parts = [f">= {meta['minimum']}" if "minimum" in meta else "", f"> {meta['above']}" if "above" in meta else "",
             f"<= {meta['maximum']}" if "maximum" in meta else "", f"< {meta['below']}" if "below" in meta else ""]
    return " and ".join(part for part in parts if part)


def check_value(spec: dataclasses.Field, value) -> None:
    """Raise ValueError naming the flag if `value` breaks the field's rules (None: not decided yet, not checked)."""
    meta = spec.metadata
    if value is None or not any(k in meta for k in ("choices", "minimum", "maximum", "below", "above")):
        return
    bad = ("choices" in meta and value not in meta["choices"]) or (
        isinstance(value, (int, float)) and not isinstance(value, bool) and (
            math.isnan(value)
            or ("minimum" in meta and value < meta["minimum"]) or ("maximum" in meta and value > meta["maximum"])
            or ("below" in meta and value >= meta["below"]) or ("above" in meta and value <= meta["above"])))
    if bad:
        raise ValueError(f"{flag(spec.name)} {value!r}: must be {_allowed(spec)}")


def check_options(config) -> None:
    """Check every field of a config dataclass instance against its rules (see `option`)."""
    for spec in dataclasses.fields(config):
        check_value(spec, getattr(config, spec.name))


def _field_type(cls, spec: dataclasses.Field):
    hint = typing.get_type_hints(cls)[spec.name]
    arguments = [a for a in typing.get_args(hint) if a is not type(None)]
    return arguments[0] if arguments else hint  # Optional[int] -> int


def _add_flag(parser, cls, spec, default, extra_help: str = "") -> None:
    kind = _field_type(cls, spec)
    text = spec.metadata.get("help") or field_comments(cls).get(spec.name, "")
    text += extra_help
    allowed = _allowed(spec)
    if allowed and "choices" not in spec.metadata:
        text += f"; {allowed}"
    if kind is bool:
        parser.add_argument(flag(spec.name), action=argparse.BooleanOptionalAction, default=default, help=text)
    else:
        shown = "" if default in (None, argparse.SUPPRESS) else " (default: %(default)s)"
        parser.add_argument(flag(spec.name), type=kind, default=default, help=text.replace("%", "%%") + shown,
                            metavar=spec.name.upper() if "choices" not in spec.metadata else None,
                            choices=spec.metadata.get("choices"))


def build_parser(cls, description: str = "", extra_positional: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if extra_positional:
        parser.add_argument("command", choices=extra_positional)
    for spec in dataclasses.fields(cls):
        if "config_class" not in spec.metadata:
            _add_flag(parser, cls, spec, spec.default)
            continue
        inner, presets = spec.metadata["config_class"], spec.metadata["presets"]
        group = parser.add_argument_group(spec.metadata["help"])
        for inner_spec in dataclasses.fields(inner):
            values = ", ".join(f"{name} {settings.get(inner_spec.name, inner_spec.default):.4g}"
                               if isinstance(inner_spec.default, float) else
                               f"{name} {settings.get(inner_spec.name, inner_spec.default)}"
                               for name, settings in presets.items())
            _add_flag(group, inner, inner_spec, argparse.SUPPRESS, f" (preset: {values})")
    return parser


def parse_config(cls, argv=None, description: str = "", commands: list[str] | None = None):
    """Parse argv (None = sys.argv) into an instance of the dataclass `cls`; bad values exit with a message
    naming the flag (argparse's exit code 2). `commands`: a required first word (e.g. `data.py cache`)."""
    parser = build_parser(cls, description, commands)
    arguments = vars(parser.parse_args(argv))
    arguments.pop("command", None)
    values = {}
    for spec in dataclasses.fields(cls):
        if "config_class" in spec.metadata:
            names = {inner.name for inner in dataclasses.fields(spec.metadata["config_class"])}
            values[spec.name] = {name: arguments.pop(name) for name in list(arguments) if name in names}
    try:
        return cls(**arguments, **values)
    except ValueError as error:
        parser.error(str(error))


def given_flags(config, argv: list[str] | None = None) -> set[str]:
    """The fields of `config` named on the command line `argv`; with argv None (a config made in code), the fields
    that differ from their defaults. A flag of an `overrides` field counts as that field."""
    cls = type(config)
    if argv is None:
        return {spec.name for spec in dataclasses.fields(cls)
                if getattr(config, spec.name) != (spec.default_factory() if callable(spec.default_factory)
                                                  else spec.default)}
    parser = build_parser(cls)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    named = set(vars(parser.parse_known_args(argv)[0]))
    given = named & {spec.name for spec in dataclasses.fields(cls)}
    for spec in dataclasses.fields(cls):
        if "config_class" in spec.metadata and named - given:
            given.add(spec.name)
    return given


def run_script(cls, body, argv=None, description: str = "", commands: list[str] | None = None,
               errors: tuple = (FileNotFoundError, ValueError)) -> int:
    """A script's main: parse argv into `cls`, call body(config) and return its exit code (None = 0). A bad flag,
    one of `errors` or a failed write (WriteError: a full disk) prints `error: <message>` (no traceback) and
    returns 2; --help returns 0; Ctrl-C returns 130."""
    try:
        return body(parse_config(cls, argv, description, commands)) or 0
    except SystemExit as exit:  # argparse has printed the usage and the message, or a run stopped on a signal
        return exit.code
    except (WriteError, *errors) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
