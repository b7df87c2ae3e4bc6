"""
Schemathesis hooks of tests/test_contract.py (loaded through
C{SCHEMATHESIS_HOOKS}): they leave out the generated bodies whose answer
depends on more than the document can say, each for a reason given below.
"""

import schemathesis

# [dispatcher] max_array of the daemon under test.
MAX_ARRAY = 50


def _walk(value):
    yield value
    if isinstance(value, dict):
        for item in value.values():
            yield from _walk(item)
    elif isinstance(value, list):
        for item in value:
            yield from _walk(item)


@schemathesis.hook
def filter_body(context, body):
    """
    Keep a body unless its answer depends on the daemon's state or on a
    sum the schema cannot state: C{depends_on} names jobs that must exist
    (an unknown one is a 400 C{unknown_dependency}); a batch makes at most
    C{max_array} jobs in all, arrays counted; two inputs of a job may not
    go to one path.  A float with no fraction (C{3.0}) is left out too:
    JSON Schema counts it an integer, the server (msgspec) reads it as a
    number and refuses it where an integer is due.
    """
    if not isinstance(body, dict):
        return True
    jobs = body.get("jobs") if isinstance(body.get("jobs"), list) else [body]
    for job in jobs:
        if isinstance(job, dict):
            if job.get("depends_on"):
                return False
            inputs = job.get("inputs")
            if isinstance(inputs, list):
                paths = [i.get("path") for i in inputs if isinstance(i, dict)]
                if len(paths) != len(set(map(str, paths))):
                    return False
    if isinstance(body.get("jobs"), list):
        total = sum(
            (job.get("array") or 1) if isinstance(job, dict) and isinstance(job.get("array"), int)
            else 1
            for job in body["jobs"]
        )
        if total > MAX_ARRAY:
            return False
    return not any(isinstance(v, float) and v.is_integer() for v in _walk(body))
