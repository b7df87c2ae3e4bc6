"""
The package's public surface.
"""

import dispatcher


def test_public_names():
    """The package exports exactly its public names, each importable, and the
    plugin file imports nothing of the package."""
    assert sorted(dispatcher.__all__) == sorted(
        name for name in vars(dispatcher)
        if not name.startswith("_") and name not in ("annotations",)
        and not isinstance(getattr(dispatcher, name), type(dispatcher)))
    for name in dispatcher.__all__:
        assert getattr(dispatcher, name).__module__.startswith("dispatcher.")
    source = open("twisted/plugins/dispatcher_plugin.py").read()
    assert "import dispatcher" not in source and "from dispatcher" not in source


def test_interfaces_are_provided(tmp_path):
    """The store, the spawner and the stager provide their interfaces."""
    from twisted.internet import reactor
    from twisted.python.threadpool import ThreadPool
    from zope.interface.verify import verifyObject

    from dispatcher._config import FetchConfig

    verifyObject(dispatcher.IJobStore,
                 dispatcher.SQLiteJobStore(str(tmp_path / "db"), reactor))
    verifyObject(dispatcher.IProcessSpawner, dispatcher.ProcessSpawner(reactor))
    verifyObject(dispatcher.IInputStager,
                 dispatcher.InputStager(None, reactor, FetchConfig(), ThreadPool(), reactor))
