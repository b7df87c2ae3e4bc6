"""
The domain's values: job states and their transitions, job specs, jobs,
attempts, leases, outcomes, resources, worker offers and job ids; what the
dispatcher decides about remote workers' leases and shows of the workers
(C{_workers}); and the claim policy (C{_claims}): which queued jobs a
holder gets; and the limits every layer checks alike (C{_limits}: a
task's result, the dependencies of one request); arrays and batches as
groups of jobs, and the refusals of a wait (C{_groups}); a webhook's
delivery as the store's outbox holds it (C{_deliveries}); the events a
client follows and what one subscriber sees of them (C{_events}).

Pure values and the rules on them, with no I/O and no reactor.  May import: nothing of the package.
"""
