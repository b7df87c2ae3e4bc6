"""
The job directories under C{DATA_DIR/jobs} as retention removes them: a
removed job's directory, and the directories of id windows that no longer
hold a stored job; on a remote worker, the directories of the jobs it ran,
once they are old (L{JobDirectories.remove_unwritten_since}), and those an
earlier run of it left (L{JobDirectories.walk_jobs}).

Everything here blocks on the file system: run it on the I/O pool, never
on the reactor thread.

A job's directory is C{jobs/<id[:4]>/<id[4:6]>/<id[6:8]>/<id[-2:]>/<id>}
(L{dispatcher.execution._executor.job_path}): the first three levels are
windows of the id's time (49.7 days, 4.7 hours and 65.5 seconds of
submissions).  An emptied directory is never removed alone: a job whose
directory is being made beside it would find its parent gone between
C{makedirs}'s look and its C{mkdir} (on this host's executor, the spawner
helper, the API writing a worker's log).  A window's directory goes whole,
once its time is over and no stored job's id is in it: then no job will
make a directory there again (new ids are of the time they are made), and
whatever is left in it (a job's directory whose removal a crash cut short)
goes with it.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Iterable, Iterator, Optional

from twisted.logger import Logger

from dispatcher.execution._executor import job_path

log = Logger()

# The id windows a job's directory is under: how many leading hex digits
# name each level's window, and how many bits of milliseconds it spans.
# (A UUIDv7 starts with 48 bits of Unix milliseconds, in 12 hex digits.)
WINDOW_DIGITS = (4, 6, 8)
_ID_TIME_DIGITS = 12

_HEX = re.compile(r"[0-9a-f]+")


def window_path(prefix: str) -> str:
    """
    The directory, under C{jobs}, of the ids that start with C{prefix}
    (4, 6 or 8 hex digits): C{aaaa}, C{aaaa/bb} or C{aaaa/bb/cc}.
    """
    return "/".join(prefix[i:j] for i, j in ((0, 4), (4, 6), (6, 8)) if len(prefix) > i)


def window_end(prefix: str) -> float:
    """
    The Unix time at which the window of ids starting with C{prefix} ends:
    no id made from then on starts with it.
    """
    shift = 4 * (_ID_TIME_DIGITS - len(prefix))
    return ((int(prefix, 16) + 1) << shift) / 1000.0


class JobDirectories:
    """
    The job directories under one C{jobs} directory.

    @param jobs_dir: C{DATA_DIR/jobs}.
    """

    def __init__(self, jobs_dir: str) -> None:
        self.jobs_dir = jobs_dir

    def remove_jobs(self, job_ids: Iterable[str]) -> int:
        """
        Remove the directories of these jobs (their working directories and
        logs), those that exist; how many were removed.  What cannot be
        removed is logged, and goes with its window's directory.
        """
        return _remove_trees(
            (f"{self.jobs_dir}/{job_path(job_id)}" for job_id in job_ids),
            "job directories",
        )

    def ended_windows(self, before: float) -> list[str]:
        """
        The windows (id prefixes of 4, 6 and 8 hex digits) that have a
        directory and ended before C{before}, the deepest first: each a
        window a job directory may be left in.  Only the windows whose time
        is over are listed, so a walk reads few directories: one for each
        65.5 s of submissions still kept.
        """
        found: list[str] = []

        def walk(prefix: str, path: str, level: int) -> None:
            if level == len(WINDOW_DIGITS):
                return
            width = WINDOW_DIGITS[level] - len(prefix)
            try:
                names = os.listdir(path)
            except (FileNotFoundError, NotADirectoryError):
                return
            for name in sorted(names):
                if len(name) != width or not _HEX.fullmatch(name):
                    continue
                inner = prefix + name
                # Its deeper windows may have ended while it has not.
                walk(inner, f"{path}/{name}", level + 1)
                if window_end(inner) < before:
                    found.append(inner)

        walk("", self.jobs_dir, 0)
        # Deepest first: a window is removed before the one holding it is
        # looked at.
        return sorted(found, key=len, reverse=True)

    def remove_windows(self, prefixes: Iterable[str]) -> int:
        """
        Remove the directories of these windows (ended, holding no stored
        job: the caller has checked) with whatever is left in them; how
        many were removed.
        """
        return _remove_trees(
            (f"{self.jobs_dir}/{window_path(prefix)}" for prefix in prefixes),
            "window directories",
        )


    def last_written(self, job_id: str) -> Optional[float]:
        """
        When a job's directory was last written (the latest modification
        time of the directory, of what it holds, and of what its attempts'
        directories hold: its logs), or C{None} if it has none.  Deeper
        files of the working directory are not looked at: a job's
        directory is read for age once its job has ended.
        """
        path = f"{self.jobs_dir}/{job_path(job_id)}"
        try:
            latest = os.lstat(path).st_mtime
        except (FileNotFoundError, NotADirectoryError):
            return None
        for inner in _entries(path):
            latest = max(latest, inner.stat(follow_symlinks=False).st_mtime)
            if inner.name.startswith("attempt-") and inner.is_dir(follow_symlinks=False):
                for log in _entries(inner.path):
                    latest = max(latest, log.stat(follow_symlinks=False).st_mtime)
        return latest

    def remove_unwritten_since(
        self, job_ids: Iterable[str], before: float
    ) -> tuple[int, list[tuple[str, float]]]:
        """
        Remove the directory of each of C{job_ids} last written before
        C{before} (L{last_written}), and then each directory on the way to
        it that is left empty; how many were removed, and the jobs (with
        when they were written) whose directories were written since.

        A remote worker removes its jobs' directories this way.  An emptied
        window directory goes at once (unlike retention's, L{remove_windows}):
        a worker cannot know which ids the dispatcher will lease it, so no
        window's time is ever over for it.  Its caller starts no job whose
        directory is in a window under way (L{dispatcher.workers._sweep}),
        and a directory made in another process finds its parent gone only
        if one is removed between two of its tries
        (L{dispatcher.execution._spawner.make_passage}).
        """
        removed = 0
        written: list[tuple[str, float]] = []
        failed = 0
        first = ""
        for job_id in job_ids:
            try:
                last = self.last_written(job_id)
            except OSError as e:
                last, failed = None, failed + 1
                first = first or f"{e.filename}: {e.strerror or e}"
            if last is None:
                continue
            if last >= before:
                written.append((job_id, last))
                continue
            path = f"{self.jobs_dir}/{job_path(job_id)}"
            try:
                shutil.rmtree(path)
            except FileNotFoundError:
                continue
            except OSError as e:
                failed += 1
                first = first or f"{e.filename or path}: {e.strerror or e}"
                continue
            removed += 1
            parent = os.path.dirname(path)
            while parent != self.jobs_dir:
                try:
                    os.rmdir(parent)
                except OSError:
                    # Not empty (or made again meanwhile): so are those
                    # holding it.
                    break
                parent = os.path.dirname(parent)
        if failed:
            log.warn(
                "could not remove {count} job directories (the first: {first}); "
                "they are left where they are",
                count=failed,
                first=first,
            )
        return removed, written

    def walk_jobs(self) -> Iterator[str]:
        """
        The ids of the job directories under C{jobs}, in order, each read
        from the directory it is in when the walk gets there; only the
        directories where L{job_path} puts their name.  Blocking at each
        step: advance it on the I/O pool.
        """
        for top in _names(self.jobs_dir, 4):
            for middle in _names(f"{self.jobs_dir}/{top}", 2):
                for low in _names(f"{self.jobs_dir}/{top}/{middle}", 2):
                    window = f"{self.jobs_dir}/{top}/{middle}/{low}"
                    for tail in _names(window, 2):
                        for name in _names(f"{window}/{tail}", None):
                            if job_path(name) == f"{top}/{middle}/{low}/{tail}/{name}":
                                yield name


def _entries(path: str) -> list[os.DirEntry]:
    """
    The entries of the directory C{path}; none if it is gone.
    """
    try:
        with os.scandir(path) as entries:
            return list(entries)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _names(path: str, width: Optional[int]) -> list[str]:
    """
    The sorted names in the directory C{path} (none if it is gone): those of
    C{width} hex digits, or all of them.
    """
    try:
        names = os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []
    if width is not None:
        names = [n for n in names if len(n) == width and _HEX.fullmatch(n)]
    return sorted(names)


def _remove_trees(paths: Iterable[str], what: str) -> int:
    """
    Remove each of C{paths} with everything under it; how many were there
    and are gone.  Failures (a file this account may not remove) are
    logged in one line, not raised: what is left goes with its window.
    """
    removed = 0
    failed = 0
    first = ""
    for path in paths:
        try:
            shutil.rmtree(path)
        except FileNotFoundError:
            continue
        except OSError as e:
            failed += 1
            if not first:
                first = f"{e.filename or path}: {e.strerror or e}"
            continue
        removed += 1
    if failed:
        log.warn(
            "could not remove {count} {what} (the first: {first}); what is left "
            "goes with its window's directory",
            count=failed,
            what=what,
            first=first,
        )
    return removed
