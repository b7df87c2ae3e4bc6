"""
The interfaces between the executor and what it drives: the process spawner,
a running process, and the input stager.
"""

from zope.interface import Attribute, Interface


class IProcessSpawner(Interface):
    """
    Starts command jobs as processes, each in its own session and process
    group (and cgroups, where the host allows), and tells when they end.
    """

    def spawn(argv, env, cwd, stdout_path, stderr_path, deadline=None, run_as=None,
              memory_mb=0):
        """
        Start C{argv} (no shell) in C{cwd} with exactly the environment
        C{env}, stdout and stderr to those files.  Fire with an
        L{IRunningProcess}.  With a C{deadline} (a time on
        L{dispatcher.execution._spawner.deadline_clock}), the process group
        is killed when it passes, by a process other than the caller's.
        With C{run_as} (a L{dispatcher.config._ini.RunAs}), it runs as that
        account, which C{cwd} is given to.
        C{memory_mb} (0: none) is its memory limit, where it can be
        enforced.
        """

    def set_deadline(processes, at):
        """
        Move the deadline of several running processes to C{at} (C{None}:
        none).
        """


class IRunningProcess(Interface):
    """
    A process started by an L{IProcessSpawner}.
    """

    pid = Attribute("The process id, which is also its process group id.")
    start_ticks = Attribute("Its start time in clock ticks since boot.")
    boot_id = Attribute("The kernel boot id when it started.")
    ended = Attribute(
        "A Deferred that fires with the exit code (negative: the signal) "
        "when the process has exited and its group has been killed."
    )
    killed_at_deadline = Attribute(
        "Whether it was killed because its deadline passed."
    )
    limits = Attribute("The Limits it runs under, or None if not known.")
    oom_kills = Attribute(
        "Once it has ended: how many of its processes the OOM killer killed."
    )
    log_cut = Attribute("Once it has ended: the streams of its log that were cut.")

    def signal_group(signum):
        """
        Send C{signum} to the whole process group, while it still exists.
        """


class IInputStager(Interface):
    """
    Fetches a job's inputs before it runs.
    """

    def stage_inputs(inputs, workdir, owner=None):
        """
        Fetch every L{InputSpec} into C{workdir}; fire with C{None}, or
        fail with L{StagingError} naming the input and why.  With C{owner}
        (C{(uid, gid)}), the files and directories made belong to it, and
        no symbolic link is followed on the way.
        """
