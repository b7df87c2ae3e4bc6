"""
What the daemon's job lines cost a no-op job, in process: a job's start and
end events (as the store publishes them) through L{JobLog}, into
twisted.logger's text or JSON file observer, or the daemon's text one
(L{dispatcher.app._logging.text_observer}: the same lines as twisted's
text observer), 7,000 jobs a second on a Clock, measured as CPU time of
the one thread.

    .venv/bin/python bench/job_lines.py text 200     # the default bound
    .venv/bin/python bench/job_lines.py text none    # every line
    .venv/bin/python bench/job_lines.py daemon none  # every line, the daemon's
    .venv/bin/python bench/job_lines.py json none

(Run under flock /tmp/bench.lock, as every measure.)  The README's "Logs,
signals, systemd, packages" quotes the figures.
"""

import os
import sys
import tempfile
import time

if not __package__:  # run as a file: make "dispatcher" importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet.task import Clock
from twisted.logger import globalLogBeginner, jsonFileLogObserver, textFileLogObserver

from dispatcher.app._logging import text_observer
from dispatcher.core._joblog import JobLog
from dispatcher.model._events import JobEvent
from dispatcher.model._jobs import JobState

JOBS = 50_000
JOBS_PER_SECOND = 7_000


def main(kind: str, bound: str) -> None:
    out = tempfile.TemporaryFile("w")
    observer = {"text": textFileLogObserver, "daemon": text_observer,
                "json": jsonFileLogObserver}[kind](out)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False, discardBuffer=True)
    clock = Clock()
    job_log = JobLog(clock, None if bound == "none" else int(bound))
    writes = []
    for i in range(JOBS):
        job_id = f"01a25079-6118-7049-91b9-{i:012d}"
        writes.append((
            [JobEvent(job_id, JobState.RUNNING, None, 1, 0.0, JobState.QUEUED, 1, None,
                      None, "admin", None, "local@host")],
            [JobEvent(job_id, JobState.SUCCEEDED, None, 2, 0.0, JobState.RUNNING, 1, None,
                      None, "admin", None, "local@host")],
        ))
    started = time.process_time()
    for number, (start, end) in enumerate(writes):
        job_log.write(start)
        job_log.write(end)
        if number % JOBS_PER_SECOND == 0:
            clock.advance(1.0)
    elapsed = time.process_time() - started
    job_log.stop()
    print(f"{kind}, job_lines = {bound}: {elapsed / JOBS * 1e6:.1f} us of CPU a no-op job "
          f"(its start and end)")


if __name__ == "__main__":
    main(*sys.argv[1:3])
