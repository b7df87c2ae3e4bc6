"""
The package's layout is its architecture: each subpackage imports only the
layers below it on a job's path, and the worker process imports no API,
store or core code.
"""

from __future__ import annotations

import ast
import pathlib

import dispatcher

PACKAGE = pathlib.Path(dispatcher.__file__).parent

# What each subpackage may import, besides itself and the shared helpers at
# the top of the package (dispatcher._deferreds, dispatcher._threads,
# dispatcher._throttle).  The
# subpackages' docstrings say the same in words.
ALLOWED = {
    "model": set(),
    "config": set(),
    "wire": {"model"},
    "store": {"model"},
    "execution": {"model", "config"},
    "core": {"model", "wire", "store", "execution"},
    "http": {"wire"},
    "api": {"model", "config", "wire", "store"},
    "workers": {"model", "config", "wire", "execution"},
    "app": {"model", "config", "wire", "store", "execution", "core", "http", "api", "workers",
            "cli"},
    # The Python client speaks to the dispatcher over HTTP alone.
    "client": {"model", "wire"},
    # The dispatcher command's API commands: the client, and no server.
    "cli": {"model", "wire", "client"},
}

SHARED = {"_deferreds", "_threads", "_throttle"}

# Imports that break the rules today, each with the change that removes it.
KNOWN: set[tuple[str, str]] = set()


def _imports(path: pathlib.Path) -> set[str]:
    """
    The C{dispatcher...} modules that C{path} imports when it runs (imports
    under C{if TYPE_CHECKING:} only name types and are left out).
    """
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[: -node.level])
                found.add(f"{base}.{node.module}" if node.module else base)
            elif node.module and node.module.split(".")[0] == "dispatcher":
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "dispatcher")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_module_is_in_a_layer():
    """
    Every module of the package lives in one of the known subpackages, or
    is a shared helper or the package's C{__init__}.
    """
    strays = []
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if len(parts) == 1:
            if parts[0] not in SHARED | {"__init__"}:
                strays.append(str(path))
        elif parts[0] not in ALLOWED:
            strays.append(str(path))
    assert strays == []


def test_subpackages_say_what_they_own():
    """
    Each subpackage opens with a docstring that names what it may import.
    """
    for name in ALLOWED:
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text()))
        assert doc, name
        assert "May import" in doc, name


def test_imports_go_down_the_path():
    """
    No module imports a layer above its own, or beside it, unless the
    table allows it.
    """
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if len(parts) == 1:
            continue
        layer = parts[0]
        for module in _imports(path):
            target = _layer(module)
            if target in ("", layer) or target in SHARED:
                continue
            if target not in ALLOWED[layer] and (layer, target) not in KNOWN:
                wrong.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert wrong == []


def test_shared_helpers_import_no_layer():
    """
    The shared helpers at the top of the package import no subpackage.
    """
    for name in SHARED:
        assert {m for m in _imports(PACKAGE / f"{name}.py") if _layer(m) not in SHARED} == set()


def test_worker_process_imports_no_server_code():
    """
    The worker process (its tap and everything it imports) loads no API,
    store or core module: it reaches the dispatcher over HTTP alone.
    """
    import subprocess
    import sys

    code = (
        "import sys, dispatcher.app.worker_tap, dispatcher.workers._service;"
        "print('\\n'.join(m for m in sys.modules if m.startswith('dispatcher.')))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert [m for m in loaded if _layer(m) in ("api", "store", "core", "http")] == []


def test_client_imports_no_server_code():
    """
    The Python client (and everything it imports) loads nothing of the
    server: a script that uses it needs no API, store, core or execution
    code, nor the daemon's configuration.
    """
    import subprocess
    import sys

    code = (
        "import sys, dispatcher.client; dispatcher.client.TwistedClient;"
        "print('\\n'.join(m for m in sys.modules if m.startswith('dispatcher.')))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "dispatcher.client._twisted" in loaded
    assert sorted({_layer(m) for m in loaded}) == ["client", "model", "wire"]


def test_the_blocking_client_imports_no_twisted_client():
    """
    The blocking client (the dispatcher command's, at every call and every
    completion) does not import the Twisted one, treq or Twisted's HTTP
    client: they are loaded at the first use of TwistedClient.
    """
    import subprocess
    import sys

    code = (
        "import sys, dispatcher.client; dispatcher.client.Client;"
        "print('\\n'.join(sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "dispatcher.client._twisted" not in loaded
    assert "treq" not in loaded


def test_only_the_store_imports_sqlite3():
    """No module outside the store imports sqlite3: the dispatcher and the
    API know a store by its interface and its errors alone."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path.relative_to(PACKAGE).parts[0] == "store":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            if any(name.split(".")[0] == "sqlite3" for name in names):
                found.append(str(path.relative_to(PACKAGE)))
    assert found == []


def test_only_the_postgresql_store_imports_psycopg():
    """Only the PostgreSQL store's module imports psycopg (or its pool):
    no SQL driver outside the store, and the SQLite store and every shared
    store module run without psycopg installed."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path.relative_to(PACKAGE).parts == ("store", "_postgres.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            if any(name.split(".")[0] in ("psycopg", "psycopg_pool") for name in names):
                found.append(str(path.relative_to(PACKAGE)))
    assert found == []
