"""
The real PostgreSQL the tests that need one use: the server at
C{DISPATCHER_TEST_POSTGRES} (default C{postgresql://postgres@127.0.0.1:5432/test}:
trust auth, database C{test}).  Each test makes databases of its own
(C{dispatcher_<random hex>}, made from a connection to C{test}, dropped
when the test is done), never tables in C{test} itself, so that suites
running at once on the same server never meet.

Where the server cannot be reached a test that needs it skips, saying
why; unless C{DISPATCHER_REQUIRE_POSTGRES=1} (which C{.ci/run} sets):
then it fails.
"""

import atexit
import os
import secrets
import socket
import threading
import urllib.parse
from typing import Optional

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

ADMIN_URL = os.environ.get(
    "DISPATCHER_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)

_unreachable: Optional[str] = None
_checked = False
# Every database made and not dropped yet.
_made: set[str] = set()


def _admin() -> psycopg.Connection:
    return psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5)


def unreachable() -> Optional[str]:
    """
    Why the tests' PostgreSQL cannot be used, or C{None} if it can.
    """
    global _unreachable, _checked
    if not _checked:
        _checked = True
        try:
            _admin().close()
        except psycopg.Error as e:
            _unreachable = f"PostgreSQL at {ADMIN_URL} cannot be reached: {str(e).strip()}"
    return _unreachable


def require_postgres() -> None:
    """
    Skip the test (fail it, under C{DISPATCHER_REQUIRE_POSTGRES=1}) if the
    tests' PostgreSQL cannot be reached.
    """
    why = unreachable()
    if why is None:
        return
    if os.environ.get("DISPATCHER_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"{why} (DISPATCHER_REQUIRE_POSTGRES=1: it must be)")
    pytest.skip(why)


def make_database() -> str:
    """
    Make a new, empty database of the tests' own and return its URL.
    """
    require_postgres()
    name = f"dispatcher_{secrets.token_hex(6)}"
    with _admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    _made.add(name)
    return url_of(name)


def through(url: str, port: int) -> str:
    """
    C{url} with its host and port those of a local proxy (L{Proxy}).
    """
    parts = urllib.parse.urlsplit(url)
    user = f"{parts.username}@" if parts.username else ""
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{port}"))


def target(url: str) -> tuple:
    """
    The host and port of the server at C{url}.
    """
    parts = urllib.parse.urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 5432


def url_of(name: str) -> str:
    """
    The URL of the database C{name} on the tests' server.
    """
    return urllib.parse.urlunsplit(urllib.parse.urlsplit(ADMIN_URL)._replace(path=f"/{name}"))


def drop_database(url: str) -> None:
    """
    Drop the database at C{url} (made by L{make_database}), whoever is
    still connected to it.
    """
    name = conninfo_to_dict(url)["dbname"]
    with _admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    _made.discard(name)


@atexit.register
def _drop_left() -> None:
    # What a test could not drop (a failure before its teardown).
    for name in list(_made):
        try:
            drop_database(url_of(name))
        except psycopg.Error:
            pass


class Databases:
    """
    The databases of one test, one for each name it asks for (the same
    name: the same database), all dropped by L{drop}.
    """

    def __init__(self) -> None:
        self.urls: dict[str, str] = {}

    def url(self, name: str) -> str:
        if name not in self.urls:
            self.urls[name] = make_database()
        return self.urls[name]

    def drop(self) -> None:
        for url in self.urls.values():
            drop_database(url)
        self.urls.clear()


# The databases of each directory a store factory was given (a test's
# own, or a state machine's), dropped by drop_databases(directory).
_by_place: dict[str, Databases] = {}


def database_for(place, name: str) -> str:
    """
    The URL of the database of C{name} for the test whose directory is
    C{place}: made at the first ask, the same one after.
    """
    return _by_place.setdefault(str(place), Databases()).url(name)


def drop_databases(place) -> None:
    """
    Drop the databases made for C{place}.
    """
    databases = _by_place.pop(str(place), None)
    if databases is not None:
        databases.drop()


def one_dispatcher_only(why: str) -> None:
    """
    Skip a daemon test of what only a dispatcher alone on its store does
    when the daemon tests run on PostgreSQL (C{DISPATCHER_TEST_STORE=postgresql}),
    where a dispatcher may share its database with others: C{why}.
    """
    if os.environ.get("DISPATCHER_TEST_STORE") == "postgresql":
        pytest.skip(f"{why}; the daemon runs on PostgreSQL, shared by several dispatchers")


def sqlite_file_only() -> None:
    """
    Skip a daemon test that reads or damages the SQLite file itself when
    the daemon tests run on PostgreSQL (C{DISPATCHER_TEST_STORE=postgresql},
    tests/conftest.py): it has no such file there.
    """
    if os.environ.get("DISPATCHER_TEST_STORE") == "postgresql":
        pytest.skip("reads or damages the SQLite file itself; the daemon runs on PostgreSQL")


class Proxy:
    """
    A TCP proxy on 127.0.0.1 (C{port}) to C{target} that a test can cut
    (L{set_cut}: every connection closed, new ones closed as they come)
    and restore: a database that goes away and comes back, for one
    client alone.
    """

    def __init__(self, target):
        self.target = target
        self.cut = False
        self.pairs = []
        self.lock = threading.Lock()
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.running = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while self.running:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.cut:
                client.close()
                continue
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.pairs.append((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source, sink):
        try:
            while True:
                data = source.recv(65536)
                if not data or self.cut:
                    break
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def set_cut(self, cut):
        self.cut = cut
        if cut:
            with self.lock:
                pairs, self.pairs = self.pairs, []
            for pair in pairs:
                for s in pair:
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    s.close()

    def close(self):
        self.running = False
        self.set_cut(True)
        self.listener.close()
