"""
The dispatcher proper: it takes validated submissions, stores them,
schedules queued jobs onto holders (this host's executor, remote workers
through the worker hub), records how attempts end, and tells listeners.

Its parts, by role: L{_dispatcher} (the one path of a job), L{_scheduler}
(which holder claims how many, when), L{_capacity} (what a holder has
free), L{_recorder} (the one writer of ends), L{_hub} (remote workers and
their leases), L{_reasons} (why a queued job waits for a holder),
L{_events} (who is told of changes), L{_retention} (finished jobs
removed once old), L{_waits} (requests that wait for a job or a group to
be final).

May import: L{dispatcher.model}, L{dispatcher.wire}, L{dispatcher.store},
L{dispatcher.execution}.
"""
