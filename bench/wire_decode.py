"""
Microseconds of one core to decode and check a submission, the old way
(orjson into dicts, then the hand-written checks of
C{dispatcher/wire/_submission.py} as of C{--old}, read from git) against
the new (msgspec straight from the bytes into the wire types, then the
checks a type cannot hold), in one process, same run; and to encode the
answer to a single submit (the old C{Job.to_json} and orjson against the
wire type L{JobView} and msgspec).

    python bench/wire_decode.py [--old b461398] [--repeat 7]

Prints one line per case: the best of C{--repeat} runs, in microseconds
per submission (per job for batches).  docs/wire.md keeps the method and
the figures.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import timeit
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import orjson  # noqa: E402

from dispatcher.config._ini import QueueConfig  # noqa: E402
from dispatcher.model._jobs import Job, JobSpec, JobState  # noqa: E402
from dispatcher.wire._forms import job_view  # noqa: E402
from dispatcher.wire._json import encode  # noqa: E402
from dispatcher.wire._json import decode as decode_json  # noqa: E402
from dispatcher.wire._submission import (  # noqa: E402
    decode,
    decode_batch,
    parse_submission,
    plain_jobs,
)
from dispatcher.wire._types import Batch, JobSubmission, PlainBatch  # noqa: E402

TASKS = {"add": None}
QUEUES = {"default": QueueConfig("default"), "slow": QueueConfig("slow")}
MAX_ARRAY = 10_000

PLAIN = {"command": ["echo", "hello"]}
RICH = {
    "command": ["sh", "-c", "echo $A"],
    "env": {"A": "1", "B": "two"},
    "name": "nightly",
    "labels": {"team": "ice", "run": "42"},
    "inputs": [{"url": "https://example.org/data.csv", "path": "in/data.csv"}],
    "priority": 5,
    "queue": "slow",
    "timeout": 60,
    "max_attempts": 3,
    "not_before": "2026-11-25T13:00:00Z",
    "requirements": {"site": "a"},
}
TASK = {"task": "add", "args": [1, 2], "kwargs": {"scale": 3}}


def load_old(ref: str, path: str = "dispatcher/wire/_submission.py") -> types.ModuleType:
    """
    A module of the package as it was at git C{ref}.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    source = subprocess.run(
        ["git", "show", f"{ref}:{path}"],
        cwd=root, check=True, capture_output=True, text=True,
    ).stdout
    spec = importlib.util.spec_from_loader("old_" + path.replace("/", "_")[:-3], loader=None)
    module = importlib.util.module_from_spec(spec)
    exec(compile(source, f"{ref}:{path}", "exec"), module.__dict__)
    return module


def best(function, number: int, repeat: int) -> float:
    """
    The best time of C{repeat} runs of C{number} calls, in seconds a call.
    """
    return min(timeit.repeat(function, number=number, repeat=repeat)) / number


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", default="b461398", help="the git ref of the old checks")
    parser.add_argument("--repeat", type=int, default=7)
    options = parser.parse_args()
    old = load_old(options.old)

    def old_single(raw: bytes) -> None:
        old.parse_submission(decode_json(raw), TASKS, QUEUES, 0.0, MAX_ARRAY)

    def new_single(raw: bytes) -> None:
        parse_submission(decode(raw, JobSubmission), TASKS, QUEUES, 0.0, MAX_ARRAY)

    def old_plain_batch(raw: bytes) -> None:
        jobs = decode_json(raw)["jobs"]
        assert old.plain_jobs(jobs, TASKS, QUEUES["default"]) is not None

    def new_plain_batch(raw: bytes) -> None:
        batch = decode_batch(raw)
        assert isinstance(batch, PlainBatch)
        assert plain_jobs(batch.jobs, TASKS, QUEUES["default"]) is not None

    def old_batch(raw: bytes) -> None:
        jobs = decode_json(raw)["jobs"]
        for i, item in enumerate(jobs):
            old.parse_submission(item, TASKS, QUEUES, 0.0, MAX_ARRAY, f"jobs[{i}].", i)

    def new_batch(raw: bytes) -> None:
        # As the handler does: the plain decode fails, the full one names.
        batch = decode_batch(raw)
        assert isinstance(batch, Batch)
        for i, item in enumerate(batch.jobs):
            parse_submission(item, TASKS, QUEUES, 0.0, MAX_ARRAY, f"jobs[{i}].", i)

    def old_refused(raw: bytes) -> None:
        try:
            old.parse_submission(decode_json(raw), TASKS, QUEUES, 0.0, MAX_ARRAY)
        except old.ApiError:
            return
        raise AssertionError("taken")

    def new_refused(raw: bytes) -> None:
        try:
            parse_submission(decode(raw, JobSubmission), TASKS, QUEUES, 0.0, MAX_ARRAY)
        except Exception as e:
            if type(e).__name__ == "ApiError":
                return
            raise
        raise AssertionError("taken")

    cases = [
        ("single, command only", old_single, new_single, PLAIN, 1, 20000),
        ("single, task with args", old_single, new_single, TASK, 1, 20000),
        ("single, every field", old_single, new_single, RICH, 1, 5000),
        ("single, refused (env.1BAD)", old_refused, new_refused,
         {"command": ["a"], "env": {"1BAD": "x"}}, 1, 5000),
        ("batch of 1,000 plain commands", old_plain_batch, new_plain_batch,
         {"jobs": [PLAIN] * 1000}, 1000, 20),
        ("batch of 1,000 plain tasks", old_plain_batch, new_plain_batch,
         {"jobs": [TASK] * 1000}, 1000, 20),
        ("batch of 1,000 named commands", old_batch, new_batch,
         {"jobs": [dict(PLAIN, name="n")] * 1000}, 1000, 10),
    ]
    # The answer to a single submit: the job shown whole.
    old_model = load_old(options.old, "dispatcher/model/_jobs.py")
    old_job = old_model.Job(
        "0190a0a0-0000-7000-8000-000000000000", old_model.JobState.QUEUED,
        old_model.JobSpec(command=("echo", "hello"), labels={"team": "ice"}), 1.5e9,
        wait_reason="no worker is connected",
    )
    new_job = Job(
        old_job.id, JobState.QUEUED,
        JobSpec(command=("echo", "hello"), labels={"team": "ice"}), 1.5e9,
        wait_reason="no worker is connected",
    )
    assert json.loads(encode(old_job.to_json())) == json.loads(encode(job_view(new_job)))
    encoded = [
        ("answer: one job shown whole", lambda _: orjson.dumps(old_job.to_json()),
         lambda _: encode(job_view(new_job)), None, 1, 20000),
    ]
    print(f"{'case':34} {'old us':>9} {'new us':>9} {'new/old':>8}")
    for name, old_fn, new_fn, body, jobs, number in cases + encoded:
        raw = json.dumps(body).encode()
        old_time = best(lambda: old_fn(raw), number, options.repeat) / jobs * 1e6
        new_time = best(lambda: new_fn(raw), number, options.repeat) / jobs * 1e6
        print(f"{name:34} {old_time:9.2f} {new_time:9.2f} {new_time / old_time:8.2f}")


if __name__ == "__main__":
    main()
