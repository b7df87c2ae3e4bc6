"""
The API's JSON codec: out through msgspec, in through orjson, with the
standard library's values.  (The store's own JSON is
C{tests/test_stored.py}'s.)
"""

import json

import pytest
from hypothesis import given, strategies as st

from dispatcher.wire._json import decode, encode

# Every JSON value, as the standard library reads it (other tests use it too).
values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)


@given(values)
def test_same_values_as_json(value):
    """Whatever JSON value goes out reads back as what the standard library
    would have written, integers beyond 64 bits included."""
    assert json.loads(encode(value)) == json.loads(json.dumps(value))


def test_what_orjson_cannot_write_goes_to_json():
    """A huge integer stays exact and a key that is not a string becomes one,
    as json.dumps does."""
    assert encode({"n": 2**80}) == b'{"n":1208925819614629174706176}'
    assert encode({1: "a"}) == b'{"1":"a"}'
    assert encode("\u00e9") == '"\u00e9"'.encode("utf-8")


def test_decode_keeps_integers_and_refuses_nan():
    """Reading keeps a large integer exact and refuses NaN and Infinity."""
    assert decode(b"[123456789012345678901234567890]") == [123456789012345678901234567890]
    for text in (b"NaN", b"[Infinity]", b'{"a": -Infinity}'):
        with pytest.raises(ValueError):
            decode(text)


def test_decode_takes_utf8_only():
    """A body is UTF-8 without a byte order mark; anything else is refused
    as not JSON (the API answers 400 malformed_json)."""
    assert decode('{"a": "é"}'.encode("utf-8")) == {"a": "é"}
    with pytest.raises(ValueError):
        decode(b'\xef\xbb\xbf{"a": 1}')
    with pytest.raises(ValueError):  # UnicodeDecodeError is a ValueError
        decode('{"a": 1}'.encode("utf-16"))


def same(a, b):
    """Equal as JSON values, types included (1, 1.0 and True differ, and
    so do 0.0 and -0.0)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


@given(values)
def test_decode_reads_as_json_does(value):
    """decode() gives what json.loads gives for any JSON text, though orjson
    reads most of them: huge integers stay exact, and the text of a value
    json writes with ASCII escapes reads the same."""
    for text in (json.dumps(value), json.dumps(value, ensure_ascii=False)):
        assert same(decode(text.encode("utf-8")), json.loads(text))


def servable(value):
    """Whether a value json.loads gave can be written back out as JSON: no
    lone surrogate, no number that is not finite."""
    try:
        json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except ValueError:
        return False
    return True


@given(st.text(alphabet='[]{}",:0123456789.eE+- \\uaflnrstd', max_size=40))
def test_decode_takes_what_json_takes(text):
    """Near-JSON text: decode() refuses what json.loads refuses or reads as
    what cannot be written back out (a lone surrogate escape, a number too
    large for a float), and reads the rest as the same value, types
    included."""
    try:
        expected = json.loads(text)
    except ValueError:
        expected = None
        ok = False
    else:
        ok = servable(expected)
    if not ok:
        with pytest.raises(ValueError):
            decode(text.encode("utf-8"))
    else:
        assert same(decode(text.encode("utf-8")), expected)


def test_decode_falls_back_to_json_where_orjson_refuses():
    """Where orjson refuses or differs, json decides, but what json would
    read and no JSON can carry back out is refused: a number too large for
    a float (json: infinite) and a lone surrogate escape (json: kept); a
    huge integer stays exact; bad JSON is a ValueError either way."""
    for text in (b"[1e400]", b'["\\ud800"]', b'{"\\udc00": 1}', b'[-1e999, 18446744073709551616]'):
        with pytest.raises(ValueError, match="no JSON can carry"):
            decode(text)
    assert decode(b"[18446744073709551616]") == [18446744073709551616]
    assert decode(b'["\\ud83d\\ude00"]') == ["\U0001f600"]
    for text in (b"[1,]", b"{", b"\xff"):
        with pytest.raises(ValueError):
            decode(text)
