"""
The C{dispatcher} command: the API commands of L{dispatcher.cli}
(C{submit}, C{ls}, C{wait}, ...), and the commands that work on this host:
C{dispatcher worker ...} runs a remote worker in the foreground, logging
text to stderr, as C{twistd -n dispatcher-worker} does with its own log
options; C{dispatcher store ...} checks, backs up and restores a
dispatcher's store; C{dispatcher token ...} makes its credentials.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Optional, Sequence

LOCAL_COMMANDS = """\b
worker, store and token work on this host; each has its own --help.
The dispatcher itself runs with 'twistd -n dispatcher' (or 'twist dispatcher').
Shell completion: eval "$(dispatcher completion bash)" (or zsh, fish).
"""


def main(argv: Optional[Sequence[str]] = None) -> None:
    """
    The console script's entry point.
    """
    from dispatcher.app._files import UMASK

    # A backup, a token file, a worker's files: this account's alone.
    os.umask(UMASK)
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["worker"]:
        # Straight to the worker's own parser, as the click group would
        # hand it on: a direct-mode Slurm job starts a worker for each job,
        # and click and the API commands are 18 modules a worker never
        # uses (python -X importtime: 8 ms from cached bytecode, several
        # times that where the dispatcher's own are compiled at each start).
        raise SystemExit(worker_main(args[1:]))
    command(args).main(args, prog_name="dispatcher")


def command(args: Sequence[str] = ()) -> Any:
    """
    The C{dispatcher} click group: the API commands and the local ones.
    The local ones hand their arguments, C{--help} included, to their own
    parsers as they are, so that their options, messages and exit statuses
    stay what they were before the group was click's.
    """
    import click

    from dispatcher.cli import api_commands

    def local(name: str, run: Any, summary: str) -> click.Command:
        @click.command(
            name, help=summary, add_help_option=False,
            context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
        )
        @click.argument("rest", nargs=-1, type=click.UNPROCESSED)
        def handed_on(rest: Sequence[str]) -> None:
            raise SystemExit(run(list(rest)))

        return handed_on

    return api_commands(
        local=[
            local("worker", worker_main, "Run a worker: jobs pulled over HTTP, run here."),
            local("store", store_main, "Check, back up and restore a dispatcher's store."),
            local("token", token_main, "Make, list and revoke credentials."),
        ],
        epilog=LOCAL_COMMANDS,
    )


def worker_main(rest: Sequence[str]) -> int:
    """
    C{dispatcher worker ...}: runs the worker until a signal stops it;
    returns 2 on a usage error, before any reactor starts.
    """
    if "--one-job" in rest:
        # A one-job worker starts once a job: where PYTHONDONTWRITEBYTECODE
        # is set and the package was never compiled (an editable install),
        # each start would compile every module of the dispatcher again,
        # about 0.1 s of CPU.  Its bytecode is cached where it can be
        # written; the jobs never see this process's environment.
        sys.dont_write_bytecode = False

    from twisted.python import usage

    from dispatcher.app.worker_tap import Options

    # The options are checked before any reactor or log starts, so that a
    # mistake is one clear line.
    options = Options()
    try:
        options.parseOptions(list(rest))
    except usage.UsageError as e:
        sys.stderr.write(
            f"dispatcher worker: {e}\nRun 'dispatcher worker --help' for the options.\n"
        )
        return 2
    run_worker(options)
    return 0


def run_worker(options: Any) -> None:
    """
    Run the worker that C{options} (parsed L{dispatcher.app.worker_tap.Options})
    describe until the reactor stops (SIGTERM or SIGINT), then exit.

    What C{twist} does with a plugin, with public Twisted alone: log text at
    level info and above to stderr, start the service, and stop it (waiting
    for its Deferred) before the reactor shuts down.
    """
    from twisted.internet.defer import Deferred
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    from twisted.internet.task import react

    from dispatcher.app.worker_tap import makeService

    globalLogBeginner.beginLoggingTo(
        [
            FilteringLogObserver(
                textFileLogObserver(sys.stderr),
                [
                    LogLevelFilterPredicate(
                        defaultLogLevel=LogLevel.levelWithName(options.settings.log_level)
                    )
                ],
            )
        ]
    )

    from dispatcher.workers._service import DataDirInUse

    def start(reactor: Any) -> Deferred:
        service = makeService(options, reactor)
        try:
            service.startService()
        except DataDirInUse as e:
            # One line, as the daemon says it, not a traceback: react ends
            # with a SystemExit's code.
            sys.stderr.write(f"dispatcher worker: {e}\n")
            raise SystemExit(1)
        reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
        if options.settings.one_job:
            # Fires once its one job is delivered: the reactor stops (the
            # service with it) and the process exits 0.
            return service.worker.finished
        # Never fires: the worker runs until a signal stops the reactor.
        return Deferred()

    if not options.settings.one_job:
        react(start)
        return
    try:
        react(start)
    except SystemExit as e:
        code = exit_status(e.code)
    else:  # pragma: no cover (react always exits)
        code = 0
    # Its job delivered and its service stopped: what is left is Python's
    # own teardown of every module and object, 0.1 s of CPU for nothing a
    # worker that started for one job needs (strace: no system call
    # between the reactor's end and its exit).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def exit_status(code: Any) -> int:
    """
    The exit status C{SystemExit(code)} gives a process: C{None} 0, an
    integer itself, anything else (a message, written to stderr) 1.
    """
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    sys.stderr.write(f"{code}\n")
    return 1


STORE_HELP = """\
Check, back up and restore a dispatcher's store (DIR/dispatcher.sqlite3).

  check       Check it as the dispatcher does at its start (SQLite's
              quick_check, and that it holds every commit its mark file
              says was made); --full matches every index with its table too.
              Safe while the dispatcher runs.  Exits 1 if it is not fit.
  backup FILE Copy it to FILE with SQLite's backup API, safe while the
              dispatcher runs, and check the copy.
  restore FILE
              Put the backup FILE in its place (the old files are kept
              beside it, named *.before-restore-TIME), so that the
              dispatcher starts on it.  Refused while a dispatcher runs.
  reset-mark  Accept what a store that lost commits still holds, so that
              the dispatcher starts on it.  Refused while a dispatcher runs.
"""


def store_main(argv: Sequence[str]) -> int:
    """
    C{dispatcher store ...}: returns the exit status (0: done, 1: the
    store is not fit or the command failed, 2: a usage error).  Every
    outcome is one line: on stdout when done, on stderr when not.
    """
    import argparse

    parser = argparse.ArgumentParser(
        prog="dispatcher store",
        description=STORE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    command = _subcommands(parser)

    check = command("check", "check the store")
    check.add_argument("--full", action="store_true", help="run integrity_check too")
    command("backup", "back the store up").add_argument("file")
    command("restore", "restore a backup").add_argument("file")
    command("reset-mark", "accept what the store holds")
    options = parser.parse_args(list(argv))

    from dispatcher.app._daemon import DATABASE_NAME, DataDirInUse, hold_data_dir
    from dispatcher.store._maintenance import (
        backup_store,
        check_store,
        reset_mark,
        restore_store,
    )
    from dispatcher.store._results import StoreUnusable

    try:
        data_dir = _data_dir(options.data_dir, options.config)
        postgresql = _store_url(options.config)
    except Exception as e:
        sys.stderr.write(f"dispatcher store {options.command}: {e}\n")
        return 2
    if postgresql:
        sys.stderr.write(
            f"dispatcher store {options.command}: {options.config} keeps jobs in "
            "PostgreSQL ([store] url): these commands are the SQLite file's; use "
            "PostgreSQL's own tools (pg_dump, pg_basebackup, amcheck)\n"
        )
        return 2
    path = os.path.join(data_dir, DATABASE_NAME)
    try:
        if options.command == "check":
            report = check_store(path, full=options.full)
        elif options.command == "backup":
            report = backup_store(path, options.file)
        else:
            with hold_data_dir(data_dir):
                if options.command == "restore":
                    report = restore_store(path, options.file)
                else:
                    report = reset_mark(path)
    except (StoreUnusable, DataDirInUse, OSError) as e:
        sys.stderr.write(f"dispatcher store {options.command}: {e}\n")
        return 1
    sys.stdout.write(f"{report.summary()}\n")
    return 0


TOKEN_HELP = """\
Make, list and revoke the credentials a dispatcher accepts (kept, hashed,
in DIR/credentials.json), while it runs: a change counts from its next
request on.

  create NAME --role ROLE [--worker-name W ...]
              Make a credential and print its token, alone on the last line
              (shown this once; only its hash is kept).  Roles: admin
              (everything), submitter (submit; see, cancel and retry its own
              jobs), reader (see every job), worker (the worker protocol,
              under its worker names: --worker-name, by default NAME),
              metrics (GET /metrics alone: a Prometheus scraper's).
  ls          List the credentials: name, role, worker names, when made.
  revoke NAME Revoke a credential: its token is refused from now on.
"""


def token_main(argv: Sequence[str]) -> int:
    """
    C{dispatcher token ...}: returns the exit status (0: done, 1: refused
    or failed, 2: a usage error).
    """
    import argparse
    import datetime

    from dispatcher.store._credentials import CredentialError, CredentialFile, check_role

    parser = argparse.ArgumentParser(
        prog="dispatcher token",
        description=TOKEN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    command = _subcommands(parser)

    create = command("create", "make a credential")
    create.add_argument("name")
    create.add_argument("--role", "-r", required=True,
                        help="admin, submitter, reader, worker or metrics")
    create.add_argument("--worker-name", "-w", action="append", dest="worker_names",
                        help="a worker name it may act under (workers; repeat)")
    command("ls", "list the credentials")
    command("revoke", "revoke a credential").add_argument("name")
    options = parser.parse_args(list(argv))
    try:
        data_dir = _data_dir(options.data_dir, options.config)
    except Exception as e:
        sys.stderr.write(f"dispatcher token {options.command}: {e}\n")
        return 2
    credentials = CredentialFile(data_dir)
    try:
        if options.command == "create":
            role = check_role(options.role)
            os.makedirs(data_dir, mode=0o700, exist_ok=True)
            token, _ = credentials.create(options.name, role, options.worker_names)
            sys.stdout.write(
                f"made the credential {options.name} ({role.value}); its token, "
                "shown this once:\n"
                f"{token}\n"
            )
        elif options.command == "ls":
            for credential in credentials.credentials():
                principal = credential.principal
                made = datetime.datetime.fromtimestamp(
                    credential.created, datetime.timezone.utc
                ).strftime("%Y-%m-%dT%H:%M:%SZ")
                names = principal.worker_names
                sys.stdout.write(
                    f"{principal.name}\t{principal.role.value}\t"
                    f"{','.join(sorted(names)) if names is not None else '-'}\t{made}\n"
                )
        else:
            if not credentials.revoke(options.name):
                sys.stderr.write(
                    f"dispatcher token revoke: no credential named {options.name!r} "
                    f"in {credentials.path}\n"
                )
                return 1
            sys.stdout.write(f"revoked the credential {options.name}\n")
    except (CredentialError, OSError) as e:
        sys.stderr.write(f"dispatcher token {options.command}: {e}\n")
        return 1
    return 0


def _subcommands(parser: Any) -> Any:
    """
    A maker of C{parser}'s subcommands, each of which works on a data
    directory named by C{--data-dir} or by the C{--config} file's.
    """
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> Any:
        sub = commands.add_parser(name, help=help)
        where = sub.add_mutually_exclusive_group()
        where.add_argument(
            "--data-dir", "-d", help="the data directory (default: the ini file's, or ./var)"
        )
        where.add_argument("--config", "-c", help="the ini file naming the data directory")
        return sub

    return command


def _store_url(config: Optional[str]) -> Optional[str]:
    # The [store] url of the configuration file, if any names one.
    from dispatcher.config._ini import ConfigError, load_config

    if not config:
        return None
    try:
        section = load_config(config).store
    except ConfigError as e:
        raise ValueError(str(e))
    return section.url


def _data_dir(data_dir: Optional[str], config: Optional[str]) -> str:
    from dispatcher.config._ini import Config, ConfigError, load_config

    if data_dir:
        return data_dir
    try:
        return (load_config(config) if config else Config()).dispatcher.data_dir
    except ConfigError as e:
        raise ValueError(str(e))
