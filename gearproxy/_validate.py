"""A tiny path-tracking validator for decoded JSON (used by `gearproxy.spec`).

Every helper takes the value and the JSON path it sits at, returns the value
converted to the Python type the caller wants, or raises
`DescriptorError(path, message)` with a one-line message.  Paths are spelled
with lowercase canonical keys (`containers[0].links[1].to`) whatever case the
user wrote.  There is no schema language: the rules live in `spec.py` as
plain code, in the order a reader would check them.  The converters for
values that need more than a type check (environment, command, healthcheck
test) live here too, to keep `spec.py` about the descriptor's structure.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import shlex
from collections.abc import Iterable, Mapping
from typing import Any, NoReturn

from gearproxy.errors import DescriptorError

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
ENV_KEYS = ("Name", "Value")
ENV_NAME_RULE = "use letters, digits and '_', not starting with a digit"


class JSONObject(dict[str, Any]):
    """A decoded JSON object that remembers keys given more than once.

    `json.loads` keeps only the last of repeated keys; this hook keeps the
    repeated names too so the validator can report them with their path.
    """

    __slots__ = ("repeated",)

    def __init__(self, pairs: Iterable[tuple[str, Any]] = ()) -> None:
        pairs = list(pairs)
        super().__init__(pairs)
        seen: set[str] = set()
        repeated: list[str] = []
        for key, _ in pairs:
            if key in seen and key not in repeated:
                repeated.append(key)
            seen.add(key)
        self.repeated: tuple[str, ...] = tuple(repeated)


def fail(path: str, message: str) -> NoReturn:
    """Raise the one error this module knows."""
    raise DescriptorError(path, message)


def join(path: str, key: str) -> str:
    """`path.key` (or `key` at the top level)."""
    return f"{path}.{key}" if path else key


def type_name(value: object) -> str:
    """The JSON name of a decoded value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def obj(value: object, path: str) -> Mapping[str, Any]:
    """An object whose keys are all given once (exactly; case is the caller's business)."""
    if not isinstance(value, dict):
        fail(path, f"must be an object, not {type_name(value)}")
    for key in value:
        if not isinstance(key, str):
            fail(path, f"keys must be strings, not {type_name(key)}")
    repeated: tuple[str, ...] = getattr(value, "repeated", ())
    if repeated:
        fail(join(path, repeated[0]), f"key {repeated[0]!r} is given more than once")
    return value


def fields(
    value: object,
    path: str,
    allowed: tuple[str, ...],
    compat: Mapping[str, object] | None = None,
) -> dict[str, Any]:
    """The members of an object, keyed by lowercase canonical name.

    Keys match `allowed` ignoring case (as geard's decoder did); the same key
    twice in different case and any unknown key are errors.  `compat` names
    geard keys gearproxy does not implement but that geard writes into every
    state file: they are accepted, and dropped, only with their neutral value.
    """
    members = obj(value, path)
    canonical = {name.lower(): name for name in allowed}
    tolerated = {name.lower(): (name, neutral) for name, neutral in (compat or {}).items()}
    spelled: dict[str, str] = {}
    out: dict[str, Any] = {}
    for key, item in members.items():
        low = key.lower()
        if low in spelled:
            fail(
                join(path, low),
                f"key given twice as {spelled[low]!r} and {key!r} (keys are case-insensitive)",
            )
        spelled[low] = key
        if low in canonical:
            out[low] = item
        elif low in tolerated:
            name, neutral = tolerated[low]
            if type(item) is not type(neutral) or item != neutral:
                fail(
                    join(path, low),
                    f"geard's {name!r} is not supported by gearproxy "
                    f"(only {name}: {json.dumps(neutral)} is accepted; remove the key)",
                )
        else:
            hint = difflib.get_close_matches(low, list(canonical), n=1)
            maybe = f" (did you mean {canonical[hint[0]]!r}?)" if hint else ""
            fail(join(path, low), f"unknown key {key!r}{maybe}; allowed: {', '.join(allowed)}")
    return out


def required(members: Mapping[str, Any], key: str, path: str, what: str) -> Any:
    """`members[key]`, or an error saying it is required and what it is."""
    if key not in members:
        fail(join(path, key), f"required ({what})")
    return members[key]


def string(value: object, path: str) -> str:
    """A string."""
    if not isinstance(value, str):
        fail(path, f"must be a string, not {type_name(value)}")
    return value


def boolean(value: object, path: str) -> bool:
    """A JSON boolean (not 0/1, not "true")."""
    if not isinstance(value, bool):
        fail(path, f"must be true or false, not {type_name(value)}")
    return value


def integer(value: object, path: str, low: int, high: int, note: str = "") -> int:
    """An integer in `low..high` (a boolean is not an integer, nor is 80.0)."""
    if isinstance(value, bool) or not isinstance(value, int):
        fail(path, f"must be an integer, not {type_name(value)}")
    if not low <= value <= high:
        fail(path, f"must be {low}..{high}{note}, not {value}")
    return value


def port(value: object, path: str, *, zero: str = "") -> int:
    """A TCP port 1..65535; with `zero` (what 0 means) also 0."""
    if zero:
        return integer(value, path, 0, 65535, f" (0 means {zero})")
    return integer(value, path, 1, 65535)


def seconds(value: object, path: str, low: float, high: float) -> float:
    """A finite number of seconds in `low..high`."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        fail(path, f"must be a number of seconds, not {type_name(value)}")
    if not math.isfinite(value) or not low <= value <= high:
        fail(path, f"must be {low:g}..{high:g} seconds, not {value}")
    return float(value)


def array(value: object, path: str, *, nonempty: str = "") -> list[Any]:
    """A list; with `nonempty` (what it should hold) an empty one is an error."""
    if not isinstance(value, list):
        fail(path, f"must be a list, not {type_name(value)}")
    if nonempty and not value:
        fail(path, f"must not be empty (list at least one {nonempty})")
    return value


def optional(members: dict[str, Any], key: str, default: Any) -> Any:
    """An optional member; null counts as absent, as it did for geard's Go decoder."""
    value = members.get(key)
    return default if value is None else value


def no_nul(text: str, path: str) -> str:
    """`text`, which Docker will pass on as a C string: no NUL inside."""
    if "\0" in text:
        fail(path, "must not contain a NUL character")
    return text


def environment(value: object, path: str) -> tuple[tuple[str, str], ...]:
    """geard's `[{Name, Value}]` list, or a plain `{"NAME": "value"}` mapping."""
    pairs: list[tuple[str, str, str]] = []  # (name, value, path of the name)
    if isinstance(value, list):
        for k, item in enumerate(value):
            here = f"{path}[{k}]"
            f = fields(item, here, ENV_KEYS)
            name = string(required(f, "name", here, "the variable's name"), here + ".name")
            text = string(required(f, "value", here, "a string"), here + ".value")
            pairs.append((name, no_nul(text, here + ".value"), here + ".name"))
    elif isinstance(value, dict):
        for name, item in obj(value, path).items():
            here = join(path, name)
            if not isinstance(item, str):
                hint = f' (write "{item}")' if isinstance(item, int | float) else ""
                fail(here, f"must be a string, not {type_name(item)}{hint}")
            pairs.append((name, no_nul(item, here), here))
    else:
        fail(
            path,
            "must be a list of {Name, Value} objects or an object of NAME: value, "
            f"not {type_name(value)}",
        )
    seen: set[str] = set()
    for name, _, here in pairs:
        if not ENV_NAME.fullmatch(name):
            fail(here, f"{name!r} is not a valid variable name: {ENV_NAME_RULE}")
        if name in seen:
            fail(here, f"variable {name!r} is set twice")
        seen.add(name)
    return tuple((name, text) for name, text, _ in pairs)


def command(value: object, path: str) -> tuple[str, ...]:
    """A string split like a shell would (no shell runs it), or a list of arguments."""
    if isinstance(value, str):
        try:
            argv = shlex.split(value)
        except ValueError as exc:
            fail(path, f"cannot split {value!r} into arguments: {exc}")
        if not argv:
            fail(path, "must not be empty")
    elif isinstance(value, list):
        argv = [string(item, f"{path}[{k}]") for k, item in enumerate(value)]
        if not argv:
            fail(path, "must not be empty (list the program and its arguments)")
        if not argv[0]:
            fail(f"{path}[0]", "the program name must not be empty")
    else:
        fail(path, f"must be a string or a list of strings, not {type_name(value)}")
    return tuple(no_nul(arg, path) for arg in argv)


def health_test(value: object, path: str) -> tuple[str, ...]:
    """A shell command string, or Docker's `["CMD", …]` / `["CMD-SHELL", cmd]` (a bare
    argument list gets "CMD" in front)."""
    if isinstance(value, str):
        if not value.strip():
            fail(path, "must not be empty")
        return ("CMD-SHELL", no_nul(value, path))
    items = array(value, path, nonempty="argument")
    argv = [no_nul(string(item, f"{path}[{k}]"), path) for k, item in enumerate(items)]
    if argv[0] == "NONE":
        fail(f"{path}[0]", '"NONE" disables the check: leave Healthcheck out instead')
    if argv[0] == "CMD-SHELL":
        if len(argv) != 2 or not argv[1].strip():
            fail(path, '["CMD-SHELL", command] takes exactly one non-empty shell command')
        return tuple(argv)
    if argv[0] != "CMD":
        argv.insert(0, "CMD")
    if len(argv) < 2 or not argv[1]:
        fail(path, "the program name must not be empty")
    return tuple(argv)
