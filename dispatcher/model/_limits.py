"""
Limits on what one job or one request may make the dispatcher keep or do,
each one constant that every layer checking it reads (the executor and the
worker, the API and its document, the store).

A limit that a site may want to change is a configuration key instead
(L{dispatcher.config}); these are the ones that must agree between a
dispatcher and its remote workers, or that bound the store's single
writer.
"""

from __future__ import annotations

# The most a task's result may be, as JSON (compact, UTF-8).  A result is
# stored with its job and sent whole in every answer that shows the job (a
# page of a list holds up to a thousand): a 50 MB result held the reactor
# for a second each time its job was read.  A larger output belongs in a
# file of the job's working directory.
MAX_RESULT_BYTES = 64 * 1024

# The most jobs the jobs of one submission may depend on in all, an array
# counting as its members: each is a row the store's single writer reads
# and writes while every other write waits, about 4 us each (a job that
# depends on 50,000 held it 0.2 s).  A depends_on naming one array of 10,000
# members a thousand times held it 21 s.  Two full arrays ([dispatcher]
# max_array) fit; more jobs can wait for one job that waits for them.
MAX_DEPENDENCY_LINKS = 20_000

# The most jobs one page of GET /v1/jobs examines: its jobs are read along
# one index (the most selective filter's) and the other filters checked on
# the rows it gives, so a page whose other filters match little ends short
# (even empty) with a cursor to go on from, rather than reading a million
# rows for nothing (issue 17).  Measured with bench/list_filters.py on a
# store of a million jobs: a page whose filters match nothing took at most
# 50 ms (two states and a queue), 11 ms for queue= or created_after= alone,
# where reading the million for queue= took 1.3 s.
MAX_LIST_EXAMINED = 10_000


def result_size(text: str) -> int:
    """
    The size in bytes of a result's JSON text, as L{MAX_RESULT_BYTES}
    counts it: its UTF-8 bytes (a lone surrogate, which cannot be stored
    anyway, counts as three).
    """
    if text.isascii():
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))
