"""
The interface every job store implements.

The values its methods fire with and the errors they fail with are in
L{dispatcher.store._results}; the jobs, specs, leases and outcomes are the
model's (L{dispatcher.model._jobs}).  Which queued jobs a claim takes is
decided by L{dispatcher.model._claims.choose_jobs}, so that every store
claims alike.  A store is checked against this interface by
C{tests/store_contract.py}.
"""

from zope.interface import Attribute, Interface

from dispatcher.model._limits import MAX_LIST_EXAMINED


class IJobStore(Interface):
    """
    Where jobs, attempts and leases live.

    Every method but L{queue_limits} returns a Deferred and does its
    blocking work off the reactor thread.  Writes fire only after their
    transaction has committed: a submission, a cancel or a retry only once
    it is durable on disk; a change of run state (a claim, a start, an
    end, a release, a wake-up) may reach the disk a little later, and a
    power loss in between makes the job run again.  A write that fails
    changes nothing.

    Failures every method may give:
      - L{StoreClosed} once L{close} has been called;
      - for writes, L{CommitFailed} when the write could not be committed
        (a full disk): asking for the same write again later may succeed;
        and L{WriteRefused} when the store's own rules refuse it (an id
        already taken);
      - for reads, L{ReadFailed} when the store could not read (reading
        again later may succeed).

    Most writes fire with a L{Written}: its C{value} is the write's answer
    (said below), C{changed} the L{Change} of every job whose state it
    changed, and C{wake_at} the earliest time a pending job it made or
    freed becomes due, for the dispatcher's timer.

    Every change of a job's state is also stored as an event
    (L{dispatcher.model._events.JobEvent}), in the transaction that makes
    the change, with an id one past the greatest stored: ids never go
    back and have no gaps.  See L{follow_events} and L{read_events}.

    A job whose spec names C{notify} has a webhook delivery (a
    L{Delivery}) written in the same transaction as each change of its
    state to one of C{notify.events}, its making included, whatever write
    makes the change: committed with the change, never without it.  Its
    deliveries are removed with the job.
    """

    queue_limits = Attribute(
        """
        A mapping of every configured queue name to its limit of jobs
        staging or running at once (0: no limit); C{default} is always
        there.
        """
    )

    # Life cycle

    def open():
        """
        Create or migrate the schema.  Fires when the store is ready; fails
        with L{StoreVersionError} if a newer dispatcher wrote it.
        """

    def close():
        """
        Finish every write already asked for, make it durable, then close.
        Fires when done; calling it again fires when the first close is
        done.
        """

    # Submissions

    def submit(specs, now, ids, idempotency=None, owner=None, sees_all=True,
               max_unfinished=None):
        """
        Store new jobs, all or nothing, and fire once they are durable.

        Each job is queued, or pending while it waits for the jobs of its
        C{depends_on} to succeed or for its C{not_before}; a job that
        depends on a job that failed or was cancelled is stored cancelled.
        A C{depends_on} entry names a stored job, an earlier job of the
        same submission, or an array (all its members).

        @param specs: the L{JobSpec}s.
        @param now: the submission time (C{created_at}).
        @param ids: the new jobs' ids, one for each spec.
        @param idempotency: an L{IdempotencyKey}, or C{None}.  A key seen
            within the store's time to live with the same digest replays
            the earlier answer and stores nothing; with another digest it
            fails with L{IdempotencyConflict}.  A key is its owner's own:
            the same key from another owner is another key.
        @param owner: the name of the principal that submits them, the
            jobs' C{owner} (C{None}: none).
        @param sees_all: whether C{depends_on} may name any owner's jobs;
            if not, an entry naming a job or an array of another owner
            fails as one that names nothing does.
        @param max_unfinished: the most unfinished jobs (pending, queued,
            staging, running) C{owner} may have once they are stored, each
            of C{specs} counted; more fails with L{TooManyUnfinished} and
            stores nothing (a replay of an idempotency key is answered
            whatever the count).  C{None}: no limit.  The count is exact
            under any concurrency (L{unfinished_jobs}).
        @return: a Deferred firing with a L{Written} whose value is
            L{Submitted} (its jobs in the order of C{specs}; C{replayed}
            for a replay) and whose C{wake_at} is the earliest future
            C{not_before}.  Fails with L{UnknownDependency} (naming the
            job and the entry) when a C{depends_on} entry names nothing,
            and with L{TooManyDependencies} (the same) when with an entry
            the jobs would depend on more than L{MAX_DEPENDENCY_LINKS} jobs
            in all; each id is resolved once however often it is named.
        """

    def submit_plain(jobs, now, ids, idempotency=None, owner=None, max_unfinished=None):
        """
        Store L{PlainJobs} (checked jobs of one queue with no dependencies
        and no C{not_before}: all queued) with their new ids, all or
        nothing, as L{submit} would store their specs (C{max_unfinished}
        too).

        @return: a Deferred firing once they are durable with a L{Written}
            whose value is L{SubmittedIds}, or, for a replayed
            C{idempotency} key, the L{Submitted} jobs of the earlier
            request.  Fails with L{IdempotencyConflict} as L{submit} does.
            C{owner} and the idempotency key's scope are as for L{submit}.
        """

    # Reads

    def get(job_id):
        """
        Fire with the L{Job} of that id (its attempts, and for a queued job
        of a queue at its limit a wait reason saying so), or fail with
        L{UnknownJob}.
        """

    def list_jobs(state=None, labels=(), limit=100, cursor=None, owner=None, states=(),
                  array=None, batch=None, name=None, queue=None, worker=None,
                  created_after=None, created_before=None, newest=False,
                  examine=MAX_LIST_EXAMINED):
        """
        Fire with C{(jobs, next_cursor)}: up to C{limit} L{Job}s in
        submission order after C{cursor} (C{newest}: newest first, before
        C{cursor}), that match every filter given: a state among C{states}
        and C{state} (L{JobState}s; none given: any), C{labels} (C{(key,
        value)} pairs, all of which must match, a value of C{None} meaning
        the key is present), C{owner} (a principal's name), C{array} and
        C{batch} (a group's id), C{name} (exact), C{queue}, C{worker} (the
        holder of its latest attempt), C{created_after} and
        C{created_before} (times, strictly).  C{next_cursor} is C{None} on
        the last page; a cursor stays valid while jobs are added or
        removed.

        No page examines more than C{examine} jobs: when the filters leave
        few of the jobs the store reads for them, a page may hold fewer
        than C{limit}, or none, and still give a C{next_cursor} to go on
        from.  Whatever the filters, the cost of a page is bounded.
        """

    def group(kind, group_id):
        """
        Fire with the L{JobGroup} of the array or batch (a L{GroupKind})
        C{group_id}: its owner, when it was made, its members' counts by
        state; or fail with L{UnknownGroup}.  Read along an index of the
        group's members, never a scan of the jobs.
        """

    def unfinished_members(kind, group_id):
        """
        Fire with the ids of the members of the array or batch C{group_id}
        that are not final (none for a group that does not exist).
        """

    def owned(job_ids, owner):
        """
        Fire with the C{frozenset} of those of C{job_ids} whose owner is
        C{owner} (ids of no job are left out).
        """

    def unfinished_jobs():
        """
        Fire with C{{owner: number of unfinished jobs}} (pending, queued,
        staging or running; owners with none left out) as last committed:
        what C{max_unfinished} is checked against.
        """

    def job_counts(owner=None):
        """
        C{{queue: {JobState: count}}} as last committed, for every queue
        that holds jobs (states without jobs left out); only the jobs of
        C{owner}, if it is given.  Answered at once, without a Deferred or
        a read of the database: the store keeps the counts at each change
        (what the metrics read at every scrape).
        """

    def count_by_state():
        """
        Fire with a dict mapping every L{JobState} to its number of jobs.
        """

    def queue_counts(owner=None):
        """
        Fire with C{{queue: {JobState: count}}} for every configured queue
        (all states, zeros included) and any other queue that holds jobs;
        only the jobs of C{owner}, if it is given.
        """

    def unconfigured_queues():
        """
        Fire with C{{queue: number of queued jobs}} for the queues that
        hold queued jobs but are not configured (left by an earlier
        configuration; nothing claims from them).
        """

    def next_due():
        """
        Fire with the earliest C{not_before} of a pending job that waits
        for nothing else (a delayed start or a retry's back-off), or
        C{None}.
        """

    # Claims and attempts

    def claim(offer, capacity, now, lease_seconds, free=None):
        """
        Lease queued jobs to C{offer.holder} in one transaction, as
        L{dispatcher.model._claims.choose_jobs} chooses them: up to
        C{capacity}, highest priority first and oldest first within one,
        queues taking turns among equal priorities, none from a queue at
        its limit of running jobs, passing over (at most
        L{dispatcher.model._claims.MAX_SKIPPED}) jobs that C{offer}
        refuses or that do not fit C{free}.

        Each job taken gets a new attempt, numbered on from its last, and
        a lease with a token greater than any before; it becomes
        C{staging} (it has inputs) or C{running} (its C{started_at} is
        C{now}).

        @param offer: the holder's L{Offer}.
        @param capacity: the most jobs to take; 0 or less takes none.
        @param now: the claim's time.
        @param lease_seconds: the leases expire at C{now + lease_seconds}.
        @param free: the holder's L{Resources} less what its running jobs
            use (all of C{offer.resources} if C{None}).
        @return: a Deferred firing with L{Claimed}: the L{Lease}s, whether
            queued jobs wait behind a queue's limit, how many were passed
            over, and whether every queue read was read to its end.
        """

    def resume_leases(local_holder, now, lease_seconds):
        """
        At start-up: every lease held by a holder other than
        C{local_holder} (a remote worker) lives on, its expiry moved to
        C{now + lease_seconds}.

        @return: a Deferred firing with a L{Written} whose value is the
            list of L{ResumedLease}s.
        """

    def record_process(lease, pid, start_ticks, boot_id):
        """
        Remember which process group runs an attempt, so that a restart can
        tell it from another process that reused the id.  Fires with
        C{None}; fails with L{StaleLease} if the lease is no longer
        current, L{UnknownJob} if there is no such job.
        """

    def mark_running(lease, now):
        """
        A staged job starts running (its C{started_at} is C{now}).  Fires
        with a L{Written} of the change; fails with L{StaleLease} if the
        lease is no longer current, and L{InvalidTransition} if the job is
        not staging.
        """

    def finish(lease, outcome, now):
        """
        Record how an attempt ended, from its L{Outcome}.

        A failed attempt with attempts left sends the job back: pending
        until its back-off has passed (C{wake_at}), or queued.  A final
        state frees the job's pending dependents (it succeeded: those that
        wait for nothing else are queued) or cancels them and theirs in
        turn (it did not).  A job whose cancel was asked for while it ran
        ends cancelled, unless it succeeded on its own.

        @return: a Deferred firing with a L{Written} of what changed.
            Fails with L{StaleLease} if the lease is no longer current,
            L{UnknownJob}, or L{InvalidTransition}.
        """

    def adopt_leases(holder, items, server, now, seconds):
        """
        Several dispatchers on one database: take up, for the dispatcher
        C{server}, the leases of C{items} (C{(job_id, token)}) that the
        remote worker C{holder} holds and that are live (their expiry has
        not passed): a worker that moved to C{server} from another
        dispatcher (or one that restarted) goes on with them there.  Their
        expiry moves to C{now + seconds}, and from then on only C{server}
        may record them expired (L{finish_served}), until another takes
        them up in turn.

        @return: a Deferred firing with a L{Written} whose value is the
            list of L{ResumedLease}s taken up; a lease of C{items} not
            among them is not current.
        """

    def finish_served(lease, outcome, now, server):
        """
        L{finish}, if the dispatcher C{server} serves the lease: it granted
        it and no other took it up since (L{adopt_leases}), or it took it
        up last.  Fails with L{StaleLease} otherwise: the worker holding it
        moved to another dispatcher, which decides when it expires.
        """

    def release(lease, now, reason):
        """
        Give an attempt up without spending it: the attempt is recorded as
        ended with C{reason} and the job goes back to C{queued} (or ends
        C{cancelled} if a cancel waits for it).  Fires with a L{Written} of
        what changed; fails with L{StaleLease} if the lease is no longer
        current.
        """

    # Requests on jobs

    def cancel(job_id, now, owner=None):
        """
        Cancel a job, durably.  Fire with a L{Written} whose value is
        C{(job, lease)}: C{lease} is C{None} when the job was cancelled at
        once (with its pending dependents), or the current L{Lease} of a
        job that is staging or running, whose holder must now stop it (its
        end then records it cancelled).  Fails with L{InvalidTransition}
        for a finished job and L{UnknownJob}; given C{owner}, with
        L{UnknownJob} for a job of another owner as well, changing nothing.
        """

    def retry(job_id, now, dependents, owner=None, max_unfinished=None):
        """
        Put a failed or cancelled job back in line, durably, with a fresh
        budget of attempts (its attempts stay in its history): queued, or
        pending while jobs it depends on have not succeeded.  With
        C{dependents}, the jobs cancelled because of it (and theirs) come
        back too.  Given C{owner}, a job of another owner fails with
        L{UnknownJob}, changing nothing, and only C{owner}'s dependents
        come back.  Given C{max_unfinished}, if the jobs coming back would
        give the job's owner more unfinished jobs than that, it fails with
        L{TooManyUnfinished}, changing nothing.

        @return: a Deferred firing with a L{Written} whose value is the
            job's L{Job}.  Fails with L{UnknownJob}, L{InvalidTransition}
            for a job that is not failed or cancelled, and
            L{DependencyNotRetried} when a job it depends on failed or was
            cancelled and does not come back with it.
        """

    def cancel_group(kind, group_id, now, owner=None):
        """
        Cancel every unfinished member of an array or batch, durably, in
        one write, each as L{cancel} would.  Fire with a L{Written} whose
        value is C{(group, leases)}: the L{JobGroup} after the write, and
        the L{Lease}s of the members staging or running, whose holders
        must now stop them.  Fails with L{UnknownGroup} (given C{owner},
        for another owner's group as well) and L{NothingToChange} when
        every member is final, changing nothing.
        """

    def retry_group(kind, group_id, now, owner=None, max_unfinished=None):
        """
        Put every failed or cancelled member of an array or batch back in
        line, durably, in one write, each as L{retry} would (a member that
        depends on another coming back waits for it).  Fire with a
        L{Written} whose value is the L{JobGroup} after the write.  Fails,
        changing nothing, with L{UnknownGroup} (given C{owner}, for
        another owner's group as well), L{NothingToChange} when no member
        failed or was cancelled, L{TooManyUnfinished} when the members
        coming back, every one counted, would give the group's owner more
        than C{max_unfinished} unfinished jobs, and L{DependencyNotRetried}
        when a member depends on a job outside the group that failed or
        was cancelled.
        """

    # Housekeeping

    def promote_due(now):
        """
        Queue every pending job whose C{not_before} has come and that waits
        for nothing else.  Fires with a L{Written} of the jobs queued,
        whose C{wake_at} is when the next one is due (or C{None}).
        """

    def purge_idempotency(now):
        """
        Forget idempotency keys older than their time to live.  Fires with
        a L{Written} whose value is how many were forgotten.
        """

    def remove_finished(now, cutoff, excess, cursor, limit, scan):
        """
        One step of a removal pass over the finished jobs: look at the jobs
        after C{cursor} (a L{RemovalCursor}; C{RemovalCursor()} begins a
        pass) in submission order, at most C{scan} of them, and remove,
        with their attempts, labels and dependency rows, at most C{limit}
        finished jobs: those finished before C{cutoff} (C{None}: no age
        rule), and the first C{excess} in submission order (the count
        rule; 0: none).

        Kept whatever the rules say: a job that a job which has not
        succeeded depends on; a job that an idempotency key still live at
        C{now} made.  An array goes whole, once every member is finished
        and past the rules, over as many steps as it takes, its failed and
        cancelled members last.  A removed job's sequence number is never
        given again (a list's cursor stays valid).

        @return: a Deferred firing with a L{Written} whose value is
            L{Removed}: the ids removed, the cursor of the next step, how
            many the count rule still wants, and whether the pass is done.
        """

    def remove(job_id, now, owner=None):
        """
        Remove one finished job now, durably, with what L{remove_finished}
        removes of it and the idempotency keys that made it.  Fires with a
        L{Written} whose value is its id.  Fails with L{UnknownJob} (given
        C{owner}, for another owner's job as well), L{NotFinished} for a
        job not finished, and L{HasDependents} while a job that depends on
        it has not succeeded.
        """

    def windows_in_use(prefixes):
        """
        Fire with the C{frozenset} of those of C{prefixes} (leading hex
        digits of job ids) that a stored job's id starts with.
        """

    def space():
        """
        Fire with the L{StoreSpace} of the store on disk.
        """

    def shrink(limit):
        """
        Give at most C{limit} bytes of free space back to the file system
        (if L{StoreSpace.can_shrink}); fires with a L{Written} whose value
        is the free bytes left.
        """

    def due_deliveries(now, limit, hold=0.0, exclude=()):
        """
        Fire with at most C{limit} webhook deliveries (L{Delivery}) due at
        C{now}, but those whose ids are in C{exclude} (the caller's own,
        being tried): those never tried, then those whose retry is due, the
        longest due first; among the never tried, in the order they were
        made.  On a database shared with other dispatchers, with C{hold}
        above 0, the deliveries given are the caller's alone: none is given
        to another caller before C{now + hold} (unless its record puts it
        earlier), so that one delivery is not tried by two dispatchers at
        once.
        """

    def record_deliveries(done, later):
        """
        Record what became of deliveries tried: each id of C{done}
        (delivered, or given up) is removed; each C{(id, due)} of C{later}
        has one more try counted and is due again at C{due}.  An id no
        longer stored (its job was removed) is passed over.  Not durable
        at once: a power cut within the sync interval may have a delivery
        sent again.  Fires with a L{Written}.
        """

    def recover(holder, now):
        """
        At start-up: every attempt that C{holder} (this dispatcher's own
        executor) held when the daemon last stopped ended with it.  Record
        each as failed and lost (retried if it has attempts left, as
        L{finish} does), and fire with a L{Written} whose value is the
        list of L{LostAttempt}s, with their process identities.
        """

    def renew_leases(holder, tokens, now, lease_seconds, token_seconds=None):
        """
        Move the expiry of every lease C{holder} holds (a dispatcher's own
        local executor) to C{now + lease_seconds}, and of each live lease
        of C{tokens} (the remote workers' it serves) to C{now +
        token_seconds} (C{lease_seconds} if not given), in one write: what
        a dispatcher sharing its database with others does every few
        seconds, so that theirs recover only the leases of a dispatcher
        that stopped renewing.  Fires with a L{Written} whose value is the
        frozenset of tokens C{holder} still holds (one missing was
        recovered elsewhere: its job must stop).
        """

    def expire_leases(now, keep_holder, keep_tokens, limit=1000):
        """
        Record as lost every attempt whose lease expired before C{now},
        whatever its holder, but C{keep_holder}'s and those of
        C{keep_tokens}: each is retried if it has attempts left and failed
        otherwise (as L{finish} does), and the lease's token is no longer
        the job's, so a late write of its old holder changes nothing.  At
        most C{limit} a call.  Fires with a L{Written} whose value is the
        list of L{ExpiredLease}s.
        """

    # Events

    def follow_events(listener):
        """
        Call C{listener} (C{None}: no one) in the reactor thread with the
        list of events (L{JobEvent}s and L{WorkerEvent}s) of each write
        that made any, in id order, once its commit is done and just before
        the write fires: a caller told its write is done finds its events
        already told.  A live event carries what its job is (owner, spec)
        as the write knew it.
        """

    def follow_others(listener):
        """
        Call C{listener} (C{None}: no one) in the reactor thread with the
        events other dispatchers sharing the store committed, a list at a
        time, each list in id order and told in its place among this
        store's own (L{follow_events}): every event once, none skipped.
        A store no other dispatcher shares (the SQLite file) never calls
        it.  Given before the store opens.
        """

    def follow_cancels(listener):
        """
        Call C{listener} (C{None}: no one) in the reactor thread, with no
        arguments, whenever another dispatcher sharing the store may have
        stored a client's cancel of a running job (which changes no state
        until its holder stops it): at once when one commits, and at
        every poll of the others' events.  A store no other dispatcher
        shares never calls it.  Given before the store opens.
        """

    def cancels_asked(job_ids):
        """
        Fire with the list of those of C{job_ids} (jobs this dispatcher's
        holders run) whose cancel a client asked for while they ran.
        """

    def read_events(after, limit):
        """
        Fire with an L{EventPage}: at most C{limit} stored events whose ids
        are above C{after}, in id order, each with what its job's row still
        says (no owner and no spec for a job removed since); and the oldest
        and newest ids stored (C{None} when none is).
        """

    def set_queue_limits(queues):
        """
        Take C{queues} (a mapping of queue name to its limit of jobs
        staging or running at once, 0 for none) as the configured queues
        from now on (a reload of the configuration): claims after this
        fires respect them, and L{queue_limits} says them.  Jobs running
        past a lowered limit run on; jobs of a queue no longer configured
        stay queued until it is again.
        """

    def record_presence(worker, change, now):
        """
        Store the event of the remote worker C{worker} that connected or
        left (C{change}: L{CONNECTED} or L{LEFT}) at C{now}; fires with a
        L{Written} once it has committed.
        """

    def remove_events(cutoff, limit):
        """
        One step of removing old events: the oldest, at most C{limit} of
        them, as long as they are older than C{cutoff}; never the newest.
        Fires with a L{Written} whose value is a L{RemovedEvents} (how many,
        and whether none older is left).
        """
