"""
Running one job on this host: the local executor, command processes and
their spawner helper, input staging with treq, the task threads, and the
host's resources.

May import: L{dispatcher.model}, L{dispatcher.config}.
"""
