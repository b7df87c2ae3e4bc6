"""
The spawner helper: a small process that starts command jobs for the daemon.

Starting a process from the daemon itself means walking every one of its
open file descriptors (thousands of sockets) in the reactor thread.  This
helper holds only a few, so it starts jobs quickly.  The daemon starts it
once, with its settings (L{DEFAULT_SETTINGS}) as its one argument, and
talks to it over its stdin and stdout, one JSON object a line.

Requests::

    {"op": "spawn", "id": N, "argv": [...], "env": {...}, "cwd": "...",
     "stdout": "path", "stderr": "path"}
    {"op": "spawn", ..., "deadline": D, "memory_mb": M}
    {"op": "spawn", ..., "run_as": {"user": "nobody", "uid": U, "gid": G,
                                    "groups": [G, ...]}}
    {"op": "signal", "id": N, "signal": 15}
    {"op": "deadline", "ids": [N, ...], "at": D}

Replies::

    {"op": "ready", "id": null, "description": "each job gets cgroups ..."}
    {"op": "spawned", "id": N, "pid": P, "start_ticks": T, "boot_id": B,
     "limits": {"memory_mb": M, "processes": P, "enforced": true}}
    {"op": "error", "id": N, "error": "no such file: foo"}
    {"op": "exited", "id": N, "code": C}
    {"op": "exited", "id": N, "code": -9, "deadline": true,
     "oom_kills": 1, "cut": ["stdout"]}

The first reply, once the helper has started, says in words what holds for
jobs on this host (L{dispatcher.execution._cgroups}).

A deadline is a time on L{deadline_clock} (C{CLOCK_BOOTTIME}, one clock for
every process of the host, which also counts time the host spent
suspended).  A job given one is killed, its whole process group and cgroup
with C{SIGKILL}, once the deadline passes, and its exit says so.  The remote
worker gives each job the time by which it must have stopped unless its
lease is renewed, and moves it later at each renewal: the deadline holds
even while the worker's own process is frozen, since this process keeps
it.  A C{deadline} request moves the deadlines of several jobs at once (one
heartbeat renews them all), to any time, earlier or later; C{null} takes
them away.  Ids the helper no longer runs are ignored.  The daemon's own
jobs have no deadline and cost nothing here.

The working directory and the directories of the two output files are
made if need be (L{make_job_dirs}): the directories on the way to them
with L{PASSAGE_MODE}, the output files' with L{LOGS_MODE}, the working
directory with L{WORK_MODE}, given to the job's account.  The output files
are opened here, never following a symbolic link.  Without a
C{max_log_bytes} they are handed to the job open, and belong to its
account too, so that it may open them again (C{/dev/stdout}); with one,
the job writes pipes, and the files stay this process's.

With C{run_as}, the job runs as that account: its real, effective and
saved user and group ids and its supplementary groups are the account's
when it starts (L{_take_ids}).  This process stays root.

Each job leads its own session and process group and,
where the host allows, has cgroups of its own, which bound its processes
(the setting C{max_processes}) and its memory (C{memory_mb}); it is born in
them (L{dispatcher.execution._cgroups}).  When a job's leader exits, what
is left of its group and of its cgroups is killed, and its exit is
reported once none of its processes is left (a few seconds at most), so a
job's stray background processes die with it, whatever session they moved
to.  The helper is a child subreaper: a job's orphans become its children,
and are reaped here, not reported.  C{C} is the exit status, or minus the
signal that killed the leader; C{oom_kills} says how many of its processes
the out-of-memory killer took, C{cut} which streams of its log were cut.
With a C{max_log_bytes}, a job's stdout and stderr go through pipes the
helper reads into the files, at most that many bytes of each
(L{dispatcher.execution._outputs}); without, the job writes its files
itself.  When stdin closes, the daemon is gone (an orderly stop has ended
every job before): the helper kills every job still running, and the
orphans it holds, so that none runs on unwatched while the daemon is down
or its next start runs it again, and exits.

It imports only the standard library (and its two siblings, which do
too), to start fast and hold few files.
"""

import errno
import json
import os
import select
import signal
import sys
import time

if __package__:
    from dispatcher.execution._cgroups import JobCgroups
    from dispatcher.execution._outputs import open_outputs
else:
    # Run as a file (python -I -S _spawner.py), which keeps this directory
    # out of the path: its two stdlib-only siblings are imported from it.
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _cgroups import JobCgroups
    from _outputs import open_outputs

# How a job's stdout and stderr files are opened: appended to, so that the
# output of an earlier attempt is kept; never through a symbolic link, and
# never left open in another job.
_OUTPUT_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC

# Who may enter what under the jobs directory (docs/security.md).  Every
# directory on the way to a job's working directory (the jobs directory,
# its buckets, the job's own directory) may be passed through by anyone
# but listed by its owner alone: a job reaches its working directory by
# its path, and finds no other's.
PASSAGE_MODE = 0o711
# A job's working directory: its account's alone.
WORK_MODE = 0o700
# The directory of an attempt's output files, and the files: the daemon's
# (each file is given to the job's account, which writes it).  Nothing
# the daemon reads or writes lies in a directory a job may change, so a
# job cannot lead the daemon through a symbolic link.
LOGS_MODE = 0o700
LOG_MODE = 0o600


# Field 22 of /proc/<pid>/stat, counted from 1: the start time.
_START_TICKS = 21

# prctl's option to become a child subreaper (linux/prctl.h).
_PR_SET_CHILD_SUBREAPER = 36

# How long the end of a job waits, at most, for the processes killed in its
# cgroup to be gone before it is reported.
_LAST_PROCESS_WAIT = 5.0
# How often, meanwhile, it looks whether they are.
_ENDING_POLL = 0.05

# The longest the helper sleeps while a job has a deadline.  poll() counts
# its timeout on CLOCK_MONOTONIC, which stands still while the host is
# suspended; waking at least this often notices a deadline that passed
# during a suspension soon after the host resumes.
_LONGEST_SLEEP = 1.0


def deadline_clock():
    """
    The clock of job deadlines: seconds of C{CLOCK_BOOTTIME}, the same in
    every process of the host, never set back, and counting time the host
    spent suspended (which C{CLOCK_MONOTONIC} does not).

    @rtype: C{float}
    """
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def read_boot_id():
    """
    Read the kernel's boot id, which changes at every boot.

    @return: the boot id, a UUID as text.
    @rtype: C{str}
    """
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def read_stat(pid):
    """
    Read C{/proc/<pid>/stat}.

    @param pid: a process id.
    @type pid: C{int}

    @return: the fields as text, indexed from 0 (field 22, the start time in
        clock ticks since boot, is C{[21]}); or C{None} if there is no such
        process.  A zombie still has its fields.
    @rtype: C{list} of C{str} or C{None}
    """
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) is in parentheses and may itself hold
    # spaces and parentheses; it is the only field that can.
    open_paren = data.index(b" (")
    close_paren = data.rindex(b")")
    fields = [data[:open_paren], data[open_paren + 2 : close_paren]]
    fields.extend(data[close_paren + 2 :].split())
    return [field.decode("utf-8", "replace") for field in fields]


def _start_ticks(pid):
    """
    Field 22 of C{/proc/<pid>/stat} (L{read_stat}), the start time, alone:
    read at every spawn, where decoding every field was a tenth of the
    helper's time.
    """
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    return int(data[data.rindex(b")") + 2 :].split(None, _START_TICKS - 1)[_START_TICKS - 2])


class _Refused(Exception):
    """
    A request cannot be carried out; the message says why, in words.
    """


# The umask of this helper, and so of the jobs it starts (the daemon's own
# is 077): a job's files are its own business, and 022 is what jobs had
# under a daemon of the usual umask.  Everything the helper makes has a
# mode of its own.
JOB_UMASK = 0o022

# Whether a directory made with PASSAGE_MODE may lack bits for others (a
# umask taking them away), to be given them: true but in the helper, whose
# umask is JOB_UMASK.
_passage_needs_chmod = True


def make_passage(path):
    """
    Make C{path} and its missing parents with L{PASSAGE_MODE}.
    """
    try:
        os.mkdir(path, PASSAGE_MODE)
    except FileExistsError:
        return
    except FileNotFoundError:
        make_passage(os.path.dirname(path))
        try:
            os.mkdir(path, PASSAGE_MODE)
        except FileExistsError:
            return
    if _passage_needs_chmod:
        # The umask took the bits for others away.
        os.chmod(path, PASSAGE_MODE)


def _make_dir(path, mode):
    """
    Make C{path} with C{mode} (with no bits for group or others, which no
    umask takes away), and its missing parents as passages; whether it was
    made.
    """
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        return False
    except FileNotFoundError:
        make_passage(os.path.dirname(path))
        try:
            os.mkdir(path, mode)
        except FileExistsError:
            return False
    return True


def make_job_dirs(workdir=None, logs_dirs=(), owner=None):
    """
    Make a job's directories: C{workdir} (L{WORK_MODE}), each of
    C{logs_dirs} (L{LOGS_MODE}) and the directories on the way to them
    (L{PASSAGE_MODE}).  Blocking.

    @param owner: C{(uid, gid)} the working directory is given to, made or
        found (one an older version made, or of an account the job ran as
        before); C{None}: it stays this process's.
    @return: whether every one of C{logs_dirs} was made now (and so holds
        no file yet).
    """
    # The job's own directory first, so that the others are made at the
    # first try (a mkdir costs more than a syscall on some disks).
    for parent in {os.path.dirname(path) for path in (workdir, *logs_dirs) if path}:
        make_passage(parent)
    new_logs = True
    for path in logs_dirs:
        new_logs = _make_dir(path, LOGS_MODE) and new_logs
    if workdir is None:
        return new_logs
    made = _make_dir(workdir, WORK_MODE)
    if owner is None:
        return new_logs
    uid, gid = owner
    if not made:
        # Its parent is the daemon's: nobody else can have put a link here.
        found = os.lstat(workdir)
        if found.st_uid == uid and found.st_gid == gid:
            return new_logs
    os.chown(workdir, uid, gid, follow_symlinks=False)
    return new_logs


def _run_as(value):
    """
    The account of a spawn request's C{run_as}: C{(user, uid, gid,
    groups)}, or C{None}.
    """
    if value is None:
        return None
    user, uid, gid, groups = value["user"], value["uid"], value["gid"], value["groups"]
    if not (
        isinstance(user, str)
        and all(type(n) is int and n >= 0 for n in (uid, gid, *groups))
    ):
        raise _Refused(f"run_as must name a user and numeric ids, not {value!r}")
    return user, uid, gid, groups


# This process's own real ids and groups, which it takes back after each
# spawn as another account.
_OWN_IDS = None


def _take_ids(run_as):
    """
    Take the account's ids as this process's *real* user and group ids and
    its groups, the effective ids staying root's, for the moment of a
    spawn: C{posix_spawn(..., resetids=True)} then sets the child's
    effective ids to these real ones before it executes the program, and
    the exec sets the saved ids to the effective ones.  So the job starts
    with every id its account's, and with no capability (its ids are not
    0), without a fork of this process (C{os.posix_spawn} is a C{vfork}).
    Nothing to do for C{None}.  L{_give_back_ids} ends it, whether this
    succeeded or not.

    While it holds them a process of that account may signal this one
    (docs/security.md says what that allows); every signal it may catch is
    ignored (L{main}).
    """
    if run_as is None:
        return
    user, uid, gid, groups = run_as
    try:
        os.setgroups(groups)
        os.setresgid(gid, -1, -1)
        os.setresuid(uid, -1, -1)
    except OSError as e:
        raise _Refused(
            f"cannot run as {user} (uid {uid}, gid {gid}): {e.strerror}"
            + ("; the process spawner helper is not root" if os.geteuid() != 0 else "")
        )


def _give_back_ids(run_as):
    """
    Take this process's own real ids and groups back after a spawn as
    C{run_as} (nothing to do for C{None}).
    """
    if run_as is None:
        return
    (ruid, _, _), (rgid, _, _), groups = _OWN_IDS
    try:
        os.setresuid(ruid, -1, -1)
        os.setresgid(rgid, -1, -1)
        os.setgroups(groups)
    except OSError as e:
        # Never serve on with a job's ids.
        os.write(2, f"cannot take back this process's own ids: {e}\n".encode())
        os._exit(70)


def _resolve(name, env):
    """
    Find the program to run for C{argv[0]} as C{execvp} would, but in the
    job's C{PATH}: C{posix_spawnp} would search the helper's own.
    """
    if "/" in name:
        return name
    if not name:
        raise _Refused("no such file: the program name is empty")
    search = env.get("PATH", os.defpath)
    denied = None
    for directory in search.split(os.pathsep):
        # An empty entry means the working directory, as for execvp.
        candidate = os.path.join(directory or ".", name)
        if os.path.isfile(candidate):
            if os.access(candidate, os.X_OK):
                return candidate
            denied = denied or candidate
    if denied is not None:
        raise _Refused(f"permission denied: {denied} is not executable")
    raise _Refused(f"no such file: {name} (not found in PATH={search})")


def _explain(error, executable, run_as):
    """
    Say why C{posix_spawn} failed.  The error number alone does not tell
    whether the program or its interpreter was at fault, so look.  Called
    while this process holds the job's ids, so that C{os.access} answers
    for the job's account.
    """
    code = error.errno
    by = "" if run_as is None else f" by {run_as[0]}"
    if code == errno.ENOENT:
        if not os.path.lexists(executable):
            return f"no such file: {executable}"
        return (
            f"no such file: the interpreter or loader that {executable} "
            f"names (its #! line)"
        )
    if code == errno.EACCES:
        if os.path.isdir(executable):
            return f"permission denied: {executable} is a directory"
        closed = _closed_directory(executable)
        if closed is not None:
            who = "this process" if run_as is None else run_as[0]
            return f"permission denied: {executable} lies in {closed}, which {who} may not enter"
        if not os.access(executable, os.X_OK):
            return f"permission denied: {executable} is not executable{by}"
        return (
            f"permission denied: cannot execute {executable}{by} (a directory on "
            "its way, or its interpreter, may not be open to it)"
        )
    if code == errno.ENOEXEC:
        return (
            f"not a program: {executable} is neither a binary for this system "
            f"nor a script with a #! line"
        )
    return f"cannot start {executable}: {error.strerror}"


def _closed_directory(path):
    """
    The first directory on the way to C{path} that this process's real ids
    may not pass through, or C{None}.
    """
    on_the_way = os.path.dirname(os.path.abspath(path))
    closed = None
    while True:
        if not os.access(on_the_way, os.X_OK):
            closed = on_the_way
        parent = os.path.dirname(on_the_way)
        if parent == on_the_way:
            return closed
        on_the_way = parent


def _cannot_open(label, path, error):
    """
    The refusal of a job's C{label} output file C{path}, which C{error}
    (an C{OSError}) kept from opening, in words.
    """
    if error.errno == errno.ELOOP:
        why = "it is a symbolic link"
    elif error.errno == errno.EISDIR:
        why = "it is a directory"
    else:
        why = error.strerror
    return _Refused(f"cannot open the {label} file {path}: {why}")


def _open_output(label, path, owner):
    """
    Open a job's output file, never through a symbolic link, given to
    C{owner} (C{(uid, gid)}, or C{None}); its descriptor.
    """
    try:
        fd = os.open(path, _OUTPUT_FLAGS, LOG_MODE)
    except OSError as e:
        raise _cannot_open(label, path, e)
    except (ValueError, TypeError) as e:
        raise _Refused(f"cannot open the {label} file {path!r}: {e}")
    if owner is not None:
        try:
            os.fchown(fd, *owner)
        except OSError as e:
            os.close(fd)
            raise _Refused(f"cannot give the {label} file {path} to uid {owner[0]}: {e.strerror}")
    return fd


# What a helper is started with (a JSON object, its one argument); a key
# not given has this value.  cgroups: "auto" (what the host allows), "off",
# or "v1" (cgroup v1 only: for tests of the v1 freezer); max_processes: a
# job's most processes and threads, 0 for no limit; max_log_bytes: the most
# bytes of each stream a job's log file takes, 0 for no limit (the job then
# writes its files itself); markers: per stream, the line (as text) written
# where one is cut, needed with max_log_bytes.
DEFAULT_SETTINGS = {"cgroups": "auto", "max_processes": 0, "max_log_bytes": 0, "markers": {}}


class _Job:
    """
    A job started and not yet reaped: its leader, its cgroups (a
    L{dispatcher.execution._cgroups.JobCgroup}) and its outputs (those the
    helper reads; none when the job writes its files itself).
    """

    __slots__ = ("pid", "cgroup", "outputs", "code", "oom_kills", "report_by")

    def __init__(self, pid, cgroup, outputs):
        self.pid = pid
        self.cgroup = cgroup
        self.outputs = outputs
        # Once its leader is reaped: its exit status, the OOM kills among
        # its processes, and until when its report waits for the rest of
        # its processes to be gone (0: they are).
        self.code = None
        self.oom_kills = 0
        self.report_by = 0.0


class _Spawner:
    """
    The helper's state: the jobs started and not yet reaped, and the
    replies not yet written.
    """

    def __init__(self, replies_fd, settings=None):
        settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self._replies_fd = replies_fd
        # What poll() watches: fd -> what it is ("requests", "children", or
        # a job's Output).  poll, not epoll: a few descriptors, one fewer
        # file, and it also takes a regular file or /dev/null as stdin.
        self.poller = select.poll()
        self.watched = {}
        self._replies = []
        self._pid_of = {}
        self._id_of = {}
        # Job id -> _Job: started and not yet reaped; and reaped, not yet
        # reported.
        self._jobs = {}
        self._ending = {}
        # Cgroups of jobs reported before their killed processes were all
        # gone, given back once they are.
        self._lingering = []
        # Job id -> deadline, for the jobs that have one; and the ids killed
        # at theirs, until their exit is reported.
        self._deadlines = {}
        self._past_deadline = set()
        self._boot_id = read_boot_id()
        self._max_log_bytes = int(settings["max_log_bytes"])
        self._markers = {
            stream: text.encode("utf-8") for stream, text in settings["markers"].items()
        }
        if self._max_log_bytes and set(self._markers) != {"stdout", "stderr"}:
            raise ValueError("max_log_bytes needs a marker for stdout and for stderr")
        self.cgroups = JobCgroups(settings["cgroups"], int(settings["max_processes"]))
        # Signals this helper ignores would stay ignored in its jobs across
        # exec (Python ignores SIGPIPE and SIGXFSZ); jobs get the defaults.
        self._default_signals = [
            number
            for number in signal.valid_signals()
            if number not in (signal.SIGKILL, signal.SIGSTOP)
            and signal.getsignal(number) == signal.SIG_IGN
        ]

    def start(self):
        """
        Become a child subreaper and find the cgroups jobs go in; reply
        C{ready}, saying what holds for jobs.
        """
        subreaper = become_subreaper()
        description = self.cgroups.start()
        if subreaper:
            description += (
                "; the spawner helper is a child subreaper (a job's orphaned "
                "processes become its children, not init's)"
            )
        else:
            description += "; the spawner helper could not become a child subreaper"
        self._reply(op="ready", id=None, description=description)

    def received(self, line):
        """
        Carry out one request line.
        """
        job_id = None
        try:
            request = json.loads(line)
            job_id = request.get("id")
            op = request.get("op")
            if op == "spawn":
                self._spawn(job_id, request)
            elif op == "signal":
                self._signal(job_id, request)
            elif op == "deadline":
                self._set_deadlines(request)
            else:
                raise _Refused(
                    f"unknown op {op!r}: expected 'spawn', 'signal' or 'deadline'"
                )
        except _Refused as e:
            self._reply(op="error", id=job_id, error=str(e))
        except (ValueError, TypeError, AttributeError, KeyError) as e:
            self._reply(op="error", id=job_id, error=f"malformed request: {e!r}")

    def _spawn(self, job_id, request):
        argv = request["argv"]
        env = request["env"]
        cwd = request["cwd"]
        stdout = request["stdout"]
        stderr = request["stderr"]
        memory_mb = request.get("memory_mb", 0)
        if not isinstance(job_id, int) or job_id in self._pid_of:
            raise _Refused(f"the id must be a new integer, not {job_id!r}")
        if not argv or not all(isinstance(arg, str) for arg in argv):
            raise _Refused(f"argv must be a non-empty list of strings, not {argv!r}")
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            raise _Refused("env must map strings to strings")
        if isinstance(memory_mb, bool) or not isinstance(memory_mb, int) or memory_mb < 0:
            raise _Refused(f"memory_mb must be an integer of at least 0, not {memory_mb!r}")
        deadline = request.get("deadline")
        if deadline is not None:
            deadline = _deadline(deadline)
        run_as = _run_as(request.get("run_as"))
        owner = None if run_as is None else run_as[1:3]
        try:
            # Made here rather than by the daemon, which would have to hand
            # the work to a thread before every spawn.
            new_logs = make_job_dirs(
                cwd, dict.fromkeys((os.path.dirname(stdout), os.path.dirname(stderr))), owner
            )
        except (OSError, ValueError, TypeError) as e:
            where = getattr(e, "filename", None) or cwd
            raise _Refused(
                f"cannot make the directory {where}: {getattr(e, 'strerror', None) or e}"
            )
        try:
            # posix_spawn has no working directory of its own: the job
            # inherits ours.  The helper is single-threaded, so changing it
            # for the moment of the spawn is safe.
            os.chdir(cwd)
        except (OSError, ValueError, TypeError) as e:
            raise _Refused(f"bad cwd {cwd}: {getattr(e, 'strerror', None) or e}")
        outputs, handed = [], []
        cgroup = None
        started = False
        try:
            outputs, handed = self._outputs(stdout, stderr, owner, new_logs)
            # Likewise the helper steps into the job's cgroups for the
            # moment of the spawn, with its own ids: the job is born in
            # them, and so is all it forks.
            cgroup = self.cgroups.enter(memory_mb)
            # From here to the end of the spawn, the job's account's ids as
            # our real ids (_take_ids): the program is looked for, and a
            # failure explained, as that account.
            _take_ids(run_as)
            executable = _resolve(argv[0], env)
            pid = os.posix_spawn(
                executable,
                argv,
                env,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, handed[0], 1),
                    (os.POSIX_SPAWN_DUP2, handed[1], 2),
                ],
                # Its own session and so its own process group, which it
                # leads: the group can be signalled as a whole, and a
                # terminal's signals do not reach it.
                setsid=True,
                setsigdef=self._default_signals,
                resetids=run_as is not None,
            )
            started = True
        except OSError as e:
            raise _Refused(_explain(e, executable, run_as))
        except (ValueError, TypeError) as e:
            raise _Refused(f"cannot start {argv[0]}: {e}")
        finally:
            _give_back_ids(run_as)
            if cgroup is not None:
                self.cgroups.leave(cgroup)
                if not started:
                    self.cgroups.end(cgroup)
            # Hold no job's directory busy, nor what is the job's open.
            os.chdir("/")
            for fd in handed:
                os.close(fd)
            for output in outputs:
                # (Its write end was among those handed.)
                output.write_fd = None
                if not started:
                    output.close()
        for output in outputs:
            self._watch(output.read_fd, output)
        # Not yet reaped, so /proc still has it even if it has exited.
        start_ticks = _start_ticks(pid)
        self._pid_of[job_id] = pid
        self._id_of[pid] = job_id
        self._jobs[job_id] = _Job(pid, cgroup, outputs)
        if deadline is not None:
            # Kept from the moment the job exists: a worker frozen right
            # after asking for it must not leave it without one.
            self._deadlines[job_id] = deadline
        self._reply(
            op="spawned",
            id=job_id,
            pid=pid,
            start_ticks=start_ticks,
            boot_id=self._boot_id,
            limits=cgroup.limits,
        )

    def _outputs(self, stdout, stderr, owner, new_logs=False):
        """
        How the job's stdout and stderr reach their files: C{(outputs,
        handed)}, the L{Output}s this process reads and the two descriptors
        the job gets as its stdout and stderr (closed here once it has
        them).  With a limit, pipes this process reads into the files (which
        stay its own, the pipes given to C{owner}); without, the files
        themselves, given to C{owner}.  C{new_logs}: their directories were
        made for this spawn, so no file is there yet.
        """
        if not self._max_log_bytes:
            handed = [_open_output("stdout", stdout, owner)]
            try:
                handed.append(_open_output("stderr", stderr, owner))
            except _Refused:
                os.close(handed[0])
                raise
            return [], handed
        try:
            outputs = open_outputs(
                {"stdout": stdout, "stderr": stderr},
                self._max_log_bytes,
                self._markers,
                _OUTPUT_FLAGS,
                LOG_MODE,
                new_logs,
            )
        except OSError as e:
            path = e.filename or stdout
            raise _cannot_open("stderr" if path == stderr else "stdout", path, e)
        handed = [output.write_fd for output in outputs]
        if owner is not None:
            # The job's account may open its pipes again (/dev/stdout), as
            # it may a file of its own.
            try:
                for fd in handed:
                    os.fchown(fd, *owner)
            except OSError as e:
                for output in outputs:
                    output.close()
                raise _Refused(f"cannot give the job's pipes to uid {owner[0]}: {e.strerror}")
        return outputs, handed

    def _signal(self, job_id, request):
        # Once the leader is reaped its pid may belong to someone else: only
        # jobs still in the table are signalled.
        pid = self._pid_of.get(job_id)
        if pid is None:
            return
        signum = request["signal"]
        try:
            os.killpg(pid, signum)
        except ProcessLookupError:
            pass
        except (OSError, ValueError, OverflowError) as e:
            raise _Refused(f"cannot send signal {signum!r}: {e}")
        # And the processes of its cgroup that left its group.
        self.cgroups.signal(self._jobs[job_id].cgroup, signum, pid)

    def _set_deadlines(self, request):
        at = request["at"]
        if at is not None:
            at = _deadline(at)
        ids = request["ids"]
        if not isinstance(ids, list):
            raise _Refused(f"ids must be a list of job ids, not {ids!r}")
        for job_id in ids:
            if job_id not in self._pid_of or job_id in self._past_deadline:
                # Ended, or killed already: too late to move.
                continue
            if at is None:
                self._deadlines.pop(job_id, None)
            else:
                self._deadlines[job_id] = at

    def next_deadline(self):
        """
        Seconds until the earliest deadline (0 if one has passed), or
        C{None} when no job has one.
        """
        if not self._deadlines:
            return None
        return max(0.0, min(self._deadlines.values()) - deadline_clock())

    def enforce_deadlines(self):
        """
        SIGKILL the process group of every job whose deadline has passed;
        its exit is reported when its leader is reaped.
        """
        if not self._deadlines:
            return
        now = deadline_clock()
        for job_id, at in list(self._deadlines.items()):
            if at > now:
                continue
            del self._deadlines[job_id]
            self._past_deadline.add(job_id)
            self._kill(job_id)

    def _kill(self, job_id):
        try:
            os.killpg(self._pid_of[job_id], signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.cgroups.signal(self._jobs[job_id].cgroup, signal.SIGKILL, self._pid_of[job_id])

    def kill_all(self):
        """
        SIGKILL every job whose leader is not reaped yet (so its id cannot
        have been reused): its group and its cgroup; and every other child
        of this helper (a job's orphan, where jobs have no cgroups).
        """
        for job_id in list(self._pid_of):
            self._kill(job_id)
        for pid in _children():
            if pid not in self._id_of:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def reap(self):
        """
        Reap every job whose leader has exited, after killing what is left
        of it (its process group, its cgroup), and report it once it has no
        process left (L{report_ended}); reap the orphans that came to this
        helper, a subreaper.
        """
        while True:
            try:
                # WNOWAIT leaves the leader a zombie, which keeps its pid and
                # so its group id from being reused while we kill the group.
                info = os.waitid(
                    os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT
                )
            except ChildProcessError:
                break
            if info is None:
                break
            pid = info.si_pid
            job_id = self._id_of.pop(pid, None)
            if job_id is None:
                # An orphan of some job, or what is left of one: not a job.
                os.waitpid(pid, 0)
                continue
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            job = self._jobs.pop(job_id)
            oom, left = self.cgroups.end(job.cgroup)
            _, status = os.waitpid(pid, 0)
            del self._pid_of[job_id]
            job.code = os.waitstatus_to_exitcode(status)
            job.oom_kills = oom
            # Its end is reported once the processes killed in its cgroup
            # are gone too (and with them the last of its output), or after
            # a while at most.
            job.report_by = time.monotonic() + _LAST_PROCESS_WAIT if left else 0.0
            self._ending[job_id] = job
        self.report_ended()

    def report_ended(self):
        """
        Report the jobs reaped whose cgroups are empty now, or have waited
        long enough; after the last of their output.

        @return: seconds until the processes left are looked for again, or
            C{None} if none are waited for.
        """
        wait = None
        now = None
        for job_id, job in list(self._ending.items()):
            if job.report_by:
                if self.cgroups.populated(job.cgroup):
                    if now is None:
                        now = time.monotonic()
                    if job.report_by > now:
                        # Their exits wake this process (a subreaper): this
                        # is only in case one does not.
                        wait = _ENDING_POLL
                        continue
                    # Not gone in time (stuck in the kernel?): reported all
                    # the same, its cgroups given back once empty.
                    self._lingering.append(job.cgroup)
                else:
                    self.cgroups.release(job.cgroup)
            del self._ending[job_id]
            self._report(job_id, job)
        if self._lingering:
            self._lingering = [c for c in self._lingering if not self._released(c)]
            if self._lingering and wait is None:
                wait = _LONGEST_SLEEP
        return wait

    def _released(self, cgroup):
        if self.cgroups.populated(cgroup):
            return False
        self.cgroups.release(cgroup)
        return True

    def _report(self, job_id, job):
        cut = []
        for output in job.outputs:
            if not output.closed:
                self._unwatch(output.read_fd)
                output.finish()
            if output.cut:
                cut.append(output.stream)
        ended = {"op": "exited", "id": job_id, "code": job.code}
        if self._deadlines:
            self._deadlines.pop(job_id, None)
        if job_id in self._past_deadline:
            self._past_deadline.discard(job_id)
            ended["deadline"] = True
        if job.oom_kills:
            ended["oom_kills"] = job.oom_kills
        if cut:
            ended["cut"] = cut
        self._reply(**ended)

    def _watch(self, fd, what):
        self.poller.register(fd, select.POLLIN)
        self.watched[fd] = what

    def _unwatch(self, fd):
        self.poller.unregister(fd)
        del self.watched[fd]

    def output_ready(self, output, events):
        """
        Move what a job wrote since; at the end of its pipe (every writer
        gone, nothing left in it: the end of most jobs), close it.
        """
        if output.closed:
            return
        if not events & select.POLLIN or output.pump() == 0:
            self._unwatch(output.read_fd)
            output.close()

    def close(self):
        """
        Close what is left open (the outputs of jobs not reaped), and kill
        and remove every job cgroup: this helper is exiting.
        """
        for job in self._jobs.values():
            for output in job.outputs:
                output.close()
        self.cgroups.close()

    def _reply(self, **message):
        self._replies.append(json.dumps(message, separators=(",", ":")))

    def flush(self):
        """
        Write the replies so far, all at once.
        """
        if not self._replies:
            return
        data = ("\n".join(self._replies) + "\n").encode("utf-8")
        self._replies = []
        view = memoryview(data)
        while view:
            view = view[os.write(self._replies_fd, view) :]


def become_subreaper():
    """
    Make this process a child subreaper (Linux's C{PR_SET_CHILD_SUBREAPER}):
    a descendant whose parent dies becomes its child, not init's, so that a
    job's double-forked or C{setsid} processes stay in reach.

    @return: whether it is one.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _children():
    """
    The pids of this process's children, from C{/proc}; none where it does
    not say.
    """
    pid = os.getpid()
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _deadline(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise _Refused(f"a deadline must be a number of seconds, not {value!r}")
    return float(value)


def _wake(signum, frame):
    # Only here so that SIGCHLD is caught, which writes to the wakeup fd.
    pass


def main(requests_fd=0, replies_fd=1, settings=None):
    """
    Serve requests from C{requests_fd} until it closes.

    @param requests_fd: where requests are read from.
    @param replies_fd: where replies are written to.
    @param settings: the helper's settings (L{DEFAULT_SETTINGS}).
    """
    global _OWN_IDS, _passage_needs_chmod
    os.chdir("/")
    os.umask(JOB_UMASK)
    _passage_needs_chmod = False
    _OWN_IDS = (os.getresuid(), os.getresgid(), os.getgroups())
    # A Ctrl-C at the daemon's terminal reaches this process too; the
    # daemon then stops and closes our stdin, which is how we should end.
    # And while it starts a job as another account, that account's
    # processes may signal it (see _take_ids): every signal that can be
    # ignored is, so that only SIGKILL and SIGSTOP remain to them.  (Jobs
    # get the default of each: _Spawner._default_signals.)
    for number in signal.valid_signals():
        # (Between 31 and SIGRTMIN: the C library's own, left alone.)
        if number not in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD) and (
            number < 32 or number >= signal.SIGRTMIN
        ):
            try:
                signal.signal(number, signal.SIG_IGN)
            except (OSError, ValueError):
                pass
    spawner = _Spawner(replies_fd, settings)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, _wake)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    spawner._watch(requests_fd, "requests")
    spawner._watch(wake_r, "children")
    pending = b""
    try:
        spawner.start()
        spawner.flush()
        while True:
            timeout = spawner.next_deadline()
            if timeout is not None:
                timeout = min(timeout, _LONGEST_SLEEP)
            # Killed processes not all gone are looked for again at least
            # this often (their exits wake the helper first, most often).
            waiting = spawner.report_ended()
            if waiting is not None:
                timeout = waiting if timeout is None else min(timeout, waiting)
            spawner.flush()
            ready = spawner.poller.poll(None if timeout is None else timeout * 1000)
            # What each event is about, looked up before any is handled: a
            # job's pipe closed by one (its end) may have its number taken
            # by another's (a spawn) before the next is handled.
            for what, events in [(spawner.watched.get(fd), events) for fd, events in ready]:
                if what == "children":
                    while True:
                        try:
                            if not os.read(wake_r, 4096):
                                break
                        except BlockingIOError:
                            break
                    spawner.reap()
                    continue
                if what != "requests":
                    if what is not None:
                        spawner.output_ready(what, events)
                    continue
                data = os.read(requests_fd, 65536)
                if not data:
                    spawner.reap()
                    spawner.kill_all()
                    spawner.flush()
                    return
                lines = (pending + data).split(b"\n")
                pending = lines.pop()
                for line in lines:
                    if line.strip():
                        spawner.received(line)
            # After the requests: a deadline moved later by a request that
            # came in before it passed counts.
            spawner.enforce_deadlines()
            spawner.flush()
    except BrokenPipeError:
        # The daemon is gone; so is anyone to report to.
        spawner.kill_all()
        return
    finally:
        spawner.close()


if __name__ == "__main__":
    sys.exit(main(settings=json.loads(sys.argv[1]) if len(sys.argv) > 1 else None))
