"""Keep Hub tokens out of everything a job or the uploader writes: commands, argument files, logs, pickles.

Two rules, applied together:

* the *value* of a token argument is replaced, whatever it looks like: `--token X`, `--token=X`, `--hub_token X`,
  `--hub-token=X` (any option whose name ends in `token`), and the `token` / `hub_token` / `*_token` fields of a
  JSON or YAML argument file or of a mapping;
* anything *shaped* like a Hub token is replaced wherever it appears in a string: `hf_` or `api_org_` followed by
  30 or more letters and digits (user access tokens are `hf_` + 34).

`find_token_shapes` reports the token-shaped strings in a file (text or binary); `hub_upload.py` refuses to
stage a file where one remains.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

REDACTED = "REDACTED"

_SHAPE = r"(?:hf_|api_org_)[A-Za-z0-9]{30,}"
TOKEN_SHAPE = re.compile(_SHAPE)
TOKEN_SHAPE_BYTES = re.compile(_SHAPE.encode())

# `--token`, `--hub_token`, `--hub-token`, `--push_to_hub_token` ...; not `--tokenizer_name` or `--max_tokens`.
_TOKEN_OPTION = re.compile(r"^--?(?:[\w-]*[_-])?token$", re.IGNORECASE)
# A JSON/YAML/dict key that holds a token: `token`, `hub_token`, `hf-token`, ...
_TOKEN_KEY = re.compile(r"^(?:[\w-]*[_-])?token$", re.IGNORECASE)
# `"hub_token": "..."` in JSON and `hub_token: ...` in YAML (value up to the end of the quoted string or line).
_JSON_TOKEN_FIELD = re.compile(r'("(?:[\w-]*[_-])?token"\s*:\s*)"(?:[^"\\]|\\.)*"', re.IGNORECASE)
_YAML_TOKEN_FIELD = re.compile(
    r"^(\s*(?:-\s+)?[\"']?(?:[\w-]*[_-])?token[\"']?\s*:[ \t]*)(?![ \t]*(?:#|$))(?:\"[^\"\n]*\"|'[^'\n]*'|[^\n#]*?)([ \t]*(?:#.*)?)$",
    re.IGNORECASE | re.MULTILINE,
)


def is_token_option(name: str) -> bool:
    """Whether a command-line option (`--token`, `--hub_token`, ...) takes a token as its value."""
    return bool(_TOKEN_OPTION.match(name))


def is_token_key(name: str) -> bool:
    """Whether a mapping key or argument-file field (`token`, `hub_token`, ...) holds a token."""
    return isinstance(name, str) and bool(_TOKEN_KEY.match(name))


def redact_text(text: str) -> str:
    """`text` with every Hub-token-shaped substring replaced."""
    return TOKEN_SHAPE.sub(REDACTED, text)


def redact_argv(argv: Iterable[str]) -> list[str]:
    """A copy of a command line with the values of token options and any token-shaped strings replaced.

    `--token X` and `--token=X` become `--token REDACTED` and `--token=REDACTED`; an option with no value
    (end of the line, or followed by another option) is left alone. An argument file given as the only argument
    is a path, not its contents; its contents are redacted by `redact_arguments_file_text`.
    """
    argv = [str(item) for item in argv]
    redacted = []
    index = 0
    while index < len(argv):
        item = argv[index]
        name, equals, _ = item.partition("=")
        if equals and is_token_option(name):
            redacted.append(f"{name}={REDACTED}")
        elif is_token_option(item):
            redacted.append(item)
            if index + 1 < len(argv) and not argv[index + 1].startswith("--"):
                redacted.append(REDACTED)
                index += 1
        else:
            redacted.append(redact_text(item))
        index += 1
    return redacted


def redact_mapping(value: Any) -> Any:
    """A deep copy of a parsed JSON/YAML document (dicts, lists, strings) with token fields and shapes replaced."""
    if isinstance(value, Mapping):
        return {
            key: (REDACTED if is_token_key(key) and value[key] not in (None, "") else redact_mapping(value[key]))
            for key in value
        }
    if isinstance(value, (list, tuple)):
        return type(value)(redact_mapping(item) for item in value)
    if isinstance(value, str):
        return redact_text(value)
    return value


def redact_arguments_file_text(text: str) -> str:
    """The text of a JSON or YAML argument file with the values of its token fields and any token shapes replaced.

    Works on the text (keeping comments and layout), so a file that does not parse is still redacted.
    """
    text = _JSON_TOKEN_FIELD.sub(lambda match: f'{match.group(1)}"{REDACTED}"', text)
    text = _YAML_TOKEN_FIELD.sub(lambda match: f"{match.group(1)}{REDACTED}{match.group(2)}", text)
    return redact_text(text)


def find_token_shapes(data: str | bytes) -> list[str]:
    """The distinct token-shaped strings in `data`, each shortened to its first 7 characters and `...`."""
    if isinstance(data, bytes):
        found = (match.decode("ascii") for match in TOKEN_SHAPE_BYTES.findall(data))
    else:
        found = TOKEN_SHAPE.findall(data)
    return sorted({f"{match[:7]}..." for match in found})


def file_token_shapes(path: str | Path) -> list[str]:
    """`find_token_shapes` of a file's bytes (text and binary files alike, e.g. pickles and safetensors)."""
    return find_token_shapes(Path(path).read_bytes())


class TokenFreePickle:
    """Mixin for argument dataclasses: a pickled copy carries no tokens; the live object keeps them.

    The `Trainer` pickles its `TrainingArguments` into `training_args.bin` (output folder and every checkpoint),
    `hub_token` included. With this mixin the pickle holds `None` for every `*_token` field, while the `Trainer`
    still reads the real token from the object it holds (to push to the Hub). `copy.copy` and `copy.deepcopy`
    keep the tokens, as they do for any object.
    """

    def __getstate__(self):
        state = dict(self.__dict__)
        for key in state:
            if is_token_key(key) and state[key] is not None:
                state[key] = None
        return state

    def __copy__(self):
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        return clone

    def __deepcopy__(self, memo):
        clone = object.__new__(type(self))
        memo[id(self)] = clone
        clone.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return clone
