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


def give(context, kind):
    """Return a value JSON cannot carry as it is, by name (or raise an
    exception whose words hold a lone surrogate)."""
    if kind == "raise":
        raise ValueError("no \ud800 here")
    return {
        "refuse": "refuse me",
        "surrogate": "\ud800",
        "surrogate_key": {"\udc00": 1},
        "colliding_keys": {1: "a", "1": "b"},
        "int_keys": {1: "a", 2: "b"},
        "nan": float("nan"),
        "infinity": [float("inf")],
        "deep": _nested(200),
        # More digits than Python writes or reads as text (4300 by
        # default): no JSON encoder here can send or store it.
        "huge_int": 10 ** 5000,
        "huge_int_in_list": [1, 10 ** 5000],
        "huge_int_key": {10 ** 5000: "a"},
    }[kind]


def _nested(depth):
    value = []
    for _ in range(depth):
        value = [value]
    return value
