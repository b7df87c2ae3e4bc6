"""
Almost-complete request bodies held open (issue 16): many connections each
send a head announcing a body of C{[server] max_body_bytes} and all of it
but the last kilobyte, then wait; the daemon's resident memory is read
before, while they wait, and after they close.

Before the fix, 1,500 such bodies without a credential, sent to an open
route (C{/healthz} takes no credential), added 1.18 GB to the daemon, and
it kept most of it after they closed.  Now a request without a credential
may carry C{MAX_ANONYMOUS_BODY_BYTES} at most (413 from its head), and the
daemon hands freed body buffers back to the system (L{dispatcher.http}).

    python -m bench.body_flood [--count N] [--kind KIND] [--url URL --pid PID
                               [--token-file FILE]]

C{KIND} is C{open} (no credential, C{POST /healthz}), C{refused} (no
credential, C{POST /v1/jobs}: 401 from the head) or C{token} (the admin
token, C{POST /v1/jobs}: a body the daemon must take).  Without C{--url} it
starts a C{twistd -n dispatcher} of its own in a temporary directory (with
C{[server] max_connections_per_address} raised to let one address hold
them all).  It prints one JSON line: the connections, how many were
answered before their body was whole (and with what), and C{VmRSS} in KiB
before, while they wait and after they closed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional
from urllib.parse import urlsplit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BODY_BYTES = 1048576
# What each connection leaves unsent: its body is never whole.
HELD_BACK = 1024


def rss_kib(pid: int) -> int:
    """
    The resident memory of process C{pid}, in KiB.
    """
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise ValueError(f"no VmRSS for process {pid}")


def settled_rss(pid: int, seconds: float = 10.0) -> int:
    """
    C{pid}'s resident memory once it stops moving (two reads 0.5 s apart
    within 1 MiB), or after C{seconds}.
    """
    deadline = time.monotonic() + seconds
    last = rss_kib(pid)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = rss_kib(pid)
        if abs(now - last) < 1024:
            return now
        last = now
    return last


def start_daemon(workdir: str) -> tuple[subprocess.Popen, str, str]:
    """
    A C{twistd -n dispatcher} in C{workdir}: its process, URL and token file.
    """
    import attrs

    from dispatcher.config._ini import ServerConfig

    config = os.path.join(workdir, "dispatcher.ini")
    with open(config, "w") as f:
        f.write("[executor]\nslots = 0\n[server]\nbody_timeout = 600\nidle_timeout = 600\n")
        # (A dispatcher from before the connection limits has no such key.)
        if "max_connections_per_address" in attrs.fields_dict(ServerConfig):
            f.write("max_connections_per_address = none\n")
    log = open(os.path.join(workdir, "out.log"), "wb")
    process = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "twistd"), "-n", "--pidfile", "",
         "dispatcher", "--config", config, "--listen", "tcp:0:interface=127.0.0.1",
         "--data-dir", os.path.join(workdir, "data")],
        cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
        env=dict(os.environ, PYTHONPATH=ROOT), start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with open(os.path.join(workdir, "out.log")) as f:
            found = re.findall(r"dispatcher listening on [\d.]+:(\d+)", f.read())
        if found:
            return (process, f"http://127.0.0.1:{found[-1]}",
                    os.path.join(workdir, "data", "admin.token"))
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.kill()
    with open(os.path.join(workdir, "out.log")) as f:
        raise SystemExit(f"body_flood: the daemon did not start: {f.read()[-2000:]}")


def flood(url: str, pid: int, count: int, kind: str, token: Optional[str]) -> dict[str, Any]:
    """
    Hold C{count} almost-complete bodies of C{kind} open against the daemon
    at C{url} (process C{pid}), then close them; the figures.
    """
    parts = urlsplit(url)
    path = b"/healthz" if kind == "open" else b"/v1/jobs"
    auth = b"Authorization: Bearer %s\r\n" % token.encode() if kind == "token" else b""
    head = (b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"%sContent-Length: %d\r\n\r\n" % (path, auth, BODY_BYTES))
    body = b"[" + b" " * (BODY_BYTES - HELD_BACK - 1)
    before = settled_rss(pid)
    sockets = []
    answered: dict[str, int] = {}
    for _ in range(count):
        s = socket.create_connection((parts.hostname, parts.port))
        s.settimeout(5)
        try:
            s.sendall(head + body)
        except OSError:
            # Refused (and closed) before the body was in.
            pass
        sockets.append(s)
    during = settled_rss(pid)
    for s in sockets:
        s.setblocking(False)
        try:
            first = s.recv(64)
        except OSError:
            continue
        status = first.split(b" ")[1].decode() if first.startswith(b"HTTP/") else "closed"
        answered[status] = answered.get(status, 0) + 1
    for s in sockets:
        s.close()
    # The daemon gives freed bodies back a second after they go
    # (dispatcher.http._trim.TRIM_DELAY).
    time.sleep(2)
    after = settled_rss(pid)
    return {"kind": kind, "connections": count, "body_bytes": BODY_BYTES,
            "answered_before_the_body": answered, "rss_before_kib": before,
            "rss_during_kib": during, "rss_after_kib": after,
            "held_mib": round((during - before) / 1024, 1),
            "kept_after_close_mib": round((after - before) / 1024, 1)}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--count", type=int, default=1500)
    parser.add_argument("--kind", choices=("open", "refused", "token"), default="open")
    parser.add_argument("--url")
    parser.add_argument("--pid", type=int)
    parser.add_argument("--token-file")
    args = parser.parse_args(argv)
    workdir = process = None
    try:
        if args.url is None:
            workdir = tempfile.mkdtemp(prefix="body-flood-")
            process, args.url, args.token_file = start_daemon(workdir)
            args.pid = process.pid
        token = None
        if args.token_file:
            with open(args.token_file) as f:
                token = f.read().strip()
        print(json.dumps(flood(args.url, args.pid, args.count, args.kind, token)))
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            process.wait(30)
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
