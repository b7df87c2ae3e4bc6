"""
The dispatcher proper: it takes validated submissions, stores them,
schedules queued jobs onto holders (this host's executor, remote workers
through the worker hub), records how attempts end, and tells listeners.

May import: L{dispatcher.model}, L{dispatcher.config}, L{dispatcher.wire},
L{dispatcher.store}, L{dispatcher.execution}.
"""
