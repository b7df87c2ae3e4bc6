"""
Where a client finds the dispatcher and its credential when it is not
told: the environment, then the admin token a local daemon made.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

DEFAULT_URL = "http://127.0.0.1:8080"
# Where `twistd -n dispatcher` run from a checkout keeps the admin token it
# makes on its first start (README, "Run it"): a client run from the same
# directory finds it.
LOCAL_ADMIN_TOKEN = os.path.join("var", "admin.token")


def dispatcher_url(url: Optional[str] = None, environ: Optional[Mapping[str, str]] = None) -> str:
    """
    The dispatcher's base URL: C{url}, else C{DISPATCHER_URL}, else
    L{DEFAULT_URL}; without a trailing C{/}.
    """
    environ = os.environ if environ is None else environ
    return (url or environ.get("DISPATCHER_URL") or DEFAULT_URL).rstrip("/")


def _read_token(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


def dispatcher_token(
    token: Optional[str] = None, environ: Optional[Mapping[str, str]] = None
) -> Optional[str]:
    """
    The bearer token to send: C{token}, else C{DISPATCHER_TOKEN}, else the
    content of the file C{DISPATCHER_TOKEN_FILE} names, else that of
    C{./var/admin.token} if it can be read, else C{None} (no credential:
    the dispatcher answers L{Unauthorized<dispatcher.client.Unauthorized>}).

    @raise OSError: C{DISPATCHER_TOKEN_FILE} names a file that cannot be
        read (said rather than sending no credential).
    """
    environ = os.environ if environ is None else environ
    if token:
        return token
    if environ.get("DISPATCHER_TOKEN"):
        return environ["DISPATCHER_TOKEN"].strip()
    named = environ.get("DISPATCHER_TOKEN_FILE")
    if named:
        try:
            return _read_token(named)
        except OSError as e:
            raise OSError(e.errno, f"DISPATCHER_TOKEN_FILE={named}: {e.strerror}") from None
    try:
        return _read_token(LOCAL_ADMIN_TOKEN) or None
    except OSError:
        return None
