"""
The client's Server-Sent Events parser (dispatcher.client._sse) reads an
event stream as the HTML standard says, however the bytes are split; and
the event follower resumes where the stream was.
"""

import pytest

from dispatcher.client._plans import Answer
from dispatcher.client._sse import EventStreamParser, ServerSentEvent
from dispatcher.client._streams import EventFollower, LogFollower
import json

from dispatcher.client import DispatcherError, NotFound, Unreachable
from dispatcher.client._calls import job_call, read_answer
from dispatcher.wire._types import JobEvent, JobView, WorkerEvent


def _all(stream: bytes, pieces=None):
    parser = EventStreamParser()
    events = []
    if pieces is None:
        pieces = [stream]
    for piece in pieces:
        events += parser.feed(piece)
    return events, parser


def _every_split(stream: bytes):
    """The events of stream fed whole, then split in two at every byte,
    then a byte at a time: all the same."""
    whole, _ = _all(stream)
    for i in range(len(stream) + 1):
        assert _all(stream, [stream[:i], stream[i:]])[0] == whole, i
    assert _all(stream, [stream[i:i + 1] for i in range(len(stream))])[0] == whole
    return whole


def test_the_standards_examples():
    """The standard's examples: data lines joined by LF, a comment ignored,
    an event without data not dispatched, ids kept across events, the space
    after the colon dropped once."""
    stream = (
        b": test stream\n\n"
        b"data: first event\nid: 1\n\n"
        b"data:second event\nid\n\n"
        b"data:  third event\n\n"
        b"data: YHOO\ndata: +2\ndata: 10\n\n"
        b"event: add\ndata: 73857293\n\n"
        b"data\n\ndata\ndata\n\ndata:\n"
    )
    assert _every_split(stream) == [
        ServerSentEvent("message", "first event", "1"),
        ServerSentEvent("message", "second event", ""),
        ServerSentEvent("message", " third event", ""),
        ServerSentEvent("message", "YHOO\n+2\n10", ""),
        ServerSentEvent("add", "73857293", ""),
        ServerSentEvent("message", "", ""),
        ServerSentEvent("message", "\n", ""),
    ]


@pytest.mark.parametrize("end", [b"\n", b"\r", b"\r\n"])
def test_every_line_ending(end):
    """Lines end with LF, CR or CRLF, and a CRLF split between two pieces is
    one line end, not two (which would dispatch an event early)."""
    stream = end.join([b"event: job", b"id: 7", b"data: {\"a\"", b"data: 1}", b"", b""])
    assert _every_split(stream) == [ServerSentEvent("job", '{"a"\n1}', "7")]


def test_utf8_split_anywhere_and_a_leading_bom():
    """A UTF-8 sequence split between pieces is read whole; a byte order
    mark opening the stream is skipped; a field name is matched exactly."""
    stream = "\ufeffdata: héllo ✓\nDATA: no\n\n".encode()
    assert _every_split(stream) == [ServerSentEvent("message", "héllo ✓", "")]


def test_retry_and_an_unfinished_event():
    """retry sets the reconnection time only when all digits; an event with
    no blank line after it is not dispatched."""
    events, parser = _all(b"retry: 2500\n\nretry: 1x\ndata: cut")
    assert events == [] and parser.retry == 2500


def test_an_id_with_nul_is_ignored():
    """An id field holding NUL leaves the last event ID as it was."""
    events, parser = _all(b"id: 5\ndata: a\n\nid: 6\x007\ndata: b\n\n")
    assert [e.last_event_id for e in events] == ["5", "5"]


JOB = (b'{"id": %d, "at": "2026-12-07T09:00:00Z", "job_id": "j", "state": "running",'
       b' "previous": "queued", "owner": "admin", "queue": "default", "name": null,'
       b' "array_id": null, "batch_id": null, "attempt": 1, "exit_code": null, "error": null}')


def test_the_follower_resumes_after_the_last_event():
    """The follower asks with after= the first time, gives each event typed
    (a job's, a worker's), skips the heartbeat, and after a dropped event or
    a lost connection resumes with Last-Event-ID of the last one."""
    follower = EventFollower((("type", "job"),), 3, "http://d")
    call = follower.call()
    assert ("after", "3") in call.query and ("type", "job") in call.query
    assert "Last-Event-ID" not in dict(call.headers)
    events = follower.feed(
        b"id: 4\nevent: job\ndata: " + JOB % 4 + b"\n\n: keep-alive\n\n"
        b"id: 5\nevent: worker\ndata: {\"id\": 5, \"at\": \"2026-12-07T09:00:01Z\","
        b" \"worker\": \"w1\", \"change\": \"connected\"}\n\n"
    )
    assert [(e.id, e.type, type(e.data)) for e in events] == [
        (4, "job", JobEvent), (5, "worker", WorkerEvent)]
    assert events[0].data.state.value == "running"
    assert follower.feed(b'event: dropped\ndata: {"id": 9, "reason": "too_far_behind"}\n\n') == []
    assert follower.ended() > 0
    resumed = follower.call()
    assert dict(resumed.headers)["Last-Event-ID"] == "9"
    assert not any(k == "after" for k, _ in resumed.query)


def test_the_follower_gives_up_after_its_tries_and_raises_refusals():
    """Failures in a row beyond the tries are Unreachable (an event between
    them starts the count again); a refusal other than 503 is raised as
    its error."""
    follower = EventFollower((), None, "http://d", retries=2)
    follower.call()
    follower.lost("refused")
    follower.lost("refused")
    follower.feed(b"id: 1\nevent: job\ndata: " + JOB % 1 + b"\n\n")
    follower.lost("refused")
    follower.lost("refused")
    with pytest.raises(Unreachable):
        follower.lost("refused")
    body = b'{"error": {"code": "not_found", "message": "no", "field": "job"}}'
    with pytest.raises(NotFound) as caught:
        EventFollower((), None, "http://d").refused(Answer(404, {}, body))
    assert caught.value.field == "job"


def test_the_log_follower_resumes_at_the_bytes_read():
    """A followed log resumes at the offset of the bytes received."""
    follower = LogFollower("j", "stderr", 2, 10, "http://d")
    follower.feed(b"12345")
    follower.lost("reset")
    assert dict(follower.call().query) == {
        "stream": "stderr", "offset": "15", "attempt": "2", "follow": "true"}


def test_an_event_of_another_shape_is_an_error_and_an_unknown_type_is_kept():
    """An event whose data is not its type's shape is a DispatcherError
    saying so; an event of a type this client does not know is given with
    its plain JSON data, so that the stream may gain types."""
    follower = EventFollower((), None, "http://d")
    follower.call()
    with pytest.raises(DispatcherError, match="event job"):
        follower.feed(b'id: 1\nevent: job\ndata: {"id": "x"}\n\n')
    (event,) = follower.feed(b'id: 2\nevent: queue\ndata: {"name": "q"}\n\n')
    assert (event.id, event.type, event.data) == (2, "queue", {"name": "q"})


def test_answers_that_grow_are_read():
    """A job whose answer has fields this client does not know, in the job
    and in an attempt, decodes into JobView all the same.  (Not in an
    attempt's limits: they are the Limits a worker sends, declared once,
    which refuses a field it does not know.)"""
    body = json.dumps({
        "id": "j", "state": "succeeded", "name": None, "labels": {}, "created_at": "t",
        "started_at": None, "finished_at": None, "exit_code": 0, "result": None,
        "error": None, "wait_reason": None, "worker": None, "owner": None, "new": 1,
        "attempts": [{"number": 1, "holder": "h", "started_at": None, "finished_at": None,
                      "exit_code": 0, "error": None, "new": 2,
                      "limits": {"memory_mb": None, "processes": None, "enforced": False}}]}
    ).encode()
    job = read_answer(job_call("j"), 200, {}, body)
    assert isinstance(job, JobView) and job.attempts[0].limits.enforced is False


def test_the_public_names():
    """dispatcher.client exports the clients, their errors and the wire types
    a caller builds or reads, each from where it is defined."""
    import dispatcher.client as client

    assert set(client.__all__) == {
        "Client", "TwistedClient", "BadRequest", "Conflict", "DispatcherError", "Forbidden",
        "NotFound", "QuotaExceeded", "Unauthorized", "Unavailable", "Unreachable",
        "WaitTimeout", "BatchJob", "Event", "EventsReset", "Identity", "InputFile", "JobEvent",
        "JobGroup", "JobState", "JobSubmission", "JobSummary", "JobView", "QueueView",
        "Resources", "SubmittedJobs", "WorkerEvent", "WorkerView"}
    for name in client.__all__:
        home = getattr(client, name).__module__
        assert home.startswith(("dispatcher.client.", "dispatcher.wire.", "dispatcher.model.")), name
