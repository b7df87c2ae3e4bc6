"""
Staging a job's inputs: each L{InputSpec} is fetched over HTTP(S) with treq
into the job's working directory before the job runs.

A body streams from the connection to a temporary file beside its target in
batches written by a thread pool, so a file larger than memory never sits in
memory; the file is renamed into place only when the whole body arrived,
within the size limit and with the expected sha256.  Transient failures
(connection errors, timeouts, 5xx, 408 and 429 answers) are retried with an
exponential back-off.

The client given connects only where the fetch policy allows
(L{dispatcher.execution._http_client.input_http_client}); a refused
address fails the input at once, saying which address and how to allow
it.  A URL with credentials in it (C{user:password@}) is refused: they
would never be sent, and they appear in no error and no log line (shown
as C{***}).
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import os
import random
import re
import secrets
from typing import Any, Callable, Optional, Sequence

from hyperlink import DecodedURL, EncodedURL
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectError, ConnectionRefusedError, DNSLookupError
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.web.client import (
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH
from zope.interface import implementer

from dispatcher.config._ini import FetchConfig
from dispatcher._deferreds import shielded
from dispatcher.execution._http_client import AddressRefused, CredentialsInURL
from dispatcher.execution._interfaces import IInputStager
from dispatcher.model._jobs import InputSpec

log = Logger()

# The body is written in batches of about this size: big enough that the
# thread hand-off costs little, small enough to keep memory flat.
_BATCH_BYTES = 256 * 1024

# When this much of a body is buffered or being written, the connection is
# paused until the writes catch up.
_HIGH_WATER_BYTES = 4 * _BATCH_BYTES

# Statuses that say "try again later" rather than "this will never work".
_RETRY_STATUSES = frozenset({408, 429})

# The user:password@ of a URL: everything of its authority up to the last
# "@" (an authority ends at the first "/", "?" or "#"; a backslash, which
# browsers read as "/", is taken as part of it: more is hidden, not less).
_USERINFO = re.compile(r"^(\s*[A-Za-z][A-Za-z0-9+.\-]*:)?//([^/?#]*)@")


def redact_url(text: str) -> str:
    """
    C{text} with the credentials (C{user:password@}) of its URL shown as
    C{***@}: what errors and log lines show of an input's URL.
    """
    return _USERINFO.sub(lambda m: f"{m.group(1) or ''}//***@", text, count=1)


def _userinfo(text: str) -> Optional[str]:
    match = _USERINFO.match(text)
    return match.group(2) if match else None


class StagingError(Exception):
    """
    An input could not be staged.

    @ivar index: the position of the input in the job's list of inputs.
    @ivar url: the URL it was fetched from, its credentials (if any)
        shown as C{***}.
    @ivar path: where it was to be written, relative to the job's working
        directory.
    @ivar reason: what went wrong, in words a user can act on.
    """

    def __init__(self, index: int, url: str, path: str, reason: str) -> None:
        url = redact_url(url)
        super().__init__(index, url, path, reason)
        self.index = index
        self.url = url
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"input {self.index} ({self.url} -> {self.path}): {self.reason}"


class _TryFailed(Exception):
    """
    One try at fetching an input failed; C{retry} tells whether another try
    may succeed.
    """

    def __init__(self, reason: str, retry: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry = retry


@implementer(IInputStager)
class InputStager:
    """
    Fetches a job's inputs over HTTP or HTTPS into its working directory.

    @param client: a C{treq.client.HTTPClient} (or an object with its
        C{get}, such as C{treq.testing.StubTreq}); whoever made it owns its
        connection pool and closes it.
    @param clock: the L{IReactorTime} that times out fetches and spaces
        retries.
    @param config: the L{FetchConfig} limits: C{timeout} for one try at one
        input (connect, headers and body), C{retries} after the first try,
        the first back-off C{retry_delay}, and C{max_bytes} per input.
    @param threadpool: the L{ThreadPool} every file-system call runs in.
    @param reactor: the reactor the thread pool reports back to.
    @ivar staged_bytes: the bytes of every input staged so far.
    @ivar staged_inputs: how many inputs were staged.
    @ivar failed_inputs: how many inputs could not be staged (each fails
        its job's attempt); a cancelled one is neither.
    """

    def __init__(
        self,
        client: Any,
        clock: IReactorTime,
        config: FetchConfig,
        threadpool: ThreadPool,
        reactor: Any,
    ) -> None:
        self._client = client
        self._clock = clock
        self._config = config
        self._threadpool = threadpool
        self._reactor = reactor
        self._random = random.Random()
        self.staged_bytes = 0
        self.staged_inputs = 0
        self.failed_inputs = 0

    def stage_inputs(
        self,
        inputs: Sequence[InputSpec],
        workdir: str,
        owner: Optional[tuple[int, int]] = None,
    ) -> Deferred:
        """
        Fetch every input into C{workdir}, one after the other.

        @param inputs: the L{InputSpec}s of a job.
        @param workdir: the job's working directory; each input lands at
            C{workdir/path}, with its parent directories created, never
            through a symbolic link.
        @param owner: C{(uid, gid)} of the job's account, which the files
            and directories made are given to; C{None}: this process's.
        @return: a L{Deferred} that fires with C{None} when every input is in
            place, or fails with L{StagingError} for the first input that
            could not be fetched.  Cancelling it stops the fetch in progress
            and removes its temporary file.
        """
        stopped: list[bool] = []
        inner = Deferred.fromCoroutine(
            self._stage_all(list(inputs), workdir, stopped, owner)
        )

        def cancel(outer: Deferred) -> None:
            # Also stop between tries: a cancelled try may look like a
            # connection error, and must not be retried.
            stopped.append(True)
            inner.cancel()

        return shielded(inner, cancel)

    async def _stage_all(
        self,
        inputs: list[InputSpec],
        workdir: str,
        stopped: list[bool],
        owner: Optional[tuple[int, int]] = None,
    ) -> None:
        for index, spec in enumerate(inputs):
            try:
                await self._stage_one(index, spec, workdir, stopped, owner)
            except StagingError:
                self.failed_inputs += 1
                raise

    async def _stage_one(
        self,
        index: int,
        spec: InputSpec,
        workdir: str,
        stopped: list[bool] = [],
        owner: Optional[tuple[int, int]] = None,
    ) -> None:
        def error(reason: str) -> StagingError:
            return StagingError(index, spec.url, spec.path, reason)

        url = _check_url(spec.url)
        if isinstance(url, str):
            raise error(url)
        path_problem = _check_path(spec.path)
        if path_problem is not None:
            raise error(path_problem)

        tries = self._config.retries + 1
        started = self._clock.seconds()
        shown = redact_url(spec.url)
        log.info(
            "staging input {index} from {url} to {path}",
            index=index,
            url=shown,
            path=spec.path,
        )
        for number in range(1, tries + 1):
            if stopped:
                raise CancelledError()
            try:
                size = await self._try_with_timeout(url, spec, workdir, owner)
            except CancelledError:
                log.info("staging input {index} cancelled", index=index)
                raise
            except _TryFailed as e:
                if stopped:
                    raise CancelledError()
                if not e.retry:
                    where = f" (on try {number} of {tries})" if number > 1 else ""
                    raise error(e.reason + where)
                if number == tries:
                    raise error(
                        f"{e.reason}; gave up after {_tries(number)}"
                        f" ([fetch] retries = {self._config.retries})"
                    )
                base = self._config.retry_delay * 2 ** (number - 1)
                # Jitter keeps the jobs that failed together against one
                # server from all coming back to it at the same moment.
                delay = base * self._random.uniform(0.5, 1.0)
                log.warn(
                    "input {index} ({url}): {reason}; retrying in {delay:.2f} s"
                    " (try {number} of {tries})",
                    index=index,
                    url=shown,
                    reason=e.reason,
                    delay=delay,
                    number=number,
                    tries=tries,
                )
                await deferLater(self._clock, delay)
            except Exception as e:
                # A bug of ours still fails as this input, not as a mystery.
                log.failure(
                    "input {index} ({url}): unexpected error", index=index, url=shown
                )
                raise error(f"unexpected error: {type(e).__name__}: {e}")
            else:
                self.staged_bytes += size
                self.staged_inputs += 1
                log.info(
                    "staged input {index} to {path}: {size} bytes in {seconds:.3f} s",
                    index=index,
                    path=spec.path,
                    size=size,
                    seconds=self._clock.seconds() - started,
                )
                return

    async def _try_with_timeout(
        self,
        url: DecodedURL,
        spec: InputSpec,
        workdir: str,
        owner: Optional[tuple[int, int]] = None,
    ) -> int:
        """
        One try, cancelled if it takes longer than C{[fetch] timeout}.
        """
        attempt = Deferred.fromCoroutine(self._try_once(url, spec, workdir, owner))
        timed_out = False

        def time_out() -> None:
            nonlocal timed_out
            timed_out = True
            attempt.cancel()

        timeout = self._config.timeout
        timer = self._clock.callLater(timeout, time_out)
        try:
            return await attempt
        except Exception:
            # Whatever the cancellation made the try fail with (a cancelled
            # connection attempt, a lost connection), the cause was the time.
            if timed_out:
                raise _TryFailed(
                    f"timed out after {timeout:g} s ([fetch] timeout)", retry=True
                )
            raise
        finally:
            if timer.active():
                timer.cancel()

    async def _try_once(
        self,
        url: DecodedURL,
        spec: InputSpec,
        workdir: str,
        owner: Optional[tuple[int, int]] = None,
    ) -> int:
        """
        Fetch the body once into a temporary file and rename it into place;
        fire with the number of bytes, or fail with L{_TryFailed}.
        """
        part = _PartFile(self._in_thread, workdir, spec.path, owner)
        try:
            try:
                await part.open()
            except OSError as e:
                raise _TryFailed(_os_reason(e, spec.path), retry=False)
            except _OutsideWorkdir as e:
                raise _TryFailed(str(e), retry=False)

            try:
                response = await self._client.get(_request_url(url), unbuffered=True)
            except Exception as e:
                if _cancelled(e):
                    raise CancelledError() from e
                raise _request_failed(e, url)

            code = response.code
            if not 200 <= code < 300:
                _drop_body(response)
                phrase = _text(response.phrase)
                raise _TryFailed(
                    f"the server answered HTTP {code} {phrase}".rstrip(),
                    retry=code >= 500 or code in _RETRY_STATUSES,
                )
            limit = self._config.max_bytes
            if response.length is not UNKNOWN_LENGTH and response.length > limit:
                _drop_body(response)
                raise _TryFailed(
                    f"the server announced {response.length} bytes, larger than"
                    f" the limit of {limit} bytes ([fetch] max_bytes)",
                    retry=False,
                )

            writer = _BodyWriter(part, limit, spec.path)
            response.deliverBody(writer)
            await writer.done

            digest = part.hexdigest()
            if spec.sha256 is not None and digest != spec.sha256.lower():
                raise _TryFailed(
                    f"sha256 mismatch: expected {spec.sha256.lower()}, got {digest}",
                    retry=False,
                )
            try:
                await part.commit()
            except OSError as e:
                raise _TryFailed(_os_reason(e, spec.path), retry=False)
            return part.size
        except BaseException:
            # Queued behind any write still running, so the file is closed
            # and removed only once no thread uses it.
            await part.discard()
            raise

    def _in_thread(self, f: Callable[..., Any], *args: Any) -> Deferred:
        return deferToThreadPool(self._reactor, self._threadpool, f, *args)


def _tries(n: int) -> str:
    return "1 try" if n == 1 else f"{n} tries"


def _check_url(text: str) -> DecodedURL | str:
    """
    The URL to fetch, or the reason it cannot be fetched.
    """
    if _userinfo(text) is not None:
        return str(CredentialsInURL())
    try:
        url = DecodedURL.from_text(text)
    except Exception as e:
        return f"not a valid URL ({e})"
    scheme = url.scheme.lower()
    if not scheme:
        return "the URL has no scheme; only http and https URLs can be fetched"
    if scheme not in ("http", "https"):
        return f"only http and https URLs can be fetched, not {scheme}"
    if not url.host:
        return "the URL has no host"
    return url.replace(scheme=scheme)


class _URI(EncodedURL):
    """
    A URL already in URI form, which treq sends as it is.  treq makes a URI
    of every URL it is given, and hyperlink does that by IDNA-encoding the
    host, which fails for an IPv6 address (python-hyper/hyperlink#68 and
    #188): C{http://[2001:db8::1]/x} could not be fetched at all.
    """

    def to_uri(self) -> "_URI":
        return self


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    return True


def _uri_host(url: DecodedURL) -> str:
    """
    C{url}'s host as it goes on the wire: IDNA-encoded unless it is an IP
    address.
    """
    return url.host if _is_ip_literal(url.host) else url.to_uri().host


def _request_url(url: DecodedURL) -> Any:
    """
    What treq is given to fetch C{url}: C{url} itself, or, when its host
    is an IP address, its URI form that treq does not make again.
    """
    if not _is_ip_literal(url.host):
        return url
    encoded = url.replace(host="ip.invalid").to_uri().replace(host=url.host)
    return _URI.from_text(encoded.to_text())


def _check_path(path: str) -> Optional[str]:
    """
    Why C{path} cannot be a place in a working directory, or C{None}.
    """
    # Paths were checked when the job was submitted; this is the second
    # line of defence, and cheap because it looks only at the text.
    if not path:
        return "the path is empty; it must name a file in the working directory"
    if os.path.isabs(path):
        return "the path must be relative to the working directory"
    normal = os.path.normpath(path)
    if normal == os.curdir or normal == os.pardir or normal.startswith(os.pardir + os.sep):
        return "the path must name a file inside the working directory"
    return None


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return str(value or "")


def _os_reason(e: OSError, path: str) -> str:
    detail = e.strerror or str(e)
    return f"cannot write {path} in the working directory: {detail}"


def _cancelled(e: Exception) -> bool:
    """
    Whether C{e} is what cancelling a request fails with: the agent wraps
    the cancellation of a request in flight in one of its own errors.
    """
    if isinstance(e, CancelledError):
        return True
    reasons = getattr(e, "reasons", None) or []
    return any(
        isinstance(reason, Failure) and reason.check(CancelledError)
        for reason in reasons
    )


def _request_failed(e: Exception, url: DecodedURL) -> _TryFailed:
    """
    Classify an error from the request (before the response headers).
    """
    where = f"{url.host}:{url.port}"
    if isinstance(e, AddressRefused):
        # The policy will not change before a retry.
        redirected = e.host.strip("[]").lower() != _uri_host(url).lower()
        hop = "redirected to a refused address: " if redirected else ""
        return _TryFailed(f"{hop}{e}", retry=False)
    if isinstance(e, CredentialsInURL):
        return _TryFailed(
            "redirected to a URL that holds credentials (user:password@), which"
            " are never sent",
            retry=False,
        )
    if isinstance(e, DNSLookupError):
        return _TryFailed(f"cannot resolve the host name {url.host!r}", retry=True)
    if isinstance(e, ConnectionRefusedError):
        return _TryFailed(f"cannot connect to {where}: connection refused", retry=True)
    if isinstance(e, (ConnectError, ConnectTimeoutError)):
        return _TryFailed(f"cannot connect to {where}: {e}", retry=True)
    if isinstance(e, (ResponseNeverReceived, RequestTransmissionFailed)):
        tls = _tls_problem(e.reasons)
        if tls is not None:
            return _TryFailed(f"TLS with {where} failed: {tls}", retry=False)
        return _TryFailed(
            f"{where} closed the connection before it answered", retry=True
        )
    if isinstance(e, ResponseFailed):
        return _TryFailed(f"the connection to {where} broke during the answer", retry=True)
    if isinstance(e, RequestNotSent):
        return _TryFailed(f"the request to {where} could not be sent", retry=True)
    return _TryFailed(f"{type(e).__name__}: {e}", retry=False)


def _tls_problem(reasons: Sequence[Failure]) -> Optional[str]:
    """
    The TLS error among C{reasons}, if any: a certificate that does not
    verify will not verify on the next try either.
    """
    try:
        from OpenSSL.SSL import Error as TLSError
    except ImportError:
        return None
    for reason in reasons:
        if reason.check(TLSError):
            return reason.getErrorMessage()
    return None


class _Dropper(Protocol):
    """
    Takes the body of an answer we do not want and closes the connection
    rather than read it.
    """

    def connectionMade(self) -> None:
        self.transport.stopProducing()

    def connectionLost(self, reason: Failure = None) -> None:
        pass


def _drop_body(response: Any) -> None:
    # An unbuffered response left unread would hold its connection paused
    # for ever; closing it is cheaper than reading a body we ignore.
    response.deliverBody(_Dropper())


class _OutsideWorkdir(Exception):
    """
    The target of an input lies through a symbolic link, which could lead
    outside the working directory.
    """


# How the directories on the way to an input are opened: never through a
# symbolic link (a job of the same account may have put one there, and this
# process may be root).
_WALK_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class _PartFile:
    """
    The temporary file a body is written to, beside its target.

    Every file-system call runs through C{run} (the thread pool), one at a
    time and in the order asked, so a clean-up asked for while a write is
    still in a thread waits for that write.  The sha256 of what was written
    is computed in the same thread as the writes.

    The target's directory is found from the working directory one name at
    a time, each opened without following a symbolic link, and every later
    call is relative to it: a link put on the way while a body is fetched
    (by a job running as the same account) cannot send the file elsewhere.
    What is made belongs to C{owner} when given.

    @ivar size: the number of bytes written.
    """

    def __init__(
        self,
        run: Callable[..., Deferred],
        workdir: str,
        path: str,
        owner: Optional[tuple[int, int]] = None,
    ) -> None:
        self._run = run
        self._workdir = workdir
        self._path = os.path.normpath(path)
        self._owner = owner
        self._dir_fd: Optional[int] = None
        self._temp: Optional[str] = None
        self._file: Any = None
        self._sha256 = hashlib.sha256()
        self._tail: Deferred = succeed(None)
        self.size = 0

    def _queue(self, f: Callable[..., Any], *args: Any) -> Deferred:
        result: Deferred = Deferred()

        def step(_: object) -> Deferred:
            try:
                d = self._run(f, *args)
            except BaseException:
                d = fail()
            d.addBoth(_settle, result)
            # The queue goes on whatever became of this operation.
            return d.addErrback(lambda _: None)

        self._tail.addBoth(step)
        return result

    def open(self) -> Deferred:
        """
        Create the parent directories and the temporary file.
        """
        return self._queue(self._open)

    def write(self, chunks: list[bytes]) -> Deferred:
        """
        Append C{chunks} to the file.
        """
        return self._queue(self._write, chunks)

    def hexdigest(self) -> str:
        """
        The sha256 of what was written, once no write is in progress.
        """
        return self._sha256.hexdigest()

    def commit(self) -> Deferred:
        """
        Make the file durable and rename it to its target.
        """
        return self._queue(self._commit)

    def discard(self) -> Deferred:
        """
        Close and remove the temporary file, if there is one.
        """
        return self._queue(self._discard)

    # The methods below run in the thread pool.

    def _open_workdir(self) -> int:
        try:
            return os.open(self._workdir, _WALK_FLAGS)
        except FileNotFoundError:
            os.makedirs(self._workdir, 0o700, exist_ok=True)
            return os.open(self._workdir, _WALK_FLAGS)

    def _open(self) -> None:
        fd = self._open_workdir()
        try:
            *parents, _ = self._path.split(os.sep)
            for depth, name in enumerate(parents):
                try:
                    os.mkdir(name, 0o700, dir_fd=fd)
                except FileExistsError:
                    pass
                else:
                    if self._owner is not None:
                        os.chown(name, *self._owner, dir_fd=fd, follow_symlinks=False)
                try:
                    inner = os.open(name, _WALK_FLAGS, dir_fd=fd)
                except OSError as e:
                    if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    on_the_way = os.sep.join(parents[: depth + 1])
                    if not os.path.islink(os.path.join(self._workdir, on_the_way)):
                        raise
                    raise _OutsideWorkdir(
                        f"{on_the_way} is a symbolic link, which could lead outside the "
                        "working directory: inputs are written through directories only"
                    )
                os.close(fd)
                fd = inner
            name = f".{os.path.basename(self._path)}.{secrets.token_hex(6)}.part"
            temp = os.open(
                name,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o666,
                dir_fd=fd,
            )
        except BaseException:
            os.close(fd)
            raise
        self._dir_fd = fd
        self._temp = name
        self._file = os.fdopen(temp, "wb")
        if self._owner is not None:
            os.fchown(temp, *self._owner)

    def _write(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self._file.write(chunk)
            self._sha256.update(chunk)
            self.size += len(chunk)

    def _commit(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        fd = self._dir_fd
        assert fd is not None and self._temp is not None
        # Within the directory opened: a name in it that is a link is
        # replaced, never followed.
        os.replace(
            self._temp, os.path.basename(self._path), src_dir_fd=fd, dst_dir_fd=fd
        )
        self._temp = None
        # The rename is durable only once its directory is.
        try:
            os.fsync(fd)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EROFS):
                raise
        finally:
            self._close_dir()

    def _close_dir(self) -> None:
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None

    def _discard(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
        if self._temp is not None:
            try:
                os.unlink(self._temp, dir_fd=self._dir_fd)
            except FileNotFoundError:
                pass
            self._temp = None
        self._close_dir()


def _settle(result: Any, d: Deferred) -> None:
    # The caller may have stopped waiting (cancelled d); the operation ran
    # all the same and the queue goes on.
    if not d.called:
        if isinstance(result, Failure):
            d.errback(result)
        else:
            d.callback(result)


class _BodyWriter(Protocol):
    """
    Receives a response body and hands it to a L{_PartFile} in batches,
    pausing the connection while too much is buffered or being written.

    @ivar done: fires with C{None} once the whole body is written, or fails
        with L{_TryFailed}; cancelling it closes the connection.
    """

    def __init__(self, part: _PartFile, max_bytes: int, path: str) -> None:
        self.done: Deferred = Deferred(lambda d: self._fail(CancelledError()))
        self._part = part
        self._max_bytes = max_bytes
        self._path = path
        self._received = 0
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._writing = 0
        self._paused = False
        self._ended = False
        self._failed = False

    def dataReceived(self, data: bytes) -> None:
        if self._failed:
            return
        self._received += len(data)
        if self._received > self._max_bytes:
            self._fail(
                _TryFailed(
                    f"the body is larger than the limit of {self._max_bytes}"
                    " bytes ([fetch] max_bytes)",
                    retry=False,
                )
            )
            return
        self._chunks.append(data)
        self._buffered += len(data)
        if not self._writing and self._buffered >= _BATCH_BYTES:
            self._write()
        if not self._paused and self._buffered + self._writing >= _HIGH_WATER_BYTES:
            self._paused = True
            self.transport.pauseProducing()

    def connectionLost(self, reason: Failure = None) -> None:
        if self._failed:
            return
        if reason is not None and not reason.check(ResponseDone, PotentialDataLoss):
            self._fail(
                _TryFailed(
                    f"the connection broke after {self._received} bytes of the body",
                    retry=True,
                )
            )
            return
        # PotentialDataLoss: the server sent neither a length nor chunks,
        # so the end of the connection is the end of the body.
        self._ended = True
        if not self._writing:
            if self._chunks:
                self._write()
            else:
                self.done.callback(None)

    def _write(self) -> None:
        chunks, self._chunks = self._chunks, []
        self._writing, self._buffered = self._buffered, 0
        self._part.write(chunks).addBoth(self._written)

    def _written(self, result: Any) -> None:
        self._writing = 0
        if self._failed:
            return
        if isinstance(result, Failure):
            e = result.value
            reason = (
                _os_reason(e, self._path)
                if isinstance(e, OSError)
                else f"cannot write {self._path}: {result.getErrorMessage()}"
            )
            self._fail(_TryFailed(reason, retry=False))
            return
        if self._chunks and (self._ended or self._buffered >= _BATCH_BYTES):
            self._write()
        elif self._ended:
            self.done.callback(None)
            return
        if self._paused and self._buffered + self._writing < _HIGH_WATER_BYTES:
            self._paused = False
            self.transport.resumeProducing()

    def _fail(self, error: BaseException) -> None:
        if self._failed:
            return
        self._failed = True
        self._chunks = []
        if not self._ended:
            # Stop reading at once: the rest of the body is unwanted.
            abort = getattr(self.transport, "abortConnection", None)
            if abort is not None:
                abort()
            else:
                self.transport.stopProducing()
        if not self.done.called:
            self.done.errback(error)
