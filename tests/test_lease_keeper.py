"""
The lease keeper of a dispatcher on a database shared with others
(dispatcher.core._lease_keeper), on a real PostgreSQL store behind a TCP
proxy the test cuts, its time on a fake clock: renewals every sixth of a
lease, the sweep of leases others let expire, the self-fence at half a
lease without a renewal, and the way back once the database answers.
"""

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock

from dispatcher.core._lease_keeper import LeaseKeeper
from dispatcher.model._jobs import JobIds, JobSpec, JobState, Offer
from dispatcher.store._postgres import PostgresJobStore
from tests.conftest import until
from tests.postgres import Databases, Proxy, target, through

ids = JobIds()
LEASE = 6.0


@pytest.fixture
def database():
    made = Databases()
    yield made.url("db")
    made.drop()


@pytest.fixture
def proxy(database):
    made = Proxy(target(database))
    yield made
    made.close()


class Told:
    """What the keeper told its dispatcher, in order."""

    def __init__(self):
        self.said = []

    def fence(self, why):
        self.said.append(("fence", why))

    def unfence(self):
        self.said.append(("unfence",))

    def taken(self, held):
        self.said.append(("held", held))

    def recovered(self, written):
        self.said.append(("recovered", [e.token for e in written.value]))


async def turn(keeper, clock):
    """One turn of the keeper: the renewal (and sweep) under way lands,
    the clock moves to the next, and that one lands too."""
    await until(lambda: keeper._renewing is None)
    clock.advance(keeper.renew_interval)
    await until(lambda: keeper._renewing is None)


@pytest_twisted.ensureDeferred
async def test_renewal_sweep_fence_and_return(database, proxy):
    """The keeper renews its holder's leases as it starts and every sixth of
    a lease; another holder's lease that ran out is recorded lost by its
    sweep; with the database cut, renewals fail and say the database cannot
    be reached, and at half a lease after the last renewal that landed (not
    before) the dispatcher is told to fence; once the database answers, a
    renewal lands, the fence is lifted and the trouble cleared."""
    store = PostgresJobStore(through(database, proxy.port), reactor)
    await store.open()
    clock = Clock()
    clock.advance(1000.0)
    told = Told()
    keeper = LeaseKeeper(
        store, clock, LEASE, lambda: "local@me", lambda: [], told.fence, told.unfence,
        told.taken, told.recovered,
    )
    try:
        await store.submit([JobSpec(command=("true",))] * 2, 1000.0,
                           [ids.new(), ids.new()])
        (mine,) = (await store.claim(Offer("local@me", 1), 1, 1000.0, LEASE)).leases
        (theirs,) = (await store.claim(Offer("local@dead", 1), 1, 1000.0, LEASE)).leases

        keeper.start()
        await until(lambda: keeper.renewals == 1 and keeper._renewing is None)
        assert told.said == [("held", frozenset({mine.token}))]
        # Turn by turn past the dead holder's expiry (1006): a sweep after
        # it records it lost; this holder's own lease, renewed, is left.
        for _ in range(7):
            assert ("recovered", [theirs.token]) not in told.said
            await turn(keeper, clock)
        assert ("recovered", [theirs.token]) in told.said
        assert keeper.renewals == 8
        assert (await store.get(theirs.job_id)).state is JobState.FAILED
        assert (await store.get(mine.job_id)).state is JobState.RUNNING
        assert keeper.trouble is None and not keeper.fenced
        last = keeper.confirmed_at

        proxy.set_cut(True)
        await turn(keeper, clock)
        assert keeper.trouble.startswith("the database cannot be reached")
        assert not keeper.fenced
        clock.advance(last + LEASE / 2 - 0.01 - clock.seconds())
        await until(lambda: keeper._renewing is None)
        assert not keeper.fenced and told.said[-1][0] != "fence"
        clock.advance(0.01)
        assert keeper.fenced
        assert told.said[-1][0] == "fence" and "3.0 s" in told.said[-1][1]

        # Fenced, it renews on; a renewal that lands lifts the fence.  (Its
        # lease outlived the cut: no sweep of another dispatcher came.)
        proxy.set_cut(False)
        for _ in range(10):
            if not keeper.fenced:
                break
            await turn(keeper, clock)
        assert not keeper.fenced and keeper.trouble is None
        assert told.said[-2:] == [("unfence",), ("held", frozenset({mine.token}))]
    finally:
        await keeper.stop()
        await store.close()
    assert clock.getDelayedCalls() == []
