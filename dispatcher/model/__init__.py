"""
The domain's values: job states and their transitions, job specs, jobs,
attempts, leases, outcomes, resources, worker offers and job ids.

Pure values and the rules on them, with no I/O and no reactor.  May import: nothing of the package.
"""
