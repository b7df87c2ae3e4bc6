"""
Schemathesis hooks of tests/test_contract.py (loaded through
C{SCHEMATHESIS_HOOKS}): they leave out the generated bodies whose answer
depends on more than the document can express (each such rule is said in
the field's description and in the operation's 400), each for a reason
given below, and keep a lease request from long-polling.

They also add a check, L{RolesEnforced}: each answer is the one the
operation's C{security} and C{x-roles} promise to the run's caller
(C{DISPATCHER_CONTRACT_CALLER}: a role, or C{none} for no credential,
whose token is C{DISPATCHER_CONTRACT_TOKEN}).
"""

import json
import os
import posixpath
import re
from typing import Optional

import schemathesis
from schemathesis.core import NOT_SET
from schemathesis.core.parameters import ParameterLocation

from dispatcher.wire._types import HTTP_URL, MAX_URL

# [dispatcher] max_array of the daemon under test.
MAX_ARRAY = 50
# [server] max_body_bytes of the daemon under test (its default).
MAX_BODY_BYTES = 1 << 20

# Who the run calls as: the role of the credential it sends (admin,
# submitter, reader, worker), or "none" when it sends none; and the
# credential's token.
CALLER = os.environ.get("DISPATCHER_CONTRACT_CALLER", "admin")
TOKEN = os.environ.get("DISPATCHER_CONTRACT_TOKEN", "")
NO_CREDENTIAL = "none"


def role_verdict(caller: str, roles: Optional[list], status: int,
                 field: Optional[str] = None) -> Optional[str]:
    """
    What is wrong with answering C{status} (an error naming C{field}) to
    C{caller} (a role, or L{NO_CREDENTIAL}) on an operation that C{roles}
    may call (its C{x-roles}; C{None} for an open one, C{security: []}),
    or C{None}.

    Without a credential a secured operation answers 401 and nothing else
    (not its 404, nor a 400 for its body: the head is refused first); a
    role it leaves out gets the head check's 403 (its field
    C{Authorization}) and nothing else; a role it names is never refused
    for who it is (401, or that 403), and an open operation refuses no
    one.  Another 403 is no refusal of the role: a worker credential
    naming a worker that is not its own (C{worker.name}), which the
    operation documents.
    """
    for_role = status == 401 or (status == 403 and field == "Authorization")
    if roles is None or (caller != NO_CREDENTIAL and caller in roles):
        if for_role:
            who = "anyone" if roles is None else f"{caller} (x-roles {', '.join(roles)})"
            return f"refused {who} with {status} ({field})"
        return None
    if caller == NO_CREDENTIAL:
        return None if status == 401 else f"answered {status} to no credential; expected 401"
    if status != 403 or not for_role:
        return (f"answered {status} ({field}) to {caller}, not in x-roles "
                f"{', '.join(roles)}; expected 403 (Authorization)")
    return None


@schemathesis.check
class RolesEnforced:
    """
    Every answer is what L{role_verdict} allows the run's L{CALLER}; and
    every operation tried was judged at least once as the run's caller,
    so that a run cannot pass by judging nothing.

    A request is judged by the credential it really carried: schemathesis
    sends some without the run's (the coverage phase leaves the
    C{Authorization} the document declares out, or makes one up), and
    those are judged as having none.  A role caller's case at another
    method than its operation's (the coverage phase's) or with a path
    parameter generated invalid is not judged: it may reach another route
    or none.  Without a credential every path but the open ones is a 401,
    so every such case is judged.
    """

    def __init__(self) -> None:
        self.tested: set[str] = set()
        self.judged: set[str] = set()

    def after_response(self, ctx, response, case) -> None:
        operation = case.operation
        self.tested.add(operation.label)
        sent = response.request.headers.get("Authorization")
        caller = CALLER if TOKEN and sent == f"Bearer {TOKEN}" else NO_CREDENTIAL
        if caller != NO_CREDENTIAL and (
            case.method.upper() != operation.method.upper()
            or (case.meta is not None and case.meta.is_negative_at(ParameterLocation.PATH))
        ):
            return
        raw = operation.definition.raw
        roles = None if raw.get("security") == [] else list(raw.get("x-roles", []))
        problem = role_verdict(caller, roles, response.status_code, _error_field(response))
        if problem is not None:
            raise AssertionError(f"{operation.label} {problem}")
        if caller == CALLER:
            self.judged.add(operation.label)

    def after_run(self, ctx) -> None:
        missed = self.tested - self.judged
        if missed:
            raise AssertionError(
                f"never judged for {CALLER}: {', '.join(sorted(missed))}"
            )


def _error_field(response) -> Optional[str]:
    """
    The C{field} of an error answer, if it is one.
    """
    try:
        error = json.loads(response.content)["error"]
        return error.get("field")
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def _input_paths_clash(inputs):
    """
    Whether two inputs go to one path, or one to a directory of another's:
    a rule JSON Schema cannot express (the uniqueness of a property of the
    items, a prefix relation between them).
    """
    paths = [
        posixpath.normpath(i["path"]) for i in inputs
        if isinstance(i, dict) and isinstance(i.get("path"), str)
    ]
    if len(paths) != len(set(paths)):
        return True
    taken = set(paths)
    for path in paths:
        parent = posixpath.dirname(path)
        while parent:
            if parent in taken:
                return True
            parent = posixpath.dirname(parent)
    return False


@schemathesis.hook
def filter_body(context, body):
    """
    Keep a body unless its answer depends on the daemon's state or on a
    rule the schema can only describe: C{depends_on} names jobs that must
    exist (an unknown one is a 400 C{unknown_dependency}); a batch makes
    at most C{max_array} jobs in all, arrays counted (a sum over items);
    two inputs of a job may not go to one path, nor one to a directory of
    another's.  (C{args}/C{kwargs} nested more than 100 deep, the
    fourth such rule, is never generated.)  A body over C{[server]
    max_body_bytes} is refused with a 413 before it is read, whatever it
    holds: one made to break a schema rule (a list of more than
    C{maxItems} items) would not be read for it.
    """
    if not isinstance(body, dict):
        return True
    if len(json.dumps(body).encode("utf-8", "surrogatepass")) > MAX_BODY_BYTES:
        return False
    jobs = body.get("jobs") if isinstance(body.get("jobs"), list) else [body]
    for job in jobs:
        if isinstance(job, dict):
            if job.get("depends_on"):
                return False
            inputs = job.get("inputs")
            if isinstance(inputs, list) and _input_paths_clash(inputs):
                return False
    if isinstance(body.get("jobs"), list):
        total = sum(
            job["array"]
            if isinstance(job, dict) and isinstance(job.get("array"), (int, float))
            and not isinstance(job.get("array"), bool) and job["array"] >= 1
            else 1
            for job in body["jobs"]
        )
        if total > MAX_ARRAY:
            return False
    return True


@schemathesis.hook
def before_call(context, case, kwargs):
    """
    A lease request waits C{wait} seconds (30 when not given) when no job
    fits: ask for no wait, so the worker endpoints are checked at the
    pace of the others.  A C{wait} the schema refuses is left as sent, so
    that a refused body stays refused.  A C{max_jobs} over
    C{worker.slots} (one field against another: a rule the 400 of the
    operation describes, which the schema cannot express) is lowered to
    the slots, in a request for work and in a report that asks for work;
    the coverage phase does not pass through L{filter_body}.

    A POST without a body (a cancel, a retry) says C{Content-Type:
    application/json} as its 415 requires: OpenAPI describes no body's
    media type, so schemathesis sends none.

    A delete of a job (C{DELETE /v1/jobs/{id}}) with a valid path, by a
    caller that may submit, is of a job it made and cancelled just before:
    the daemon runs nothing (C{slots = 0}), so no generated id would name
    a job that may be deleted, and every answer would be a 404 (or a 409
    for a queued job schemathesis took from an answer).

    An event stream (C{GET /v1/events}) is read for half a second.

    A C{wait} the schema takes is made a hundredth of a second (a job
    queued here never ends; see the code).

    A job's C{notify.url} the schema takes is made L{WEBHOOK_URL}: whether
    a URL may be posted to depends on the address its host gives and on
    the configuration (the fetch policy and its C{allow}: a rule the
    field's description and the operation's 400 state, which the schema
    cannot express), and a generated URL would have the daemon post to
    whatever host the generator made up.

    A log chunk's C{offset} the schema takes is made 0: past the end of
    what the stream holds, it is a 400 C{offset_past_end} (the
    operation's 400 says so), which depends on what was written before;
    and schemathesis reuses the job ids and tokens of leases it was
    granted, so its chunks may reach a stream.

    A log read with C{follow=true} is sent with C{follow=false}: a follow
    answers once its attempt ends, and the daemon runs nothing, so a
    follow of a job schemathesis made would wait for a worker that never
    comes (tests/test_follow.py checks follows against real jobs).
    """
    if (case.operation.method.upper() == "DELETE" and case.operation.path == "/v1/jobs/{id}"
            and CALLER in ("admin", "submitter") and TOKEN
            and not (case.meta is not None and case.meta.is_negative_at(ParameterLocation.PATH))):
        case.path_parameters = {**(case.path_parameters or {}), "id": _finished_job(case)}
        return
    if case.operation.method.upper() == "POST" and case.body is NOT_SET:
        if case.headers is None:
            case.headers = {}
        if not any(name.lower() == "content-type" for name in case.headers):
            case.headers["Content-Type"] = "application/json"
    if (case.operation.method.upper() == "POST"
            and case.operation.path in ("/v1/jobs", "/v1/jobs/batch")):
        _harmless_webhooks(case.body)
    if case.operation.path == "/v1/events":
        # A stream that is open stays open: schemathesis reads it until its
        # timeout, which is made short so that each stream costs half a
        # second rather than the run's request timeout (a refusal comes
        # whole at once).
        kwargs["timeout"] = 0.5
        return
    query = case.query or {}
    wait = query.get("wait")
    if case.operation.method.upper() == "GET" and wait is not None:
        # A wait the schema takes (issue 17: up to 300 s) on a job or group
        # that never ends here (slots = 0) would outlast the request's
        # timeout: it is made a hundredth of a second, a refused one left.
        try:
            seconds = float(wait)
        except (TypeError, ValueError):
            seconds = -1.0
        if 0 < seconds <= 300:
            query["wait"] = 0.01
    if case.operation.path == "/v1/jobs/{id}/log":
        query = case.query or {}
        if query.get("follow") in (True, "true"):
            query["follow"] = "false" if isinstance(query["follow"], str) else False
        return
    if case.operation.path == "/v1/leases/log":
        # A chunk goes at most at its stream's current size (a rule on the
        # daemon's state, said in the operation's 400): a generated offset
        # the schema takes is sent as 0, so that a lease token taken from a
        # lease's answer writes rather than is refused for its offset.
        query = case.query or {}
        offset = query.get("offset")
        if isinstance(offset, int) and not isinstance(offset, bool) and offset > 0:
            query["offset"] = 0
        return
    if (case.operation.path not in ("/v1/leases", "/v1/leases/results")
            or not isinstance(case.body, dict)):
        return
    body = case.body
    if case.operation.path == "/v1/leases":
        wait = body.get("wait", 0)
        if _number(wait) and 0 <= wait <= 60:
            body["wait"] = 0
    worker = body.get("worker")
    max_jobs = body.get("max_jobs")
    if (isinstance(worker, dict) and _number(worker.get("slots")) and _number(max_jobs)
            and float(max_jobs).is_integer() and max_jobs > worker["slots"] >= 1):
        body["max_jobs"] = worker["slots"]


# What every generated webhook URL the schema takes is made: an address the
# contract daemon's [fetch] allow lets through, where nothing listens (the
# daemon's posts there fail at once, and are put off).
WEBHOOK_URL = "http://127.0.0.1:9/contract-hook"
_HTTP_URL = re.compile(HTTP_URL)


def _harmless_webhooks(body):
    """
    Make each schema-valid C{notify.url} of a submission's body (a job or
    a batch) L{WEBHOOK_URL}; leave an invalid one as it is, so that a
    refused body stays refused.
    """
    if not isinstance(body, dict):
        return
    jobs = body.get("jobs") if isinstance(body.get("jobs"), list) else [body]
    for job in jobs:
        notify = job.get("notify") if isinstance(job, dict) else None
        url = notify.get("url") if isinstance(notify, dict) else None
        if isinstance(url, str) and 1 <= len(url) <= MAX_URL and _HTTP_URL.match(url):
            notify["url"] = WEBHOOK_URL


def _finished_job(case):
    """
    The id of a job the run's caller submitted and cancelled now: finished,
    so that a delete of it is a 204.
    """
    import requests

    base = case.operation.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    made = requests.post(f"{base}/v1/jobs", json={"command": ["true"]}, headers=headers,
                         timeout=10)
    made.raise_for_status()
    job_id = made.json()["id"]
    requests.post(f"{base}/v1/jobs/{job_id}/cancel", headers=headers,
                  timeout=10).raise_for_status()
    return job_id


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
