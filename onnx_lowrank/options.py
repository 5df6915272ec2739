"""What an option is: one declaration that the API, the recipes and the command line all read.

Every option of :class:`~onnx_lowrank.config.CompressConfig` and
:class:`~onnx_lowrank.verify.VerifyConfig` is a dataclass field declared with :func:`opt`: its
kind (what values it takes), its help text, an example.  From that one declaration,

* the config validates a value and normalizes it (:func:`check`), with a message that names the
  option the way the caller named it (``energy`` in Python, ``--energy`` on the command line);
* the command line builds its flag (:func:`add_arguments`): the same name with dashes, the
  same help, a parser that refuses bad text with the same message;
* a recipe key is the field's name.

So a flag, a recipe key and an API keyword stay one name for one thing.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from .errors import UsageError, option, option_value

__all__ = ["Opt", "opt", "check", "add_arguments", "flag_of", "parse_input_shapes", "parse_input_ranges"]


@dataclass(frozen=True)
class Opt:
    """How one option behaves.

    Attributes:
        kind: What it takes: ``fraction`` (0, 1], ``positive_int``, ``non_negative_int``,
            ``positive_float``, ``non_negative_float``, ``switch``, ``choice``, ``regex``,
            ``int_list`` (positive ints, comma-separated on the command line), ``names``
            (comma-separated names), ``shapes`` (``NAME:DIMS`` items), ``ranges``
            (``NAME:LOW,HIGH`` items), ``text``, or ``any`` (checked by its owner).
        help: The command line's help text.
        metavar: The value's placeholder in the help.
        choices: The allowed values of a ``choice`` (and of each ``names`` item).
        example: A value for messages (``e.g. --energy 0.93``).
        flag: The flag, when it is not ``--`` + the name with dashes (``--no-attention-aware``).
        exclusive: Options sharing this tag cannot be given together on the command line.
        high: The largest value a number takes (``positive_float``, ``non_negative_float``).
    """

    kind: str
    help: str
    metavar: str | None = None
    choices: tuple[Any, ...] | None = None
    example: Any = None
    flag: str | None = None
    exclusive: str | None = None
    high: float | None = None


def opt(default: Any, kind: str, help: str, **more: Any) -> Any:
    """A dataclass field declared as an option (see :class:`Opt`)."""
    return dataclasses.field(default=default, metadata={"opt": Opt(kind, help, **more)})


def flag_of(f: dataclasses.Field) -> str:
    o: Opt = f.metadata["opt"]
    return o.flag or "--" + f.name.replace("_", "-")


# --------------------------------------------------------------------------------------------
# Values: one check per kind, for Python values and command-line text alike
# --------------------------------------------------------------------------------------------

_WHAT = {
    "fraction": "a fraction in (0, 1]",
    "energy": "a number in (0, 1]",
    "positive_int": "a positive integer",
    "non_negative_int": "a non-negative integer",
    "positive_float": "a positive number",
    "non_negative_float": "a non-negative number",
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _in_range(kind: str, v: Any, high: float | None) -> bool:
    if kind in ("positive_int", "non_negative_int"):
        return _is_int(v) and v >= (1 if kind == "positive_int" else 0) and (high is None or v <= high)
    if not _is_number(v):
        return False
    x = float(v)
    if kind in ("fraction", "energy"):
        return 0.0 < x <= 1.0  # written so that NaN fails too
    top = float("inf") if high is None else high
    return (0.0 < x <= top) if kind == "positive_float" else (0.0 <= x <= top)


def _what(o: Opt) -> str:
    """What a numeric option takes, in words, with its upper limit if it has one."""
    return _WHAT[o.kind] + (f" up to {o.high:g}" if o.high is not None and o.kind not in ("fraction", "energy") else "")


def _example(name: str, o: Opt) -> str:
    return f"; e.g. {option_value(name, o.example)}" if o.example is not None else ""


def check(name: str, o: Opt, value: Any) -> Any:
    """``value`` validated and normalized for option ``name`` (``None`` passes as "not set").

    Raises:
        UsageError: naming the option as the caller named it, what it takes, and an example.
    """
    if isinstance(value, np.generic):  # a numpy scalar (np.float32(0.9), np.int64(4)) is the number it holds
        value = value.item()
    if value is None or o.kind == "any":
        return value
    kind = o.kind
    if kind in _WHAT:
        if not _in_range(kind, value, o.high):
            raise UsageError(f"{option(name)} must be {_what(o)}, got {value!r}{_example(name, o)}.")
        return value
    if kind == "switch":
        if not isinstance(value, bool):
            raise UsageError(f"{option(name)} is a switch (true or false), got {value!r}.")
        return value
    if kind == "choice":
        value = _choice_case(o.choices)(value)
        if value not in o.choices:
            raise UsageError(f"{option(name)} got {value!r}; expected one of {', '.join(map(str, o.choices))}.")
        return value
    if kind == "regex":
        if not isinstance(value, str):
            raise UsageError(f"{option(name)} takes one regular expression (a string), got {value!r}; "
                             "join alternatives with '|', e.g. 'q_proj|k_proj'.")
        try:
            re.compile(value)
        except re.error as exc:
            raise UsageError(f"{option(name)} '{value}' is not a valid regular expression ({exc}).") from None
        return value
    if kind == "int_list":
        values = (value,) if _is_int(value) else tuple(value) if isinstance(value, (list, tuple)) else None
        if not values or not all(_is_int(v) and v >= 1 for v in values):
            raise UsageError(f"{option(name)} must be positive integers, got {value!r}{_example(name, o)}.")
        return values
    if kind == "names":
        names = tuple(s.strip() for s in value.split(",") if s.strip()) if isinstance(value, str) else tuple(value)
        bad = [n for n in names if n not in o.choices]
        if bad or not names:
            raise UsageError(f"{option(name)} got {','.join(map(str, bad)) or 'nothing'}; expected a comma-separated subset of "
                             f"{','.join(o.choices)}.")
        return names
    if kind == "shapes":
        specs = (value,) if isinstance(value, str) else tuple(value)
        parse_input_shapes(specs)
        return specs
    if kind == "ranges":
        parse_input_ranges(value)
        return value
    if kind == "text":
        if not isinstance(value, str):
            raise UsageError(f"{option(name)} takes a name (a string), got {value!r}.")
        return value
    raise ValueError(f"unknown option kind {kind!r}")


# --------------------------------------------------------------------------------------------
# The command line: flags built from the declarations
# --------------------------------------------------------------------------------------------

def _text_parser(name: str, o: Opt) -> Callable[[str], Any]:
    """An argparse ``type`` for a numeric kind: the text parsed, then :func:`check`-ed."""
    cast = int if o.kind.endswith("_int") else float

    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {_what(o)}, got '{text}'{_example(name, o)}") from None
        if not _in_range(o.kind, value, o.high):
            raise argparse.ArgumentTypeError(f"must be {_what(o)}, got {text}{_example(name, o)}")
        return value

    return parse


def int_list(name: str, o: Opt) -> Callable[[str], tuple[int, ...]]:
    """An argparse ``type`` for comma-separated positive integers (``--threads 1,2``)."""

    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(s) for s in text.split(",") if s.strip())
        except ValueError:
            values = ()
        if not values or any(v < 1 for v in values):
            raise argparse.ArgumentTypeError(f"must be positive integers separated by commas, got '{text}'{_example(name, o)}")
        return values

    return parse


def _choice_case(choices: Sequence[Any]):
    """Maps a string to the choice it spells in any letter case (``INT4`` -> ``int4``, as
    ``--ffn-keep AUTO`` reads ``auto``); anything else passes unchanged, for the caller to refuse."""
    by_lower = {c.lower(): c for c in choices if isinstance(c, str)}

    def parse(value: Any) -> Any:
        return by_lower.get(value.lower(), value) if isinstance(value, str) else value

    return parse


def _names(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def add_arguments(parser: argparse.ArgumentParser, fields: Iterable[dataclasses.Field], title: str,
                  *, skip: Sequence[str] = ()) -> None:
    """Add one flag per option field (``skip``: names another group already added)."""
    group = parser.add_argument_group(title)
    exclusive: dict[str, Any] = {}
    for f in fields:
        if f.name in skip:
            continue
        o: Opt = f.metadata["opt"]
        target = group
        if o.exclusive is not None:
            if o.exclusive not in exclusive:
                exclusive[o.exclusive] = group.add_mutually_exclusive_group()
            target = exclusive[o.exclusive]
        flag = flag_of(f)
        kw: dict[str, Any] = {"dest": f.name, "help": o.help}
        if o.kind == "switch":
            kw.update(action="store_false" if flag.startswith("--no-") else "store_true", default=None)
        else:
            kw["metavar"] = o.metavar
            if o.kind in _WHAT:
                kw["type"] = _text_parser(f.name, o)
            elif o.kind == "int_list":
                kw["type"] = int_list(f.name, o)
            elif o.kind == "choice":
                numbers = all(_is_int(c) for c in o.choices)
                kw.update(choices=list(o.choices), metavar=None, type=int if numbers else _choice_case(o.choices))
            elif o.kind == "names":
                kw["type"] = _names
            elif o.kind in ("shapes", "ranges"):
                kw["action"] = "append"
        target.add_argument(flag, **kw)


# --------------------------------------------------------------------------------------------
# Input specs: NAME:DIMS and NAME:LOW,HIGH
# --------------------------------------------------------------------------------------------

def _join_specs(value: str | Iterable[str], name: str) -> str:
    if isinstance(value, str):
        return value
    parts = list(value)
    if not all(isinstance(p, str) for p in parts):
        raise UsageError(f"{option(name)} got {value!r}; expected strings like 'name:...' or a dict.")
    return ",".join(parts)


def parse_input_shapes(value: str | Iterable[str] | Mapping[str, Sequence[int]] | None) -> dict[str, tuple[int, ...]]:
    """``"ids:1x128,mask:1x128"`` (or a list of such strings, or a dict) -> ``{name: shape}``.

    Names may contain ``:`` (``input:0``); the last ``:`` separates the shape.

    Raises:
        UsageError: a part is not ``NAME:DIMxDIM...`` with positive integer dimensions.
    """
    if value is None:
        return {}
    if isinstance(value, Mapping):
        items = list(value.items())
    else:
        items = []
        for part in filter(None, (p.strip() for p in _join_specs(value, "input_shape").split(","))):
            name, sep, dims = part.rpartition(":")
            if not sep or not name:
                raise UsageError(f"{option('input_shape')} '{part}': expected NAME:DIMxDIM..., "
                                 f"e.g. {option_value('input_shape', 'input_ids:1x128')}.")
            items.append((name, dims.split("x")))
    out: dict[str, tuple[int, ...]] = {}
    for name, dims in items:
        try:
            shape = tuple(int(d) for d in dims)
        except (TypeError, ValueError):
            shape = ()
        if not shape or any(d < 1 for d in shape):
            raise UsageError(f"{option('input_shape')} {name}: got {dims!r}; expected positive integer dimensions like {name}:1x128.")
        out[str(name)] = shape
    return out


_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_RANGE = re.compile(rf"(?P<name>.+?):(?P<low>{_NUM}),(?P<high>{_NUM})(?:,|$)")


def parse_input_ranges(value: str | Iterable[str] | Mapping[str, Sequence[float]] | None) -> dict[str, tuple[float, float]]:
    """``"ids:0,30522,mask:0,2"`` (or a list of such strings, or a dict) -> ``{name: (low, high)}``.

    Values are drawn from the half-open ``[low, high)``, so ``ids:0,30522`` is a vocabulary of 30522.

    Raises:
        UsageError: a part is not ``NAME:LOW,HIGH`` with ``LOW < HIGH``.
    """
    if value is None:
        return {}
    if isinstance(value, Mapping):
        items = [(str(k), v) for k, v in value.items()]
    else:
        text = _join_specs(value, "input_range").strip()
        items = []
        pos = 0
        while pos < len(text):
            m = _RANGE.match(text, pos)
            if m is None:
                raise UsageError(f"{option('input_range')} '{text[pos:]}': expected NAME:LOW,HIGH, "
                                 f"e.g. {option_value('input_range', 'input_ids:0,30522')}.")
            items.append((m["name"].strip(), (m["low"], m["high"])))
            pos = m.end()
    out: dict[str, tuple[float, float]] = {}
    for name, bounds in items:
        try:
            low, high = (float(b) for b in bounds)
        except (TypeError, ValueError):
            raise UsageError(f"{option('input_range')} {name}: got {bounds!r}; expected two numbers LOW,HIGH.") from None
        if not low < high:
            raise UsageError(f"{option('input_range')} {name}:{bounds[0]},{bounds[1]}: LOW must be below HIGH "
                             "(values are drawn from [LOW, HIGH)).")
        out[name] = (low, high)
    return out
