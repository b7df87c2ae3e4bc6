"""
Every job store passes the store contract (C{tests/store_contract.py}):
one factory per store below, each test run once for each.
"""

import pytest
import pytest_twisted
from twisted.internet import reactor

from dispatcher.store._sqlite import SQLiteJobStore
from tests.postgres import database_for, drop_databases
from tests.store_contract import *  # noqa: F401,F403 (the contract's tests)
from tests.store_contract import no_jitter


def sqlite_store(place, name, **options):
    """An SQLite store in the test's own directory."""
    return SQLiteJobStore(str(place / f"{name}.sqlite3"), reactor, **options)


def postgresql_store(place, name, **options):
    """A PostgreSQL store in a database of the test's own (tests/postgres.py:
    made at the first ask for the name, dropped with the test's others)."""
    from dispatcher.store._postgres import PostgresJobStore

    return PostgresJobStore(database_for(place, name), reactor, **options)


# Each store the contract runs against: a function of the test's directory,
# a name (the same name opens the same jobs again) and the options.
STORES = {
    "sqlite": sqlite_store,
    "postgresql": postgresql_store,
}


@pytest.fixture(params=sorted(STORES))
def make_store(request, tmp_path):
    """Open stores of the kind under test; all are closed at teardown."""
    factory = STORES[request.param]
    made = []

    async def make(name="db", **options):
        options.setdefault("backoff", no_jitter)
        store = factory(tmp_path, name, **options)
        made.append(store)
        await store.open()
        return store

    yield make
    for store in made:
        pytest_twisted.blockon(store.close())
    drop_databases(tmp_path)
