"""
The dispatcher's version, as installed, for C{--version} and the start-up
log.
"""

from __future__ import annotations

import platform
from importlib import metadata

from twisted import copyright

# The distribution's name (pyproject.toml).
DISTRIBUTION = "dispatcher"


def dispatcher_version() -> str:
    """
    The installed distribution's version, or C{unknown} when the package
    runs from a tree that was never installed.
    """
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"


def version_line(program: str) -> str:
    """
    What C{--version} prints: the program, its version, and Twisted's and
    Python's.
    """
    return (
        f"{program} {dispatcher_version()} (Twisted {copyright.version}, "
        f"Python {platform.python_version()})"
    )
