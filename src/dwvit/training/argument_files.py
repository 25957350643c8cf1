"""Argument files (recipes) for `run_image_classification.py`: a flat YAML or JSON mapping of script arguments.

`python run_image_classification.py recipes/paper/vit-tiny_cifar10.yaml --learning_rate 1e-3` reads the file, turns
each entry into a `--key=value` argument placed before the rest of the command line, and lets `HfArgumentParser`
parse the whole list: values from a file are parsed exactly as on the command line (`true`/`false` for flags,
`5e-4` for floats), and the command line, coming later, overrides the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from argparse import ArgumentParser

ARGUMENT_FILE_SUFFIXES = (".yaml", ".yml", ".json")

__all__ = ["ARGUMENT_FILE_SUFFIXES", "arguments_from_file", "is_argument_file", "read_argument_file"]


def is_argument_file(argument: str) -> bool:
    return not argument.startswith("-") and argument.lower().endswith(ARGUMENT_FILE_SUFFIXES)


def _yaml_loader():
    """PyYAML's safe loader, reading `5e-4` as a float (YAML 1.2) rather than a string (YAML 1.1 needs `5.0e-4`)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(
            r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
            |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
            |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
            |[-+]?\.(?:inf|Inf|INF)
            |\.(?:nan|NaN|NAN))$""",
            re.VERBOSE,
        ),
        list("-+0123456789."),
    )
    return Loader


def read_argument_file(path: str) -> dict:
    """The mapping in a YAML (`.yaml`/`.yml`) or JSON (`.json`) file; an empty file is an empty mapping."""
    with open(path) as handle:
        if path.lower().endswith(".json"):
            entries = json.load(handle)
        else:
            import yaml

            entries = yaml.load(handle, Loader=_yaml_loader())
    if entries is None:
        return {}
    if not isinstance(entries, dict):
        raise ValueError(
            f"{path}: an argument file holds a mapping of argument names to values, not a {type(entries).__name__}."
        )
    return entries


def _to_text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def arguments_from_file(parser: ArgumentParser, path: str) -> tuple[list[str], dict]:
    """`(argv, defaults)` for a file's entries, for `parser` (an `HfArgumentParser`).

    `argv` holds the entries as command-line arguments: `--key=value` (bools as `true`/`false`, dicts as JSON, e.g.
    `lr_scheduler_kwargs`), or `--key v1 v2 ...` for a list given to a list argument. `defaults` holds what a
    command line cannot spell: a null, or a list for an argument that takes one value (`report_to: [a, b]`); pass
    them to `parser.set_defaults`, so a command-line argument still overrides them. Keys may use `-` or `_`. A key
    that is not one of the parser's dataclass fields raises a `ValueError` naming the key and the file.
    """
    actions = {}
    for action in parser._actions:
        if any(option.startswith("--") for option in action.option_strings) and action.nargs != 0:
            actions.setdefault(action.dest, action)
    dataclass_types = getattr(parser, "dataclass_types", ())
    fields = {field.name for dtype in dataclass_types for field in dataclasses.fields(dtype) if field.init}
    known = (fields or set(actions)) & set(actions)

    argv: list[str] = []
    defaults: dict = {}
    for key, value in read_argument_file(path).items():
        name = str(key).replace("-", "_")
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f" Did you mean {' or '.join(repr(match) for match in close)}?" if close else ""
            raise ValueError(f"Unknown argument {key!r} in {path}: the script has no such argument.{hint}")
        action = actions[name]
        if value is None:
            defaults[name] = None
        elif isinstance(value, (list, tuple)):
            if action.nargs in ("+", "*") and value:
                argv += [f"--{name}", *(_to_text(item) for item in value)]
            else:
                defaults[name] = list(value)
        elif isinstance(value, dict):
            argv.append(f"--{name}={json.dumps(value)}")
        else:
            argv.append(f"--{name}={_to_text(value)}")
    return argv, defaults
