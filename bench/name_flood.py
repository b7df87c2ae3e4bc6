"""
A fake-worker-name flood (issue 15): one worker credential asks for work
under many made-up worker names, each with the largest description the
dispatcher takes, and the daemon's resident memory is read before and
after.  Before the limits, every name's description stayed in memory (440
MB for the issue's flood); now a credential keeps at most
C{[workers] max_names_per_credential} names.

Run against a started dispatcher:

    python -m bench.name_flood URL TOKEN_FILE PID [COUNT]

It prints one JSON line: the names sent, how many were accepted (200) and
refused (429), and C{VmRSS} before and after in KiB.  tests/test_worker_credentials.py
runs it against a real twistd.
"""

from __future__ import annotations

import http.client
import json
import sys
import urllib.parse
from typing import Any

# The largest description the dispatcher takes (dispatcher/wire/_types.py):
# 64 labels with keys and values of 200 characters, 256 tasks named with
# 100.  (A dispatcher from before the limits took any size; this is the
# same flood for both.)
LABELS = 64
LABEL_CHARS = 200
TASKS = 256
TASK_CHARS = 100


def description(name: str) -> dict[str, Any]:
    """
    A worker description as large as the dispatcher takes, under C{name}.
    Every name's strings are its own, as a flood's would be.
    """
    return {
        "name": name,
        "slots": 1,
        "labels": {
            f"{name}-{i}".ljust(LABEL_CHARS, "k"): f"{name}-{i}".ljust(LABEL_CHARS, "v")
            for i in range(LABELS)
        },
        "tasks": [f"{name}-{i}".ljust(TASK_CHARS, "t") for i in range(TASKS)],
    }


def rss_kib(pid: int) -> int:
    """
    The resident memory of process C{pid}, in KiB.
    """
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise ValueError(f"no VmRSS for process {pid}")


def flood(url: str, token: str, pid: int, count: int, prefix: str = "fake") -> dict[str, int]:
    """
    Ask C{url} for work under C{count} new worker names with C{token} on
    one connection; return what was answered and the memory of process
    C{pid} before and after.
    """
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    before = rss_kib(pid)
    answers: dict[int, int] = {}
    try:
        for n in range(count):
            body = json.dumps({"worker": description(f"{prefix}-{n}"), "wait": 0})
            connection.request("POST", "/v1/leases", body, headers)
            response = connection.getresponse()
            response.read()
            answers[response.status] = answers.get(response.status, 0) + 1
    finally:
        connection.close()
    return {
        "names": count,
        "accepted": answers.pop(200, 0),
        "refused": answers.pop(429, 0),
        "other": sum(answers.values()),
        "rss_before_kib": before,
        "rss_after_kib": rss_kib(pid),
    }


def main(argv: list[str]) -> None:
    url, token_file, pid = argv[:3]
    count = int(argv[3]) if len(argv) > 3 else 10_000
    with open(token_file) as f:
        token = f.read().strip()
    print(json.dumps(flood(url, token, int(pid), count)))


if __name__ == "__main__":
    main(sys.argv[1:])
