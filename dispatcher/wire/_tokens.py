"""
Lease tokens as the worker protocol carries them: unguessable, yet
checked without a lookup and still good after a restart.

The store fences a job's writes with a counter that grows with every lease
it grants (L{Lease.token}): a write that names an older counter is stale.
A counter alone is guessable (consecutive leases had tokens 1, 8, 15), and a
worker that could guess another's token could write its log.  So what a
worker is given is C{"<counter>.<mac>"}: the counter, and the first 128
bits of HMAC-SHA256 over the job's id and the counter, under a 256-bit key
only the dispatcher holds, in base64url.  Every write a worker makes is
checked against it in constant time before its counter means anything; a
token whose MAC is wrong is refused exactly as a stale one is (the worker
learns nothing of the job's lease from it).

Why a MAC rather than a random token per lease: the store's fencing and
its schema stay as they are (the counter still orders leases and ends
them), nothing more is written for a lease, and a dispatcher that restarts
with the same key verifies the tokens of the leases it resumes.  The job's
id is in the MAC so that a token is good for its own job alone, even if a
fresh store ever counted from 1 again under the same key.  The key is made
by the daemon on its first start (L{dispatcher.app._daemon}).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from typing import Optional

from dispatcher.wire._types import LEASE_TOKEN, MAX_COUNTER

# The key's size, and how much of the MAC a token carries.
KEY_BYTES = 32
MAC_BYTES = 16

# What a token that this dispatcher did not give opens to: no lease has it
# (the store's counters start at 1), so the write is refused as stale.
NO_TOKEN = 0

_FORM = re.compile(LEASE_TOKEN)
# Written before every MAC: a MAC made for something else never opens.
_PURPOSE = b"dispatcher lease token\x00"

# How many tokens sealed or opened lately are remembered, so that opening
# one of them again costs a lookup, not a MAC (see LeaseTokens.open).
REMEMBERED_TOKENS = 65_536


def new_key() -> bytes:
    """
    A fresh random key.
    """
    return secrets.token_bytes(KEY_BYTES)


class LeaseTokens:
    """
    Seals a lease's fencing counter into the token a worker is given, and
    opens the tokens workers send back.

    @param key: the dispatcher's secret key (L{KEY_BYTES} random bytes), or
        C{None} until it is read at start (L{use_key}).
    """

    def __init__(self, key: Optional[bytes] = None) -> None:
        self._key: Optional[bytes] = None
        # The counters of the tokens sealed or opened lately, by job id and
        # token: each remote job's token is sealed once and opened in its
        # result, and in every request for work of its worker while it
        # holds the lease (a worker of 16 leases lists them all in each),
        # about four MACs a job otherwise.  The oldest are forgotten first.
        self._known: dict[tuple[str, str], int] = {}
        if key is not None:
            self.use_key(key)

    def use_key(self, key: bytes) -> None:
        """
        Seal and open with C{key} from now on.
        """
        if len(key) < KEY_BYTES:
            raise ValueError(f"a lease token key has at least {KEY_BYTES} bytes")
        self._key = key
        self._known.clear()

    def _remember(self, job_id: str, token: str, counter: int) -> None:
        known = self._known
        known[(job_id, token)] = counter
        if len(known) > REMEMBERED_TOKENS:
            # Dicts keep their order: the first is the oldest.
            del known[next(iter(known))]

    def _mac(self, job_id: str, counter: int) -> str:
        if self._key is None:
            raise RuntimeError("the lease token key has not been read yet")
        message = _PURPOSE + job_id.encode("utf-8", "surrogatepass") + b"\x00%d" % counter
        digest = hmac.new(self._key, message, hashlib.sha256).digest()[:MAC_BYTES]
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")

    def seal(self, job_id: str, counter: int) -> str:
        """
        The token of the lease of C{job_id} whose fencing counter is
        C{counter}.
        """
        token = f"{counter}.{self._mac(job_id, counter)}"
        self._remember(job_id, token, counter)
        return token

    def open(self, job_id: str, token: str) -> int:
        """
        The fencing counter of C{token} if this dispatcher gave it for
        C{job_id}; L{NO_TOKEN} otherwise (a token it did not give, or gave
        for another job).  The MAC is compared in constant time.

        A token this dispatcher sealed or opened lately is found by
        lookup, whole, without a MAC: only a token equal to one it gave
        can be found so (a dict compares the whole string once its hash,
        keyed at random per process, matches), and any other is checked as
        above.
        """
        if type(token) is str:
            counter = self._known.get((job_id, token))
            if counter is not None:
                return counter
        if not isinstance(token, str) or _FORM.fullmatch(token) is None:
            return NO_TOKEN
        digits, _, mac = token.partition(".")
        counter = int(digits)
        if counter > MAX_COUNTER:
            return NO_TOKEN
        expected = self._mac(job_id, counter)
        if not hmac.compare_digest(mac.encode("ascii"), expected.encode("ascii")):
            return NO_TOKEN
        self._remember(job_id, token, counter)
        return counter
