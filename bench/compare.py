"""
Two versions of the dispatcher, measured in alternating runs of the
benchmark: the way to say what a change costs ("within 5 % of the run
before") on a machine whose speed drifts and whose other work comes and
goes.

    sudo .venv/bin/python bench/compare.py BEFORE [AFTER] [--only MEASURES]
                                           [--rounds N] [--fresh-fs IMAGE]

BEFORE and AFTER are checkouts, each set up with the README's command (its
own C{.venv}); AFTER defaults to this one.  For example, with a worktree of
an older commit::

    git worktree add --detach /tmp/before cc4f8ae
    (cd /tmp/before && python3 -m venv .venv &&
     .venv/bin/pip install -q --config-settings editable_mode=compat -e .)
    sudo .venv/bin/python bench/compare.py /tmp/before --only commands --rounds 8

Each round runs C{bench/run.py --only MEASURES} of each checkout, in turn,
the order reversed every other round (ABBA), so that a trend in the
machine's speed falls on both alike.  It prints each run's headline figure
(jobs or requests a second) of every measure, the median of each version,
and the ratio of the medians, AFTER over BEFORE.

C{--fresh-fs IMAGE}: each run's data directories go on an ext4 made anew
in the file IMAGE (sparse, 8 GiB), mounted on a loop device (root only).
On ext4 without a journal (this machine's root file system), making a
file takes much longer for a while after many files were deleted: the
allocator skips every inode freed in the last seconds, and a run's own
clean-up, or any other program's, slows the next run's job directories
by a third or more (measured here with perf: C{find_inode_bit} and
C{recently_deleted} at 80 us a job).  A file system of its own for each
run gives both versions the same disk.  C{--mkfs-options} (default
C{-O ^has_journal}, as this machine's root) says how it is made.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent

# The figure each measure is read by: the first of these keys it has.
HEADLINES = ("jobs_per_s", "requests_per_s", "left_queued_per_s", "events_per_s")


def headline(measure: dict[str, Any]) -> Optional[tuple[str, float]]:
    """
    The key and value of a measure's headline figure, or C{None}.
    """
    for key in HEADLINES:
        if isinstance(measure.get(key), (int, float)):
            return key, float(measure[key])
    return None


class FreshFilesystem:
    """
    An ext4 in a file, made anew and mounted for each run.
    """

    def __init__(self, image: Path, options: str) -> None:
        self.image = image
        self.options = shlex.split(options)
        self.mount_point = Path(tempfile.mkdtemp(prefix="compare-fs-"))
        self.mounted = False

    def renew(self) -> Path:
        self.unmount()
        with open(self.image, "ab") as f:
            f.truncate(8 << 30)
        subprocess.run(["mkfs.ext4", "-q", "-F", *self.options, str(self.image)], check=True)
        subprocess.run(["mount", "-o", "loop", str(self.image), str(self.mount_point)],
                       check=True)
        self.mounted = True
        return self.mount_point

    def unmount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", str(self.mount_point)], check=True)
            self.mounted = False

    def close(self) -> None:
        self.unmount()
        self.mount_point.rmdir()


def one_run(checkout: Path, only: str, tmpdir: Optional[Path], out: Path) -> dict[str, Any]:
    """
    Run the benchmark of C{checkout} once; its results.
    """
    python = checkout / ".venv" / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"compare: {checkout} has no .venv (run the README's install there)")
    env = dict(os.environ)
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    out.mkdir(parents=True, exist_ok=True)
    finished = subprocess.run(
        [str(python), "bench/run.py", "--only", only, "--out", str(out)],
        cwd=checkout, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if finished.returncode != 0:
        raise SystemExit(f"compare: the benchmark of {checkout} failed:\n{finished.stderr}")
    return json.loads((out / "latest.json").read_text(encoding="utf-8"))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path, nargs="?", default=ROOT)
    parser.add_argument("--only", default="commands")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--fresh-fs", type=Path, default=None, metavar="IMAGE")
    parser.add_argument("--mkfs-options", default="-O ^has_journal")
    args = parser.parse_args(argv)
    if args.fresh_fs is not None and os.geteuid() != 0:
        parser.error("--fresh-fs mounts a file system: run as root")
    versions = {"before": args.before.resolve(), "after": args.after.resolve()}
    figures: dict[str, dict[str, list[float]]] = {"before": {}, "after": {}}
    filesystem = (FreshFilesystem(args.fresh_fs, args.mkfs_options)
                  if args.fresh_fs is not None else None)
    out = Path(tempfile.mkdtemp(prefix="compare-"))
    try:
        for number in range(args.rounds):
            order = ["before", "after"] if number % 2 == 0 else ["after", "before"]
            for name in order:
                tmpdir = filesystem.renew() if filesystem is not None else None
                results = one_run(versions[name], args.only, tmpdir, out / f"{name}-{number}")
                shown = []
                for measure, values in sorted(results["measures"].items()):
                    found = headline(values) if isinstance(values, dict) else None
                    if found is None:
                        continue
                    figures[name].setdefault(measure, []).append(found[1])
                    shown.append(f"{measure} {found[1]:,.0f}")
                print(f"round {number + 1} {name}: {', '.join(shown)}", flush=True)
    finally:
        if filesystem is not None:
            filesystem.close()
    print(f"\n{args.rounds} rounds, alternating; medians (all runs), after / before:")
    for measure in sorted(figures["before"]):
        before = figures["before"][measure]
        after = figures["after"].get(measure, [])
        if not after:
            continue
        ratio = statistics.median(after) / statistics.median(before)
        print(f"  {measure}: before {statistics.median(before):,.1f} "
              f"({', '.join(f'{x:.0f}' for x in before)}), after "
              f"{statistics.median(after):,.1f} ({', '.join(f'{x:.0f}' for x in after)}): "
              f"{ratio:.3f}")
    print(f"(each run's results are under {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
