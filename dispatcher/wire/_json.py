"""
JSON out: compact, fast, and the same values as the standard library's.

Answers are written by msgspec, which writes the wire types
(L{dispatcher.wire._types}) as well as plain values, about ten times
faster than C{json}.  What it cannot write the way C{json} does (keys
that are not strings) is handed to C{json}, so a value never changes on
its way out.  (What the store keeps is the store's own form,
L{dispatcher.store._stored}.)  Two differences remain: a non-ASCII character is written as
UTF-8, not escaped, and a NaN or an infinity (which the API does not take
in) as C{null}, where C{json} would write C{NaN}, which is not JSON.

JSON in is read by orjson too, about four times faster, unless it may hold
an integer orjson would make a float, or orjson refuses it: then C{json}
reads it, so a value and every error are what C{json} gives.  L{decode}
refuses C{NaN} and C{Infinity}, a number too large for a float (which
C{json} makes infinite) and a lone surrogate escape (C{"\\ud800"}, which
C{json} keeps): what it gives can be written back out.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import msgspec
import orjson
from twisted.logger import Logger

from dispatcher.model._values import repaired

log = Logger()

_compact = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


_encode = msgspec.json.Encoder().encode


def encode(value: Any) -> bytes:
    """
    C{value} (plain values, or wire types) as compact JSON in UTF-8.
    """
    try:
        return _encode(value)
    except TypeError:
        pass
    except UnicodeEncodeError:
        return _encode_repaired(value)
    try:
        return _compact(value).encode("utf-8")
    except UnicodeEncodeError:
        return _encode_repaired(value)


# When an answer with text no UTF-8 carries was last logged, and how many
# since.
_unservable = {"logged": float("-inf"), "count": 0}


def _encode_repaired(value: Any) -> bytes:
    """
    C{value}, which holds a lone surrogate, with U+FFFD in its place; the
    first such answer of a minute is logged with where it was.
    """
    fixed, faults = repaired(msgspec.to_builtins(value), "")
    _unservable["count"] += 1
    now = time.monotonic()
    if now - _unservable["logged"] >= 60:
        log.warn(
            "{count} answers held text that cannot be written as UTF-8 (a lone "
            "surrogate, stored before such text was refused) and were served with "
            "U+FFFD in its place; the first: {where}",
            count=_unservable["count"],
            where="; ".join(faults[:3]),
        )
        _unservable["logged"] = now
        _unservable["count"] = 0
    return _compact(fixed).encode("utf-8")


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
    value = _decoder.decode(data)
    # Only what orjson refused or may misread gets here: json reads a
    # number beyond a float as infinite and keeps a lone surrogate escape,
    # neither of which can be written back out.
    try:
        _strict(value).encode("utf-8")
    except ValueError as e:
        raise ValueError(f"the JSON text holds what no JSON can carry back out: {e}") from None
    return value


# Refuses what the API cannot write back out: a number that is not finite
# (ValueError), a lone surrogate (UnicodeEncodeError, a ValueError).
_strict = json.JSONEncoder(ensure_ascii=False, allow_nan=False, check_circular=False).encode


# A run of 19 digits or more may be an integer beyond 64 bits, which
# orjson would read as a float.
_LONG_DIGITS = re.compile(rb"\d{19}")
