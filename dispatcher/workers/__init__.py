"""
The remote worker process: its client for the worker protocol, the agent
that leases, runs and reports jobs, log shipping and its service.

It runs on other hosts and talks to the dispatcher only over HTTP, so it
imports no API, store or core code.  May import: L{dispatcher.model},
L{dispatcher.config}, L{dispatcher.wire}, L{dispatcher.execution}.
"""
