"""
The HTTP endpoints remote workers call (docs/worker-protocol.md), and the
bearer-token checks of the whole API.

They are handlers of L{DispatcherAPI}, which routes to them; what they
decide is the L{WorkerHub}'s.
"""

from __future__ import annotations

import hmac
import os
from typing import Any, Mapping, Optional

from twisted.internet.threads import deferToThreadPool

from dispatcher._deferreds import shielded
from dispatcher.model._jobs import (
    JobState,
    Offer,
    Outcome,
    Resources,
    lease_to_json,
)
from dispatcher.wire._submission import ApiError, check_body, check_fields, invalid

MAX_NAME = 200
MAX_ITEMS = 10000
STREAMS = ("stdout", "stderr")
WORKER_FIELDS = ("name", "slots", "cpus", "memory_mb", "gpus", "labels", "tasks", "instance")


def check_token(request: Any, token: Optional[str], what: str) -> None:
    """
    Refuse (401) a request whose C{Authorization: Bearer} token is not
    C{token}; compared in constant time.
    """
    assert token is not None
    raw = request.getHeader(b"authorization") or b""
    scheme, _, given = raw.partition(b" ")
    if scheme.lower() != b"bearer" or not hmac.compare_digest(
        given.strip(), token.encode("utf-8")
    ):
        request.setHeader(b"www-authenticate", b'Bearer realm="dispatcher"')
        raise ApiError(
            401,
            "unauthorized",
            f"send the {what} token as 'Authorization: Bearer <token>'",
            "Authorization",
        )


def _number(value: Any, field: str, low: float, high: float, integer: bool) -> Any:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
        noun = "an integer" if integer else "a number"
        invalid(field, f"expected {noun} from {low:g} to {high:g}")
    return value


def _string(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_NAME or "\x00" in value:
        invalid(field, f"expected a string of 1 to {MAX_NAME} characters")
    return value


def parse_worker(value: Any) -> Offer:
    """
    The L{Offer} of a worker description (the C{worker} field).
    """
    if value is None:
        raise ApiError(400, "missing_field", "worker: required: the worker's description", "worker")
    if not isinstance(value, dict):
        invalid("worker", "expected an object describing the worker")
    check_fields(value, "worker", WORKER_FIELDS, ("name", "slots"))
    name = _string(value["name"], "worker.name")
    slots = _number(value["slots"], "worker.slots", 1, 100_000, True)
    cpus = _number(value.get("cpus", 0), "worker.cpus", 0, 1_000_000, False)
    memory = _number(value.get("memory_mb", 0), "worker.memory_mb", 0, 1 << 40, True)
    gpus = _number(value.get("gpus", 0), "worker.gpus", 0, 100_000, True)
    labels = value.get("labels", {})
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        invalid("worker.labels", "expected an object of strings")
    tasks = value.get("tasks", [])
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        invalid("worker.tasks", "expected an array of task names")
    instance = value.get("instance")
    if instance is not None:
        instance = _string(instance, "worker.instance")
    return Offer(
        name,
        slots,
        Resources(float(cpus), memory, gpus),
        dict(labels),
        frozenset(tasks),
        instance,
    )


HEARTBEAT_ITEM = ("job_id", "token", "running")
RESULT_ITEM = ("job_id", "token", "state", "exit_code", "result", "error", "stopped")


def _items(body: Mapping[str, Any], key: str, allowed: tuple[str, ...]) -> list[Any]:
    items = body.get(key)
    if not isinstance(items, list) or len(items) > MAX_ITEMS:
        invalid(key, f"expected an array of at most {MAX_ITEMS} items")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            invalid(f"{key}[{i}]", "expected an object")
        check_fields(item, f"{key}[{i}]", allowed, ("job_id", "token"))
        _string(item.get("job_id"), f"{key}[{i}].job_id")
        _number(item.get("token"), f"{key}[{i}].token", 1, 2**63 - 1, True)
    return items


def _all_refused(answers: list[dict[str, Any]]) -> int:
    return 409 if answers and not any(a["ok"] for a in answers) else 200


class WorkerEndpoints:
    """
    The worker endpoints.

    @param hub: the dispatcher's L{WorkerHub}.
    @param token: the workers' bearer token, or C{None} (closed).
    @param log_path: C{(job_id, attempt, stream) -> path} of a log file.
    @param reactor: for file writes on C{io_pool}.
    @param io_pool: the pool that writes logs.
    """

    def __init__(
        self, hub: Any, token: Optional[str], log_path: Any, reactor: Any, io_pool: Any
    ) -> None:
        self._hub = hub
        self._token = token
        self._log_path = log_path
        self._reactor = reactor
        self._io_pool = io_pool

    def authorize(self, request: Any) -> None:
        if self._token is None:
            raise ApiError(
                403,
                "workers_disabled",
                "this dispatcher takes no remote workers; set [workers] token_file",
            )
        check_token(request, self._token, "workers'")

    def _timing(self) -> dict[str, float]:
        return {
            "lease_seconds": self._hub.lease_seconds,
            "heartbeat_seconds": self._hub.heartbeat_seconds,
        }

    async def lease(self, request: Any, body: Any) -> tuple[int, Any]:
        check_body(body, ("worker", "max_jobs", "wait"), "expected an object")
        offer = parse_worker(body.get("worker"))
        max_jobs = _number(body.get("max_jobs", offer.slots), "max_jobs", 1, offer.slots, True)
        wait = _number(body.get("wait", 30), "wait", 0, 60, False)
        leases = await self._hub.poll(offer, max_jobs, float(wait))
        return 200, {"leases": [lease_to_json(lease) for lease in leases], **self._timing()}

    async def heartbeat(self, request: Any, body: Any) -> tuple[int, Any]:
        check_body(body, ("worker", "leases"), "expected an object")
        offer = parse_worker(body.get("worker"))
        items = _items(body, "leases", HEARTBEAT_ITEM)
        parsed = []
        for i, item in enumerate(items):
            running = item.get("running", False)
            if not isinstance(running, bool):
                invalid(f"leases[{i}].running", "expected true or false")
            parsed.append((item["job_id"], item["token"], running))
        # A worker that hangs up must not cancel the writes: the leases a
        # heartbeat ends (a cancel told) have ended in memory already.
        answers = await shielded(self._hub.heartbeat(offer, parsed))
        return _all_refused(answers), {"leases": answers, **self._timing()}

    async def results(self, request: Any, body: Any) -> tuple[int, Any]:
        check_body(body, ("worker", "results"), "expected an object")
        offer = parse_worker(body.get("worker"))
        items = _items(body, "results", RESULT_ITEM)
        parsed = []
        for i, item in enumerate(items):
            field = f"results[{i}]"
            state = item.get("state")
            if state not in ("succeeded", "failed", "released"):
                invalid(f"{field}.state", "expected succeeded, failed or released")
            exit_code = item.get("exit_code")
            if exit_code is not None:
                _number(exit_code, f"{field}.exit_code", -255, 255, True)
            error = item.get("error")
            if error is not None and not isinstance(error, str):
                invalid(f"{field}.error", "expected a string or null")
            stopped = item.get("stopped", False)
            if not isinstance(stopped, bool):
                invalid(f"{field}.stopped", "expected true or false")
            if state == "released":
                outcome = None
            else:
                outcome = Outcome(
                    JobState(state), exit_code, item.get("result"), error, stopped
                )
            parsed.append((item["job_id"], item["token"], outcome))
        # Not cancelled with the request: the reported leases have ended in
        # memory, and a resend would be refused as reported.
        answers = await shielded(self._hub.report(offer, parsed))
        return _all_refused(answers), {"results": answers}

    async def write_log(self, request: Any, query: Mapping[str, Optional[str]]) -> tuple[int, Any]:
        job_id = _string(query.get("job_id"), "job_id")
        token = _query_integer(query.get("token"), "token")
        offset = _query_integer(query.get("offset"), "offset", low=0)
        stream = query.get("stream")
        if stream not in STREAMS:
            invalid("stream", "expected stdout or stderr")
        # The query names no worker: the token alone says whose it is.
        remote = self._hub.current(job_id, token)
        if remote is None:
            refusal = self._hub.refusal(job_id, token)
            raise ApiError(409, "stale_lease", f"token: {refusal['message']}", "token")
        path = self._log_path(job_id, remote.lease.attempt, stream)
        data = request.content.read()
        size = await deferToThreadPool(
            self._reactor, self._io_pool, _write_at, path, offset, data
        )
        if size is None:
            have = await deferToThreadPool(self._reactor, self._io_pool, _size, path)
            raise ApiError(
                400,
                "offset_past_end",
                f"offset: {offset} is past the end of the stream ({have} bytes); "
                f"send from {have}",
                "offset",
                {"size": have},
            )
        return 200, {"size": size}

    def describe(self) -> list[dict[str, Any]]:
        return self._hub.describe()


def _query_integer(text: Optional[str], name: str, low: int = 1) -> int:
    try:
        value = int(text or "")
    except ValueError:
        invalid(name, f"expected an integer of at least {low}")
    if value < low:
        invalid(name, f"expected an integer of at least {low}")
    return value


def _write_at(path: str, offset: int, data: bytes) -> Optional[int]:
    """
    Write C{data} at C{offset} of the file (made if need be); the size
    afterwards, or C{None} if C{offset} is past the end.
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if offset > size:
            return None
        if data:
            os.pwrite(fd, data, offset)
        return max(size, offset + len(data))
    finally:
        os.close(fd)


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0
