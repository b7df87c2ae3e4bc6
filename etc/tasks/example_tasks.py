"""
Example task functions, configured in etc/dispatcher.ini ([tasks]) and
used by the README's walk-through.  A task module lives in a directory of
[tasks] path (this one is etc/tasks, the path given there relative to the
configuration file) or anywhere on the daemon's PYTHONPATH.

A task is called on the daemon's task threads as
function(context, *args, **kwargs) and returns a JSON-able value: its
job's result.
"""

import os


def wordcount(context, path):
    """
    Count the lines, words and bytes of the file C{path} in the job's
    working directory (an input the job fetched there), as C{wc} does.

    @return: C{{"lines": n, "words": n, "bytes": n}}.
    """
    lines = words = size = 0
    # In chunks, so that a large input (or one without newlines) is never
    # held whole in the daemon's memory.
    in_word = False
    with open(os.path.join(context.workdir, path), "rb") as f:
        while chunk := f.read(65536):
            lines += chunk.count(b"\n")
            words += len(chunk.split())
            if in_word and not chunk[:1].isspace():
                # A word cut in two by the chunks' edge.
                words -= 1
            in_word = not chunk[-1:].isspace()
            size += len(chunk)
    return {"lines": lines, "words": words, "bytes": size}
