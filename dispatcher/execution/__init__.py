"""
Running one job on this host: the local executor, command processes and
their spawner helper, input staging with treq, the task threads, the
host's resources, and the removal of finished jobs' directories.

May import: L{dispatcher.model}, L{dispatcher.config}.
"""
