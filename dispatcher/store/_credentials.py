"""
The credentials file: the named bearer tokens the API accepts, each with
its role, kept as SHA-256 hashes in C{DATA_DIR/credentials.json}.

The daemon and the C{dispatcher token} command share it: a change is a
whole new file put in place with C{rename} (under C{flock}, so that two
changes never lose one another), and the daemon sees it at the next
request, so that a revocation takes effect at once, without a restart.

Why a file and not a table of the job store: the command works on the
data directory while the daemon runs, and the store's file is the
daemon's alone (its commit mark, L{dispatcher.store._mark}, would call
another process's write damage).

Why SHA-256 and not a slow password hash: a token is 256 random bits, so
no dictionary or brute force can reach it from its hash (as with GitHub's
tokens); a fast hash keeps a request's check to a microsecond.  A token
that matched is remembered until the file changes, so that a client's
every request, whose head the check runs on, does not hash it again; the
file's C{stat} stays on every check, so that a change is seen at the next
request.  What authentication costs a request: docs/benchmarks.md, (j).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import secrets
import time
from typing import Any, Callable, Iterable, Optional

import attrs

from dispatcher.model._principals import (
    MAX_WORKER_NAMES,
    PRINCIPAL_NAME_RULE,
    Principal,
    Role,
    valid_name,
)

CREDENTIALS_NAME = "credentials.json"
ADMIN_TOKEN_NAME = "admin.token"
# A token's prefix: it tells a secret scanner (and a person) what it is.
TOKEN_PREFIX = "dsp_"
# The largest credentials file read: thousands of credentials fit.
MAX_FILE_BYTES = 16 * 1024 * 1024


class CredentialError(Exception):
    """
    A credential cannot be made, changed or read; the message says why.
    """


class CredentialExists(CredentialError):
    """
    A credential of that name exists.
    """


@attrs.frozen
class Credential:
    """
    One named credential as kept: its principal, its token's hash and
    when it was made.
    """

    principal: Principal
    digest: str
    created: float

    def to_json(self) -> dict[str, Any]:
        names = self.principal.worker_names
        return {
            "name": self.principal.name,
            "role": self.principal.role.value,
            "worker_names": None if names is None else sorted(names),
            "sha256": self.digest,
            "created": self.created,
        }


def digest(token: bytes) -> str:
    """
    The hash a token is kept as.
    """
    return hashlib.sha256(token).hexdigest()


def new_token() -> str:
    """
    A new random token: 256 bits, URL-safe, with L{TOKEN_PREFIX}.
    """
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def _parse(raw: bytes, path: str) -> list[Credential]:
    try:
        data = json.loads(raw)
        found = []
        for item in data["credentials"]:
            names = item.get("worker_names")
            principal = Principal(
                item["name"],
                Role(item["role"]),
                None if names is None else frozenset(names),
            )
            if not valid_name(principal.name) or len(item["sha256"]) != 64:
                raise ValueError(f"credential {principal.name!r} is malformed")
            found.append(Credential(principal, item["sha256"], float(item["created"])))
    except (ValueError, KeyError, TypeError) as e:
        raise CredentialError(
            f"{path} is not a credentials file ({e}); restore it from a backup, "
            "or move it away and make the credentials again"
        ) from e
    return found


def check_role(text: str) -> Role:
    try:
        return Role(text)
    except ValueError:
        raise CredentialError(
            f"unknown role {text!r}; expected one of: {', '.join(r.value for r in Role)}"
        ) from None


def check_name(name: str) -> str:
    if not valid_name(name):
        raise CredentialError(f"invalid credential name {name!r}: {PRINCIPAL_NAME_RULE}")
    return name


class CredentialFile:
    """
    The credentials of a data directory, read and changed.

    Reads (L{authenticate}, L{named}) look at the file's C{stat} and read
    it again when it changed; changes (L{create}, L{revoke}) block on file
    I/O, so the daemon runs them on its I/O pool.

    With C{recheck}, reads look at the C{stat} at most once in that many
    seconds: a removal another process made (C{dispatcher token revoke})
    holds from the first read after that; one made through this object (the
    API's) from the next read, whenever it comes; and a token or name not
    known is looked for in the file at once (a credential just made by
    C{dispatcher token create} works at its first request).  The daemon's
    is 1 s: a stat at every request cost a no-op job 1.8 us of the
    reactor's time.

    @param data_dir: the daemon's data directory, or C{None}: no file,
        the fixed principals alone.
    @param fixed: principals and their tokens that are not in the file
        (C{[api] token_file}, C{[workers] token_file}).
    @param recheck: the longest, in seconds, that a read trusts the file's
        last look (0: look at every read).
    @param now: the monotonic clock C{recheck} is measured by.
    """

    def __init__(
        self,
        data_dir: Optional[str],
        fixed: Iterable[tuple[Principal, str]] = (),
        recheck: float = 0.0,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = os.path.join(data_dir, CREDENTIALS_NAME) if data_dir else os.devnull
        self._lock_path = self.path + ".lock"
        self._fixed = {digest(token.encode("utf-8")): principal for principal, token in fixed}
        self._seen: Optional[tuple[int, int, int]] = None
        self._recheck = recheck
        self._now = now
        # When the file is next looked at (with recheck), and whether a
        # change of this object's asks for a look at once; set by a change
        # on the I/O pool after its file is in place, cleared by the read
        # before its look: a read never keeps what a change replaced.
        self._due = -math.inf
        self._changed = False
        self._by_digest: dict[str, Principal] = dict(self._fixed)
        self._by_name: dict[str, Principal] = {p.name: p for p in self._fixed.values()}
        self._credentials: list[Credential] = []
        # Tokens that matched a credential of the file as last read: one
        # per credential at most (a token that matched none is not kept).
        self._matched: dict[bytes, Principal] = {}

    def set_fixed(self, fixed: Iterable[tuple[Principal, str]]) -> None:
        """
        Take C{fixed} as the principals that are not in the file from now
        on (a reload of C{[api] token_file}, C{[workers] token_file}): a
        token dropped is refused at its next request.
        """
        self._fixed = {digest(token.encode("utf-8")): principal for principal, token in fixed}
        # Built again from the new ones at the next read.
        self._seen = (-1, -1, -1)
        self._changed = True

    # Reading

    def _refresh(self, now: bool = False) -> bool:
        """
        Read the file again if it changed since it was last read; whether
        it was looked at (not, within a recheck of the last look, unless
        C{now}).
        """
        if self.path == os.devnull:
            return True
        if self._recheck:
            at = self._now()
            if at < self._due and not self._changed and not now:
                return False
            self._changed = False
            self._due = at + self._recheck
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            seen = None
        else:
            seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        if seen == self._seen:
            return True
        credentials = self._read() if seen is not None else []
        self._seen = seen
        self._credentials = credentials
        by_digest = dict(self._fixed)
        by_name = {p.name: p for p in self._fixed.values()}
        for credential in credentials:
            by_digest[credential.digest] = credential.principal
            by_name[credential.principal.name] = credential.principal
        self._by_digest = by_digest
        self._by_name = by_name
        self._matched = {}
        return True

    def _read(self) -> list[Credential]:
        try:
            with open(self.path, "rb") as f:
                raw = f.read(MAX_FILE_BYTES + 1)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise CredentialError(f"cannot read {self.path}: {e.strerror}") from e
        if len(raw) > MAX_FILE_BYTES:
            raise CredentialError(f"{self.path} is over {MAX_FILE_BYTES} bytes")
        return _parse(raw, self.path)

    def authenticate(self, token: bytes) -> Optional[Principal]:
        """
        The principal whose token this is, or C{None}.
        """
        # The stat first (at every call, or once a recheck): a revoked
        # token must not pass from what was remembered any longer.
        looked = self._refresh()
        principal = self._matched.get(token)
        if principal is None:
            hashed = digest(token)
            principal = self._by_digest.get(hashed)
            if principal is None and not looked:
                # A token made since the last look (dispatcher token
                # create) works at once: one unknown is looked for again.
                self._refresh(now=True)
                principal = self._by_digest.get(hashed)
            if principal is not None:
                self._matched[token] = principal
        return principal

    def named(self, name: str) -> Optional[Principal]:
        """
        The principal of this name (a local account's, for a UNIX socket's
        caller), or C{None}.
        """
        looked = self._refresh()
        principal = self._by_name.get(name)
        if principal is None and not looked:
            self._refresh(now=True)
            principal = self._by_name.get(name)
        return principal

    def credentials(self) -> list[Credential]:
        """
        The credentials in the file, in the order they were made.
        """
        self._refresh()
        return list(self._credentials)

    def has_admin(self) -> bool:
        """
        Whether an admin credential is configured, in the file or fixed.
        """
        self._refresh()
        return any(p.role is Role.ADMIN for p in self._by_digest.values())

    # Changing

    def create(
        self, name: str, role: Role, worker_names: Optional[Iterable[str]] = None
    ) -> tuple[str, Credential]:
        """
        Make a credential; its token (kept nowhere but in the answer: only
        its hash is stored) and the credential as kept.

        A worker credential acts under C{worker_names}, by default its own
        name alone.

        @raise CredentialError: the name is taken or invalid, or the file
            cannot be written.
        """
        check_name(name)
        names: Optional[frozenset[str]] = None
        if role is Role.WORKER:
            names = frozenset(worker_names) if worker_names else frozenset({name})
            if len(names) > MAX_WORKER_NAMES:
                raise CredentialError(
                    f"a worker credential may list at most {MAX_WORKER_NAMES} worker names"
                )
            for worker_name in names:
                if not valid_name(worker_name):
                    raise CredentialError(
                        f"invalid worker name {worker_name!r}: {PRINCIPAL_NAME_RULE}"
                    )
        elif worker_names:
            raise CredentialError("only a worker credential lists worker names")
        token = new_token()
        with self._locked():
            credentials = self._read()
            taken = {c.principal.name for c in credentials}
            taken.update(p.name for p in self._fixed.values())
            if name in taken:
                raise CredentialExists(
                    f"a credential named {name!r} exists; revoke it first, or choose another name"
                )
            made = Credential(
                Principal(name, role, names), digest(token.encode("ascii")), time.time()
            )
            credentials.append(made)
            self._write(credentials)
        return token, made

    def create_workers(self, names: Iterable[str]) -> list[str]:
        """
        Make a worker credential for each of C{names} (each acting under
        its own name alone), in one write of the file; their tokens, in
        order.  All are made or none.

        @raise CredentialError: a name is taken or invalid, or the file
            cannot be written.
        """
        names = list(names)
        for name in names:
            check_name(name)
        tokens = [new_token() for _ in names]
        now = time.time()
        with self._locked():
            credentials = self._read()
            taken = {c.principal.name for c in credentials}
            taken.update(p.name for p in self._fixed.values())
            for name in names:
                if name in taken:
                    raise CredentialExists(
                        f"a credential named {name!r} exists; revoke it first, or "
                        "choose another name"
                    )
                taken.add(name)
            credentials.extend(
                Credential(
                    Principal(name, Role.WORKER, frozenset({name})),
                    digest(token.encode("ascii")),
                    now,
                )
                for name, token in zip(names, tokens)
            )
            self._write(credentials)
        return tokens

    def revoke_many(self, names: Iterable[str]) -> int:
        """
        Remove the credentials named in C{names}, in one write of the file
        (none if none of them is there); how many there were.
        """
        gone = set(names)
        with self._locked():
            credentials = self._read()
            kept = [c for c in credentials if c.principal.name not in gone]
            if len(kept) == len(credentials):
                return 0
            self._write(kept)
        return len(credentials) - len(kept)

    def revoke(self, name: str) -> bool:
        """
        Remove the credential C{name}; whether there was one.
        """
        with self._locked():
            credentials = self._read()
            kept = [c for c in credentials if c.principal.name != name]
            if len(kept) == len(credentials):
                return False
            self._write(kept)
        return True

    def _locked(self) -> Any:
        if self.path == os.devnull:
            raise CredentialError("no data directory: credentials cannot be kept")
        return _FileLock(self._lock_path)

    def _write(self, credentials: list[Credential]) -> None:
        body = json.dumps(
            {"version": 1, "credentials": [c.to_json() for c in credentials]}, indent=1
        ).encode("utf-8")
        write_private(self.path, body)
        # The next read sees the new file whatever its stat, and however
        # recently it looked.
        self._seen = None
        self._changed = True


class _FileLock:
    """
    An exclusive C{flock} on a lock file beside the credentials, held
    between two processes' read-modify-writes.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._fd = -1

    def __enter__(self) -> None:
        try:
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise CredentialError(f"cannot open {self._path}: {e.strerror}") from e
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: Any) -> None:
        os.close(self._fd)


def write_private(path: str, body: bytes) -> None:
    """
    Put C{body} in the file at C{path}, mode 0600, whole or not at all: a
    new file written, synced and renamed over the old one.

    @raise CredentialError: it cannot be written.
    """
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(body)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise CredentialError(f"cannot write {path}: {e.strerror}") from e


def make_admin_token(data_dir: str, credentials: CredentialFile) -> Optional[str]:
    """
    On a start with no admin credential: make one named C{admin} and put
    its token in C{DATA_DIR/admin.token} (0600) for the CLI and the people
    of this account; the file's path, or C{None} when an admin credential
    exists already (or a credential named C{admin}).  Blocks on file I/O.
    """
    if credentials.has_admin() or credentials.named("admin") is not None:
        return None
    path = os.path.join(data_dir, ADMIN_TOKEN_NAME)
    token, _ = credentials.create("admin", Role.ADMIN)
    write_private(path, (token + "\n").encode("ascii"))
    return path
