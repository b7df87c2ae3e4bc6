"""
What the store keeps as JSON (L{dispatcher.store._stored}): one text for a
value, read back exactly; the same text for a job however it was
submitted; rows written by earlier versions still read back; and the
digest a request's idempotency key is remembered with.
"""

import hashlib
import json
import sqlite3

import pytest
import pytest_twisted
from hypothesis import given

from dispatcher.model._jobs import InputSpec, JobSpec, JobState, Outcome, PlainJobs, Resources
from dispatcher.store import _submissions
from dispatcher.store._stored import (
    decode_stored,
    encode_stored,
    plain_stored,
    request_digest,
    spec_from_stored,
    spec_to_stored,
)
from tests.store_contract import claim, ids
from tests.test_json import values
from tests.test_layout import PACKAGE, _imports
from tests.test_store import make_store  # noqa: F401 (a fixture)



@given(values)
def test_stored_text_reads_back_exactly(value):
    """Whatever value the store writes reads back equal, and as the
    standard library reads it: integers beyond 64 bits stay exact."""
    text = encode_stored(value)
    assert decode_stored(text) == json.loads(text) == json.loads(json.dumps(value))


def test_stored_text_is_compact_sorted_utf8():
    """The stored text is compact, its keys sorted at every level, its
    non-ASCII characters unescaped; what orjson cannot write (a huge
    integer, a key that is not a string) is written the same way by json."""
    assert encode_stored({"b": 1, "a": {"d": 2, "c": "\u00e9"}}) == '{"a":{"c":"é","d":2},"b":1}'
    assert encode_stored({"b": 2**80, "a": "\u00e9"}) == '{"a":"é","b":1208925819614629174706176}'
    assert encode_stored({1: "a"}) == '{"1":"a"}'


def test_earlier_texts_read_back():
    """What earlier versions stored with json.dumps (ASCII escapes, a
    NaN, huge integers) reads back as json reads it."""
    assert decode_stored('{"a":"\\u00e9"}') == {"a": "\u00e9"}
    assert decode_stored("[-9223372036854775809, 2]") == [-9223372036854775809, 2]
    nan = decode_stored('{"x": NaN}')["x"]
    assert nan != nan


def test_spec_round_trips():
    """A spec's stored form and its columns give the spec back, every
    field that has no column included."""
    spec = JobSpec(
        command=("sh", "-c", "x"),
        env={"A": "1"},
        inputs=(InputSpec("https://e.org/a", "a", "ab" * 32), InputSpec("https://e.org/b", "b")),
        depends_on=("j1",),
        resources=Resources(1.5, 64, 1),
        requirements={"site": "a"},
        priority=4,
        queue="q",
    )
    text = encode_stored(spec_to_stored(spec))
    assert spec_from_stored(decode_stored(text), priority=4, queue="q") == spec
    task = JobSpec(task="t", args=(1, [2]), kwargs={"k": {"n": 2**70}})
    text = encode_stored(spec_to_stored(task))
    assert spec_from_stored(decode_stored(text)) == task


def test_plain_jobs_texts_are_their_specs_texts():
    """The text of a plain job is its spec's stored text: a command, a task
    (keys sorted at every level), and a task whose arguments orjson cannot
    write."""
    plain = PlainJobs([
        ["echo", "\u00e9"],
        ("t", [1.5, {"b": 1, "a": 2}], {"z": 1, "y": "\x00"}),
        ("t", [2**70], {}),
    ])
    assert plain_stored(plain) == [encode_stored(spec_to_stored(s)) for s in plain.specs()]


def test_request_digest():
    """The digest is the SHA-256 of the path and the value in the stored
    form: the same for a JSON-equal body, another for another path or
    value."""
    body = {"jobs": [{"command": ["echo", "\u00e9"]}], "a": 1e-05}
    digest = request_digest("/v1/jobs/batch", body)
    assert digest == hashlib.sha256(
        encode_stored(["/v1/jobs/batch", body]).encode("utf-8")).hexdigest()
    reordered = json.loads('{"a": 0.00001, "jobs": [{"command": ["echo", "\\u00e9"]}]}')
    assert request_digest("/v1/jobs/batch", reordered) == digest
    assert request_digest("/v1/jobs", body) != digest
    assert request_digest("/v1/jobs/batch", {**body, "a": 2e-05}) != digest


def test_the_stored_form_is_the_stores_own():
    """The store's rows and stored form import nothing of the wire package,
    so a change to the API contract cannot change a stored row."""
    for name in ("_stored.py", "_rows.py", "_submissions.py", "_leases.py"):
        imported = _imports(PACKAGE / "store" / name)
        assert not [m for m in imported if m.startswith("dispatcher.wire")], name


@pytest.mark.parametrize("json_rows", [True, False])
@pytest_twisted.ensureDeferred
async def test_plain_and_full_submissions_store_one_text(make_store, tmp_path, monkeypatch,
                                                          json_rows):
    """A job stored as a plain job has, in its row, the very text the same
    job stored from its spec has; with SQLite reading the rows from JSON
    and with rows bound from Python."""
    if json_rows and not _submissions.JSON_ROWS:
        pytest.skip(f"SQLite {sqlite3.sqlite_version} has no JSON functions built in")
    monkeypatch.setattr(_submissions, "JSON_ROWS", json_rows)
    store = await make_store()
    plain = PlainJobs([
        ["echo", "\u00e9 \"q\" \\ \x01"],
        ("t", [1.5e300, 1e-07, -0.0, {"b": 1, "a": [2]}], {"z": "\u2028", "y": None}),
        ("t", [2**70], {}),
    ])
    plain_ids = [ids.new() for _ in plain.work]
    full_ids = [ids.new() for _ in plain.work]
    await store.submit_plain(plain, 1.0, plain_ids)
    await store.submit(plain.specs(), 1.0, full_ids)
    await store.close()
    with sqlite3.connect(tmp_path / "db.sqlite3") as conn:
        texts = dict(conn.execute("SELECT id, spec FROM jobs"))
    assert [texts[i] for i in plain_ids] == [texts[i] for i in full_ids]
    assert [texts[i] for i in plain_ids] == plain_stored(plain)


@pytest_twisted.ensureDeferred
async def test_rows_written_by_json_dumps_read_back(make_store, tmp_path):
    """A job's spec, labels and result are stored in the one stored form;
    a database whose JSON columns an earlier version wrote with json.dumps
    (ASCII escapes, a NaN result, a huge integer) reads back the same
    jobs."""
    store = await make_store()
    spec = JobSpec(task="t", args=("\u00e9", 2**70), kwargs={"k": "\u2603"},
                   labels={"team": "\u00e9t\u00e9"})
    written = await store.submit([spec], 1.0, [ids.new()])
    (job,) = written.value.jobs
    (lease,) = await claim(store, "h", 1, 2.0)
    await store.finish(lease, Outcome(JobState.SUCCEEDED, result={"r": "\u00e9"}), 3.0)
    await store.close()
    old = json.dumps
    with sqlite3.connect(tmp_path / "db.sqlite3") as conn:
        # Written now: in the one stored form.
        assert conn.execute("SELECT spec, labels, result FROM jobs").fetchone() == (
            encode_stored(spec_to_stored(spec)), encode_stored(spec.labels),
            encode_stored({"r": "\u00e9"}))
        conn.execute(
            "UPDATE jobs SET spec = ?, labels = ?, result = ? WHERE id = ?",
            (
                old({"args": ["\u00e9", 2**70], "kwargs": {"k": "\u2603"}, "task": "t"},
                    separators=(",", ":"), sort_keys=True),
                old({"team": "\u00e9t\u00e9"}, separators=(",", ":"), sort_keys=True),
                old({"r": "\u00e9", "nan": float("nan")}, separators=(",", ":"), sort_keys=True),
                job.id,
            ),
        )
        assert "\\u00e9" in conn.execute("SELECT spec FROM jobs").fetchone()[0]
    store = await make_store()
    again = await store.get(job.id)
    assert again.spec == job.spec
    assert again.result["r"] == "\u00e9" and again.result["nan"] != again.result["nan"]
