"""
How soon one dispatcher runs a job submitted to another on the same
PostgreSQL database: two real C{twistd} (the tests' own, on a database of
their own made from the tests' server, tests/postgres.py), the one
submitted to with no slots, the other with four; C{--jobs} no-op jobs one
after the other, each timed from its submission to its success as the
first dispatcher shows it.  Once with notifications (polls 30 s apart, so
only a notification can wake the other in time), once with the polls
alone every second.

    .venv/bin/python bench/pg_wakeups.py [--jobs N]

Prints the median and the longest of each.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.postgres import Databases  # noqa: E402
from tests.test_postgres_wakeups import Dispatcher  # noqa: E402

MODES = (
    ("notifications, polls 30 s apart", "poll_interval = 30\n"),
    ("polls alone, every second", "poll_interval = 1\nnotify = no\n"),
)


def latencies(store: str, jobs: int) -> list[float]:
    """
    Seconds from submission to success of each of C{jobs} no-op jobs.
    """
    made = Databases()
    url = made.url("db")
    place = tempfile.mkdtemp(prefix="pg-wakeups-")
    a = Dispatcher(f"{place}/a", f"[store]\nurl = {url}\n{store}[executor]\nslots = 0\n", "a")
    b = Dispatcher(f"{place}/b", f"[store]\nurl = {url}\n{store}[executor]\nslots = 4\n", "b")
    try:
        a.start()
        b.start()
        found = []
        for _ in range(jobs):
            began = time.monotonic()
            code, job = a.request("POST", "/v1/jobs", {"command": ["true"]})
            assert code == 201, job
            while a.request("GET", f"/v1/jobs/{job['id']}")[1]["state"] != "succeeded":
                time.sleep(0.005)
            found.append(time.monotonic() - began)
        return found
    finally:
        a.stop()
        b.stop()
        made.drop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20)
    options = parser.parse_args()
    for label, store in MODES:
        found = latencies(store, options.jobs)
        print(f"{label}: median {statistics.median(found) * 1000:.0f} ms, "
              f"longest {max(found) * 1000:.0f} ms", flush=True)


if __name__ == "__main__":
    main()
