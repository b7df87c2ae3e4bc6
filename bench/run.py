"""
The dispatcher's benchmark, in one run: the daemon and a stock twisted.web
baseline, each server alone on core 0, the load on core 1.

    .venv/bin/python bench/run.py [--quick] [--out DIR] [--profile]
                                  [--only MEASURES] [--rounds N] [--py-spy]

Writes DIR/<timestamp>.json and DIR/latest.json (default DIR: bench/results),
prints the result tables, and (a full run only: not --quick, --only,
--rounds or --py-spy) writes docs/benchmarks.md whole and the JSON to
docs/benchmarks.json.  docs/benchmarks.md says what each measure is and the
targets it is held to.

This file runs the measures in order; L{bench.harness} controls the
processes, L{bench.measures} takes the figures, L{bench.report} writes them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

if not __package__:  # run as a file: make "bench" importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import report
from bench.harness import (
    BENCH,
    LOAD_CORE,
    PYTHON,
    ROOT,
    BenchError,
    Processes,
    Run,
    in_rounds,
    seed_store,
    step,
)
from bench.machine import (
    background_load,
    code_version,
    machine,
    raise_open_file_limit,
    settled_directory_cost,
)
from bench.event_measures import take_event_measures
from bench.pg_measures import take_pg_measures
from bench.measures import (
    STEPS,
    measure_batch,
    measure_blocking_tasks,
    measure_claims,
    measure_end_to_end,
    measure_start_latency,
    measure_submit,
    settings as run_settings,
)
from bench.profiles import print_profiles, print_top_frames


def parse_arguments(argv: Optional[list[str]]) -> argparse.Namespace:
    """
    The command line; C{only} becomes the set of measures to run.
    """
    parser = argparse.ArgumentParser(description="The dispatcher's benchmark.")
    parser.add_argument("--quick", action="store_true",
                        help="a short smoke run (does not touch docs/)")
    parser.add_argument("--out", default=str(BENCH / "results"),
                        help="where the JSON results go (default: bench/results)")
    parser.add_argument("--profile", action="store_true",
                        help="also cProfile the daemon's reactor thread under the "
                             "50-connection submit load (and, with noop_remote, the "
                             "remote worker's jobs) and print its top functions")
    parser.add_argument("--only", default=None,
                        help=f"run only these measures, comma-separated, of: "
                             f"{', '.join(STEPS)} (does not touch docs/)")
    parser.add_argument("--py-spy", action="store_true",
                        help="sample the daemon with py-spy during each measure and print "
                             "where its threads spend their time (does not touch docs/: "
                             "sampling slows what it measures)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds of the submit, claim and authentication measures "
                             "(default 3, 1 with --quick; another number does not touch "
                             "docs/)")
    args = parser.parse_args(argv)
    args.limited = args.only is not None
    args.only = set(STEPS) if args.only is None else set(args.only.split(","))
    if args.only - set(STEPS):
        parser.error(f"--only: unknown {', '.join(sorted(args.only - set(STEPS)))}; "
                     f"known: {', '.join(STEPS)}")
    return args


def missing_tools(args: argparse.Namespace) -> Optional[str]:
    """
    What the run needs and the machine lacks, in words, or C{None}.
    """
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install -y {tool})"
    if args.py_spy and not (shutil.which("py-spy") or Path(PYTHON).with_name("py-spy").exists()):
        return "--py-spy needs py-spy (.venv/bin/pip install py-spy)"
    if len(os.sched_getaffinity(0)) < 2 or os.cpu_count() < 2:
        return "needs two cores (server on core 0, load on core 1)"
    return None


def take_measures(run: Run, settings: dict[str, Any], only: set[str], profile: bool,
                  results: dict[str, Any]) -> None:
    """
    Build the stores the long-queue measures need, then take every measure
    of C{only}, in order, into C{results["measures"]}.
    """
    measures = results["measures"]
    queued_store = run.tmp / "stores" / "queued.sqlite3"
    seeded_store = run.tmp / "stores" / "seeded.sqlite3"
    c_max = max(settings["connections"])
    if only & {"submit", "claims"}:
        for key, path, count in (("queued", queued_store, settings["queued_jobs"]),
                                 ("seeded", seeded_store, settings["seeded_jobs"])):
            if key == "seeded" and "claims" not in only:
                continue
            t0 = time.monotonic()
            print(f"bench: seeding a store of {count:,} queued jobs ...", file=sys.stderr,
                  flush=True)
            results["seeds"][key] = seed_store(run.processes, path, count)
            print(f"bench: seeded in {time.monotonic() - t0:.1f}s", file=sys.stderr,
                  flush=True)
    if "submit" in only:
        rows = []
        for c in settings["connections"]:
            variants: list[tuple[str, str, dict[str, Any]]] = [
                ("baseline", "baseline", {}), ("daemon", "daemon", {})]
            if c == c_max:
                variants += [
                    ("logged", "daemon", {"access_log": True}),
                    ("idle", "daemon", {"idle": settings["idle_connections"]}),
                    ("queued", "daemon", {"store": queued_store,
                                          "store_jobs": settings["queued_jobs"]})]
            for variant, kind, extra in variants:
                rows.append((f"submit_{variant}_{c}c",
                             lambda n, kind=kind, c=c, variant=variant, extra=extra:
                             measure_submit(run, kind, c, settings["submit_seconds"],
                                            round_=n, variant=variant, **extra)))
        in_rounds(measures, settings["submit_rounds"], rows, "requests_per_s")
    if "batch" in only:
        step(measures, "batch", lambda: measure_batch(
            run, settings["batch_seconds"], settings["batch_size"],
            settings["batch_concurrency"]))
    noop, batch = {"task": "noop"}, {"concurrency": settings["batch_concurrency"],
                                     "batch": settings["batch_size"]}
    idle = {"idle": settings["idle_connections"]}
    remote = {"slots": settings["remote_worker_slots"],
              "threads": settings["remote_worker_slots"],
              "workers": settings["remote_workers"], "timeout": 600.0}
    end_to_end = [
        ("noop", "noop_tasks", noop, settings["noop_jobs"], {}),
        ("noop_batch", "noop_tasks_batched", noop, settings["noop_jobs"], batch),
        ("noop_small", "noop_tasks_small", noop, settings["noop_jobs_small"], {}),
        ("noop_idle", "noop_tasks_idle", noop, settings["noop_jobs"], idle),
        ("noop_batch_idle", "noop_tasks_batched_idle", noop, settings["noop_jobs"],
         {**batch, **idle}),
        # The same jobs, submitted the same way, as (b), so that the ratio
        # to (b) is the cost of the remote path.
        ("noop_remote", "noop_tasks_remote", noop, settings["noop_jobs"], remote),
        # And with the worker's prefetch off: what holding leases beyond
        # the slots gains.
        ("noop_remote_noprefetch", "noop_tasks_remote_noprefetch", noop, settings["noop_jobs"],
         {**remote, "prefetch": 0}),
        ("commands", "true_commands", {"command": ["true"]}, settings["true_jobs"], {}),
        ("commands_idle", "true_commands_idle", {"command": ["true"]},
         settings["true_jobs"], idle),
    ]
    for key, name, body, count, extra in end_to_end:
        if key in only and count:
            options = {"slots": 8, "threads": 8, **extra}
            step(measures, name, lambda: measure_end_to_end(
                run, name.replace("_", "-"), body, count, **options))
    if "latency" in only:
        step(measures, "start_latency", lambda: measure_start_latency(
            run, settings["latency_jobs"]))
    if "blocking" in only:
        step(measures, "blocking_tasks", lambda: measure_blocking_tasks(run))
    if "claims" in only:
        # Rounds alternate the short and the long queue, as above.
        in_rounds(measures, settings["claims_rounds"], [
            (name, lambda n, name=name, path=path, count=count: measure_claims(
                run, f"{name}-{n}", path, count, settings["claims_seconds"]))
            for name, path, count in (
                ("claims_seeded", seeded_store, settings["seeded_jobs"]),
                ("claims_queued", queued_store, settings["queued_jobs"]))],
            "left_queued_per_s")
    if "auth" in only:
        # (j) The same submits and no-op jobs with authentication and
        # without, in alternating rounds: what a credential costs.
        rows = []
        for authentication, label in ((True, "auth"), (False, "noauth")):
            rows.append((f"submit_{label}_{c_max}c",
                         lambda n, a=authentication, label=label: measure_submit(
                             run, "daemon", c_max, settings["submit_seconds"], round_=n,
                             variant=label, authentication=a)))
        for authentication, label in ((True, "auth"), (False, "noauth")):
            rows.append((f"noop_tasks_{label}",
                         lambda n, a=authentication, label=label: measure_end_to_end(
                             run, f"noop-tasks-{label}-{n}", {"task": "noop"},
                             settings["noop_jobs"], slots=8, threads=8, authentication=a)))
        in_rounds(measures, settings["auth_rounds"], rows[:2], "requests_per_s",
                  alternate=True)
        in_rounds(measures, settings["auth_rounds"], rows[2:], "jobs_per_s", alternate=True)
    if "events" in only:
        # (k) The event stream: idle subscribers' cost, delivery, latency.
        take_event_measures(run, settings, measures)
    if "pg" in only:
        # (l) PostgreSQL beside SQLite, one dispatcher and two on one
        # database, and the peers on the same server.
        take_pg_measures(run, settings, measures)
    if profile:
        step(measures, "profile_submit_daemon_50c", lambda: measure_submit(
            run, "daemon", 50, settings["submit_seconds"], profile=True))
        if "noop_remote" in only:
            step(measures, "profile_noop_tasks_remote", lambda: measure_end_to_end(
                run, "profile-noop-tasks-remote", noop, settings["noop_jobs"],
                **{"slots": 8, "threads": 8, **remote}, profile=True))


def main(argv: Optional[list[str]] = None) -> int:
    """
    Run the benchmark; returns the process's exit code.
    """
    args = parse_arguments(argv)
    missing = missing_tools(args)
    if missing:
        print(f"bench: {missing}", file=sys.stderr)
        return 2
    # The harness is part of the load: it lives on the load's core.
    os.sched_setaffinity(0, {LOAD_CORE})

    quick = args.quick
    settings = run_settings(quick, args.rounds)
    # Idle connections take a descriptor each in this process and in the
    # daemon (which inherits the limit).
    open_files = raise_open_file_limit(settings["idle_connections"] + 1000)
    if open_files["soft"] != resource.RLIM_INFINITY and \
            open_files["soft"] < settings["idle_connections"] + 1000:
        print(f"bench: the open-file limit ({open_files}) is too low for "
              f"{settings['idle_connections']:,} idle connections", file=sys.stderr)
        return 2

    def terminated(number: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {number}")

    signal.signal(signal.SIGINT, terminated)
    signal.signal(signal.SIGTERM, terminated)
    signal.signal(signal.SIGHUP, terminated)
    tmp = Path(tempfile.mkdtemp(prefix="dispatcher-bench-"))
    py_spy_dir = None
    if args.py_spy:
        py_spy_dir = tmp / "py-spy"
        py_spy_dir.mkdir()
    run = Run(Processes(), tmp, py_spy_dir)
    started = time.monotonic()
    started_at = datetime.datetime.now()
    results: dict[str, Any] = {"machine": machine(), "code": code_version(),
                               "settings": settings, "measures": {},
                               "open_files": open_files, "seeds": {}}
    if args.limited:
        results["only"] = sorted(args.only)
    if args.py_spy:
        results["py_spy"] = True
    # Job directories are part of what a job costs; a file system still
    # busy forgetting an earlier run's files would make every job slower.
    # A full run waits (up to three minutes) for it to settle.
    try:
        cost, waited = settled_directory_cost(tmp, wait=not quick)
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)
        return 130
    results["directory_cost"] = cost
    results["waited_for_file_system_s"] = waited
    results["background_busy_pct"] = background_load()
    try:
        take_measures(run, settings, args.only, args.profile, results)
    except KeyboardInterrupt:
        print("bench: interrupted; stopping everything", file=sys.stderr)
        return 130
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    finally:
        run.processes.stop_all()
        if py_spy_dir is not None and py_spy_dir.exists():
            # The raw stacks, for a flame graph or a closer look.
            kept = Path(args.out) / f"py-spy-{datetime.datetime.now():%Y%m%dT%H%M%S}"
            shutil.copytree(py_spy_dir, kept)
            print(f"bench: py-spy's raw stacks are in {kept}", file=sys.stderr)
        if args.profile:
            # The whole profiles, for a closer look (python -m pstats).
            for stats in tmp.glob("*/profile.pstats"):
                kept = Path(args.out) / f"{stats.parent.name}-{started_at:%Y%m%dT%H%M%S}.pstats"
                kept.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(stats, kept)
                print(f"bench: the profile is in {kept}", file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)

    results["ratios"] = report.ratios(results)
    if code_version() != results["code"]:
        results["code_changed_during_run"] = code_version()
        print("bench: warning: dispatcher/ changed while the run ran; its numbers mix "
              "two versions", file=sys.stderr)
    results["targets"] = report.targets(results)
    results["total_seconds"] = round(time.monotonic() - started, 1)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    text = json.dumps(results, indent=2) + "\n"
    (out / f"{stamp}.json").write_text(text, encoding="utf-8")
    (out / "latest.json").write_text(text, encoding="utf-8")

    print(report.markdown(results))
    if args.profile:
        print_top_frames(results["measures"]["profile_submit_daemon_50c"]["profile_top"])
        if "profile_noop_tasks_remote" in results["measures"]:
            print_top_frames(results["measures"]["profile_noop_tasks_remote"]["profile_top"],
                             "no-op task jobs through a remote worker (i)")
    if args.py_spy:
        print_profiles(results["measures"])
    if not quick and not args.limited and not args.py_spy and args.rounds in (None, 3):
        report.write_docs(results, STEPS, text)
        print(f"bench: wrote {report.DOCS.relative_to(ROOT)} and "
              f"{report.DOCS_JSON.relative_to(ROOT)}", file=sys.stderr)
    print(f"bench: wrote {out / (stamp + '.json')} and latest.json "
          f"({results['total_seconds']}s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
