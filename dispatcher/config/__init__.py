"""
The ini file, read once into frozen values (L{Config} and its sections).

The values are read by every layer that is configured (the executor's
tasks, the stager's fetch limits, the API's queues), so they sit low, beside
L{dispatcher.model}, rather than in L{dispatcher.app}, which only parses the
command line.  May import: nothing of the package.
"""
