"""
The worker hub's lease bookkeeping on a Clock, with a fake scheduler and
recorder: what a stalled dispatcher does with leases whose expiry passed
while it could not run, and how leases whose grant never reached their
worker go back to the queue unspent (issue 14, findings 1 and 3).
"""

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from dispatcher.core._hub import WorkerHub
from dispatcher.model._jobs import JobSpec, JobState, Lease, Offer, Outcome
from dispatcher.store._results import ResumedLease, Written

from .conftest import run_clock
from .postgres import one_dispatcher_only
from .test_leases import call, lease, make_pure, worker  # noqa: F401 (a fixture)

LEASE_SECONDS = 30.0


class FakeScheduler:
    """Remembers the free slots each holder's long-poll asks for."""

    def __init__(self):
        self.free = {}

    def set_free(self, holder, free):
        self.free[holder] = free

    def remove_holder(self, holder):
        self.free.pop(holder, None)

    def claiming(self, holder):
        return False

    def slots_freed(self, holder, count=1):
        pass


class FakeRecorder:
    """Records every end of a lease; a finish answers when the test says
    (finishing), or at once."""

    def __init__(self):
        self.finished = []
        self.released = []
        self.finishing = None
        self.servers = []

    def finish(self, lease, outcome, now, server=None):
        self.finished.append((lease, outcome, now))
        self.servers.append(server)
        return self.finishing if self.finishing is not None else succeed(None)

    def release(self, lease, now, reason):
        self.released.append((lease, now, reason))
        return succeed(None)

    def mark_running(self, lease, now):
        return succeed(None)


class Hub:
    """A WorkerHub on a Clock, with helpers that speak for a worker."""

    def __init__(self, start=1000.0, lists=True):
        self.clock = Clock()
        self.clock.advance(start)
        self.scheduler = FakeScheduler()
        self.recorder = FakeRecorder()
        self.hub = WorkerHub(
            self.scheduler, self.clock, LEASE_SECONDS, self.recorder, lambda: None
        )
        self.hub.accepting = True
        self.tokens = iter(range(100, 1000))
        # What the worker process "a" holds, and whether its requests for
        # work list it (the stall tests speak as a worker that does not).
        self.held = []
        self.lists = lists

    def offer(self, instance="a" * 16, slots=2):
        return Offer("w", slots, instance=instance)

    def grant(self, job_id, instance="a" * 16, slots=2, max_attempts=3):
        """A long-poll of the worker process instance (listing what it
        holds), answered with a new lease on attempt 1 of job_id (not its
        last, unless max_attempts is 1)."""
        held = (list(self.held),) if self.lists else ()
        answer = self.hub.poll(self.offer(instance, slots), 1, 30, *held)
        spec = JobSpec(command=("true",), max_attempts=max_attempts)
        lease = Lease(job_id, 1, next(self.tokens), "w", 0.0, spec)
        self.hub.claimed("w", [lease])
        assert answer.called and answer.result == [lease]
        self.held.append((job_id, lease.token))
        return lease

    def beat(self, *leases, instance="a" * 16):
        d = self.hub.heartbeat(
            self.offer(instance), [(l.job_id, l.token, False) for l in leases]
        )
        return [v.ok for v in d.result]

    def expired(self):
        return [lease.job_id for lease, outcome, _ in self.recorder.finished
                if "sent no heartbeat" in (outcome.error or "")]

    def released(self):
        return [lease.job_id for lease, _, _ in self.recorder.released]

    def reported(self, lease, outcome):
        d = self.hub.report(self.offer(), [(lease.job_id, lease.token, outcome)])
        return [v.ok for v in d.result]

    def finished(self):
        return [(lease.job_id, outcome.state) for lease, outcome, _ in self.recorder.finished]


@pytest.fixture
def warnings():
    """The hub's warnings about stalls, as they are logged."""
    seen = []

    def observe(event):
        if "did not run for" in event.get("log_format", ""):
            seen.append(event)

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


def test_a_stall_past_every_expiry_expires_nothing(warnings):
    """A dispatcher that could not run for 60 s (its clock jumps past every
    lease's expiry at once) expires no lease: it logs one warning naming
    the stall and the leases extended; a heartbeat read after the stall
    renews its lease, and a lease that gets none after the stall expires
    once the life it had left when the stall began has passed."""
    h = Hub(lists=False)
    a, b = h.grant("a"), h.grant("b")
    run_clock(h.clock, 20)
    assert h.beat(a, b) == [True, True]
    start = h.clock.seconds()
    h.clock.advance(60)
    assert h.expired() == []
    [warning] = warnings
    # The watchdog's tick was due a second after the stall began.
    assert warning["seconds"] == pytest.approx(59) and warning["count"] == 2
    assert h.beat(a) == [True]
    # b had 30 s left when the stall began; the second before the
    # watchdog's tick counts against it.
    run_clock(h.clock, 28.5)
    assert h.expired() == []
    assert h.beat(a) == [True]
    run_clock(h.clock, 1)
    assert h.expired() == ["b"]
    assert h.clock.seconds() - start == pytest.approx(89.5)
    assert len(warnings) == 1


def test_a_reaper_that_fires_late_sees_the_stall_first(warnings):
    """When the reaper is due before the watchdog's next tick, the reaper
    finds the stall: the lease at its last second when the stall began is
    given at least a tick after the dispatcher wakes, so that a heartbeat
    waiting in its sockets is read first; the watchdog firing in the same
    turn does not count the stall again."""
    h = Hub(lists=False)
    a = h.grant("a")
    # The watchdog ticks at whole seconds; a's expiry is at a half, and the
    # stall begins just after a tick, before it.
    run_clock(h.clock, 10.5)
    assert h.beat(a) == [True]
    run_clock(h.clock, 29.7)
    h.clock.advance(30)
    assert h.expired() == []
    [warning] = warnings
    assert warning["seconds"] == pytest.approx(29.7) and warning["count"] == 1
    run_clock(h.clock, 0.9)
    assert h.expired() == []
    assert h.beat(a) == [True]
    run_clock(h.clock, 29.5)
    assert h.expired() == []
    run_clock(h.clock, 1)
    assert h.expired() == ["a"]


def test_a_timer_late_by_less_than_a_tick_is_no_stall(warnings):
    """Time that passes while the reactor runs timers at most a tick late
    counts against leases as it always did: a lease without heartbeat
    expires after lease_seconds, and no stall is logged."""
    h = Hub(lists=False)
    h.grant("a")
    run_clock(h.clock, 29.9, step=0.95)
    assert h.expired() == []
    run_clock(h.clock, 0.95, step=0.95)
    assert h.expired() == ["a"]
    assert warnings == []
    # With no lease out, the watchdog stops ticking.
    run_clock(h.clock, 2)
    assert h.clock.getDelayedCalls() == []


def test_a_lease_its_worker_does_not_list_goes_back_unspent():
    """A lease granted to a worker process whose next request for work
    does not list it never reached it: it goes back to the queue unspent,
    and the slot it took is asked for again in that same request."""
    h = Hub()
    kept, lost = h.grant("kept"), h.grant("lost")
    assert h.scheduler.free == {}
    h.hub.poll(h.offer(), 2, 30, [("kept", kept.token)])
    assert h.released() == ["lost"]
    [(lease, _, reason)] = h.recorder.released
    assert lease.token == lost.token
    assert "does not hold its lease" in reason and "not counted" in reason
    assert h.scheduler.free == {"w": 1}
    assert sorted(h.hub.leases) == ["kept"]
    # A late write about it is refused.
    assert h.beat(lost) == [False]


def test_only_a_later_request_for_work_of_the_same_process_proves_a_loss():
    """A lease is kept when the request for work lists it, when it comes
    from another process under the same name, when it lists nothing (an
    older worker), when it is a heartbeat (which may be sent while the
    answer granting a lease is on its way), and while the lease's result is
    being written."""
    h = Hub()
    a = h.grant("a")
    h.hub.poll(h.offer(), 1, 30, [("a", a.token)])
    h.hub.poll(h.offer("b" * 16), 1, 30, [])
    h.hub.poll(h.offer(), 1, 30, None)
    assert h.beat(instance="a" * 16) == []
    # A worker without an instance releases nothing either.
    h.hub.poll(h.offer(None), 1, 30, [])
    assert h.released() == []
    # Its result is reported and its write has not committed: the worker
    # has let go of it, and the lease is no longer its to lose.
    h.recorder.finishing = Deferred()
    h.hub.report(h.offer(), [("a", a.token, Outcome(JobState.SUCCEEDED, exit_code=0))])
    h.hub.poll(h.offer(), 1, 30, [])
    assert h.released() == []
    h.recorder.finishing.callback(None)
    assert h.hub.leases == {}


def test_a_lease_listed_with_another_token_is_not_held():
    """A lease listed under an older token of the same job (the worker still
    holds an earlier attempt) is not the one granted: the new one goes back
    unspent."""
    h = Hub()
    a = h.grant("a")
    h.hub.poll(h.offer(), 1, 30, [("a", a.token - 1)])
    assert h.released() == ["a"]


def test_resumed_leases_are_settled_at_the_holders_first_request_for_work():
    """After a restart (the dispatcher crashed after committing a claim and
    before its answer went out), the holder's first request for work
    releases, unspent, the resumed leases it does not list, and makes
    those it lists its own: another process under the name cannot release
    them later, the same process can."""
    h = Hub()

    def resumed(job_id, token):
        lease = Lease(job_id, 1, token, "w", h.clock.seconds() + LEASE_SECONDS,
                      JobSpec(command=("true",)))
        return ResumedLease(lease, JobState.RUNNING, False)

    h.hub.resume([resumed("lost", 7), resumed("kept", 8)])
    h.hub.poll(h.offer(), 2, 30, [("kept", 8)])
    assert h.released() == ["lost"]
    assert "does not hold its lease" in h.recorder.released[0][2]
    assert h.scheduler.free == {"w": 1}
    h.hub.poll(h.offer("b" * 16), 2, 30, [])
    assert h.released() == ["lost"]
    h.hub.poll(h.offer(), 2, 30, [])
    assert h.released() == ["lost", "kept"]


def test_resumed_leases_of_a_shared_name_are_not_released():
    """While two processes are known to call under one name, a resumed
    lease could be either's: a request for work that does not list it
    releases nothing."""
    h = Hub()
    lease = Lease("j", 1, 7, "w", h.clock.seconds() + LEASE_SECONDS,
                  JobSpec(command=("true",)))
    h.hub.resume([ResumedLease(lease, JobState.RUNNING, False)])
    h.beat(instance="a" * 16)
    h.beat(instance="b" * 16)
    h.hub.poll(h.offer("b" * 16), 1, 30, [])
    assert h.released() == []


@pytest_twisted.ensureDeferred
async def test_a_claim_whose_answer_a_crash_lost_is_released_after_the_restart(
        make_pure, tmp_path):
    """A dispatcher that committed a claim and stopped before its answer
    reached the worker resumes the lease at its restart; the worker's first
    request for work does not list it, so the job goes back to the queue
    unspent, and with max_attempts = 1 it is leased again and succeeds."""
    one_dispatcher_only("a restart resumes the workers' leases only on a store of its own")
    clock = Clock()
    clock.advance(1000)
    data = tmp_path / "keep"
    daemon = await make_pure(clock=clock, data_dir=data)
    who = {**worker("w", slots=1), "instance": "a" * 16}
    job = await daemon.submit({"command": ["true"], "max_attempts": 1})
    (granted,) = await lease(daemon, who)
    await daemon.service.stopService()
    daemon = await make_pure(clock=clock, data_dir=data)
    # The same request for work gets the job back, as soon as the release
    # has committed.
    code, answer = await call(daemon, "/v1/leases", {"worker": who, "wait": 5, "held": []})
    assert code == 200, answer
    (again,) = answer["leases"]
    assert (again["job_id"], again["attempt"]) == (job["id"], 2)
    assert granted["token"] < again["token"]
    code, answer = await call(daemon, "/v1/leases/results", {"worker": who, "results": [
        {"job_id": again["job_id"], "token": again["token"], "state": "succeeded",
         "exit_code": 0}]})
    assert code == 200, answer
    done = await daemon.wait(job["id"])
    assert done["state"] == "succeeded" and len(done["attempts"]) == 2
    assert "does not hold its lease" in done["attempts"][0]["error"]


def test_a_last_attempt_waits_for_its_silent_worker_and_takes_its_result():
    """A job's last attempt whose lease runs out is not recorded lost at
    once: nothing else can run beside it, and its worker may be cut off
    with a success in hand.  It waits last_attempt_grace more, shown by the
    hub as a silent worker; a result that comes meanwhile is recorded as it
    came."""
    h = Hub()
    lease = h.grant("a", max_attempts=1)
    run_clock(h.clock, 31)
    assert h.finished() == []
    ((attempt, reason),) = h.hub.silent().values()
    assert attempt == 1 and "its worker w has been silent since" in reason
    run_clock(h.clock, h.hub.last_attempt_grace - 5)
    assert h.finished() == []
    assert h.reported(lease, Outcome(JobState.SUCCEEDED, exit_code=0)) == [True]
    assert h.finished() == [("a", JobState.SUCCEEDED)]
    assert h.hub.silent() == {}


def test_a_last_attempt_whose_worker_stays_silent_is_lost_after_the_grace():
    """A last attempt whose worker says nothing through the grace is
    recorded lost then, as any expired lease; a heartbeat within the grace
    renews the lease as usual; an attempt with attempts left expires at
    once; and a grace of 0 waits for nothing."""
    h = Hub()
    silent, beating, retried = (
        h.grant("silent", max_attempts=1),
        h.grant("beating", max_attempts=1, slots=3),
        h.grant("retried", max_attempts=2, slots=3),
    )
    run_clock(h.clock, 31)
    assert h.expired() == ["retried"]
    assert set(h.hub.silent()) == {"silent", "beating"}
    assert h.beat(beating) == [True]
    assert set(h.hub.silent()) == {"silent"}
    run_clock(h.clock, h.hub.last_attempt_grace)
    assert h.expired() == ["retried", "silent"]
    # (beating, heard from once, fell silent in turn meanwhile.)
    assert set(h.hub.silent()) == {"beating"}
    assert h.beat(beating) == [True]
    h = Hub()
    h.hub.last_attempt_grace = 0
    h.grant("now", max_attempts=1)
    run_clock(h.clock, 31)
    assert h.expired() == ["now"]


class SharedStore:
    """The leases a shared database holds, by job: what a take-up finds
    (live ones, a worker's own), and who took each up last."""

    def __init__(self):
        self.leases = {}
        self.server = {}
        self.asked = []

    def adopt(self, holder, items):
        self.asked.append((holder, list(items)))
        taken = []
        for job_id, token in items:
            lease = self.leases.get(job_id)
            if lease is not None and lease.token == token and holder in (None, lease.holder):
                self.server[job_id] = "local@b"
                taken.append(ResumedLease(lease, JobState.RUNNING, False))
        return succeed(Written(taken))


def test_a_worker_that_moved_here_goes_on_with_its_leases():
    """On a shared database a heartbeat of leases not kept here takes them
    up from the store (its worker moved here): the live one is renewed and
    kept from then on, one the store no longer gives is refused; every
    heartbeat takes its leases up again; a report of a lease not kept here
    takes it up first and records it; and an expiry here is written only
    where this dispatcher serves the lease (its name given to the
    recorder)."""
    clock = Clock()
    clock.advance(1000)
    recorder = FakeRecorder()
    store = SharedStore()
    hub = WorkerHub(FakeScheduler(), clock, LEASE_SECONDS, recorder, lambda: None,
                    adopt=store.adopt, server=lambda: "local@b")
    hub.accepting = True
    spec = JobSpec(command=("true",), max_attempts=3)
    moved = Lease("moved", 1, 7, "w", 0.0, spec)
    ended = Lease("ended", 1, 8, "w", 0.0, spec)
    store.leases["moved"] = moved
    offer = Offer("w", 2, instance="a" * 16)
    d = hub.heartbeat(offer, [("moved", 7, True), ("ended", 8, True)])
    assert [(v.job_id, v.ok) for v in d.result] == [("moved", True), ("ended", False)]
    assert store.asked == [("w", [("moved", 7), ("ended", 8)])]
    assert set(hub.leases) == {"moved"} and hub.workers["w"].jobs == {"moved"}
    # Every heartbeat takes them up again: the store names this dispatcher.
    hub.heartbeat(offer, [("moved", 7, True)])
    assert store.asked[-1] == ("w", [("moved", 7)])
    # Unheard for a lease: its expiry is written as this dispatcher's.
    run_clock(clock, LEASE_SECONDS + 1)
    assert [lease.job_id for lease, _, _ in recorder.finished] == ["moved"]
    assert recorder.servers == ["local@b"]
    # A report of a lease not kept here takes it up first, then records it.
    late = Lease("late", 1, 9, "w", 0.0, spec)
    store.leases["late"] = late
    d = hub.report(offer, [("late", 9, Outcome(JobState.SUCCEEDED, exit_code=0))])
    assert [(v.job_id, v.ok) for v in d.result] == [("late", True)]
    assert recorder.finished[-1][0] == late and recorder.servers[-1] is None
    assert store.asked[-1] == ("w", [("late", 9)])
    # A lease the worker names that another worker holds is not taken up.
    store.leases["other"] = Lease("other", 1, 10, "x", 0.0, spec)
    d = hub.heartbeat(offer, [("other", 10, True)])
    assert [v.ok for v in d.result] == [False] and "other" not in hub.leases
    hub.stop()
    assert not clock.getDelayedCalls()


def test_a_holder_known_lost_fails_its_leases_at_once():
    """A worker its backend saw die (the Slurm job it ran in ended) has its
    leases ended now, each attempt failed with the error given, not when
    they run out; its later heartbeat and report are refused; and another
    holder's leases, or a lease whose report is being recorded, are not
    touched."""
    h = Hub()
    running = h.grant("a")
    reported = h.grant("b")
    h.recorder.finishing = Deferred()
    waiting = h.hub.report(h.offer(), [("b", reported.token,
                                        Outcome(JobState.SUCCEEDED, exit_code=0))])
    assert not waiting.called
    assert h.hub.holder_lost("someone-else", "gone") == []
    assert h.hub.holder_lost("w", "its Slurm job 7 was preempted (PREEMPTED)") == ["a"]
    ((lease, outcome, _), (other, _, _)) = h.recorder.finished[1:] + h.recorder.finished[:1]
    assert lease.job_id == "a" and outcome.state is JobState.FAILED
    assert outcome.error == "its Slurm job 7 was preempted (PREEMPTED)"
    assert other.job_id == "b"
    assert h.beat(running) == [False]
    assert h.hub.holder_lost("w", "again") == []
    h.recorder.finishing.callback(None)
    assert [v.ok for v in waiting.result] == [True]


def test_a_worker_known_gone_is_forgotten_unless_it_holds_something():
    """A worker its backend saw end is forgotten at once, its name no longer
    shown nor counted, unless it still holds a lease or has a poll open."""
    h = Hub()
    lease = h.grant("a")
    assert not h.hub.forget_worker("w")
    assert h.reported(lease, Outcome(JobState.SUCCEEDED, exit_code=0)) == [True]
    assert "w" in h.hub.workers
    assert h.hub.forget_worker("w")
    assert "w" not in h.hub.workers and not h.hub.forget_worker("w")


def test_a_workers_prefetch_counts_as_capacity_and_its_leases_as_held():
    """A worker that offers a prefetch is asked work for its slots and its
    prefetch, less every lease it holds, started or not: it is never given
    more leases than both together; a lease beyond its slots expires,
    is renewed and ends as any other."""
    h = Hub()
    offer = Offer("w", 2, instance="a" * 16, prefetch=3)
    h.hub.poll(offer, 5, 30)
    assert h.scheduler.free == {"w": 5}
    spec = JobSpec(command=("true",), max_attempts=3)
    leases = [Lease(f"j{n}", 1, next(h.tokens), "w", 0.0, spec) for n in range(4)]
    h.hub.claimed("w", leases)
    assert h.hub.workers["w"].free_slots == 1
    # Asking for more than is free is cut to what is free.
    h.hub.poll(offer, 5, 30, [(l.job_id, l.token) for l in leases])
    assert h.scheduler.free == {"w": 1}
    # Without the prefetch (an older worker) it holds more than its slots
    # and gets nothing more.
    h.hub.poll(Offer("w", 2, instance="a" * 16), 2, 30, [(l.job_id, l.token) for l in leases])
    assert h.scheduler.free == {} and h.hub.workers["w"].free_slots == 0
    # The leases beyond the slots are leases like the others: renewed by
    # a heartbeat, and expired without one.
    run_clock(h.clock, 20)
    d = h.hub.heartbeat(offer, [(l.job_id, l.token, False) for l in leases[:3]])
    assert [v.ok for v in d.result] == [True, True, True]
    run_clock(h.clock, 11)
    assert h.expired() == ["j3"]
    assert h.hub.workers["w"].free_slots == 2


def test_a_reports_results_make_one_scheduler_pass_as_the_last_ends():
    """The results of one report make the scheduler look for free capacity
    once, as the last of them is recorded, not once each; a result whose
    write fails for good still lets the others' pass happen."""
    h = Hub()
    passes = []
    h.hub._capacity_changed = lambda: passes.append(h.clock.seconds())
    leases = [h.grant(job_id, slots=4) for job_id in "abc"]
    passes.clear()
    writes = [Deferred() for _ in leases]
    first, second, third = writes
    h.recorder.finish = lambda lease, outcome, now, server=None: writes.pop(0)
    ok = Outcome(JobState.SUCCEEDED, exit_code=0)
    d = h.hub.report(h.offer(slots=4), [(l.job_id, l.token, ok) for l in leases])
    first.callback(None)
    second.callback(None)
    assert passes == [] and not d.called
    third.callback(None)
    assert len(passes) == 1 and [v.ok for v in d.result] == [True, True, True]
    # A report whose one result is not written (the store gave up): the
    # other's end still makes its pass, once.
    leases = [h.grant(job_id, slots=4) for job_id in "de"]
    passes.clear()
    writes = [Deferred() for _ in leases]
    first, second = writes
    h.recorder.finish = lambda lease, outcome, now, server=None: writes.pop(0)
    d = h.hub.report(h.offer(slots=4), [(l.job_id, l.token, ok) for l in leases])
    first.callback(None)
    second.errback(RuntimeError("the store gave up"))
    assert len(passes) == 1
    assert d.called and isinstance(d.result.value, RuntimeError)
    d.addErrback(lambda _: None)
    assert h.hub.current("e", leases[1].token) is not None


def test_a_request_for_work_takes_up_the_leases_it_lists_first():
    """On a shared database a request for work that lists leases not kept
    here (its worker moved here with them running) takes them up from the
    store before it counts the worker's free slots: a worker of three
    slots that holds two is asked work for one, not three, and its leases
    are kept here from then on; a lease the store no longer gives does not
    count; the same request again asks the store nothing; a request
    cancelled while the store answers opens no poll."""
    clock = Clock()
    clock.advance(1000)
    store = SharedStore()
    scheduler = FakeScheduler()
    hub = WorkerHub(scheduler, clock, LEASE_SECONDS, FakeRecorder(), lambda: None,
                    adopt=store.adopt, server=lambda: "local@b")
    hub.accepting = True
    spec = JobSpec(command=("true",), max_attempts=3)
    for job_id, token in (("a", 7), ("b", 8)):
        store.leases[job_id] = Lease(job_id, 1, token, "w", 0.0, spec)
    offer = Offer("w", 3, instance="a" * 16)
    held = [("a", 7), ("b", 8), ("gone", 9)]
    answer = hub.poll(offer, 3, 30, held)
    assert store.asked == [("w", held)]
    assert scheduler.free == {"w": 1}
    assert hub.workers["w"].jobs == {"a", "b"} and set(hub.leases) == {"a", "b"}
    assert not answer.called
    # Asked again, listing only what is kept here: no take-up.
    hub.poll(offer, 3, 30, held[:2])
    assert len(store.asked) == 1 and scheduler.free == {"w": 1}
    assert answer.called and answer.result == []
    # A request cancelled while its take-up is under way opens nothing.
    store.leases["c"] = Lease("c", 1, 10, "w", 0.0, spec)
    pending = Deferred()
    store.adopt = lambda holder, items: pending
    hub._adopt = store.adopt
    scheduler.free.clear()
    hub._end_poll(hub.workers["w"], [])
    cancelled = hub.poll(offer, 3, 30, held[:2] + [("c", 10)])
    cancelled.cancel()
    cancelled.addErrback(lambda _: None)
    pending.callback(Written([ResumedLease(store.leases["c"], JobState.RUNNING, False)]))
    assert hub.workers["w"].poll is None and scheduler.free == {}
    assert "c" in hub.leases
    hub.stop()
    assert not clock.getDelayedCalls()
