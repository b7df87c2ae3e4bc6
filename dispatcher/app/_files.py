"""
What the daemon's own files may be: the data directory's mode, its files'
(the database and its log, the access log, the lock, the holder name), the
secrets it refuses to use when others could have read or changed them,
and the narrowing, at start, of what an older version or a wider umask
left open.  Blocking: for the I/O pool, or start-up.

The jobs directory inside the data directory is the executor's
(L{dispatcher.execution._spawner}: a passage to each job's working
directory).
"""

from __future__ import annotations

import os
import pwd
import stat
from typing import Iterable, Optional

from dispatcher.execution._spawner import PASSAGE_MODE

# The process umask the daemon and the worker set at start (in their
# taps): whatever is made without a mode of its own is this process's
# alone.
UMASK = 0o077

# The data directory: entered by anyone (a job running as another account
# reaches its working directory under DATA_DIR/jobs by its path), listed by
# the daemon alone.
DATA_DIR_MODE = PASSAGE_MODE
# Every file directly in it, and any other directory in it.
OWN_FILE_MODE = 0o600
OWN_DIR_MODE = 0o700

JOBS_DIR_NAME = "jobs"


class UnsafeSecret(Exception):
    """
    A file holding a secret (a token, the lease key, the credentials) that
    group or others may read or write, or that another user owns: the
    daemon refuses to start with it.  The message is one line naming the
    file, what is wrong and the command that puts it right.
    """


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def check_secret(path: str, what: str, euid: Optional[int] = None) -> None:
    """
    Refuse C{path} (described as C{what}) if group or others may read or
    write it, or it belongs to another user than C{euid} (this process's
    effective user by default).  A file that does not exist passes: it is
    made with mode 0600 when it is.

    @raise UnsafeSecret: saying which, and the fix.
    """
    euid = os.geteuid() if euid is None else euid
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return
    mode = stat.S_IMODE(found.st_mode)
    if found.st_uid != euid:
        raise UnsafeSecret(
            f"{path} ({what}) belongs to {_user_name(found.st_uid)}, not to "
            f"{_user_name(euid)}, the user this process runs as, so another may "
            f"change it: chown {_user_name(euid)} {path} && chmod 600 {path}"
        )
    if mode & 0o077:
        may = " and ".join(
            verb for verb, bits in (("read", 0o044), ("write", 0o022)) if mode & bits
        ) or "execute"
        raise UnsafeSecret(
            f"{path} ({what}) has mode {mode:04o}: group or others may {may} it; "
            f"chmod 600 {path} (and replace the secret if another may have read it)"
        )


def secure_data_dir(data_dir: str, secrets: Iterable[str] = ()) -> list[str]:
    """
    Make C{data_dir} if need be and narrow what is in it to what the daemon
    makes now: the directory L{DATA_DIR_MODE}, each file directly in it
    L{OWN_FILE_MODE}, each other directory L{OWN_DIR_MODE} (the jobs
    directory is the executor's to narrow).  The names in C{secrets} are
    left as they are: those are checked, and refused, rather than changed
    (L{check_secret}).  Symbolic links are left alone.

    @return: the paths whose modes were changed.
    """
    os.makedirs(data_dir, OWN_DIR_MODE, exist_ok=True)
    changed = []
    found = os.stat(data_dir)
    if stat.S_IMODE(found.st_mode) != DATA_DIR_MODE:
        os.chmod(data_dir, DATA_DIR_MODE)
        # Opening it to others (0700 to 0711) is not worth a word.
        if stat.S_IMODE(found.st_mode) & ~DATA_DIR_MODE:
            changed.append(data_dir)
    skip = set(secrets)
    with os.scandir(data_dir) as entries:
        for entry in entries:
            if entry.name in skip or entry.name == JOBS_DIR_NAME or entry.is_symlink():
                continue
            mode = stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode)
            if mode & 0o077:
                wanted = OWN_DIR_MODE if entry.is_dir(follow_symlinks=False) else OWN_FILE_MODE
                os.chmod(entry.path, wanted)
                changed.append(entry.path)
    return changed


def closed_on_the_way(path: str) -> Optional[str]:
    """
    The first directory on the way to C{path} (from C{/}) that others may
    not pass through, or C{None}.  A job running as another account needs
    to pass them all to reach its working directory by its path (its
    C{HOME}).
    """
    path = os.path.abspath(path)
    on_the_way = "/"
    for part in path.strip("/").split("/"):
        try:
            mode = os.stat(on_the_way).st_mode
        except OSError:
            return None
        if not mode & stat.S_IXOTH:
            return on_the_way
        on_the_way = os.path.join(on_the_way, part)
    return None


def open_own_file(path: str, flags: int) -> int:
    """
    Open (or make) one of the daemon's own files with L{OWN_FILE_MODE}.
    """
    return os.open(path, flags | os.O_CLOEXEC, OWN_FILE_MODE)
