"""
Quotas per owner: the most unfinished jobs an owner may have, and how
fast it may submit, from C{[quota]}, C{[quota:role=ROLE]} and
C{[quota:owner=NAME]} (L{dispatcher.config.Quotas}).

A request over either is answered C{429} with C{Retry-After}, and nothing
of it is stored: a batch or an array is refused whole.  The count of
unfinished jobs is the store's, checked by its single writer as the jobs
are stored (exact whatever the concurrency); the rate is this module's, a
token bucket per owner kept in this daemon's memory: it starts full at
each start, and two daemons (there is one per data directory) would each
keep their own.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from dispatcher.config._ini import QuotaLimits, Quotas
from dispatcher.model._principals import Principal
from dispatcher.wire._submission import ApiError

# What a refusal for too many unfinished jobs tells the client to wait:
# how soon jobs finish is not known, and a client that polls every few
# seconds costs little.
UNFINISHED_RETRY_AFTER = 10

# How many owners' buckets are kept before the full ones are forgotten (a
# full bucket is the same as none).
_FORGET_AFTER = 1024


class QuotaExceeded(ApiError):
    """
    A 429: the request would pass its owner's quota.  Its answer says when
    to try again, in C{Retry-After} and in the error's C{retry_after}.
    """

    def __init__(self, code: str, message: str, field: Optional[str], retry_after: int) -> None:
        ApiError.__init__(self, 429, code, message, field, {"retry_after": retry_after})
        self.retry_after = retry_after
        self.headers = {b"retry-after": str(retry_after).encode("ascii")}


def too_many_unfinished(error: Any, field: Optional[str]) -> QuotaExceeded:
    """
    The 429 for the store's L{TooManyUnfinished} C{error}.
    """
    return QuotaExceeded(
        "too_many_jobs",
        f"{field + ': ' if field else ''}{error} ([quota] max_jobs); nothing was stored; "
        "try again once some have finished",
        field,
        UNFINISHED_RETRY_AFTER,
    )


class _Bucket:
    __slots__ = ("tokens", "at", "rate", "burst")

    def __init__(self, tokens: float, at: float, rate: float, burst: int) -> None:
        self.tokens = tokens
        self.at = at
        self.rate = rate
        self.burst = burst

    def refill(self, now: float) -> None:
        self.tokens = min(float(self.burst), self.tokens + (now - self.at) * self.rate)
        self.at = max(self.at, now)


class SubmissionRates:
    """
    Each owner's quota (L{Quotas.limits}), and a token bucket per owner
    for its rate: C{rate} jobs a second refill it, up to C{burst}.

    A request for C{n} jobs takes C{n} tokens.  It is let through while
    the bucket holds at least C{n}, or is full when C{n} is more than the
    bucket holds at all (so that an array larger than the burst is not
    refused for ever); the bucket may then go below zero, and later
    requests wait until it has refilled: over time no owner submits faster
    than its rate.

    @param quotas: the configured quotas.
    @param clock: an C{IReactorTime}: the buckets refill on its time.
    """

    def __init__(self, quotas: Quotas, clock: Any) -> None:
        self._quotas = quotas
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._limits: dict[tuple[str, str], QuotaLimits] = {}

    def limits(self, principal: Principal) -> QuotaLimits:
        """
        The quota of C{principal}.
        """
        key = (principal.name, principal.role.value)
        found = self._limits.get(key)
        if found is None:
            found = self._limits[key] = self._quotas.limits(*key)
        return found

    def take(self, principal: Principal, limits: QuotaLimits, jobs: int, field: Optional[str]) -> None:
        """
        Take C{jobs} tokens from C{principal}'s bucket, or refuse the
        request (L{QuotaExceeded}, naming C{field}) and take none.
        """
        rate, burst = limits.rate, limits.burst
        if rate is None or burst is None:
            return
        now = self._clock.seconds()
        bucket = self._buckets.get(principal.name)
        if bucket is None:
            if len(self._buckets) >= _FORGET_AFTER:
                self._forget_full(now)
            bucket = self._buckets[principal.name] = _Bucket(float(burst), now, rate, burst)
        else:
            # (A configuration is read once: the limits stay the owner's.)
            bucket.refill(now)
        needed = min(jobs, burst)
        if bucket.tokens < needed:
            wait = max(1, math.ceil((needed - bucket.tokens) / rate))
            raise QuotaExceeded(
                "too_many_submissions",
                f"{field + ': ' if field else ''}{principal.name} may submit {rate:g} jobs a "
                f"second, {burst} at once ([quota] rate, burst); these {jobs} jobs must "
                f"wait {wait} s; nothing was stored",
                field,
                wait,
            )
        bucket.tokens -= jobs

    def give_back(self, principal: Principal, limits: QuotaLimits, jobs: int) -> None:
        """
        Return C{jobs} tokens taken for a request that stored nothing.
        """
        if limits.rate is None or limits.burst is None:
            return
        bucket = self._buckets.get(principal.name)
        if bucket is not None:
            bucket.tokens = min(float(limits.burst), bucket.tokens + jobs)

    def _forget_full(self, now: float) -> None:
        for name, bucket in list(self._buckets.items()):
            bucket.refill(now)
            if bucket.tokens >= bucket.burst:
                del self._buckets[name]
