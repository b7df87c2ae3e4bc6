"""
What a value must be for the store to keep it and the API to serve it:
JSON's values as every reader takes them (RFC 8259 read with the I-JSON
profile, RFC 7493).  Text is Unicode: no code point of a UTF-16 surrogate
(U+D800 to U+DFFF, which no UTF-8 encoder writes); numbers are finite
(JSON has no NaN or Infinity, and the codecs write them as C{null}) and
integers have at most L{MAX_INTEGER_DIGITS} digits (no codec here writes
more); an
object's keys are text; arrays and objects nest at most L{MAX_NESTING}
deep, since what is taken in is written back out by encoders and read by
decoders that recurse.

The rule is here, in the model, because every producer of such a value
must apply it and none may import the JSON codec's package: a task's
result is checked in the task's thread (L{dispatcher.execution}), where a
large result costs no time on the reactor and a refusal fails the job
with words; a remote worker's result, a submission's arguments and every
other string a request brings are checked as the wire package decodes
them.  It is the rule, not a codec: nothing here writes JSON.
"""

from __future__ import annotations

import math
import re
from typing import Any, Optional

# How deep a value may nest arrays and objects: a task's arguments and its
# result alike.
MAX_NESTING = 100
# The most decimal digits an integer may have: Python's own limit on
# turning an integer into text and back (sys.int_info.default_max_str_digits),
# past which json, msgspec and the store cannot write it at all.  A task
# returning 10 ** 5000 failed a remote worker's every report, its own and
# every later job's, and left them running for ever.
MAX_INTEGER_DIGITS = 4300
# An integer at least this large, or this small negated, has too many.
_INTEGER_BOUND = 10**MAX_INTEGER_DIGITS

_SURROGATE = re.compile("[\ud800-\udfff]")
# The JSON text of a key that is not text, as json.dumps writes it (and so
# as this dispatcher always wrote a task's result with such keys).
_KEY_WORDS = {True: "true", False: "false", None: "null"}


class UnservableValue(ValueError):
    """
    A value that cannot be stored and served: C{where} it is (a path as the
    API names fields: C{result.rows[3]}), the C{path} of keys and indexes
    that leads there from the value, and C{why}, in words.
    """

    def __init__(self, where: str, why: str, path: tuple[Any, ...] = ()) -> None:
        super().__init__(f"{where}: {why}")
        self.where = where
        self.why = why
        self.path = path


class _Fault(Exception):
    """
    Raised up the recursion of L{storable}, gathering the path as it goes.
    """

    def __init__(self, why: str, keep_path: bool = True) -> None:
        self.why = why
        self.path: list[Any] = []
        self.keep_path = keep_path


def lone_surrogate(text: str) -> Optional[str]:
    """
    The first code point of a UTF-16 surrogate in C{text} (which no UTF-8
    text can hold, so that no answer could carry it), or C{None}.
    """
    if text.isascii():
        return None
    found = _SURROGATE.search(text)
    return None if found is None else found.group()


def not_text(code_point: str, key: bool = False) -> str:
    """
    Why text holding C{code_point} (a surrogate) is refused, in words;
    C{key}: the text is an object's key.
    """
    surrogate = f"a lone UTF-16 surrogate (\\u{ord(code_point):04x})"
    if key:
        return f"a key holds {surrogate}, which is not Unicode text (no UTF-8 can carry it)"
    return f"{surrogate} is not Unicode text (no UTF-8 can carry it)"


def servable_text(text: str) -> str:
    """
    C{text} (an error message, say) with each surrogate written as its
    C{\\uXXXX} escape, so that it can be stored and served.
    """
    if lone_surrogate(text) is None:
        return text
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def name_path(where: str, path: list[Any]) -> str:
    """
    The name of the place C{path} (keys and indexes) leads to from
    C{where}, as the API names fields (C{result.rows[3]}).
    """
    text = where
    for token in path:
        if isinstance(token, int):
            text += f"[{token}]"
        else:
            text = f"{text}.{token}" if text else str(token)
    return text


def storable(value: Any, where: str = "result") -> Any:
    """
    C{value} (a task's result, say) as the store keeps it: the same value,
    except that an object's keys that are not text (an integer, a float,
    C{True}, C{None}) become the text JSON writes for them, as C{json.dumps}
    does.

    @param where: what the value is, to name it in a refusal.
    @raise UnservableValue: the value holds something JSON cannot carry
        (a set, a lone surrogate, NaN or an infinity, an integer of more
        than L{MAX_INTEGER_DIGITS} digits, two keys written alike, such as
        C{1} and C{"1"}), or nests more than L{MAX_NESTING} deep.
    """
    try:
        return _storable(value, 1)
    except _Fault as fault:
        path = fault.path[::-1] if fault.keep_path else []
        raise UnservableValue(name_path(where, path), fault.why, tuple(path)) from None


def _storable(value: Any, level: int) -> Any:
    kind = type(value)
    if kind is str:
        found = lone_surrogate(value)
        if found is not None:
            raise _Fault(not_text(found))
        return value
    if kind is bool or value is None:
        return value
    if kind is int:
        if not -_INTEGER_BOUND < value < _INTEGER_BOUND:
            raise _Fault(_too_many_digits())
        return value
    if kind is float:
        if not math.isfinite(value):
            raise _Fault(f"{value!r} is not a JSON number (JSON has no NaN or Infinity)")
        return value
    if kind is list or kind is tuple:
        if level > MAX_NESTING:
            raise _Fault(f"arrays and objects nested more than {MAX_NESTING} deep", False)
        changed = None
        for i, item in enumerate(value):
            kind = type(item)
            if kind is bool or item is None or (
                kind is int and -_INTEGER_BOUND < item < _INTEGER_BOUND
            ):
                continue
            try:
                new = _storable(item, level + 1)
            except _Fault as fault:
                fault.path.append(i)
                raise
            if new is not item:
                if changed is None:
                    changed = list(value)
                changed[i] = new
        return value if changed is None else changed
    if kind is dict:
        if level > MAX_NESTING:
            raise _Fault(f"arrays and objects nested more than {MAX_NESTING} deep", False)
        return _storable_object(value, level)
    # Subclasses (an IntEnum, a str enum, a namedtuple, an OrderedDict) are
    # written as their base: as json.dumps does.
    for base, plain in _BASES:
        if isinstance(value, base):
            return _storable(plain(value), level)
    raise _Fault(f"{_a(value)} is not a JSON value")


# Each JSON type, with how a subclass's value becomes the type's own (a str
# enum's str() is its name, but json.dumps writes its value).
_BASES = (
    (int, int.__int__),
    (float, float.__float__),
    (str, str.__str__),
    (dict, dict),
    (list, list),
    (tuple, list),
)


def _storable_object(value: dict, level: int) -> dict:
    text_keys = True
    changed: Optional[dict] = None
    for key, item in value.items():
        if type(key) is str:
            found = lone_surrogate(key)
            if found is not None:
                raise _Fault(not_text(found, key=True))
            name = key
        else:
            name = _key_text(key)
            text_keys = False
        kind = type(item)
        if kind is bool or item is None or (
            kind is int and -_INTEGER_BOUND < item < _INTEGER_BOUND
        ):
            continue
        try:
            new = _storable(item, level + 1)
        except _Fault as fault:
            fault.path.append(name)
            raise
        if new is not item:
            if changed is None:
                changed = {}
            changed[key] = new
    if text_keys and changed is None:
        return value
    # Made again with text keys, in order; two keys written alike are
    # refused rather than one silently lost.
    out: dict[str, Any] = {}
    firsts: dict[str, Any] = {}
    for key, item in value.items():
        name = key if type(key) is str else _key_text(key)
        if name in out:
            raise _Fault(
                f"two keys, {firsts[name]!r} and {key!r}, are both written {name!r} "
                "in JSON: one would be lost"
            )
        firsts[name] = key
        out[name] = item if changed is None else changed.get(key, item)
    return out


def _key_text(key: Any) -> str:
    """
    The JSON text of an object's key that is not text, as json.dumps
    writes it.
    """
    if key is None or isinstance(key, bool):
        return _KEY_WORDS[key]
    if isinstance(key, int):
        if not -_INTEGER_BOUND < key < _INTEGER_BOUND:
            raise _Fault(f"a key that is {_too_many_digits()}")
        return int.__repr__(key)
    if isinstance(key, float):
        if not math.isfinite(key):
            raise _Fault(f"a key {key!r} is not a JSON number (JSON has no NaN or Infinity)")
        return float.__repr__(key)
    if isinstance(key, str):
        found = lone_surrogate(key)
        if found is not None:
            raise _Fault(not_text(found, key=True))
        return str.__str__(key)
    raise _Fault(f"a key that is {_a(key)} is not text")


def _too_many_digits() -> str:
    return (
        f"an integer of more than {MAX_INTEGER_DIGITS} digits, more than JSON here"
        " can carry"
    )


def _a(value: Any) -> str:
    name = type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def repaired(value: Any, where: str) -> tuple[Any, list[str]]:
    """
    A value read back from JSON (as C{json.loads} reads it: lone surrogate
    escapes kept, C{NaN} and C{Infinity} taken) made servable: each
    surrogate replaced by U+FFFD and each number that is not finite by
    C{None}; with what was replaced, in words, each naming its place from
    C{where}.  For what was stored before these values were refused.
    """
    faults: list[str] = []
    return _repaired(value, [], where, faults), faults


def _repaired(value: Any, path: list[Any], where: str, faults: list[str]) -> Any:
    kind = type(value)
    if kind is str:
        found = lone_surrogate(value)
        if found is None:
            return value
        faults.append(f"{name_path(where, path)}: a lone surrogate (\\u{ord(found):04x}), "
                      "now U+FFFD")
        return _SURROGATE.sub("\ufffd", value)
    if kind is float:
        if math.isfinite(value):
            return value
        faults.append(f"{name_path(where, path)}: {value!r}, now null")
        return None
    if kind is list:
        return [_repaired(item, path + [i], where, faults) for i, item in enumerate(value)]
    if kind is dict:
        out = {}
        for key, item in value.items():
            text = key
            if type(key) is str and lone_surrogate(key) is not None:
                text = _SURROGATE.sub("\ufffd", key)
                faults.append(f"{name_path(where, path)}: a key with a lone surrogate, "
                              "now U+FFFD")
            out[text] = _repaired(item, path + [text], where, faults)
        return out
    return value
