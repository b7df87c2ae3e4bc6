"""
Task functions the benchmark's daemon and remote workers configure in
C{[tasks]} (L{TASKS_SECTION}).
"""

import time

# The [tasks] section of every ini file the benchmark writes.
TASKS_SECTION = """\
[tasks]
noop = bench.tasks:noop
block = bench.tasks:block
"""


def noop(context):
    """
    Do nothing: a task job whose cost is only the dispatcher's own.
    """
    return None


def block(context, seconds):
    """
    Hold a task thread for C{seconds}, as real blocking work does (it does
    not look at its context, so it cannot be cancelled).
    """
    time.sleep(seconds)
    return seconds
