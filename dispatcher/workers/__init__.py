"""
The remote worker process: its client for the worker protocol, the agent
that leases, runs and reports jobs, log shipping and its service.

In the order a request goes: L{_service} makes the process (pools,
executor, agent) from its settings; L{_agent} asks for leases, runs their
jobs, keeps the leases alive and reports how the jobs ended; L{_logs}
ships their logs; L{_sweep} removes the directories of the jobs it let go
of once they are old; L{_client} speaks the worker protocol, each body a
type of L{dispatcher.wire}.

It runs on other hosts and talks to the dispatcher only over HTTP, so it
imports no API, store or core code.  May import: L{dispatcher.model},
L{dispatcher.config}, L{dispatcher.wire}, L{dispatcher.execution}.
"""
