"""
Each command job in cgroups of its own, for the spawner helper: what the
host allows is found at start, each job's processes are counted, bounded
and killed through them.  Standard library only, as the helper is.

What is used, found once when the helper starts:

  - cgroup v2 (the unified hierarchy) wherever the helper's own cgroup can
    have children: every job gets one, and at its end its processes are
    killed with C{cgroup.kill} (Linux 5.14), or frozen, killed and thawed
    with C{cgroup.freeze} (5.2).  Its C{memory} and C{pids} controllers
    serve when they can be enabled for the jobs' cgroups: the helper's own
    cgroup must have them (a systemd unit with C{Delegate=yes}) and, by
    the no-internal-processes rule, hold no process itself.  When the
    daemon and the helper are its only processes they move into a leaf,
    C{<own>/dispatcher-daemon}, as systemd asks of a delegated unit.
  - cgroup v1 hierarchies for what v2 does not give: C{pids} (the process
    limit), C{memory} (the memory limit) and, without a v2 kill,
    C{freezer} (freeze, kill, thaw).  This is how a hybrid host runs.
    There, a v1 pids cgroup that limits a job's processes also tracks and
    kills them (its forks stopped with C{pids.max} 0), and a v2 cgroup
    with no controller to give is not used: one move fewer a job.

Job cgroups live under C{<own>/dispatcher-jobs/helper-<pid>-<ticks>/} in
each hierarchy: the first directory is shared by every helper under the
same cgroup, the second is this helper's (its pid and start time, so that
a helper starting later can tell that its owner is dead, kill what is left
in it and remove it).  A job's cgroup is taken from a pool of empty ones
(made at first need, kept up to L{POOL_SIZE} per hierarchy) and given
back once empty: making and removing a cgroup cost 30 to 100 us (a
memory one the most), moving a process from one to another 7 to 20.

Placing a job: the helper is single-threaded, so it moves itself into the
job's cgroups right before C{posix_spawn}; the job is born inside them (a
child inherits its parent's cgroups at fork), so nothing it forks, however
early, is left outside.  Right after, it moves back to its own cgroup
where the job has a memory limit; elsewhere it stays until it next moves
(L{JobCgroups.leave}), which halves the moves of a stream of jobs: each is
a write to a C{cgroup.procs} file, the dearest part of a job's cgroups.
"""

import errno
import os
import signal
import time

# The directory under the helper's own cgroup that holds every helper's
# job cgroups, and the leaf the daemon and the helper move to when a v2
# cgroup must give up its processes to enable controllers.
JOBS_DIRECTORY = "dispatcher-jobs"
DAEMON_LEAF = "dispatcher-daemon"

# Empty job cgroups kept for reuse, per hierarchy.
POOL_SIZE = 64

# How long a kill waits for a freezer to freeze, and the teardown at exit
# for killed processes to be gone.
_FREEZE_WAIT = 1.0
_TEARDOWN_WAIT = 2.0

_V2 = "cgroup2"
# The v1 controllers used, each mounted as a hierarchy of its own or
# together with others.
_V1 = ("pids", "memory", "freezer")


def _read(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)


def _write(path, text):
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode("ascii"))
    finally:
        os.close(fd)


def _pids(data):
    return [int(line) for line in data.split()]


def _unescape(field):
    # Mount points in mountinfo have space, tab, newline and backslash as
    # octal escapes.
    if "\\" not in field:
        return field
    out = []
    i = 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text):
    """
    The cgroup mounts of a C{/proc/self/mountinfo} text.

    @return: C{(fstype, root, mount_point, super_options)} for every
        C{cgroup} and C{cgroup2} mount, in order.
    """
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        dash = fields.index("-")
        if dash < 5 or len(fields) < dash + 4:
            continue
        fstype = fields[dash + 1]
        if fstype not in ("cgroup", "cgroup2"):
            continue
        options = set(fields[dash + 3].split(","))
        mounts.append((fstype, _unescape(fields[3]), _unescape(fields[4]), options))
    return mounts


def parse_proc_cgroup(text):
    """
    The cgroups of a C{/proc/self/cgroup} text: C{{"cgroup2": path}} for
    the v2 line, and each v1 controller of a line to that line's path.
    """
    found = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        number, controllers, path = parts
        if number == "0" and controllers == "":
            found[_V2] = path
            continue
        for controller in controllers.split(","):
            if controller:
                found[controller] = path
    return found


def own_directories(mounts, cgroups):
    """
    Where the process's own cgroup of each kind is in the file system:
    C{{kind: directory}} for C{"cgroup2"} and each of L{_V1} mounted and
    found in C{cgroups} (L{parse_proc_cgroup}).
    """
    found = {}
    for fstype, root, point, options in mounts:
        if fstype == "cgroup2":
            kinds = [_V2]
        else:
            kinds = [kind for kind in _V1 if kind in options]
        for kind in kinds:
            path = cgroups.get(kind)
            if kind in found or path is None:
                continue
            if root == "/":
                relative = path
            elif path == root or path.startswith(root + "/"):
                relative = path[len(root) :]
            else:
                # This mount shows another part of the hierarchy.
                continue
            found[kind] = os.path.normpath(point + "/" + relative.lstrip("/"))
    return found


def _start_ticks(pid):
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return int(data[data.rindex(b")") + 2 :].split()[19])


def kill_method(path):
    """
    How every process of the cgroup C{path} is killed, by the files it
    has: C{"kill"} (v2 C{cgroup.kill}, Linux 5.14), C{"freeze"} (v2
    C{cgroup.freeze}, 5.2), C{"freezer"} (the v1 freezer), C{"pids"} (a
    v1 pids cgroup: forks stopped with C{pids.max} 0, then one by one), or
    C{None} (one by one, again while new ones appear).
    """
    for name, method in (
        ("cgroup.kill", "kill"),
        ("cgroup.freeze", "freeze"),
        ("freezer.state", "freezer"),
        ("pids.max", "pids"),
    ):
        if os.path.exists(os.path.join(path, name)):
            return method
    return None


def processes_in(path):
    """
    The pids of the processes in the cgroup C{path} (none if it is gone).
    """
    try:
        return _pids(_read(os.path.join(path, "cgroup.procs")))
    except OSError:
        return []


def populated(path, v2):
    """
    Whether any process is in the cgroup C{path} (of cgroup v2 if C{v2}).
    """
    if v2:
        try:
            return b"populated 1" in _read(os.path.join(path, "cgroup.events"))
        except OSError:
            return False
    return bool(processes_in(path))


def signal_cgroup(path, signum, rounds=100):
    """
    Send C{signum} to every process of the cgroup C{path}; for SIGKILL,
    again while new ones appear (a job forking as it dies), C{rounds}
    times at most.
    """
    for _ in range(rounds):
        pids = processes_in(path)
        for pid in pids:
            try:
                os.kill(pid, signum)
            except (ProcessLookupError, PermissionError):
                pass
        if not pids or signum != signal.SIGKILL:
            return


def kill_cgroup(path, method):
    """
    SIGKILL every process of the cgroup C{path}, including those it forks
    meanwhile, by C{method} (L{kill_method}).
    """
    if method == "kill":
        try:
            _write(os.path.join(path, "cgroup.kill"), "1")
            return
        except OSError:
            method = None
    if method == "freeze":
        _freeze_and_kill(path, "cgroup.freeze", "1", "0", "cgroup.events", b"frozen 1")
    elif method == "freezer":
        _freeze_and_kill(path, "freezer.state", "FROZEN", "THAWED", "freezer.state", b"FROZEN")
    else:
        if method == "pids":
            # None of them can fork from now: the rounds below end.  (The
            # limit is written again before the cgroup's next job.)
            try:
                _write(os.path.join(path, "pids.max"), "0")
            except OSError:
                pass
        signal_cgroup(path, signal.SIGKILL)


def _freeze_and_kill(path, control, freeze, thaw, state, frozen):
    # Frozen, nothing in the cgroup can fork, so the list read then is
    # whole; the SIGKILLs wait for the thaw, and are the first thing each
    # process meets after it.
    try:
        _write(os.path.join(path, control), freeze)
        give_up = time.monotonic() + _FREEZE_WAIT
        while frozen not in _read(os.path.join(path, state)):
            if time.monotonic() > give_up:
                break
            time.sleep(0.001)
        signal_cgroup(path, signal.SIGKILL, rounds=1)
    except OSError:
        signal_cgroup(path, signal.SIGKILL)
    finally:
        try:
            _write(os.path.join(path, control), thaw)
        except OSError:
            pass
    # What the list missed if the freeze did not take.
    signal_cgroup(path, signal.SIGKILL, rounds=1)


def remove_cgroups(paths, v2, wait=_TEARDOWN_WAIT):
    """
    Kill every process of the cgroups C{paths}, wait up to C{wait} seconds
    for them to be gone, and remove the cgroups.
    """
    for path in paths:
        if populated(path, v2):
            kill_cgroup(path, kill_method(path))
    give_up = time.monotonic() + wait
    while any(populated(path, v2) for path in paths):
        if time.monotonic() > give_up:
            break
        time.sleep(0.01)
    for path in paths:
        try:
            os.rmdir(path)
        except OSError:
            pass


class Hierarchy:
    """
    One cgroup hierarchy the helper puts jobs in.

    @ivar kind: C{"cgroup2"}, or the v1 controller it serves for.
    @ivar home: the helper's own cgroup, which it goes back to.
    @ivar jobs: this helper's directory of job cgroups.
    @ivar kill: how every process of a job is killed here (L{kill_method}).
    @ivar controllers: what it limits for a job: a set of C{"memory"} and
        C{"pids"}.
    @ivar inside: the job cgroup the helper is in, or C{None}: at home.
    """

    def __init__(self, kind, home, jobs):
        self.kind = kind
        self.v2 = kind == _V2
        self.home = home
        self.jobs = jobs
        self.kill = None
        self.controllers = set()
        self.inside = None
        self._home_fd = None
        self._idle = []
        self._made = 0
        # Per job cgroup: its cgroup.procs open to be written, its
        # cgroup.events (v2) open to be read, and the values last written to
        # its limit files, so that a cgroup reused with the same limits
        # costs no write.
        self._procs = {}
        self._status = {}
        self._written = {}
        # Whether memory and swap are limited apart (a v1 memsw file, a v2
        # swap file), found at the first job cgroup.
        self.swap_file = None

    def __repr__(self):
        return f"<Hierarchy {self.kind} {self.jobs}>"

    def open(self):
        self._home_fd = os.open(os.path.join(self.home, "cgroup.procs"), os.O_WRONLY)

    def go_home(self, pid_text):
        if self.inside is not None:
            os.write(self._home_fd, pid_text)
            self.inside = None

    def step_out(self, path, pid_text):
        """
        Go home if the helper is in the job cgroup C{path}: before what is
        done to a job's processes there, which must not touch the helper.
        """
        if self.inside == path:
            self.go_home(pid_text)

    def take(self, new=False):
        """
        An empty job cgroup: one from the pool, or a new one (always, if
        C{new}).
        """
        if self._idle and not new:
            return self._idle.pop()
        self._made += 1
        path = os.path.join(self.jobs, f"job-{self._made}")
        os.mkdir(path)
        try:
            self._procs[path] = os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY)
            if self.v2:
                # (Not v1's cgroup.procs: read again through one open file,
                # it keeps showing the list it first made for as long as it
                # is read more often than once a second.)
                self._status[path] = os.open(
                    os.path.join(path, "cgroup.events"), os.O_RDONLY
                )
            elif self.kind == "pids":
                self._status[path] = os.open(
                    os.path.join(path, "pids.current"), os.O_RDONLY
                )
        except OSError:
            self.remove(path)
            raise
        self._written[path] = {}
        if self.swap_file is None:
            name = "memory.swap.max" if self.v2 else "memory.memsw.limit_in_bytes"
            self.swap_file = os.path.exists(os.path.join(path, name))
        return path

    def give_back(self, path):
        """
        Keep an empty job cgroup for another job, or remove it.
        """
        if len(self._idle) < POOL_SIZE:
            self._idle.append(path)
        else:
            self.remove(path)

    def remove(self, path):
        if self.inside == path:
            os.write(self._home_fd, str(os.getpid()).encode("ascii"))
            self.inside = None
        for fds in (self._procs, self._status):
            fd = fds.pop(path, None)
            if fd is not None:
                os.close(fd)
        self._written.pop(path, None)
        try:
            os.rmdir(path)
        except OSError:
            pass

    def enter(self, path, pid_text):
        if self.inside != path:
            os.write(self._procs[path], pid_text)
            self.inside = path

    def holds(self, path, name, value):
        """
        Whether this helper last wrote C{value} to the file C{name} of the
        job cgroup C{path}.
        """
        return self._written[path].get(name) == value

    def set(self, path, name, value):
        """
        Write C{value} to the file C{name} of the job cgroup C{path}, unless
        this helper wrote it there last.
        """
        written = self._written[path]
        if written.get(name) == value:
            return
        written.pop(name, None)
        _write(os.path.join(path, name), value)
        written[name] = value

    def populated(self, path, leader=False):
        """
        Whether any process is in the job cgroup C{path}; with C{leader},
        any but the job's leader, a zombie not yet reaped.
        """
        fd = self._status.get(path)
        if fd is None:
            return populated(path, self.v2)
        try:
            data = os.pread(fd, 4096, 0)
        except OSError:
            return False
        if self.v2:
            return b"populated 1" in data
        # A v1 pids cgroup counts a task until it is reaped, so the leader
        # too: no more than it, and none is left, at the cost of one read
        # (most jobs); more may be zombies alone, which the list leaves out.
        if int(data) <= leader:
            return False
        return populated(path, False)

    def kill_all(self, path):
        if self.kill == "pids":
            # (Its limit, now 0, is written again for its next job.)
            self._written.get(path, {}).pop("pids.max", None)
        kill_cgroup(path, self.kill)

    def close(self):
        """
        Kill what is left in this helper's job cgroups, remove them, and
        this helper's directory, and the shared one if it is empty.
        """
        if self._home_fd is not None:
            self.go_home(str(os.getpid()).encode("ascii"))
        paths = list(self._procs)
        for fds in (self._procs, self._status):
            for fd in fds.values():
                os.close(fd)
            fds.clear()
        self._written = {}
        self._idle = []
        remove_cgroups(paths, self.v2)
        for directory in (self.jobs, os.path.dirname(self.jobs)):
            try:
                os.rmdir(directory)
            except OSError:
                pass
        if self._home_fd is not None:
            os.close(self._home_fd)
            self._home_fd = None


class JobCgroup:
    """
    The cgroups of one job, one per hierarchy it is in.

    @ivar limits: what its record says: C{{"memory_mb": M or None,
        "processes": P or None, "enforced": bool}}.
    """

    __slots__ = ("paths", "limits", "oom_before", "memory")

    def __init__(self, paths, limits, memory, oom_before):
        self.paths = paths
        self.limits = limits
        self.memory = memory
        self.oom_before = oom_before


class JobCgroups:
    """
    The helper's job cgroups: found at L{start}, one set per job.

    @param mode: C{"auto"} (whatever works), C{"v1"} (no cgroup v2: only
        for tests of the v1 freezer) or C{"off"}.
    @param max_processes: the most processes (and threads) a job may
        have, 0 for no limit.
    """

    def __init__(self, mode="auto", max_processes=0):
        self.mode = mode
        self.max_processes = max_processes
        self.hierarchies = []
        # The hierarchy each role is served by, or None.
        self.tracker = None
        self.pids = None
        self.memory = None
        self.problems = []
        # Why cgroup v2 gives no controllers, said only if v1 gives none.
        self._controllers_problem = None
        self._pid_text = str(os.getpid()).encode("ascii")

    # Finding what the host allows

    def start(self):
        """
        Find the hierarchies to use and make this helper's directories;
        kill and remove what dead helpers left.

        @return: one line saying what is enforced.
        """
        if self.mode == "off":
            return self.describe()
        try:
            with open("/proc/self/mountinfo") as f:
                mountinfo = f.read()
            with open("/proc/self/cgroup") as f:
                proc_cgroup = f.read()
        except OSError as e:
            self.problems.append(f"cannot read the process's cgroups ({e.strerror})")
            return self.describe()
        owns = own_directories(parse_mountinfo(mountinfo), parse_proc_cgroup(proc_cgroup))
        if self.mode == "v1":
            owns.pop(_V2, None)
        try:
            if _V2 in owns:
                self._start_v2(owns[_V2])
            for kind in _V1:
                needed = (
                    (kind == "pids" and self.pids is None)
                    or (kind == "memory" and self.memory is None)
                    or (kind == "freezer" and (self.tracker is None or self.tracker.kill is None))
                )
                if kind in owns and needed:
                    self._start_v1(kind, owns[kind])
            if self.tracker is None:
                # No v2 and no freezer: a job's pids or memory cgroup still
                # lists its processes, to kill one by one.
                self.tracker = self.pids or self.memory
            self._track_with_pids()
            for hierarchy in self.hierarchies:
                hierarchy.open()
        except OSError as e:
            # Whatever went wrong, the helper runs on: its jobs without
            # cgroups, saying why.
            self.problems.append(f"cannot set up job cgroups ({e})")
            self.close()
            self.hierarchies = []
            self.tracker = self.pids = self.memory = None
        return self.describe()

    def _track_with_pids(self):
        """
        Where a job's processes are limited by a v1 pids cgroup, let it
        track them too: with C{pids.max} set to 0 none of them can fork, so
        killing every one it lists, again until it lists none, kills them
        all, as surely as v2's C{cgroup.kill}.  A v2 cgroup kept only to
        track them (a hybrid host, whose v2 hierarchy has no controllers),
        or a v1 freezer, is then not used: each hierarchy a job is in costs
        a move of the helper at each spawn, the dearest part of a job's
        cgroups.
        """
        pids = self.pids
        if pids is None or pids.v2 or not self.max_processes or self.tracker is pids:
            return
        tracker = self.tracker
        pids.kill = "pids"
        self.tracker = pids
        if tracker is not self.memory:
            self.hierarchies.remove(tracker)
            tracker.close()

    def _jobs_directory(self, home, root=None):
        base = os.path.join(root or home, JOBS_DIRECTORY)
        os.makedirs(base, exist_ok=True)
        self._reclaim(base)
        jobs = os.path.join(base, f"helper-{os.getpid()}-{_start_ticks(os.getpid())}")
        os.makedirs(jobs, exist_ok=True)
        return base, jobs

    def _start_v2(self, own):
        # Back in the leaf an earlier helper of this daemon made: the
        # cgroup to put jobs under is its parent.
        root = os.path.dirname(own) if os.path.basename(own) == DAEMON_LEAF else own
        try:
            base, jobs = self._jobs_directory(own, root)
        except OSError as e:
            self.problems.append(f"cgroup v2 at {own}: cannot make job cgroups ({e.strerror})")
            return
        hierarchy = Hierarchy(_V2, own, jobs)
        probe = os.path.join(jobs, "probe")
        try:
            os.mkdir(probe)
            files = set(os.listdir(probe))
            os.rmdir(probe)
        except OSError as e:
            self.problems.append(f"cgroup v2 at {own}: cannot make job cgroups ({e.strerror})")
            return
        if "cgroup.kill" in files:
            hierarchy.kill = "kill"
        elif "cgroup.freeze" in files:
            hierarchy.kill = "freeze"
        hierarchy.controllers = self._enable_v2_controllers(hierarchy, root, base)
        self.hierarchies.append(hierarchy)
        self.tracker = hierarchy
        if "pids" in hierarchy.controllers:
            self.pids = hierarchy
        if "memory" in hierarchy.controllers:
            self.memory = hierarchy

    def _enable_v2_controllers(self, hierarchy, root, base):
        """
        Enable the memory and pids controllers down to C{hierarchy}'s job
        cgroups, those of them C{root} has; the set enabled.
        """
        try:
            available = set(_read(os.path.join(root, "cgroup.controllers")).decode().split())
        except OSError:
            return set()
        wanted = [c for c in ("memory", "pids") if c in available]
        if not wanted:
            self._controllers_problem = (
                f"cgroup v2 at {root} has neither the memory nor the pids controller to "
                f"give its children (not delegated: a systemd unit needs Delegate=yes; or "
                f"they belong to cgroup v1)"
            )
            return set()
        line = " ".join(f"+{c}" for c in wanted)
        try:
            _write(os.path.join(root, "cgroup.subtree_control"), line)
        except OSError as e:
            if e.errno != errno.EBUSY or not self._move_to_leaf(hierarchy, root):
                self.problems.append(
                    f"cgroup v2 at {root}: cannot enable {', '.join(wanted)} for its "
                    f"children ({e.strerror}): a cgroup that holds processes cannot "
                    f"(the no-internal-processes rule); run the dispatcher in a cgroup "
                    f"of its own (a systemd unit with Delegate=yes)"
                )
                return set()
            try:
                _write(os.path.join(root, "cgroup.subtree_control"), line)
            except OSError as e:
                self.problems.append(
                    f"cgroup v2 at {root}: cannot enable {', '.join(wanted)} ({e.strerror})"
                )
                return set()
        try:
            for directory in (base, hierarchy.jobs):
                _write(os.path.join(directory, "cgroup.subtree_control"), line)
        except OSError as e:
            self.problems.append(
                f"cgroup v2 at {directory}: cannot enable {', '.join(wanted)} ({e.strerror})"
            )
            return set()
        return set(wanted)

    def _move_to_leaf(self, hierarchy, root):
        """
        Move the helper and the daemon (its parent) into the leaf
        L{DAEMON_LEAF} under C{root}, if they are all C{root} holds: then
        C{root} may enable controllers for its children.  The leaf becomes
        the helper's home.
        """
        ours = {os.getpid(), os.getppid()}
        try:
            held = set(_pids(_read(os.path.join(root, "cgroup.procs"))))
        except OSError:
            return False
        if not held <= ours:
            return False
        leaf = os.path.join(root, DAEMON_LEAF)
        try:
            os.makedirs(leaf, exist_ok=True)
            for pid in held:
                _write(os.path.join(leaf, "cgroup.procs"), str(pid))
        except OSError:
            return False
        hierarchy.home = leaf
        return True

    def _start_v1(self, kind, own):
        try:
            _, jobs = self._jobs_directory(own)
        except OSError as e:
            self.problems.append(f"cgroup v1 {kind} at {own}: cannot make job cgroups "
                                 f"({e.strerror})")
            return
        hierarchy = Hierarchy(kind, own, jobs)
        if kind == "freezer":
            hierarchy.kill = "freezer"
            self.tracker = hierarchy
        else:
            hierarchy.controllers = {kind}
            setattr(self, kind, hierarchy)
        self.hierarchies.append(hierarchy)

    def _reclaim(self, base):
        """
        Kill and remove the job cgroups of every helper under C{base} that
        is no longer running (a helper killed with the daemon).
        """
        try:
            names = os.listdir(base)
        except OSError:
            return
        for name in names:
            parts = name.split("-")
            if len(parts) != 3 or parts[0] != "helper" or not all(p.isdigit() for p in parts[1:]):
                continue
            pid, ticks = int(parts[1]), int(parts[2])
            if _start_ticks(pid) == ticks:
                continue
            directory = os.path.join(base, name)
            try:
                paths = [
                    entry.path for entry in os.scandir(directory) if entry.is_dir()
                ]
            except OSError:
                continue
            remove_cgroups(paths, os.path.exists(os.path.join(directory, "cgroup.events")))
            try:
                os.rmdir(directory)
            except OSError:
                pass

    def describe(self):
        """
        One line saying what holds for jobs, and what does not and why.
        """
        if self.mode == "off":
            return "jobs are not put in cgroups ([executor] cgroups = off): " + self._without()
        if self.tracker is None:
            why = "; ".join(self.problems) or "no cgroup hierarchy is mounted"
            return f"jobs are not put in cgroups ({why}): " + self._without()
        parts = []
        for hierarchy in self.hierarchies:
            roles = []
            if hierarchy is self.tracker:
                roles.append({
                    "kill": "every process killed at the end with cgroup.kill",
                    "freeze": "every process killed at the end, frozen first",
                    "freezer": "every process killed at the end, frozen first",
                    "pids": "every process killed at the end, its forks stopped first",
                    None: "every process killed at the end, one by one",
                }[hierarchy.kill])
            if hierarchy is self.pids:
                roles.append(
                    f"at most {self.max_processes} processes ([executor] max_processes)"
                    if self.max_processes else "processes counted ([executor] max_processes = 0: "
                    "no limit)"
                )
            if hierarchy is self.memory:
                roles.append("memory limited to resources.memory_mb")
            version = "cgroup v2" if hierarchy.kind == _V2 else f"cgroup v1 {hierarchy.kind}"
            parts.append(f"{version} under {os.path.dirname(hierarchy.jobs)} ({', '.join(roles)})")
        line = "each job gets cgroups of its own: " + "; ".join(parts)
        missing = []
        if self.pids is None:
            missing.append("no process limit (no pids controller)")
        if self.memory is None:
            missing.append("no memory limit (no memory controller)")
        problems = list(self.problems)
        if missing:
            line += "; " + " and ".join(missing)
            if self._controllers_problem:
                problems.append(self._controllers_problem)
        if problems:
            line += " (" + "; ".join(problems) + ")"
        return line

    def _without(self):
        return ("a job's processes that leave its process group (setsid) are not "
                "killed with it, and neither resources.memory_mb nor "
                "[executor] max_processes is enforced")

    # Jobs

    def enforces(self, memory_mb):
        """
        Whether a job asking for C{memory_mb} (0: no limit) gets every
        limit it has, and all its processes killed at its end.
        """
        return (
            self.tracker is not None
            and (memory_mb == 0 or self.memory is not None)
            and (self.max_processes == 0 or self.pids is not None)
        )

    def enter(self, memory_mb):
        """
        Take a job's cgroups, set their limits, and move this process into
        them: what it spawns now starts inside.  Call L{leave} right after
        the spawn, whether it worked or not.

        @param memory_mb: the job's memory limit in MiB, 0 for none.
        @return: the L{JobCgroup}; without cgroups (none on this host, or
            getting them failed: written to stderr) it has no paths, and
            its limits say they are not enforced.
        """
        limits = {
            "memory_mb": memory_mb or None,
            "processes": self.max_processes or None,
            "enforced": self.enforces(memory_mb),
        }
        if self.tracker is None:
            return JobCgroup({}, limits, None, 0)
        wanted = [self.tracker]
        if self.max_processes and self.pids is not None and self.pids not in wanted:
            wanted.append(self.pids)
        if memory_mb and self.memory is not None and self.memory not in wanted:
            wanted.append(self.memory)
        paths = {}
        try:
            for hierarchy in self.hierarchies:
                if hierarchy not in wanted:
                    # Still in an earlier job's cgroup here (L{leave}).
                    hierarchy.go_home(self._pid_text)
            for hierarchy in wanted:
                path = paths[hierarchy] = hierarchy.take()
                try:
                    self._set_limits(hierarchy, path, memory_mb)
                except OSError:
                    # A cgroup used before may refuse a lower limit (v1
                    # memory still charged with its last job's cache): a
                    # new one does not.
                    del paths[hierarchy]
                    hierarchy.remove(path)
                    path = paths[hierarchy] = hierarchy.take(new=True)
                    self._set_limits(hierarchy, path, memory_mb)
            oom_before = 0
            if memory_mb and self.memory is not None:
                oom_before = self._oom_kills(self.memory, paths[self.memory])
            for hierarchy in wanted:
                hierarchy.enter(paths[hierarchy], self._pid_text)
        except OSError as e:
            _say(f"cannot put a job in its cgroups ({e}); it runs without them")
            for hierarchy in wanted:
                hierarchy.go_home(self._pid_text)
            for hierarchy, path in paths.items():
                # Not given back: its limits may be half written.
                hierarchy.remove(path)
            limits["enforced"] = False
            return JobCgroup({}, limits, None, 0)
        return JobCgroup(paths, limits, self.memory if memory_mb else None, oom_before)

    def _set_limits(self, hierarchy, path, memory_mb):
        if "pids" in hierarchy.controllers:
            hierarchy.set(path, "pids.max", str(self.max_processes or "max"))
        if "memory" in hierarchy.controllers:
            if hierarchy.kind == _V2:
                hierarchy.set(path, "memory.max", str(memory_mb << 20) if memory_mb else "max")
                # Out of its memory, the whole job is killed, not one process
                # of it, which would leave the rest to go on without its
                # part.  Only then: a job without a limit may hold the helper
                # for a while (L{leave}), which a kill of the whole cgroup
                # would take too.
                hierarchy.set(path, "memory.oom.group", "1" if memory_mb else "0")
                # What a job is held to is its memory, not memory and swap.
                if hierarchy.swap_file:
                    hierarchy.set(path, "memory.swap.max", "0" if memory_mb else "max")
            else:
                limit = str(memory_mb << 20) if memory_mb else "-1"
                if hierarchy.holds(path, "memory.limit_in_bytes", limit):
                    return
                if hierarchy.swap_file:
                    # Memory and swap must stay at least memory's limit:
                    # lifted first, set last.
                    hierarchy.set(path, "memory.memsw.limit_in_bytes", "-1")
                hierarchy.set(path, "memory.limit_in_bytes", limit)
                if hierarchy.swap_file:
                    hierarchy.set(path, "memory.memsw.limit_in_bytes", limit)

    def leave(self, job):
        """
        Move this process back to its own cgroup after a spawn where the
        job has a memory limit.  Elsewhere it stays in the job's until it
        next moves (the next spawn, or anything done to that cgroup: see
        L{Hierarchy.step_out}): one write a job instead of two.  Where a
        memory limit is, the helper would be charged, and could be killed,
        for a job out of memory.  (Meanwhile it counts as one of the job's
        processes against its process limit.)
        """
        for hierarchy in job.paths:
            if hierarchy is job.memory:
                try:
                    hierarchy.go_home(self._pid_text)
                except OSError as e:
                    _say(f"cannot move the helper back to {hierarchy.home} ({e})")

    def _oom_kills(self, hierarchy, path):
        name = "memory.events" if hierarchy.kind == _V2 else "memory.oom_control"
        try:
            data = _read(os.path.join(path, name))
        except OSError:
            return 0
        for line in data.splitlines():
            key, _, value = line.partition(b" ")
            if key == b"oom_kill":
                return int(value)
        return 0

    def signal(self, job, signum, group):
        """
        Send C{signum} to every process of the job that is not in its
        process group C{group} (which the caller signals as a whole, so
        that none gets it twice); SIGKILL to every one, through the cgroup,
        which no fork escapes.
        """
        if self.tracker not in job.paths:
            return
        path = job.paths[self.tracker]
        self.tracker.step_out(path, self._pid_text)
        if signum == signal.SIGKILL:
            self.tracker.kill_all(path)
            return
        for pid in processes_in(path):
            try:
                if os.getpgid(pid) != group:
                    os.kill(pid, signum)
            except (ProcessLookupError, PermissionError):
                pass

    def end(self, job):
        """
        The job's leader has exited: kill whatever else of it is left.

        @return: C{(oom_kills, left)}: how many of its processes the OOM
            killer killed, and whether any process was left (then killed;
            L{release} its cgroups once L{populated} says they are empty).
            With none left its cgroups are given back at once.
        """
        oom = 0
        if job.memory is not None:
            oom = self._oom_kills(job.memory, job.paths[job.memory]) - job.oom_before
        if self.populated(job, leader=True):
            self.tracker.kill_all(job.paths[self.tracker])
            return oom, True
        self.release(job)
        return oom, False

    def populated(self, job, leader=False):
        """
        Whether any process of the job is left (with C{leader}: but its
        leader, a zombie not yet reaped).  The tracker holds every one
        (each was born in all the job's cgroups), so it alone is asked.
        """
        path = job.paths.get(self.tracker)
        if path is None:
            return False
        self.tracker.step_out(path, self._pid_text)
        return self.tracker.populated(path, leader)

    def release(self, job):
        """
        Give back the cgroups of a job that has no process left.
        """
        for hierarchy, path in job.paths.items():
            hierarchy.give_back(path)
        job.paths = {}

    def close(self):
        """
        Kill every process left in a job cgroup and remove them all.
        """
        for hierarchy in self.hierarchies:
            try:
                hierarchy.close()
            except OSError as e:
                _say(f"cannot clean up {hierarchy.jobs} ({e})")


def _say(message):
    # The daemon logs what the helper writes to its stderr.
    try:
        os.write(2, (message + "\n").encode("utf-8", "replace"))
    except OSError:
        pass
