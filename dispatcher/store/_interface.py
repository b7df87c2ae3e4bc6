"""
The interface every job store implements.
"""

from zope.interface import Interface


class IJobStore(Interface):
    """
    Where jobs, attempts and leases live.  Every method returns a Deferred
    and does its blocking work off the reactor thread.  Writes fire only
    after their transaction is durably committed.
    """

    def open():
        """
        Create or migrate the schema.  Fires when the store is ready.
        """

    def close():
        """
        Finish every write already asked for, then close.  Fires when done.
        """

    def submit(specs, now, ids):
        """
        Store new jobs from a list of L{JobSpec}s with their new ids, all
        or nothing; fires with the list of new L{Job}s, queued, in the same
        order.
        """

    def submit_plain(jobs, now, ids, idempotency=None):
        """
        Store L{PlainJobs} with their new ids, all or nothing, as L{submit}
        would store their specs; fires with their ids (L{SubmittedIds}) once
        they are durable.
        """

    def get(job_id):
        """
        Fire with the L{Job} of that id, or fail with L{UnknownJob}.
        """

    def list_jobs(state=None, labels=(), limit=100, cursor=None):
        """
        Fire with C{(jobs, next_cursor)}: jobs in submission order after
        C{cursor}, filtered by state and by labels (C{(key, value)} pairs,
        a value of C{None} meaning the key is present).
        """

    def count_by_state():
        """
        Fire with a dict mapping every L{JobState} to its number of jobs.
        """

    def claim(holder, capacity, now, lease_seconds):
        """
        Lease up to C{capacity} queued jobs to C{holder}, in one
        transaction, oldest first; fire with the list of L{Lease}s.  Each
        job gets a new attempt and becomes C{staging} (it has inputs) or
        C{running}.
        """

    def record_process(lease, pid, start_ticks, boot_id):
        """
        Remember which process group runs an attempt, so that a restart can
        tell it from another process that reused the id.
        """

    def mark_running(lease, now):
        """
        A staged job starts running.  Fails with L{StaleLease} if the
        lease is no longer current.
        """

    def finish(lease, outcome, now):
        """
        Record how an attempt ended (retried, or final, releasing or
        cancelling its dependents); a job whose cancel was asked for while
        it ran ends cancelled.  Fires with a L{Written} of what changed.
        Fails with L{StaleLease} if the lease is no longer current.
        """

    def release(lease, now, reason):
        """
        Give an attempt up without spending it: the attempt is recorded as
        ended with C{reason} and the job goes back to C{queued}.  Fire with
        a L{Written} of what changed.
        """

    def cancel(job_id, now):
        """
        Cancel a job.  Fire with C{(job, lease)}: C{lease} is C{None} when
        the job was cancelled at once, or the current lease of a job that
        runs, which its holder must now stop.  Fails with
        L{InvalidTransition} for a finished job and L{UnknownJob}.
        """

    def recover(holder, now):
        """
        At start-up: every attempt that C{holder} held when the daemon last
        stopped ended with it.  Record each as lost, end its job, and fire
        with the list of L{LostAttempt}s (with their process identities).
        """
