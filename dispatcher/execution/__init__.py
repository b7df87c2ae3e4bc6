"""
Running one job on this host: the local executor, command processes and
their spawner helper, input staging with treq (through a client that
connects only where the fetch policy allows), the task threads, the
host's resources, and the removal of finished jobs' directories.

May import: L{dispatcher.model}, L{dispatcher.config}.
"""
