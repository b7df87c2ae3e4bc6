"""
The dashboard at C{/ui/}: its static files, and the cookie sessions a
browser logs in with.

A browser cannot send C{Authorization: Bearer} on an C{EventSource} or
keep a token out of reach of a page's scripts, so the dashboard logs in
once: the user pastes a token, the daemon checks it and answers a cookie
naming a I{session}, a random 256-bit id.  The cookie never carries the
token.  It is C{HttpOnly} (no script reads it), C{SameSite=Strict} (no
request another site starts carries it, a link followed from elsewhere
included), C{Path=/}, and over TLS C{Secure} with the C{__Host-} prefix
(no other host of the domain can set a cookie of that name for it).

Sessions are kept in memory, in a map keyed by their ids, and die with the
daemon: after a restart the dashboard asks for the token again.  Kept on
disk they would need a table (a schema migration), and the ids there would
be secrets at rest; a dashboard logs in again in a second, and what a
session adds (an id and a CSRF token) is nothing a restart should keep.
The map is bounded (L{MAX_SESSIONS} in all, L{MAX_SESSIONS_PER_CREDENTIAL}
for one credential, its least recently used ended first), and a session
ends after L{SESSION_IDLE} seconds unused or L{SESSION_LIFETIME} seconds
in all, or at its logout.

A session keeps the token it was opened with, in memory alone, and every
request it authenticates checks that token again
(L{dispatcher.store.CredentialFile.authenticate}): a revoked credential's
sessions are refused from its next request on, as its bearer token is.

Writes need more than the cookie: each session has its own random CSRF
token, which the login's answer (and C{GET /ui/session}) give to the page,
and a request that the cookie authenticates with a method other than GET
or HEAD must send it as C{X-CSRF-Token} (L{dispatcher.api._auth.Gate},
where every rule of who a request comes from lives).  A request with a
bearer token is judged by its token alone, as it always was.  Besides
these, the API's own rules hold: every POST says C{Content-Type:
application/json}, which no cross-site form can send without a CORS
preflight the daemon never answers, and an C{Origin} not the daemon's own
is refused.

Every answer of the dashboard carries headers that keep it in its own
window and its own files (L{PAGE_HEADERS}): a Content-Security-Policy
that runs no inline script and loads nothing from elsewhere, framing
refused (C{frame-ancestors 'none'}, C{X-Frame-Options: DENY}), and
C{nosniff}.
"""

from __future__ import annotations

import hmac
import os
import secrets
from typing import Any, Iterator, Optional

import attrs
from twisted.internet.interfaces import ISSLTransport

from dispatcher.model._principals import Principal

# The cookie's name: over TLS with the __Host- prefix, which a browser
# accepts only from a secure origin, with Path=/ and without Domain.
COOKIE_NAME = b"dispatcher-session"
SECURE_COOKIE_NAME = b"__Host-dispatcher-session"

# The header a write authenticated by the cookie sends its CSRF token in.
CSRF_HEADER = b"x-csrf-token"

# Methods that change nothing: the only ones the cookie alone authenticates.
SAFE_METHODS = frozenset({b"GET", b"HEAD"})

# A session ends after this long unused, and this long after its login
# whatever its use (seconds).
SESSION_IDLE = 8 * 3600.0
SESSION_LIFETIME = 24 * 3600.0

# Sessions kept at once, in all and for one credential (its least recently
# used is ended to open another).
MAX_SESSIONS = 4096
MAX_SESSIONS_PER_CREDENTIAL = 16

# The random bytes of a session's id and of its CSRF token.
SECRET_BYTES = 32

# The longest session id read from a cookie (token_urlsafe(32) is 43).
_MAX_ID = 64

# The headers of every answer of the dashboard (its pages, its files, its
# session's answers).
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # A new version of the daemon serves new files: never a stale one.
    "Cache-Control": "no-cache",
}
# The answers that carry a CSRF token are not kept by any cache.
SESSION_HEADERS = {**PAGE_HEADERS, "Cache-Control": "no-store"}

# The files of the dashboard: package data (pyproject.toml), read once.
FILES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dashboard")
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
}
INDEX = "index.html"


class TooManySessions(Exception):
    """
    L{MAX_SESSIONS} sessions are open: a login must wait for one to end.
    """


@attrs.define
class Session:
    """
    One browser's login.

    @ivar id: the cookie's value.
    @ivar csrf: the token its writes send as C{X-CSRF-Token}.
    @ivar token: the credential's token it was opened with, checked again
        at each request.
    @ivar name: the principal's name when it logged in.
    @ivar created: when it was opened (the clock's seconds).
    @ivar used: when a request last came with it.
    """

    id: str
    csrf: str
    token: bytes = attrs.field(repr=False)
    name: str
    created: float
    used: float

    def csrf_matches(self, sent: Optional[bytes]) -> bool:
        """
        Whether C{sent} is this session's CSRF token (compared in constant
        time).
        """
        if not sent:
            return False
        return hmac.compare_digest(sent, self.csrf.encode("ascii"))


class Sessions:
    """
    The dashboard's sessions, in memory, by id.

    @param clock: an C{IReactorTime}: the time sessions expire on.
    """

    def __init__(
        self,
        clock: Any,
        idle: float = SESSION_IDLE,
        lifetime: float = SESSION_LIFETIME,
        max_sessions: int = MAX_SESSIONS,
        per_credential: int = MAX_SESSIONS_PER_CREDENTIAL,
    ) -> None:
        self._clock = clock
        self.idle = idle
        self.lifetime = lifetime
        self._max = max_sessions
        self._per_credential = per_credential
        self._by_id: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._by_id.values()))

    def _expired(self, session: Session, now: float) -> bool:
        return now - session.used >= self.idle or now - session.created >= self.lifetime

    def expires_at(self, session: Session) -> float:
        """
        When C{session} ends at the latest (its lifetime's end).
        """
        return session.created + self.lifetime

    def open(self, token: bytes, principal: Principal) -> Session:
        """
        A new session for C{principal}, which C{token} authenticated.

        @raise TooManySessions: L{MAX_SESSIONS} are open and none expired.
        """
        now = self._clock.seconds()
        if len(self._by_id) >= self._max:
            for session in list(self._by_id.values()):
                if self._expired(session, now):
                    del self._by_id[session.id]
            if len(self._by_id) >= self._max:
                raise TooManySessions()
        own = sorted(
            (s for s in self._by_id.values() if s.name == principal.name),
            key=lambda s: s.used,
        )
        for session in own[: max(0, len(own) - self._per_credential + 1)]:
            del self._by_id[session.id]
        session = Session(
            id=secrets.token_urlsafe(SECRET_BYTES),
            csrf=secrets.token_urlsafe(SECRET_BYTES),
            token=token,
            name=principal.name,
            created=now,
            used=now,
        )
        self._by_id[session.id] = session
        return session

    def find(self, session_id: str) -> Optional[Session]:
        """
        The live session of this id, marked used now; C{None} if there is
        none (never was, ended, or expired: then it is dropped).
        """
        session = self._by_id.get(session_id)
        if session is None:
            return None
        now = self._clock.seconds()
        if self._expired(session, now):
            del self._by_id[session_id]
            return None
        session.used = now
        return session

    def end(self, session_id: str) -> bool:
        """
        End the session of this id; whether there was one.
        """
        return self._by_id.pop(session_id, None) is not None


def cookie_name(secure: bool) -> bytes:
    """
    The session cookie's name on a connection that is TLS or not.
    """
    return SECURE_COOKIE_NAME if secure else COOKIE_NAME


def session_id(cookie_header: Optional[bytes], secure: bool) -> Optional[str]:
    """
    The session id a request's C{Cookie} header carries under the name of
    its connection (L{cookie_name}), or C{None}.  Over TLS only the
    C{__Host-} name counts: a cookie without the prefix may have been set
    by another host of the domain.
    """
    if not cookie_header:
        return None
    name = cookie_name(secure)
    for pair in cookie_header.split(b";"):
        key, sep, value = pair.strip().partition(b"=")
        if sep and key == name:
            value = value.strip().strip(b'"')
            if not value or len(value) > _MAX_ID:
                return None
            try:
                return value.decode("ascii")
            except UnicodeDecodeError:
                return None
    return None


def set_cookie(session: Session, secure: bool, max_age: float) -> str:
    """
    The C{Set-Cookie} header that gives a browser C{session}.
    """
    attributes = f"Path=/; Max-Age={int(max_age)}; HttpOnly; SameSite=Strict"
    if secure:
        attributes += "; Secure"
    return f"{cookie_name(secure).decode('ascii')}={session.id}; {attributes}"


def clear_cookie(secure: bool) -> str:
    """
    The C{Set-Cookie} header that makes a browser forget the session cookie.
    """
    attributes = "Path=/; Max-Age=0; HttpOnly; SameSite=Strict"
    if secure:
        attributes += "; Secure"
    return f"{cookie_name(secure).decode('ascii')}=; {attributes}"


def is_tls(channel: Any) -> bool:
    """
    Whether a request came over TLS (its connection's transport is one).
    """
    return ISSLTransport.providedBy(getattr(channel, "transport", None))


@attrs.frozen
class StaticFile:
    """
    One file of the dashboard, as it is answered.
    """

    body: bytes
    content_type: str


def load_files(directory: str = FILES_DIR) -> dict[str, StaticFile]:
    """
    The dashboard's files by name, read once at start (they are a few
    dozen kilobytes); only a name found here is ever answered, so that no
    request names a path on disk.
    """
    files = {}
    for name in sorted(os.listdir(directory)):
        content_type = CONTENT_TYPES.get(os.path.splitext(name)[1])
        path = os.path.join(directory, name)
        if content_type is None or not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            files[name] = StaticFile(f.read(), content_type)
    if INDEX not in files:
        raise RuntimeError(f"the dashboard's {INDEX} is missing from {directory}")
    return files
