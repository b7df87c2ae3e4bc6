"""
Makes tests/data/schema5/: the data directory of a dispatcher at schema
version 5, as today's main (cc4f8ae) leaves it, holding rows that cannot
be served as versions before the store's own JSON form (b461398) stored
them.  tests/test_values.py starts a dispatcher on a copy of it.

Run from a checkout of cc4f8ae, with this repository's venv:

    git archive cc4f8ae | tar -x -C /tmp/main
    cd /tmp/main && PYTHONPATH=/tmp/main /path/to/.venv/bin/python \\
        /path/to/tests/data/schema5/make.py /path/to/tests/data/schema5

It runs a real `twistd -n dispatcher` of that checkout, submits jobs and
waits for them to end, stops it, and then writes what older versions
wrote with json.dumps's defaults: a lone surrogate as its \\ud800 escape,
NaN and Infinity as such.
"""

import json
import os
import shutil
import sqlite3
import sys
import tempfile

from tests.test_twistd import Twistd

INI = """
[tasks]
describe = tests.tasks:describe
add = tests.tasks:add
fail = tests.tasks:fail
"""


def old_json(value):
    """A value as versions before b461398 stored it."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def main(out):
    work = tempfile.mkdtemp()
    daemon = Twistd(work, INI)
    daemon.start()
    try:
        ids = {}
        for name, body in [
            ("described", {"task": "describe", "args": ["x"], "name": "described"}),
            ("added", {"task": "add", "args": [2, 3], "name": "added"}),
            ("failed", {"task": "fail", "args": ["boom"], "name": "failed"}),
            ("plain", {"command": ["true"], "name": "plain", "labels": {"team": "ice"}}),
            ("waiting", {"task": "describe", "args": ["later"], "name": "waiting",
                         "delay": 86400}),
        ]:
            code, job = daemon.request("POST", "/v1/jobs", body)
            assert code == 201, job
            ids[name] = job["id"]
        for name in ("described", "added", "failed", "plain"):
            daemon.wait(ids[name], ("succeeded", "failed"))
    finally:
        daemon.stop()
    db = os.path.join(work, "data", "dispatcher.sqlite3")
    conn = sqlite3.connect(db, isolation_level=None)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 5
    conn.execute("UPDATE jobs SET result = ? WHERE id = ?", (
        old_json({"text": "caf\ud800", "score": float("nan"), "smile": "\U0001f600"}),
        ids["described"]))
    conn.execute("UPDATE jobs SET result = ? WHERE id = ?", (old_json(float("inf")), ids["added"]))
    conn.execute("UPDATE jobs SET spec = ? WHERE id = ?", (
        old_json({"args": ["\udc00later"], "kwargs": {}, "task": "describe"}), ids["waiting"]))
    conn.execute("UPDATE jobs SET spec = ? WHERE id = ?", (
        old_json({"command": ["echo", "\ud800"], "env": {"A": "\udfff"}}), ids["plain"]))
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("VACUUM")
    conn.close()
    os.makedirs(out, exist_ok=True)
    for name in ("dispatcher.sqlite3", "dispatcher.sqlite3.mark"):
        shutil.copy(os.path.join(work, "data", name), os.path.join(out, name))
    with open(os.path.join(out, "ids.json"), "w") as f:
        json.dump(ids, f, indent=1, sort_keys=True)
        f.write("\n")
    shutil.rmtree(work)


if __name__ == "__main__":
    main(sys.argv[1])
