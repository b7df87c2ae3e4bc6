"""
A command job's stdout and stderr, carried through pipes the spawner
helper reads, so that a log file holds at most a set number of bytes of
its stream: past it, the rest is read and dropped (the job is never
blocked, nor the disk filled) and a marker line says so.  Standard library
only, as the helper is.

The bytes go from the pipe to the file with C{splice}, which moves them in
the kernel without a copy through this process.  C{splice} refuses a file
opened with C{O_APPEND}, so the file is opened without it and written from
its end (the helper is its only writer).  A file system that cannot
C{splice} gets the bytes by C{read} and C{write}.

A stream's file is made when the first of its bytes arrives: most jobs
write nothing to one of their streams, and many to both, and a file made
is an inode taken, which costs more than the rest of a quiet stream.  One
found at the start (an earlier attempt's) is written from its end.  A
stream that never wrote has no file, which readers take as empty.
"""

import errno
import os
import select
import time

# The most bytes one call moves: a pipe's default capacity.
CHUNK = 65536

_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)

_devnull = None


def _dropped():
    global _devnull
    if _devnull is None:
        _devnull = os.open(os.devnull, os.O_WRONLY)
    return _devnull


class Output:
    """
    One stream of a job: the pipe it writes, the file it goes to, and how
    many more bytes the file takes.

    @ivar stream: C{"stdout"} or C{"stderr"}.
    @ivar cut: whether bytes were dropped (the limit was reached, or the
        file could not be written).
    @ivar closed: whether its end has been read and its files closed.
    """

    __slots__ = (
        "stream", "read_fd", "write_fd", "file_fd", "left", "cut", "closed", "_marker",
        "_splice", "_path", "_flags", "_mode",
    )

    def __init__(self, stream, read_fd, write_fd, file_fd, left, marker, path=None,
                 flags=0, mode=0):
        self.stream = stream
        self.read_fd = read_fd
        # For the job; the helper closes its copy once the job has it
        # (L{close_write_end}), so that the pipe's end is the job's.
        self.write_fd = write_fd
        self.file_fd = file_fd
        self.left = left
        self.cut = False
        self.closed = False
        self._marker = marker
        self._splice = True
        # With no C{file_fd}: where it is made, at the first byte.
        self._path = path
        self._flags = flags
        self._mode = mode

    def pump(self):
        """
        Move what the pipe holds now, up to L{CHUNK} bytes, to the file or,
        past the limit, to nowhere.  (The pipe's operations do not block:
        C{SPLICE_F_NONBLOCK}.)

        @return: the bytes moved; 0 at the pipe's end (no writer is left);
            C{None} if it holds nothing now.
        """
        try:
            if self.left > 0:
                try:
                    moved = self._to_file(min(self.left, CHUNK))
                except BlockingIOError:
                    raise
                except OSError as e:
                    self._lose(e)
                    return self.pump()
                self.left -= moved
                return moved
            moved = self._drop()
        except BlockingIOError:
            return None
        if moved and not self.cut:
            self._say_cut()
        return moved

    def _drop(self):
        try:
            return os.splice(self.read_fd, _dropped(), CHUNK, flags=_FLAGS)
        except BlockingIOError:
            raise
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOSYS):
                raise
            return len(self._read(CHUNK))

    def _read(self, count):
        # Without splice (and its SPLICE_F_NONBLOCK), the pipe itself must
        # not block.
        os.set_blocking(self.read_fd, False)
        return os.read(self.read_fd, count)

    def _to_file(self, count):
        if self.file_fd is None and not self._make_file():
            return 0
        if self._splice:
            try:
                return os.splice(self.read_fd, self.file_fd, count, flags=_FLAGS)
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOSYS):
                    raise
                # A file system that cannot splice.
                self._splice = False
        data = self._read(count)
        view = memoryview(data)
        while view:
            view = view[os.write(self.file_fd, view) :]
        return len(data)

    def _make_file(self):
        """
        Make the file, if the pipe holds a byte for it: whether it did.
        C{BlockingIOError} if the pipe holds nothing but has a writer; an
        C{OSError} if the file cannot be made.
        """
        poller = select.poll()
        poller.register(self.read_fd, select.POLLIN)
        events = poller.poll(0)
        if not events or not events[0][1] & select.POLLIN:
            if events and events[0][1] & (select.POLLHUP | select.POLLERR):
                return False
            raise BlockingIOError(errno.EAGAIN, "nothing to read")
        self.file_fd = os.open(self._path, self._flags | os.O_CREAT, self._mode)
        # (Made meanwhile by another: written from its end.)
        self.left = max(0, self.left - os.lseek(self.file_fd, 0, os.SEEK_END))
        return True

    def _lose(self, error):
        # The file cannot be written (a full disk): the rest is dropped, as
        # past the limit, so that the job does not block.
        os.write(2, f"cannot write the job's {self.stream} ({error}); the rest of it "
                    f"is dropped\n".encode("utf-8", "replace"))
        self.left = 0
        self.cut = True

    def _say_cut(self):
        self.cut = True
        try:
            end = os.lseek(self.file_fd, 0, os.SEEK_CUR)
            marker = self._marker
            if end and os.pread(self.file_fd, 1, end - 1) != b"\n":
                marker = b"\n" + marker
            os.write(self.file_fd, marker)
        except OSError:
            pass

    def finish(self, wait=0.0):
        """
        Move what is left in the pipe, waiting up to C{wait} seconds for
        its end, and close it and the file.  Writers still alive after
        that get C{EPIPE}.
        """
        if self.closed:
            return
        self.close_write_end()
        poller = None
        while True:
            moved = self.pump()
            if moved == 0:
                break
            if moved is None:
                if wait <= 0:
                    break
                if poller is None:
                    poller = select.poll()
                    poller.register(self.read_fd, select.POLLIN)
                    give_up = time.monotonic() + wait
                left = give_up - time.monotonic()
                if left <= 0 or not poller.poll(left * 1000):
                    break
        self.close()

    def close_write_end(self):
        if self.write_fd is not None:
            os.close(self.write_fd)
            self.write_fd = None

    def close(self):
        if not self.closed:
            self.closed = True
            os.close(self.read_fd)
            if self.file_fd is not None:
                os.close(self.file_fd)
            self.close_write_end()


def open_outputs(paths, limit, markers, flags, mode, new=False):
    """
    The pipes and files of a job's streams.

    @param paths: C{{stream: path}} of the log files, written from their
        end, made at their first byte (L{Output._make_file}).
    @param limit: the most bytes of each stream the file takes.
    @param markers: C{{stream: bytes}}: the line written where a stream is
        cut.
    @param flags: the flags the files are opened with, but read and
        written, and without C{O_APPEND} (which C{splice} refuses).
    @param mode: the mode of a file made.
    @param new: whether the files' directories were just made, so that
        none of them is there to be opened.

    @return: the L{Output}s, in the order of C{paths}; each one's
        C{write_fd} is for the job.
    @raise OSError: a file there cannot be opened (a symbolic link, with
        C{O_NOFOLLOW}); nothing is left open.
    """
    # Readable too: where a stream is cut, its last byte says whether the
    # marker starts a line of its own.
    flags = (flags & ~(os.O_APPEND | os.O_WRONLY | os.O_CREAT)) | os.O_RDWR
    outputs = []
    opened = []
    try:
        for stream, path in paths.items():
            try:
                if new:
                    raise FileNotFoundError
                file_fd = os.open(path, flags)
            except FileNotFoundError:
                file_fd, size = None, 0
            else:
                opened.append(file_fd)
                size = os.lseek(file_fd, 0, os.SEEK_END)
            read_fd, write_fd = os.pipe()
            opened.extend((read_fd, write_fd))
            outputs.append(Output(
                stream, read_fd, write_fd, file_fd, max(0, limit - size), markers[stream],
                path, flags, mode,
            ))
    except OSError:
        for fd in opened:
            os.close(fd)
        raise
    return outputs
