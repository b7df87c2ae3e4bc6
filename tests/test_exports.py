"""
The package's public surface.
"""

import dispatcher


def test_public_names():
    """The package exports exactly its public names, each importable from
    where it is defined, and the plugin file imports nothing of the package."""
    assert sorted(dispatcher.__all__) == sorted(dispatcher._HOMES)
    for name in dispatcher.__all__:
        assert getattr(dispatcher, name).__module__ == dispatcher._HOMES[name]
    assert set(dir(dispatcher)) >= set(dispatcher.__all__)
    source = open("twisted/plugins/dispatcher_plugin.py").read()
    assert "import dispatcher" not in source and "from dispatcher" not in source


def test_unknown_name():
    """A name the package does not export is an AttributeError, as for any
    module."""
    import pytest

    with pytest.raises(AttributeError, match="no_such_name"):
        dispatcher.no_such_name


def test_interfaces_are_provided(tmp_path):
    """The store, the spawner and the stager provide their interfaces."""
    from twisted.internet import reactor
    from twisted.python.threadpool import ThreadPool
    from zope.interface.verify import verifyObject

    from dispatcher.config._ini import FetchConfig

    verifyObject(dispatcher.IJobStore,
                 dispatcher.SQLiteJobStore(str(tmp_path / "db"), reactor))
    verifyObject(dispatcher.IProcessSpawner, dispatcher.ProcessSpawner(reactor))
    verifyObject(dispatcher.IInputStager,
                 dispatcher.InputStager(None, reactor, FetchConfig(), ThreadPool(), reactor))


def test_the_store_interface_declares_every_call_on_a_store():
    """Every method or attribute that the dispatcher, the worker hub, the
    API or the daemon reaches on a store is declared by IJobStore, so that
    a store written against the interface alone serves them."""
    import ast
    import pathlib

    from dispatcher.store._interface import IJobStore

    package = pathlib.Path(dispatcher.__file__).parent
    used = set()
    for layer in ("core", "api", "app"):
        for path in (package / layer).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute):
                    if node.value.attr in ("store", "_store"):
                        used.add(node.attr)
    assert {"claim", "finish", "submit_plain", "queue_limits"} <= used
    assert used - set(IJobStore.names(all=True)) == set()
