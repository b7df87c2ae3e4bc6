"""
The server and the document it serves agree both ways, checked with
schemathesis against a real daemon: what the schema forbids is refused
with a status the operation documents, what it allows is accepted, and
every answer is one the document describes; and each operation answers
its callers as its C{security} and C{x-roles} say: an admin, each other
role, and a caller with no credential at all.
"""

import os
import subprocess
import sys
import uuid

import pytest
from schemathesis.core.warnings import SchemathesisWarning

from dispatcher.api._routes import ROUTES

from .conftest import WORKER_TOKEN
from .schemathesis_hooks import MAX_ARRAY, NO_CREDENTIAL, role_verdict
from .test_twistd import ROOT, Twistd

BIN = os.path.dirname(sys.executable)

INI = f"""
[executor]
slots = 0
[dispatcher]
max_array = {MAX_ARRAY}
[tasks]
add = tests.tasks:add
[api]
token_file = {{admin_token_file}}
[workers]
token_file = {{token_file}}
"""
# The admin's token: a token file's, which the API cannot revoke, so that
# the admin's run, which revokes the credentials it finds listed, keeps
# its own.
ADMIN_TOKEN = "contract-admin-token-0123456789"

CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,"
    "response_schema_conformance,negative_data_rejection,positive_data_acceptance,"
    # Every secured operation that answered 2xx is sent again without the
    # credential and with a made-up one, and must refuse both (401/403).
    "ignored_auth,"
    # tests/schemathesis_hooks.py: the caller's role against x-roles.
    "RolesEnforced"
)

# The runs: who calls, and how many requests each operation gets.  The
# admin's run is the thorough one (the coverage phase's boundary and
# negative cases, then fuzzing); the others are short, since the head
# check decides on who calls, not on what the body holds, and the suite
# must stay within minutes on two cores.
RUNS = {
    "admin": ("coverage,fuzzing", 25),
    "submitter": ("fuzzing", 5),
    "reader": ("fuzzing", 5),
    "worker": ("fuzzing", 5),
    NO_CREDENTIAL: ("fuzzing", 4),
}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One daemon for every run."""
    workdir = tmp_path_factory.mktemp("contract")
    token_file = workdir / "worker.token"
    token_file.write_text(WORKER_TOKEN + "\n")
    token_file.chmod(0o600)  # one others may read is refused
    admin_token_file = workdir / "admin.token"
    admin_token_file.write_text(ADMIN_TOKEN + "\n")
    admin_token_file.chmod(0o600)  # one others may read is refused
    daemon = Twistd(str(workdir), INI.format(token_file=token_file,
                                             admin_token_file=admin_token_file))
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


def credential_of(daemon, caller):
    """The token the run of C{caller} sends: the admin's, a credential of
    that role made now (under a name no earlier run can have listed and
    revoked), or none."""
    if caller == "admin":
        return ADMIN_TOKEN
    if caller == NO_CREDENTIAL:
        return None
    code, made = daemon.request("POST", "/v1/credentials",
                                {"name": f"contract-{caller}-{uuid.uuid4().hex[:8]}",
                                 "role": caller}, token=ADMIN_TOKEN)
    assert code == 201, made
    return made["token"]


def seed_retry(daemon, where):
    """
    Give the admin's run a job it can retry: one cancelled now, whose id
    every generated retry names (the text of schemathesis's config file,
    which goes in C{where}, its working directory).  With slots = 0 no job fails, and a retry
    otherwise succeeded only when the ids schemathesis reused from earlier
    answers happened to name a job its own cancels had cancelled: any
    change to another operation's answers could leave every retry refused,
    and the run then warned that its test data was missing.
    """
    code, job = daemon.request("POST", "/v1/jobs", {"command": ["true"]}, token=ADMIN_TOKEN)
    assert code == 201, job
    code, job = daemon.request("POST", f"/v1/jobs/{job['id']}/cancel", token=ADMIN_TOKEN)
    assert (code, job["state"]) == (200, "cancelled"), job
    return (
        '[[operations]]\ninclude-operation-id = "retryJob"\n'
        f'parameters = {{ id = "{job["id"]}" }}\n'
    )


def seed_groups(daemon, token):
    """
    Give a run an array and a batch to read, cancel and retry (issue 17):
    each made by C{token}'s caller (the admin's, for a caller that cannot
    submit) and cancelled now, named by every generated request of their
    operations.  A generated id names no group, and every answer would be
    a 404.
    """
    if token is None or token == WORKER_TOKEN:
        token = ADMIN_TOKEN
    code, made = daemon.request("POST", "/v1/jobs", {"command": ["true"], "array": 1},
                                token=token)
    if code == 403:
        token = ADMIN_TOKEN
        code, made = daemon.request("POST", "/v1/jobs", {"command": ["true"], "array": 1},
                                    token=token)
    assert code == 201, made
    array_id = made["jobs"][0]["array_id"]
    code, batch = daemon.request("POST", "/v1/jobs/batch", {"jobs": [{"command": ["true"]}]},
                                 token=token)
    assert code == 201, batch
    text = ""
    for kind, group_id in (("Array", array_id), ("Batch", batch["batch_id"])):
        plural = "arrays" if kind == "Array" else "batches"
        code, _ = daemon.request("POST", f"/v1/{plural}/{group_id}/cancel", token=token)
        assert code == 200
        for operation in ("get", "cancel", "retry"):
            text += (
                f'[[operations]]\ninclude-operation-id = "{operation}{kind}"\n'
                f'parameters = {{ id = "{group_id}" }}\n'
            )
    return text


@pytest.mark.parametrize("caller", list(RUNS))
def test_the_server_and_its_document_agree(served, caller, tmp_path):
    """Requests generated from /v1/openapi.json (a fixed number per
    operation, deterministic), sent as an admin, a submitter, a reader, a
    worker or with no credential: a body the schema refuses is refused
    with a documented 4xx, one it takes is taken (2xx) when the caller's
    role may call the operation, and no answer is a 500 or undocumented;
    an operation that answered 2xx refuses the same request without the
    credential; a role x-roles leaves out gets 403, a role it names never
    401/403, and no credential gets 401 from every secured operation."""
    daemon = served
    token = credential_of(daemon, caller)
    phases, examples = RUNS[caller]
    args = [
        os.path.join(BIN, "st"), "run", daemon.url + "/v1/openapi.json",
        "--checks", CHECKS,
        "--max-examples", str(examples),
        "--generation-deterministic",
        "--phases", phases,
        "--workers", "1",
        "--no-shrink",
        "--suppress-health-check", "all",
        "--request-timeout", "10",
    ]
    if token is not None:
        args += ["--header", f"Authorization: Bearer {token}"]
    seeds = seed_groups(daemon, token)
    if caller == "admin":
        seeds += seed_retry(daemon, tmp_path)
    (tmp_path / "schemathesis.toml").write_text(seeds)
    if caller != "admin":
        # Every warning but the one saying that some operations answered
        # only 401/403: for this caller they must.
        args += ["--warnings", ",".join(
            w.value for w in SchemathesisWarning if w is not SchemathesisWarning.MISSING_AUTH)]
    result = subprocess.run(
        args,
        cwd=str(tmp_path),
        env=dict(os.environ, PYTHONPATH=ROOT, SCHEMATHESIS_HOOKS="tests.schemathesis_hooks",
                 DISPATCHER_CONTRACT_CALLER=caller, DISPATCHER_CONTRACT_TOKEN=token or ""),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "No issues found" in result.stdout
    # Every operation but the document itself (which schemathesis leaves
    # out) was tried, the worker endpoints included.
    served_routes = [r for r in ROUTES if not r.path.startswith("/v1/openapi")]
    assert f"{len(served_routes)} selected" in result.stdout
    assert f"Tested: {len(served_routes)}" in result.stdout


@pytest.mark.parametrize("caller, roles, status, field, wrong", [
    ("submitter", ["admin", "submitter"], 201, None, False),
    ("submitter", ["admin", "submitter"], 404, "id", False),
    ("submitter", ["admin", "submitter"], 403, "Authorization", True),
    ("submitter", ["admin", "submitter"], 401, "Authorization", True),
    ("worker", ["admin", "worker"], 403, "worker.name", False),
    ("reader", ["admin", "submitter"], 403, "Authorization", False),
    ("reader", ["admin", "submitter"], 403, "worker.name", True),
    ("reader", ["admin", "submitter"], 201, None, True),
    ("reader", ["admin", "submitter"], 400, "command", True),
    ("reader", ["admin", "submitter"], 404, "id", True),
    ("worker", ["admin", "reader", "submitter"], 401, "Authorization", True),
    (NO_CREDENTIAL, ["admin", "reader", "submitter", "worker"], 401, "Authorization", False),
    (NO_CREDENTIAL, ["admin", "reader", "submitter", "worker"], 200, None, True),
    (NO_CREDENTIAL, ["admin"], 403, "Authorization", True),
    (NO_CREDENTIAL, ["admin"], 404, None, True),
    (NO_CREDENTIAL, None, 200, None, False),
    (NO_CREDENTIAL, None, 401, "Authorization", True),
    ("reader", None, 403, "Authorization", True),
])
def test_the_role_check_fails_a_wrong_answer(caller, roles, status, field, wrong):
    """The hooks' role check (RolesEnforced) finds fault with a refusal of
    a role x-roles names, with anything but the head check's 403 to a role
    it leaves out, with anything but 401 without a credential, and with a
    refusal on an open operation; and with nothing else (a worker
    credential's 403 for a worker name not its own is no refusal of its
    role)."""
    assert (role_verdict(caller, roles, status, field) is not None) is wrong
