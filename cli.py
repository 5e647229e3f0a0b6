"""Command lines from config dataclasses: every field becomes a flag (`batch_size` -> `--batch-size`).

Each script declares one dataclass whose fields carry their help text, `field(default=..., metadata={"help": ...})`,
and calls `parse_config(ConfigClass, argv)`. Booleans get `--flag / --no-flag`; a field whose default is None
means "decided by another setting" and says so in its help.
"""

import argparse
import dataclasses
import typing


def _field_type(cls, spec: dataclasses.Field):
    hint = typing.get_type_hints(cls)[spec.name]
    arguments = [a for a in typing.get_args(hint) if a is not type(None)]
    return arguments[0] if arguments else hint  # Optional[int] -> int


def build_parser(cls, description: str = "", extra_positional: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if extra_positional:
        parser.add_argument("command", choices=extra_positional)
    for spec in dataclasses.fields(cls):
        flag = "--" + spec.name.replace("_", "-")
        kind = _field_type(cls, spec)
        text = spec.metadata.get("help", "")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=spec.default, help=text)
        else:
            shown = "" if spec.default is None else " (default: %(default)s)"  # None: the help says what decides
            parser.add_argument(flag, type=kind, default=spec.default, help=text + shown)
    return parser


def parse_config(cls, argv=None, description: str = ""):
    """Parse argv (None = sys.argv) into an instance of the dataclass `cls`."""
    return cls(**vars(build_parser(cls, description).parse_args(argv)))
