"""
Where the commands find their dispatcher and their credential, and how a
failure to reach it or a refusal becomes the one line a person reads.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import attrs

DEFAULT_URL = "http://127.0.0.1:8080"

# Tries after the first when a request finds no dispatcher (or a 503):
# a person at a prompt learns within about a second and a half that it
# is not there.  The commands that run on (wait, logs -f, events, ls
# --watch) keep the client's own count, which rides out a restart.
QUICK_RETRIES = 2


@attrs.define
class Settings:
    """
    What every API command is told: where the dispatcher is, the file
    holding the credential, and whether to answer in JSON.  Given to the
    group (C{dispatcher --url U ls}) or to the command (C{dispatcher ls
    --url U}); the command's wins.
    """

    url: Optional[str] = None
    token_file: Optional[str] = None
    json: bool = False

    def where(self) -> str:
        """
        The URL the client will reach, as the client chooses it: C{--url},
        else C{DISPATCHER_URL}, else the default.
        """
        return self.url or os.environ.get("DISPATCHER_URL") or DEFAULT_URL


class CommandFailed(Exception):
    """
    A command that could not do what it was asked: the message is the one
    line it prints on stderr before it exits 1.
    """


def read_token_file(path: str) -> str:
    """
    The token in C{path} (its first line, without spaces).

    @raise CommandFailed: the file cannot be read, or is empty.
    """
    try:
        with open(path) as f:
            token = f.read().strip()
    except OSError as e:
        raise CommandFailed(f"--token-file {path}: cannot read it: {e.strerror}") from None
    if not token:
        raise CommandFailed(f"--token-file {path}: the file is empty")
    return token


def connect(settings: Settings, patient: bool = False, **options: Any) -> Any:
    """
    A blocking L{dispatcher.client.Client} for C{settings}: the token of
    C{--token-file} when one is given, else the client's own choice
    (C{DISPATCHER_TOKEN}, C{DISPATCHER_TOKEN_FILE}, C{./var/admin.token}).

    @param patient: keep trying as long as the client does by default (a
        command that runs on), rather than L{QUICK_RETRIES} times.
    @param options: the client's other options (C{retries}, C{timeout}).
    """
    from dispatcher.client import Client

    token = read_token_file(settings.token_file) if settings.token_file else None
    if not patient:
        options.setdefault("retries", QUICK_RETRIES)
    return Client(settings.where(), token, **options)


def explain(error: BaseException, settings: Settings) -> Optional[str]:
    """
    The one line that says what went wrong in C{error}, or C{None} for an
    exception that is no failure of the dispatcher or of reaching it (a
    defect, to be shown whole).
    """
    from dispatcher.client import DispatcherError

    if isinstance(error, CommandFailed):
        return str(error)
    if isinstance(error, OSError):
        # DISPATCHER_TOKEN_FILE naming a file that cannot be read.
        return str(error)
    if not isinstance(error, DispatcherError):
        return None
    if error.status is None:
        reason = error.message.removeprefix(f"{getattr(error, 'url', '')}: ")
        return (f"cannot reach the dispatcher at {settings.where()} ({reason}); is it "
                "running?  (--url or DISPATCHER_URL says where it is)")
    text = f"{error.message} ({error.status} {error.code}"
    if error.field:
        text += f", field {error.field}"
    text += ")"
    if error.status == 401:
        text += ("; give a credential: --token-file FILE, DISPATCHER_TOKEN or "
                 "DISPATCHER_TOKEN_FILE")
    if error.retry_after:
        text += f"; try again in {error.retry_after:g} s"
    return text
