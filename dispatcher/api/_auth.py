"""
Who a request comes from and whether it may go on, decided on its head:
before its body is read, before a C{100 Continue} invites one, and before
an unknown path's C{404} tells a stranger what exists.

A caller is identified by its bearer token (a named credential of
L{dispatcher.store._credentials}, or a C{token_file}'s), or, on a UNIX
socket, by the account the kernel says it runs as (C{SO_PEERCRED}): root
and the daemon's own account are admins, any other account is the
credential of its name, if there is one; or, from a browser, by the
dashboard's session cookie (L{dispatcher.api._dashboard}), whose writes
(any method but GET and HEAD) must also send the session's CSRF token as
C{X-CSRF-Token}.  A bearer token comes first: a request that has one is
judged by it alone, whatever cookie it carries.  The route table
(L{dispatcher.api._routes}) says what each route needs; the role's rules
are L{dispatcher.model._principals}'.

Refusals are logged at warning with who and what, at most
C{AUDIT_BURST} lines every C{AUDIT_WINDOW} seconds and then one line
saying how many were left out, so that a flood cannot fill the disk.
"""

from __future__ import annotations

import pwd
from typing import Any, Mapping, Optional

from twisted.logger import Logger

from dispatcher.api._dashboard import CSRF_HEADER, SAFE_METHODS, Session, Sessions, session_id
from dispatcher.api._hosts import HostPolicy
from dispatcher.api._routes import MAX_ANONYMOUS_BODY_BYTES, Router, path_segments
from dispatcher.model._principals import ALLOWED, Access, Principal, Role
from dispatcher.store._credentials import CredentialFile
from dispatcher.wire._submission import ApiError

log = Logger()

# Refusals logged in full per window; the rest are counted.
AUDIT_BURST = 20
AUDIT_WINDOW = 10.0

# The caller of an open route that sent no credential, and every caller
# of a daemon whose authentication is off.
ANONYMOUS = Principal("anonymous", Role.READER)
UNAUTHENTICATED_ADMIN = Principal("local", Role.ADMIN)

CHALLENGE = b'Bearer realm="dispatcher"'

# The refusal of a body over MAX_ANONYMOUS_BODY_BYTES from a caller without
# a credential: 413, from the head when it has a Content-Length.  1,500
# strangers' bodies of 1 MiB held open on /healthz took 1.5 GB before
# (bench/body_flood.py).
ANONYMOUS_BODY_TOO_LARGE = ApiError(
    413,
    "body_too_large",
    f"a request without a credential may carry a body of at most "
    f"{MAX_ANONYMOUS_BODY_BYTES} bytes; send 'Authorization: Bearer <token>'",
    "Authorization",
)


class Refusal(ApiError):
    """
    A request refused on its head, with the headers its answer carries.
    """

    def __init__(self, *args: Any, headers: Optional[Mapping[bytes, bytes]] = None, **kw: Any) -> None:
        ApiError.__init__(self, *args, **kw)
        self.headers = dict(headers or {})


def _unauthorized(message: str) -> Refusal:
    return Refusal(
        401, "unauthorized", message, "Authorization",
        headers={b"www-authenticate": CHALLENGE},
    )


class AuditLog:
    """
    Logs refusals at warning, at most L{AUDIT_BURST} lines a window.
    """

    def __init__(self, clock: Any) -> None:
        self._clock = clock
        self._window_start = float("-inf")
        self._lines = 0
        self._left_out = 0

    def refused(self, error: ApiError, method: bytes, path: bytes, who: str, client: str) -> None:
        now = self._clock.seconds()
        if now - self._window_start >= AUDIT_WINDOW:
            if self._left_out:
                log.warn(
                    "{count} more refused requests in {window:.0f} s were not logged "
                    "one by one",
                    count=self._left_out,
                    window=AUDIT_WINDOW,
                )
            self._window_start = now
            self._lines = 0
            self._left_out = 0
        if self._lines >= AUDIT_BURST:
            self._left_out += 1
            return
        self._lines += 1
        log.warn(
            "refused {method} {path} from {client} ({principal}): {status} {code}: {message}",
            method=method.decode("ascii", "replace"),
            path=path[:200].decode("ascii", "replace"),
            client=client,
            principal=who,
            status=error.status,
            code=error.code,
            message=error.message,
        )


class Gate:
    """
    Finds a request's principal from its head, and refuses it there when
    it may not go on.

    @param credentials: the named credentials and the token files'.
    @param hosts: the C{Host} and C{Origin} rules.
    @param router: the route table's router.
    @param clock: the time the audit log's rate counts on.
    @param required: whether a credential is needed (C{[api]
        authentication = required}); when it is not, every caller is an
        admin named C{local}.
    @param own_uid: the daemon's account, an admin on a UNIX socket.
    @param sessions: the dashboard's sessions, which a request's cookie
        may name; none when C{None}.
    """

    def __init__(
        self,
        credentials: CredentialFile,
        hosts: HostPolicy,
        router: Router,
        clock: Any,
        required: bool = True,
        own_uid: Optional[int] = None,
        sessions: Optional[Sessions] = None,
    ) -> None:
        self.credentials = credentials
        self.sessions = sessions
        self.hosts = hosts
        self._router = router
        self.required = required
        self._own_uid = own_uid
        self.audit = AuditLog(clock)

    def check(
        self,
        method: bytes,
        path: bytes,
        headers: Mapping[bytes, bytes],
        peer_uid: Optional[int] = None,
        client: str = "-",
        secure: bool = False,
    ) -> Principal:
        """
        The principal of a request, if it may go on to its handler.

        @param path: the request's path, without its query.
        @param peer_uid: the caller's account, on a UNIX socket.
        @param secure: whether the request came over TLS (which session
            cookie counts: L{dispatcher.api._dashboard.session_id}).
        @raise Refusal: it may not: a C{Host} or C{Origin} not allowed
            (400, 403), no valid credential for a route that needs one or
            for a path that does not exist (401), a role that may not call
            the route (403), a write authenticated by the session cookie
            without its CSRF token (403).
        """
        principal: Optional[Principal] = None
        try:
            self.hosts.check_headers(headers)
            principal, session = self._identify(headers, peer_uid, secure)
            return self._authorize(method, path, principal, session, headers)
        except ApiError as e:
            self.audit.refused(
                e, method, path, principal.name if principal else "no credential", client
            )
            raise

    def session_of(self, headers: Mapping[bytes, bytes], secure: bool) -> Optional[Session]:
        """
        The live dashboard session a request's cookie names, or C{None}.
        """
        if self.sessions is None:
            return None
        found = session_id(headers.get(b"cookie"), secure)
        return None if found is None else self.sessions.find(found)

    def _identify(
        self, headers: Mapping[bytes, bytes], peer_uid: Optional[int], secure: bool
    ) -> tuple[Optional[Principal], Optional[Session]]:
        if not self.required:
            return UNAUTHENTICATED_ADMIN, None
        raw = headers.get(b"authorization")
        if raw is not None:
            scheme, _, token = raw.partition(b" ")
            token = token.strip()
            if scheme.lower() != b"bearer" or not token:
                raise _unauthorized(
                    "send a token as 'Authorization: Bearer <token>' (dispatcher token create)"
                )
            principal = self.credentials.authenticate(token)
            if principal is None:
                raise _unauthorized(
                    "the bearer token is not one this dispatcher knows (revoked, "
                    "mistyped, or of another dispatcher)"
                )
            return principal, None
        if b"cookie" in headers:
            session = self.session_of(headers, secure)
            if session is not None:
                # The token again, at each request: a revoked credential's
                # sessions end with it.
                principal = self.credentials.authenticate(session.token)
                if principal is not None:
                    return principal, session
                assert self.sessions is not None
                self.sessions.end(session.id)
        if peer_uid is not None:
            return self._local(peer_uid), None
        return None, None

    def _local(self, uid: int) -> Optional[Principal]:
        """
        The principal of a UNIX socket's caller, by its account.
        """
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)
        if uid == 0 or uid == self._own_uid:
            return Principal(name, Role.ADMIN)
        return self.credentials.named(name)

    def _authorize(
        self,
        method: bytes,
        path: bytes,
        principal: Optional[Principal],
        session: Optional[Session],
        headers: Mapping[bytes, bytes],
    ) -> Principal:
        found = self._router.match(path_segments(path))
        if found is None:
            if principal is None:
                # Not 404: a stranger learns nothing of what exists.
                raise _unauthorized("this dispatcher needs a credential: send 'Authorization: Bearer <token>'")
            if session is not None:
                _check_csrf(method, session, headers)
            return principal
        routes, _ = found
        name = method.decode("ascii", "replace").upper()
        if name == "HEAD":
            name = "GET"
        route = routes.get(name) or next(iter(routes.values()))
        if route.auth is Access.OPEN:
            # An open route acts for no one: the cookie grants it nothing.
            return principal or ANONYMOUS
        if session is not None:
            _check_csrf(method, session, headers)
        if principal is None:
            raise _unauthorized(
                f"{route.method} {route.path} needs a credential: send "
                "'Authorization: Bearer <token>' (dispatcher token create)"
            )
        if not principal.may(route.auth):
            raise Refusal(
                403,
                "forbidden",
                f"{principal.name} ({principal.role.value}) may not call "
                f"{route.method} {route.path}; it needs a role of: "
                + ", ".join(sorted(r.value for r in ALLOWED[route.auth])),
                "Authorization",
            )
        return principal


def _check_csrf(method: bytes, session: Session, headers: Mapping[bytes, bytes]) -> None:
    """
    Refuse (403 C{csrf_failed}) a write that the session cookie
    authenticates without the session's CSRF token in C{X-CSRF-Token}: a
    page of another site cannot read the token, so it cannot have sent it.
    """
    if method.upper() in SAFE_METHODS:
        return
    if not session.csrf_matches(headers.get(CSRF_HEADER)):
        raise Refusal(
            403,
            "csrf_failed",
            "a request authenticated by the dashboard's session cookie that "
            "changes something must send the session's CSRF token as "
            "X-CSRF-Token (GET /ui/session gives it)",
            "X-CSRF-Token",
        )
