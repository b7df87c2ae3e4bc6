"""
Task functions the tests configure in [tasks].
"""

import os
import threading
import time


def add(context, a, b):
    return a + b


def describe(context, *args, **kwargs):
    return {
        "job_id": context.job_id,
        "attempt": context.attempt,
        "labels": context.labels,
        "args": list(args),
        "kwargs": kwargs,
        "thread": threading.current_thread().name,
        "array_index": context.array_index,
    }


def block(context, seconds):
    """Block the thread, as real blocking work does (not cancellable)."""
    time.sleep(seconds)
    return seconds


def wait_for_cancel(context, seconds):
    """Wait until cancelled or until seconds pass."""
    return "cancelled" if context.wait_cancelled(seconds) else "done"


def fail(context, message):
    raise ValueError(message)


def not_json(context):
    return {1, 2}


def read_input(context, path):
    with open(os.path.join(context.workdir, path)) as f:
        return f.read()
