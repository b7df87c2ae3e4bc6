"""
JSON out: compact, fast, and the same values as the standard library's.

Answers are written by msgspec, which writes the wire types
(L{dispatcher.wire._types}) as well as plain values, about ten times
faster than C{json}; stored jobs by orjson, sorted.  What they cannot
write the way C{json} does (keys that are not strings, integers beyond 64
bits for orjson) is handed to C{json}, so a value never changes on its
way out.  Two differences remain: a non-ASCII character is written as
UTF-8, not escaped, and a NaN or an infinity (which the API does not take
in) as C{null}, where C{json} would write C{NaN}, which is not JSON.

JSON in is read by orjson too, about four times faster, unless it may hold
an integer orjson would make a float, or orjson refuses it: then C{json}
reads it, so a value and every error are what C{json} gives.  L{decode}
refuses C{NaN} and C{Infinity}.
"""

from __future__ import annotations

import json
import re
from typing import Any

import msgspec
import orjson

_compact = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_compact_sorted = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, sort_keys=True
).encode


_encode = msgspec.json.Encoder().encode


def encode(value: Any) -> bytes:
    """
    C{value} (plain values, or wire types) as compact JSON in UTF-8.
    """
    try:
        return _encode(value)
    except TypeError:
        return _compact(value).encode("utf-8")


def encode_sorted(value: Any) -> str:
    """
    C{value} as compact JSON with sorted keys: the form the store keeps.
    """
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode("utf-8")
    except TypeError:
        return _compact_sorted(value)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


# Built once: json.loads with an argument builds a decoder per call, a
# tenth of a small request's parse.
_decoder = json.JSONDecoder(parse_constant=_refuse_constant)


def decode(data: bytes | str) -> Any:
    """
    The value of a JSON text, read as the standard (RFC 8259) says: a
    C{NaN}, C{Infinity} or C{-Infinity} in it is a C{ValueError}.  Bytes
    are UTF-8, which JSON exchanged between systems must be (a byte order
    mark is refused, as RFC 8259 allows).
    """
    if isinstance(data, (bytes, bytearray)):
        if _LONG_DIGITS.search(data) is None:
            try:
                return orjson.loads(data)
            except orjson.JSONDecodeError:
                # Refused (as not UTF-8, a NaN, a lone surrogate...): json
                # says why, or reads what orjson does not (a number too
                # large for a float, which json makes infinite).
                pass
        data = data.decode("utf-8")
    if data.startswith("\ufeff"):
        raise ValueError("a JSON text must not begin with a byte order mark")
    return _decoder.decode(data)


# A run of 19 digits or more may be an integer beyond 64 bits, which
# orjson would read as a float.
_LONG_NUMBER = re.compile(r"\d{19}")
# The same, for the bytes of a request.
_LONG_DIGITS = re.compile(_LONG_NUMBER.pattern.encode("ascii"))


def decode_stored(text: str) -> Any:
    """
    The value of JSON this program wrote (a stored spec, labels, a result):
    read by orjson, about four times faster than C{json}, unless it may
    hold an integer orjson cannot keep exact.
    """
    if _LONG_NUMBER.search(text) is None:
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            # What orjson does not read at all (the NaN that json writes
            # for a task's result, say) is json's.
            pass
    return json.loads(text)
