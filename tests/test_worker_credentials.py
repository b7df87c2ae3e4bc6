"""
Worker credentials and unguessable leases (issue 15): a worker credential
acts only under its own worker names, a write about another worker's lease
changes nothing, a log chunk is written only for the lease's holder, lease
tokens cannot be guessed, and what one credential can make the dispatcher
hold (leases in one poll, worker names, the size of a description) is
bounded.
"""

import json
import os
import stat
import subprocess
import urllib.error
import urllib.request

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from dispatcher.app._daemon import LEASE_KEY_NAME, CannotStart, DaemonService
from dispatcher.core._hub import WorkerHub
from dispatcher.model._jobs import Offer
from dispatcher.model._principals import Role
from dispatcher.model._workers import TooManyWorkerNames
from dispatcher.wire import _tokens
from dispatcher.wire._tokens import KEY_BYTES, MAC_BYTES, NO_TOKEN, LeaseTokens, new_key
from dispatcher.wire._types import (
    MAX_LABEL,
    MAX_SLOTS,
    MAX_TASK_NAME,
    MAX_WORKER_LABELS,
    MAX_WORKER_TASKS,
)

from bench import name_flood

from .conftest import run_clock
from .postgres import one_dispatcher_only
from .test_hub import FakeRecorder, FakeScheduler
from .test_leases import TOKEN, call, lease, make_pure, result, worker  # noqa: F401
from .test_remote import get, log_of, poll, submit
from .test_twistd import BIN, ROOT, Twistd
from .test_worker import WorkerProcess, wait_for, workers  # noqa: F401 (a fixture)

LOG = "/v1/leases/log"
OCTETS = {"Content-Type": ["application/octet-stream"]}


def credential(daemon, name, *worker_names):
    """Make a worker credential of C{daemon} as C{dispatcher token create
    NAME --role worker --worker-name ...} does, and give its bearer token:
    the principal C{name}, which may act under C{worker_names} alone."""
    token, _ = daemon.service.credentials.create(name, Role.WORKER, worker_names)
    return token


@pytest.fixture
def logged():
    """Every event logged during the test."""
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


async def heartbeat(daemon, who, granted, token=TOKEN):
    items = [{"job_id": g["job_id"], "token": g["token"]} for g in granted]
    return await call(daemon, "/v1/leases/heartbeat", {"worker": who, "leases": items}, token)


async def append_log(daemon, granted, data, token=TOKEN, offset=0, job_id=None):
    path = (f"{LOG}?job_id={job_id or granted['job_id']}&token={granted['token']}"
            f"&stream=stdout&offset={offset}")
    headers = dict(OCTETS, Authorization=[f"Bearer {token}"])
    return await daemon.json("POST", path, raw=data, headers=headers)


async def job_log(daemon, job_id):
    response, content = await daemon.request("GET", f"/v1/jobs/{job_id}/log")
    assert response.code == 200
    return content


async def state(daemon, job_id):
    code, job = await daemon.json("GET", f"/v1/jobs/{job_id}")
    assert code == 200
    return job["state"]


def forged(granted, counter=None, mac=None):
    """The token of C{granted} with its counter or its MAC changed."""
    digits, _, given = granted["token"].partition(".")
    return f"{counter if counter is not None else digits}.{mac if mac is not None else given}"


# Worker names

@pytest_twisted.ensureDeferred
async def test_a_credential_acts_only_under_its_own_worker_names(make_pure):
    """A request for work, a heartbeat or a report under a worker name the
    credential may not use is a 403 naming worker.name, and the dispatcher
    neither hears of that worker nor changes a job."""
    daemon = await make_pure()
    node_b = credential(daemon, "node-b-cred", "node-b")
    job = await daemon.submit({"command": ["true"]})
    for path, body in [
        ("/v1/leases", {"worker": worker("node-a"), "wait": 0}),
        ("/v1/leases/heartbeat", {"worker": worker("node-a"), "leases": []}),
        ("/v1/leases/results", {"worker": worker("node-a"), "results": []}),
    ]:
        code, answer = await call(daemon, path, body, node_b)
        assert code == 403, (path, answer)
        assert answer["error"]["code"] == "forbidden"
        assert answer["error"]["field"] == "worker.name"
    code, listed = await daemon.json("GET", "/v1/workers")
    assert listed["workers"] == []
    assert "node-a" not in daemon.service.dispatcher.hub.workers
    assert await state(daemon, job["id"]) == "queued"
    # Under its own name it works.
    code, answer = await call(daemon, "/v1/leases", {"worker": worker("node-b"), "wait": 0},
                              node_b)
    assert code == 200 and [g["job_id"] for g in answer["leases"]] == [job["id"]]


@pytest_twisted.ensureDeferred
async def test_no_credential_reports_for_another_workers_lease(make_pure):
    """A credential that knows another worker's lease (its job and token)
    cannot end it: a result under that worker's name is a 403, and under
    its own name every write (heartbeat, result, release) is refused as
    stale (409); the job stays the holder's, which then reports it."""
    daemon = await make_pure()
    node_a = credential(daemon, "node-a-cred", "node-a")
    node_b = credential(daemon, "node-b-cred", "node-b")
    job = await daemon.submit({"command": ["sleep", "100"]})
    (granted,) = await lease_as(daemon, worker("node-a"), node_a)
    code, answer = await call(daemon, "/v1/leases/results",
                              {"worker": worker("node-a"), "results": [result(granted)]}, node_b)
    assert code == 403 and answer["error"]["field"] == "worker.name"
    b = worker("node-b")
    code, answer = await heartbeat(daemon, b, [granted], node_b)
    assert code == 409 and answer["leases"][0]["reason"] == "superseded"
    for state_name in ("succeeded", "released"):
        item = result(granted, state=state_name)
        code, answer = await call(daemon, "/v1/leases/results",
                                  {"worker": b, "results": [item]}, node_b)
        assert code == 409 and answer["results"][0]["ok"] is False, answer
    assert await state(daemon, job["id"]) == "running"
    code, answer = await heartbeat(daemon, worker("node-a"), [granted], node_a)
    assert code == 200 and answer["leases"][0]["ok"] is True
    code, answer = await call(daemon, "/v1/leases/results", {
        "worker": worker("node-a"),
        "results": [result(granted, state="failed", exit_code=1)]}, node_a)
    assert code == 200 and answer["results"][0]["ok"] is True
    done = await daemon.wait(job["id"])
    assert done["state"] == "failed" and done["attempts"][0]["holder"] == "node-a"


async def lease_as(daemon, who, credential, max_jobs=None):
    body = {"worker": who, "wait": 0}
    if max_jobs is not None:
        body["max_jobs"] = max_jobs
    code, answer = await call(daemon, "/v1/leases", body, credential)
    assert code == 200, answer
    return answer["leases"]


@pytest_twisted.ensureDeferred
async def test_only_the_holder_writes_its_jobs_log(make_pure):
    """A log chunk for a lease is written only for a credential that may
    act as the lease's holder: another credential, even with the right
    token, gets a 409 and the log is as the holder wrote it."""
    daemon = await make_pure()
    node_a = credential(daemon, "node-a-cred", "node-a")
    node_b = credential(daemon, "node-b-cred", "node-b")
    job = await daemon.submit({"command": ["sleep", "100"]})
    (granted,) = await lease_as(daemon, worker("node-a"), node_a)
    code, answer = await append_log(daemon, granted, b"mine\n", node_a)
    assert code == 200 and answer == {"size": 5}
    for offset in (0, 5):
        code, answer = await append_log(daemon, granted, b"theirs\n", node_b, offset)
        assert code == 409 and answer["error"]["code"] == "stale_lease", answer
    assert await job_log(daemon, job["id"]) == b"mine\n"


@pytest_twisted.ensureDeferred
async def test_no_worker_writes_a_log_with_a_token_it_was_not_given(make_pure):
    """With the one shared workers' token, a second worker that knows a
    job's id but not its lease token cannot write the job's log: a token
    with the lease's counter and a wrong MAC, or another job's token, is
    refused as stale and writes nothing."""
    daemon = await make_pure()
    jobs = [await daemon.submit({"command": ["sleep", "100"]}) for _ in range(2)]
    first, second = await lease(daemon, worker("node-a"), max_jobs=2)
    code, answer = await append_log(daemon, first, b"mine\n")
    assert code == 200
    mac = forged(first).partition(".")[2]
    wrong = ("B" if mac[0] == "A" else "A") + mac[1:]
    for token in [forged(first, mac=wrong), forged(first, mac="A" * 22),
                  second["token"]]:
        code, answer = await append_log(daemon, dict(first, token=token), b"theirs\n")
        assert code == 409 and answer["error"]["code"] == "stale_lease", (token, answer)
    assert await job_log(daemon, jobs[0]["id"]) == b"mine\n"


# Lease tokens

@pytest_twisted.ensureDeferred
async def test_lease_tokens_cannot_be_guessed(make_pure):
    """Two consecutive leases' tokens share no guessable relation: each
    carries 128 bits of MAC, unlike the other's; the next counter with the
    first token's MAC, or a MAC changed in one character, is refused in
    every write (heartbeat, result, held) as a stale token is, and changes
    nothing."""
    daemon = await make_pure()
    who = dict(worker("w", slots=2), instance="a" * 16)
    jobs = [await daemon.submit({"command": ["sleep", "100"]}) for _ in range(2)]
    (first,) = await lease(daemon, who, max_jobs=1)
    code, answer = await call(daemon, "/v1/leases", {
        "worker": who, "wait": 0, "max_jobs": 1,
        "held": [{"job_id": first["job_id"], "token": first["token"]}]})
    (second,) = answer["leases"]
    assert isinstance(first["token"], str) and isinstance(second["token"], str)
    macs = [g["token"].partition(".")[2] for g in (first, second)]
    assert all(len(mac) * 6 >= MAC_BYTES * 8 >= 128 for mac in macs)
    assert macs[0] != macs[1]
    counter = int(first["token"].partition(".")[0])
    guesses = [
        forged(second, counter=counter + 1, mac=macs[0]),
        forged(second, mac=("A" if macs[1][0] != "A" else "B") + macs[1][1:]),
        forged(second, mac=macs[1][:-1] + ("A" if macs[1][-1] != "A" else "B")),
        forged(second, counter=counter),
    ]
    for guess in guesses:
        code, answer = await heartbeat(daemon, who, [dict(second, token=guess)])
        assert code == 409, (guess, answer)
        assert answer["leases"][0] == {
            "job_id": second["job_id"], "token": guess, "ok": False, "status": 409,
            "reason": "superseded",
            "message": "this lease is no longer the job's current one; stop it"}
        code, answer = await call(daemon, "/v1/leases/results", {
            "worker": who, "results": [result(dict(second, token=guess))]})
        assert code == 409 and answer["results"][0]["reason"] == "superseded"
    code, answer = await heartbeat(daemon, who, [first, second])
    assert code == 200 and [a["ok"] for a in answer["leases"]] == [True, True]
    # A held list that gives a guess for the second lease does not list it:
    # the same process asking without its real token shows it never got
    # that lease, which goes back to the queue; its real token is then
    # stale.  (Had the guess counted, the lease would have stayed.)
    code, answer = await call(daemon, "/v1/leases", {
        "worker": who, "wait": 0, "max_jobs": 1,
        "held": [{"job_id": first["job_id"], "token": first["token"]},
                 {"job_id": second["job_id"], "token": guesses[0]}]})
    assert code == 200
    code, answer = await heartbeat(daemon, who, [first, second])
    assert [a["ok"] for a in answer["leases"]] == [True, False]


def test_a_token_opens_only_for_its_job_under_its_key():
    """A sealed token opens to its counter for its own job under the key
    that sealed it; for another job, under another key, changed in any
    character, or malformed, it opens to nothing."""
    key = new_key()
    assert len(key) == KEY_BYTES == 32
    tokens = LeaseTokens(key)
    token = tokens.seal("job-1", 41)
    assert token.startswith("41.") and tokens.open("job-1", token) == 41
    assert LeaseTokens(key).open("job-1", token) == 41
    assert tokens.open("job-2", token) == NO_TOKEN
    assert LeaseTokens(new_key()).open("job-1", token) == NO_TOKEN
    for i in range(3, len(token)):
        changed = token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1:]
        assert tokens.open("job-1", changed) == NO_TOKEN, changed
    for bad in ["41", "41.", token + "\n", token + "A", "0." + "A" * 22,
                f"{2**63}." + token.partition(".")[2], 41, None, "é" * 25]:
        assert tokens.open("job-1", bad) == NO_TOKEN, bad
    # Consecutive counters' MACs have nothing in common a guess could use.
    macs = [tokens.seal("job-1", n).partition(".")[2] for n in range(1000)]
    assert len(set(macs)) == 1000
    with pytest.raises(RuntimeError):
        LeaseTokens().seal("job-1", 1)


def test_tokens_remembered_open_as_their_mac_does(monkeypatch):
    """A token sealed or opened lately opens again without a MAC, to the
    same counter, for its own job alone; a token changed in any character
    is still refused; a new key forgets every one; and no more than
    REMEMBERED_TOKENS are kept, the oldest forgotten (and opened by MAC
    again)."""
    monkeypatch.setattr(_tokens, "REMEMBERED_TOKENS", 3)
    tokens = LeaseTokens(new_key())
    sealed = [tokens.seal(f"job-{n}", n + 10) for n in range(5)]
    macs = []
    monkeypatch.setattr(tokens, "_mac", lambda job_id, counter: macs.append(job_id) or "x")
    # The last three sealed open by lookup; the first two are forgotten.
    assert [tokens.open(f"job-{n}", sealed[n]) for n in (2, 3, 4)] == [12, 13, 14]
    assert macs == []
    assert tokens.open("job-2", sealed[3]) == NO_TOKEN and macs == ["job-2"]
    for i in range(3, len(sealed[4])):
        changed = sealed[4][:i] + ("A" if sealed[4][i] != "A" else "B") + sealed[4][i + 1:]
        assert tokens.open("job-4", changed) == NO_TOKEN, changed
    monkeypatch.undo()
    tokens.use_key(new_key())
    assert tokens.open("job-4", sealed[4]) == NO_TOKEN


@pytest_twisted.ensureDeferred
async def test_the_key_is_made_once_and_kept_private(make_pure, tmp_path):
    """The dispatcher makes its lease token key on first start, readable by
    its own user alone, keeps it across restarts (a lease's token still
    verifies), and refuses to start with a damaged one, saying which file
    to remove."""
    one_dispatcher_only("a restart resumes the workers' leases only on a store of its own")
    clock = Clock()
    clock.advance(1000)
    data = tmp_path / "keep"
    daemon = await make_pure(clock=clock, data_dir=data)
    path = data / LEASE_KEY_NAME
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    made = path.read_bytes()
    assert len(bytes.fromhex(made.decode().strip())) == KEY_BYTES
    await daemon.submit({"command": ["sleep", "100"]})
    (granted,) = await lease(daemon, worker("w"))
    await daemon.service.stopService()
    daemon = await make_pure(clock=clock, data_dir=data)
    assert path.read_bytes() == made
    code, answer = await heartbeat(daemon, worker("w"), [granted])
    assert code == 200 and answer["leases"][0]["ok"] is True
    await daemon.service.stopService()
    path.write_text("not a key\n")
    config = daemon.service.config
    service = DaemonService(reactor, config, serverFromString(reactor, "tcp:0:interface=127.0.0.1"),
                            stop_reactor=False)
    service.startService()
    try:
        with pytest.raises(CannotStart, match=f"{path} does not hold a lease token key.*remove it"):
            await service.ready
        assert service.port is None
    finally:
        await service.stopService()


# What one credential can make the dispatcher hold

@pytest_twisted.ensureDeferred
async def test_one_poll_gets_at_most_max_jobs_per_poll(make_pure):
    """A request for 2,000 jobs from a worker offering 2,000 slots is
    granted [workers] max_jobs_per_poll of them (64 by default), and the
    rest stay queued for the next request."""
    daemon = await make_pure()
    await daemon.batch([{"command": ["true"]}] * 2000)
    got = await lease(daemon, worker("greedy", slots=2000), max_jobs=2000)
    assert len(got) == 64
    code, queues = await daemon.json("GET", "/v1/queues")
    assert queues["queues"]["default"]["counts"]["queued"] == 2000 - 64


@pytest_twisted.ensureDeferred
async def test_max_jobs_per_poll_is_configured(make_pure):
    """[workers] max_jobs_per_poll sets how many leases one request for work
    is granted."""
    daemon = await make_pure("max_jobs_per_poll = 3\n")
    await daemon.batch([{"command": ["true"]}] * 10)
    assert len(await lease(daemon, worker("w", slots=10))) == 3


@pytest_twisted.ensureDeferred
async def test_a_description_beyond_the_bounds_is_400_naming_the_field(make_pure):
    """Slots or max_jobs beyond what any worker runs at once, too many
    labels or tasks, or a label or task name too long, is a 400 that names
    the field, and the dispatcher keeps nothing of that worker."""
    daemon = await make_pure()
    await daemon.submit({"command": ["true"]})
    labels = {f"k{i}": "v" for i in range(MAX_WORKER_LABELS + 1)}
    for body, field in [
        ({"worker": worker("w", slots=100_000)}, "worker.slots"),
        ({"worker": worker("w", slots=MAX_SLOTS), "max_jobs": MAX_SLOTS + 1}, "max_jobs"),
        ({"worker": worker("w", slots=2), "max_jobs": 2000}, "max_jobs"),
        ({"worker": worker("w", labels=labels)}, "worker.labels"),
        ({"worker": worker("w", labels={"k" * (MAX_LABEL + 1): "v"})},
         "worker.labels." + "k" * (MAX_LABEL + 1)),
        ({"worker": worker("w", labels={"k": "v" * (MAX_LABEL + 1)})}, "worker.labels.k"),
        ({"worker": worker("w", tasks=["t"] * (MAX_WORKER_TASKS + 1))}, "worker.tasks"),
        ({"worker": worker("w", tasks=["t" * (MAX_TASK_NAME + 1)])}, "worker.tasks[0]"),
    ]:
        code, answer = await call(daemon, "/v1/leases", dict(body, wait=0))
        assert code == 400, (field, answer)
        assert answer["error"]["field"] == field, answer
    assert daemon.service.dispatcher.hub.workers == {}


@pytest_twisted.ensureDeferred
async def test_worker_names_are_bounded_per_credential_and_in_all(
        make_pure, logged):
    """A credential may have [workers] max_names_per_credential worker names
    connected, and all together max_names: a new name beyond is a 429
    naming worker.name that changes nothing, while the names already
    connected keep working and other credentials keep theirs; a name is
    logged with its credential when first heard; a name unheard from for
    a lease's life makes room for a new one."""
    clock = Clock()
    clock.advance(1000)
    daemon = await make_pure(
        "max_names_per_credential = 3\nmax_names = 5\n", clock=clock)
    fleet = credential(daemon, "fleet", "a1", "a2", "a3", "a4")
    other = credential(daemon, "other", "b1", "b2", "b3")
    for name in ("a1", "a2", "a3"):
        await contact(daemon, name, fleet)
    # (Heartbeats: a request for work would wait on the test's clock.  The
    # flood below is refused its requests for work.)
    code, answer = await call(daemon, "/v1/leases/heartbeat",
                              {"worker": worker("a4"), "leases": []}, fleet)
    assert code == 429, answer
    assert answer["error"] == {
        "code": "too_many_worker_names", "field": "worker.name",
        "message": "worker.name: 'a4' is refused: credential fleet already has 3 worker "
        "names connected ([workers] max_names_per_credential); reuse a name, or wait "
        "until a worker gone silent is forgotten (a lease's life after its last contact)"}
    code, answer = await call(daemon, "/v1/leases/results",
                              {"worker": worker("a4"), "results": []}, fleet)
    assert code == 429, answer
    hub = daemon.service.dispatcher.hub
    assert sorted(hub.workers) == ["a1", "a2", "a3"]
    await contact(daemon, "a1", fleet)
    await contact(daemon, "b1", other)
    await contact(daemon, "b2", other)
    code, answer = await call(daemon, "/v1/leases/heartbeat",
                              {"worker": worker("b3"), "leases": []}, other)
    assert code == 429 and "the dispatcher already has 5 worker names" in answer["error"]["message"]
    first_heard = [e for e in logged if "heard from for the first time" in e.get("log_format", "")]
    assert [(e["name"], e["credential"]) for e in first_heard] == [
        ("a1", "fleet"), ("a2", "fleet"), ("a3", "fleet"), ("b1", "other"), ("b2", "other")]
    refusals = [e for e in logged if "new worker names refused" in e.get("log_format", "")]
    assert len(refusals) == 1
    # a2, a3 and b2 go silent; a1 and b1 keep calling.  After a lease's
    # life the silent ones are forgotten to make room.
    for _ in range(31):
        run_clock(clock, 1)
        await contact(daemon, "a1", fleet)
        await contact(daemon, "b1", other)
    await contact(daemon, "a4", fleet)
    await contact(daemon, "b3", other)
    assert sorted(hub.workers) == ["a1", "a4", "b1", "b3"]


async def contact(daemon, name, credential):
    """The worker C{name} calls with C{credential} (a heartbeat: a request for
    work would wait on the test's clock)."""
    code, answer = await heartbeat(daemon, worker(name), [], credential)
    assert code == 200, answer


def test_the_hub_forgets_no_connected_name_to_make_room():
    """At its limit the hub forgets only names no longer connected (no
    lease, no poll open, unheard from for a lease's life); a credential's
    names are counted apart from another's."""
    clock = Clock()
    clock.advance(1000)
    hub = WorkerHub(FakeScheduler(), clock, 30.0, FakeRecorder(), lambda: None,
                    max_names_per_credential=2, max_names=3)
    hub.accepting = True
    hub.contact(Offer("a1", 1), "a")
    hub.contact(Offer("a2", 1), "a")
    with pytest.raises(TooManyWorkerNames) as refused:
        hub.contact(Offer("a3", 1), "a")
    assert refused.value.per_credential and refused.value.limit == 2
    hub.contact(Offer("b1", 1), "b")
    with pytest.raises(TooManyWorkerNames) as refused:
        hub.contact(Offer("b2", 1), "b")
    assert not refused.value.per_credential and refused.value.limit == 3
    clock.advance(29)
    hub.contact(Offer("a1", 1), "a")
    clock.advance(2)
    # a2 and b1 are a lease's life silent, a1 is not.
    hub.contact(Offer("a3", 1), "a")
    hub.contact(Offer("b2", 1), "b")
    assert sorted(hub.workers) == ["a1", "a3", "b2"]


def test_a_flood_of_fake_worker_names_does_not_grow_memory_without_bound(tmp_path, token_file):
    """A real twistd dispatcher asked for work under 2,000 made-up worker
    names, each with the largest description it takes, keeps 256 of them
    ([workers] max_names_per_credential) and refuses the rest with a 429:
    its memory grows by what 256 descriptions take (about 20 MB), where
    before it kept every name (162 MB for this flood, 440 MB in the
    issue's)."""
    daemon = Twistd(str(tmp_path),
                    f"[executor]\nslots = 0\n[workers]\ntoken_file = {token_file}\n")
    daemon.start()
    try:
        measured = name_flood.flood(daemon.url, TOKEN, daemon.process.pid, 2000)
    finally:
        daemon.stop()
    print("flood:", measured)
    assert measured["accepted"] == 256 and measured["refused"] == 2000 - 256
    assert measured["other"] == 0
    assert measured["rss_after_kib"] - measured["rss_before_kib"] < 64 * 1024, measured


# End to end: a real twistd, real `dispatcher worker` processes, credentials
# made with `dispatcher token create`

def make_worker_credential(daemon, tmp_path, name, *worker_names):
    """Make a worker credential of the running C{daemon} with the CLI, and
    write its token (the last line of the output) to a file a worker reads."""
    args = [os.path.join(BIN, "dispatcher"), "token", "create", name, "--role", "worker",
            "--data-dir", os.path.join(daemon.workdir, "data")]
    for worker_name in worker_names:
        args += ["--worker-name", worker_name]
    made = subprocess.run(args, capture_output=True, text=True, timeout=30,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert made.returncode == 0, made.stderr
    path = tmp_path / f"{name}.token"
    path.write_text(made.stdout.splitlines()[-1] + "\n")
    path.chmod(0o600)  # one others may read is refused
    return path


def worker_call(daemon, path, body, token):
    """POST a worker request with C{token}: the status and the answer."""
    request = urllib.request.Request(
        daemon.url + path, data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_workers_with_credentials_of_their_own(tmp_path, workers):
    """A real twistd dispatcher and real worker processes, each with its own
    credential made by `dispatcher token create`: a worker started under a
    name its credential does not list is refused (403, logged by the worker)
    and runs nothing; node-a runs a job under its unguessable lease, and
    another credential can neither report it under node-a's name (403) nor
    write its log or its result with a guessed token (409), so the job ends
    as node-a reported it, with node-a's output; node-b then runs one under
    its own name."""
    daemon = Twistd(str(tmp_path), "[executor]\nslots = 0\n")
    daemon.start()
    try:
        a_token = make_worker_credential(daemon, tmp_path, "node-a-cred", "node-a")
        b_token = make_worker_credential(daemon, tmp_path, "node-b-cred", "node-b")
        b = b_token.read_text().strip()
        stray = WorkerProcess(tmp_path, daemon.url, b_token, slots=1, name="node-x")
        workers.append(stray.start())
        wait_for(lambda: "403 forbidden" in stray.output())
        assert "credential node-b-cred may not act as worker 'node-x'" in stray.output()

        job = submit(daemon, {"command": ["sh", "-c", "echo from-node-a; sleep 2"]})
        node_a = WorkerProcess(tmp_path, daemon.url, a_token, slots=1, name="node-a")
        workers.append(node_a.start())
        running = poll(lambda: (lambda j: j if j["state"] == "running" else None)(
            get(daemon, job["id"])), what="the job to run on node-a")
        assert running["worker"] == "node-a"
        guess = "1." + "A" * 22
        code, answer = worker_call(daemon, "/v1/leases/results", {
            "worker": {"name": "node-a", "slots": 1},
            "results": [{"job_id": job["id"], "token": guess, "state": "succeeded"}]}, b)
        assert code == 403 and answer["error"]["field"] == "worker.name", answer
        code, answer = worker_call(daemon, "/v1/leases/results", {
            "worker": {"name": "node-b", "slots": 1},
            "results": [{"job_id": job["id"], "token": guess, "state": "succeeded"}]}, b)
        assert code == 409 and answer["results"][0]["reason"] == "superseded", answer
        request = urllib.request.Request(
            f"{daemon.url}/v1/leases/log?job_id={job['id']}&token={guess}"
            "&stream=stdout&offset=0",
            data=b"forged\n", method="POST",
            headers={"Content-Type": "application/octet-stream",
                     "Authorization": f"Bearer {b}"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 409
        done = poll(lambda: (lambda j: j if j["state"] in ("succeeded", "failed") else None)(
            get(daemon, job["id"])), what="node-a's result")
        assert done["state"] == "succeeded" and done["attempts"][0]["holder"] == "node-a"
        assert log_of(daemon, job["id"]) == "from-node-a\n"
        assert "(token" not in node_a.output()

        node_b = WorkerProcess(tmp_path, daemon.url, b_token, slots=1, name="node-b")
        workers.append(node_b.start())
        second = submit(daemon, {"command": ["true"]})
        done = poll(lambda: (lambda j: j if j["state"] == "succeeded" else None)(
            get(daemon, second["id"])), what="a job on node-a or node-b")
        assert done["attempts"][0]["holder"] in ("node-a", "node-b")
        code, listed = daemon.request("GET", "/v1/workers")
        assert sorted(w["name"] for w in listed["workers"]) == ["node-a", "node-b"]
        assert "403 forbidden" in stray.output() and "leased" not in stray.output()
    finally:
        daemon.stop()
