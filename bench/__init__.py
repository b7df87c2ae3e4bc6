"""
The dispatcher's benchmark: C{.venv/bin/python bench/run.py}.  Nothing here
is part of the product or of its test suite.

  - C{run}: the command line; runs the measures in order.
  - C{harness}: process control (the servers pinned to core 0, the load on
    core 1, wrk, remote workers, py-spy, idle connections), measured
    windows, rounds and medians.
  - C{measures}: the measures (a) to (i), their sizes and their targets.
  - C{machine}: the machine and its state before a run.
  - C{report}: docs/benchmarks.md and docs/benchmarks.json from a run.
  - C{profiles}: reading py-spy's and cProfile's output.
  - C{daemon}, C{baseline_server}, C{monitor}: the two servers under test
    and their reactor-hold monitor; C{seed_store}: the long queues;
    C{tasks}: the task functions the daemon runs.
"""
