"""
Task functions the benchmark daemon configures in C{[tasks]}.
"""

import time


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
