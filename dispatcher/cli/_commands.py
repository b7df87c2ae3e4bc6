"""
The API commands of C{dispatcher}, on click: each parses its options,
asks the dispatcher through the blocking client, and shows the answer as
a table for a person or as JSON (C{--json}) for a script.

Exit statuses: 0 done; 1 the dispatcher refused or could not be reached
(one line on stderr says why), or, for C{wait}, a job failed or was
cancelled; 2 a usage error; 3 C{wait}'s time ran out; 130 interrupted
(Ctrl-C).
"""

from __future__ import annotations

import functools
import sys
import threading
from typing import Any, Callable, Iterable, Optional, Sequence

import click

from dispatcher.cli import _render as render
from dispatcher.cli._connect import Settings, connect, explain
from dispatcher.cli._submit import SubmissionError, job_fields, merge, read_jobs
from dispatcher.cli._wait import (
    Progress,
    group_outcome,
    outcome,
    state_of,
    wait_for_group,
    wait_for_jobs,
)
from dispatcher.model._jobs import JobState

STATES = tuple(state.value for state in JobState)

# What `ls` shows when not told --limit: a screenful or two, and a note
# on stderr when there are more.
DEFAULT_LIST_LIMIT = 100

# `ls --watch` without the events stream: how often it lists again.
WATCH_POLL_SECONDS = 2.0

# `ls --watch` with events: changes that come within this many seconds
# are drawn together, so that a burst costs one listing.
WATCH_COALESCE_SECONDS = 0.2

# The longest the main thread waits at once.  A Ctrl-C may be delivered to
# the thread that reads the events; Python runs its handler (the
# KeyboardInterrupt) in the main thread only, once that thread wakes: a
# wait without end would keep it from ever running.
WATCH_WAKE_SECONDS = 0.25

INTERRUPTED = 130

# Seconds a TAB waits for the dispatcher to list the ids it completes.
COMPLETION_TIMEOUT = 2.0

# The most jobs the API answers in one page (its limit's bound).
MAX_PAGE = 1000


# The options every API command takes, both before the command name
# (dispatcher --url U ls) and after it (dispatcher ls --url U).

def _settings(ctx: click.Context) -> Settings:
    root = ctx.find_root()
    if not isinstance(root.obj, Settings):
        root.obj = Settings()
    return root.obj


def _set(name: str) -> Callable[[click.Context, click.Parameter, Any], None]:
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> None:
        if value not in (None, False):
            setattr(_settings(ctx), name, value)
    return callback


def _connection_options() -> list[click.Option]:
    """
    C{--url}, C{--token-file} and C{--json}: each fills the L{Settings}
    that every command reads, a command's overriding the group's.
    """
    return [
        click.Option(["--url"], metavar="URL", expose_value=False, callback=_set("url"),
                     help="The dispatcher (default: $DISPATCHER_URL, else "
                          "http://127.0.0.1:8080)."),
        click.Option(["--token-file"], metavar="FILE", expose_value=False,
                     callback=_set("token_file"),
                     help="A file holding the token (default: $DISPATCHER_TOKEN, the file "
                          "$DISPATCHER_TOKEN_FILE names, or ./var/admin.token)."),
        click.Option(["--json", "json_"], is_flag=True, expose_value=False,
                     callback=_set("json"),
                     help="Answer in JSON: one document, or one line per item of a "
                          "stream."),
    ]


def connection_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """
    Add the connection options (L{_connection_options}) to C{command},
    listed after its own.
    """
    # click lists a command's parameters in the reverse of this list: put
    # first here, they are listed last.
    command.__click_params__ = [  # type: ignore[attr-defined]
        *reversed(_connection_options()), *getattr(command, "__click_params__", [])]
    return command


def api_command(name: Optional[str] = None, **attrs: Any) -> Callable[..., click.Command]:
    """
    A click command that talks to a dispatcher: with the connection
    options, and whose failures (a refusal, an unreachable daemon, a file
    that cannot be read) are one line on stderr and exit status 1.
    """
    def decorate(function: Callable[..., Any]) -> click.Command:
        @functools.wraps(function)
        def run(*args: Any, **kwargs: Any) -> Any:
            ctx = click.get_current_context()
            settings = _settings(ctx)
            try:
                return function(settings, *args, **kwargs)
            except KeyboardInterrupt:
                # The way out of logs -f, events and ls --watch: no trace.
                sys.stderr.write("\n")
                ctx.exit(INTERRUPTED)
            except SubmissionError as e:
                raise click.UsageError(str(e), ctx) from None
            except (click.exceptions.Exit, click.ClickException):
                raise
            except Exception as e:
                line = explain(e, settings)
                if line is None:
                    raise
                sys.stderr.write(f"dispatcher {ctx.info_name}: {line}\n")
                ctx.exit(1)

        return click.command(name, **attrs)(connection_options(run))

    return decorate


def _complete_job_ids(ctx: click.Context, param: click.Parameter,
                      incomplete: str) -> list[Any]:
    """
    The ids of the newest jobs this caller can see that start with what
    was typed, each with its state and name, for a shell's completion;
    nothing when the dispatcher cannot be asked quickly.
    """
    from click.shell_completion import CompletionItem

    try:
        # A TAB must not hang: one quick try.
        client = connect(_settings(ctx), retries=0, timeout=COMPLETION_TIMEOUT)
        found = []
        for job in client.jobs(order="newest", page_size=50):
            if len(found) >= 50:
                break
            if render.get(job, "id", "").startswith(incomplete):
                found.append(CompletionItem(
                    render.get(job, "id"),
                    help=f"{state_of(job)} {render.get(job, 'name') or ''}".strip()))
        return found
    except Exception:
        return []


def _show(value: Any, draw: Callable[[Any], Any], settings: Settings) -> None:
    if settings.json:
        render.write_json(value)
    else:
        render.show(draw(value))


# submit

@api_command(context_settings={"ignore_unknown_options": False})
@click.argument("command", nargs=-1, metavar="[-- COMMAND [ARG]...]")
@click.option("--file", "-f", "file_", metavar="FILE",
              help="Submit the job in FILE (JSON), or a batch: {\"jobs\": [...]}, a JSON "
                   "array of jobs, or JSON lines, one job a line. '-' reads stdin.")
@click.option("--task", "-t", metavar="NAME", help="Run the task NAME (from [tasks]).")
@click.option("--args", metavar="JSON", help="A task's positional arguments: a JSON array.")
@click.option("--kwargs", metavar="JSON", help="A task's keyword arguments: a JSON object.")
@click.option("--name", "-n", help="The job's name.")
@click.option("--label", "-l", "labels", multiple=True, metavar="KEY=VALUE",
              help="A label (repeat).")
@click.option("--env", "-e", multiple=True, metavar="NAME=VALUE",
              help="An environment variable of the command (repeat).")
@click.option("--queue", "-q", help="The queue (default 'default').")
@click.option("--priority", "-p", type=int, help="Higher runs first.")
@click.option("--array", "-a", type=int, metavar="N", help="Make N jobs of this one.")
@click.option("--after", multiple=True, metavar="ID",
              help="Run after this job (or every job of this array) succeeded (repeat).")
@click.option("--input", "-i", "inputs", multiple=True, metavar="URL[=PATH][#SHA256]",
              help="Fetch URL into PATH (default the URL's file name) first (repeat).")
@click.option("--timeout", type=float, metavar="SECONDS", help="Wall time allowed.")
@click.option("--max-attempts", type=int, metavar="N", help="Attempts before it fails.")
@click.option("--retry-delay", type=float, metavar="SECONDS",
              help="Seconds before the first retry.")
@click.option("--delay", type=float, metavar="SECONDS", help="Start no sooner than this.")
@click.option("--not-before", metavar="TIME", help="Start no sooner than this RFC 3339 time.")
@click.option("--cpus", type=float, help="CPUs it needs.")
@click.option("--memory", "memory_mb", type=int, metavar="MB", help="Memory it needs, MiB.")
@click.option("--gpus", type=int, help="GPUs it needs.")
@click.option("--require", "requirements", multiple=True, metavar="KEY=VALUE",
              help="A worker label it needs (repeat).")
@click.option("--notify", metavar="URL", help="POST its state changes to this https URL.")
@click.option("--notify-on", multiple=True, type=click.Choice(STATES), metavar="STATE",
              help="The states --notify reports (default the final ones; repeat).")
@click.option("--wait", "-w", "wait_", is_flag=True,
              help="Then wait for it, as 'dispatcher wait' does, and exit as it does.")
@click.option("--wait-timeout", type=float, metavar="SECONDS",
              help="With --wait: give up after SECONDS (exit 3).")
def submit(settings: Settings, command: Sequence[str], file_: Optional[str],
           wait_: bool, wait_timeout: Optional[float], **options: Any) -> None:
    """
    Submit a job: the command after '--', a task, or the jobs of a file.

    Prints the job's id (an array's or a batch's id for several jobs), so
    that ID=$(dispatcher submit -- ...) keeps it; --json prints the job.

    \b
      dispatcher submit --name greet -l team=ice -- sh -c 'echo hello'
      dispatcher submit --array 10 -- ./simulate.sh
      dispatcher submit --task wordcount --args '["input.txt"]' -i https://h/a.txt=input.txt
      dispatcher submit --file jobs.jsonl
    """
    fields = job_fields(command=command, **options)
    if file_ is not None:
        if command or options["task"]:
            raise SubmissionError("--file: the jobs come from the file: no command, no --task")
        jobs, is_batch = read_jobs(file_, _read(file_))
        jobs = [merge(job, fields) for job in jobs]
    elif command or options["task"]:
        jobs, is_batch = [fields], False
    else:
        raise SubmissionError(
            "nothing to run: give a command after '--', --task NAME or --file FILE")
    client = connect(settings, patient=wait_)
    if is_batch:
        answer = client.submit_batch(jobs)
        made = render.get(answer, "jobs") or []
        handle, kind = render.get(answer, "batch_id"), "batch"
    else:
        answer, handle, kind, made = _submit_one(client, jobs[0])
    if not wait_:
        if settings.json:
            render.write_json(answer)
        else:
            click.echo(handle)
        return
    if not settings.json:
        click.echo(handle)
    _wait_and_exit(client, settings, kind, handle,
                   [render.get(job, "id") for job in made], wait_timeout)


def _submit_one(client: Any, fields: dict[str, Any]) -> tuple[Any, str, str, list[Any]]:
    """
    Submit one job (or an array); the answer, the id to print, whether it
    is a job or an array, and the jobs made.
    """
    fields = dict(fields)
    command, task = fields.pop("command", None), fields.pop("task", None)
    answer = client.submit(command=command, task=task, **fields)
    made = render.get(answer, "jobs")
    if made is not None:
        return answer, render.get(made[0], "array_id"), "array", made
    return answer, render.get(answer, "id"), "job", [answer]


def _read(name: str) -> str:
    if name == "-":
        return sys.stdin.read()
    try:
        with open(name) as f:
            return f.read()
    except OSError as e:
        raise SubmissionError(f"--file {name}: cannot read it: {e.strerror}") from None


# ls

@api_command("ls")
@click.option("--state", "-s", "states", multiple=True, type=click.Choice(STATES),
              metavar="STATE", help=f"Only jobs in this state (repeat: any of them): "
                                    f"{', '.join(STATES)}.")
@click.option("--label", "-l", "labels", multiple=True, metavar="KEY[=VALUE]",
              help="Only jobs with this label (repeat: all of them).")
@click.option("--array", metavar="ID", help="Only this array's jobs.")
@click.option("--batch", metavar="ID", help="Only this batch's jobs.")
@click.option("--owner", help="Only this owner's jobs.")
@click.option("--queue", "-q", help="Only this queue's jobs.")
@click.option("--name", "-n", help="Only jobs of this name.")
@click.option("--worker", help="Only jobs whose latest attempt this worker holds or held.")
@click.option("--since", "created_after", metavar="TIME",
              help="Only jobs made after TIME (RFC 3339, or epoch seconds).")
@click.option("--until", "created_before", metavar="TIME",
              help="Only jobs made before TIME (RFC 3339, or epoch seconds).")
@click.option("--newest", is_flag=True, help="Newest first (default oldest first).")
@click.option("--limit", type=click.IntRange(min=1), metavar="N",
              help=f"Show at most N jobs (default {DEFAULT_LIST_LIMIT}).")
@click.option("--watch", "-W", is_flag=True,
              help="Keep the table on screen, redrawn as jobs change (Ctrl-C ends).")
def ls(settings: Settings, states: Sequence[str], labels: Sequence[str],
       limit: Optional[int], newest: bool, watch: bool, **filters: Any) -> None:
    """
    List jobs as a table: oldest first, or --newest first.
    """
    if watch and settings.json:
        raise click.UsageError("--watch draws for a person; for a script, "
                               "'dispatcher events --json' streams the changes")
    query = {k: v for k, v in filters.items() if v is not None}
    if states:
        query["state"] = list(states)
    if labels:
        query["label"] = list(labels)
    if newest:
        # (oldest first is the API's default: not said, so that a
        # dispatcher older than the order parameter lists too.)
        query["order"] = "newest"
    limit = limit or DEFAULT_LIST_LIMIT
    client = connect(settings, patient=watch)

    def listing() -> tuple[list[Any], bool]:
        jobs = []
        for job in client.jobs(page_size=min(limit + 1, MAX_PAGE), **query):
            jobs.append(job)
            if len(jobs) > limit:
                return jobs[:limit], True
        return jobs, False

    if watch:
        _watch(client, listing, query)
        return
    jobs, more = listing()
    if settings.json:
        render.write_json(jobs)
    else:
        render.show(render.job_table(jobs))
    if more:
        click.echo(f"(more than {limit} jobs: --limit N shows more)", err=True)


def _watch(client: Any, listing: Callable[[], tuple[list[Any], bool]],
           query: dict[str, Any]) -> None:
    """
    Redraw the listing whenever the events stream says a job changed (or
    every L{WATCH_POLL_SECONDS} when the dispatcher has no events stream)
    until interrupted.
    """
    from rich.console import Group
    from rich.live import Live
    from rich.text import Text

    changed = threading.Event()
    source = {"how": "events"}
    filters = {k: query[k] for k in ("state", "label", "array", "batch", "owner")
               if k in query}

    def follow() -> None:
        try:
            for _ in client.events(type=["job"], **filters):
                changed.set()
        except Exception:
            # No events stream (an older dispatcher), or it went away:
            # poll instead.
            pass
        source["how"] = "polling"
        changed.set()

    threading.Thread(target=follow, daemon=True, name="dispatcher-ls-events").start()

    def frame() -> Any:
        jobs, more = listing()
        note = f"{len(jobs)} jobs" + (" (more: --limit N)" if more else "")
        note += f"; redrawn on changes ({source['how']}); Ctrl-C ends"
        return Group(render.job_table(jobs), Text(note, style="dim"))

    with Live(frame(), console=render.console(), auto_refresh=False,
              redirect_stdout=False) as live:
        while True:
            waited = 0.0
            while not changed.is_set():
                if source["how"] == "polling" and waited >= WATCH_POLL_SECONDS:
                    break
                changed.wait(WATCH_WAKE_SECONDS)
                waited += WATCH_WAKE_SECONDS
            if changed.is_set():
                changed.wait(WATCH_COALESCE_SECONDS)
            changed.clear()
            live.update(frame(), refresh=True)


# show

@api_command()
@click.argument("ids", nargs=-1, required=True, metavar="ID...",
                shell_complete=_complete_job_ids)
def show(settings: Settings, ids: Sequence[str]) -> None:
    """
    Show jobs whole: state, attempts, exit code, result, error.  An array's
    or a batch's id shows how many of its jobs finished, by state.
    --json: the job (or group), or an array of them for several ids.
    """
    from dispatcher.client import NotFound

    client = connect(settings)
    found = []
    for item in ids:
        try:
            found.append((client.job(item), render.job_detail))
            continue
        except NotFound as e:
            missing = e
        for fetch in (client.array, client.batch):
            try:
                found.append((fetch(item), render.group_detail))
                break
            except NotFound:
                pass
        else:
            raise missing
    if settings.json:
        answers = [answer for answer, _ in found]
        render.write_json(answers[0] if len(answers) == 1 else answers)
        return
    for number, (answer, draw) in enumerate(found):
        if number:
            click.echo()
        render.show(draw(answer))


# logs

@api_command()
@click.argument("job_id", metavar="ID", shell_complete=_complete_job_ids)
@click.option("--follow", "-f", is_flag=True,
              help="Keep printing output as it is written, until the attempt ends.")
@click.option("--attempt", type=click.IntRange(min=1), metavar="N",
              help="This attempt's log (default the latest).")
@click.option("--stderr", "stream", flag_value="stderr", default="stdout",
              help="The job's stderr (default its stdout).")
@click.option("--offset", type=click.IntRange(min=0), default=0, metavar="BYTES",
              help="Skip the first BYTES bytes.")
def logs(settings: Settings, job_id: str, follow: bool, attempt: Optional[int],
         stream: str, offset: int) -> None:
    """
    Print a job's output (its latest attempt's, or --attempt N's) as it
    wrote it; with -f, go on as it writes more.  --json: each piece as a
    JSON line {"job_id", "stream", "offset", "text"}.
    """
    client = connect(settings, patient=follow)
    kwargs: dict[str, Any] = {"stream": stream, "offset": offset}
    if attempt is not None:
        kwargs["attempt"] = attempt
    pieces: Iterable[bytes] = (
        client.follow_log(job_id, **kwargs) if follow else [client.log(job_id, **kwargs)])
    at = offset
    out = sys.stdout.buffer
    for piece in pieces:
        if not piece:
            continue
        if settings.json:
            render.write_json({"job_id": job_id, "stream": stream, "offset": at,
                               "text": piece.decode("utf-8", "replace")}, lines=True)
        else:
            out.write(piece)
            out.flush()
        at += len(piece)


# wait

@api_command()
@click.argument("ids", nargs=-1, metavar="ID...", shell_complete=_complete_job_ids)
@click.option("--array", metavar="ID", help="Wait for every job of this array.")
@click.option("--batch", metavar="ID", help="Wait for every job of this batch.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="Give up after SECONDS (exit 3).")
@click.option("--quiet", "-Q", is_flag=True, help="No progress bar, no table: the exit "
              "status alone.")
def wait(settings: Settings, ids: Sequence[str], array: Optional[str],
         batch: Optional[str], timeout: Optional[float], quiet: bool) -> None:
    """
    Wait until jobs (or every job of an array or a batch) have finished,
    with a progress bar on a terminal, and exit with how they ended:

    \b
      0  every one succeeded
      1  one failed or was cancelled (or the dispatcher refused: see stderr)
      2  a usage error
      3  --timeout ran out first
    """
    given = sum(1 for g in (ids, array, batch) if g)
    if given != 1:
        raise click.UsageError("wait for jobs (ID...), --array ID or --batch ID: one of them")
    client = connect(settings, patient=True)
    if array or batch:
        kind, handle, members = ("array", array, []) if array else ("batch", batch, [])
    else:
        kind, handle, members = "job", None, list(ids)
    _wait_and_exit(client, settings, kind, handle, members, timeout, quiet)


def _wait_and_exit(client: Any, settings: Settings, kind: str, handle: Optional[str],
                   ids: Sequence[str], timeout: Optional[float], quiet: bool = False) -> None:
    """
    Wait (L{dispatcher.cli._wait}), show how it ended, and exit with its
    status.
    """
    ctx = click.get_current_context()
    show_bar = not settings.json and not quiet and sys.stderr.isatty()
    if kind == "job":
        description = f"job {ids[0]}" if len(ids) == 1 else f"{len(ids)} jobs"
        with Progress(description, len(ids), show_bar) as progress:
            jobs = wait_for_jobs(client, ids, timeout, progress)
        status = outcome([state_of(job) for job in jobs])
        if settings.json:
            render.write_json(jobs[0] if len(jobs) == 1 else jobs)
        elif not quiet:
            render.show(render.job_table(jobs))
    else:
        with Progress(f"{kind} {handle}", None, show_bar) as progress:
            group = wait_for_group(client, kind, handle, timeout, progress)
        status = group_outcome(group)
        if settings.json:
            render.write_json(group)
        elif not quiet:
            render.show(render.group_detail(group))
    if status == 3 and not settings.json:
        click.echo(f"dispatcher {ctx.info_name}: not finished after {timeout} s", err=True)
    ctx.exit(status)


# cancel, retry, rm

def _each(settings: Settings, ids: Sequence[str], act: Callable[[str], Any],
          said: Callable[[str, Any], str]) -> None:
    """
    Do C{act} to each id, going on past a refusal; print what became of
    each (or its answer in JSON lines); exit 1 if any was refused.
    """
    ctx = click.get_current_context()
    refused = False
    for item in ids:
        try:
            answer = act(item)
        except Exception as e:
            line = explain(e, settings)
            if line is None:
                raise
            sys.stderr.write(f"dispatcher {ctx.info_name} {item}: {line}\n")
            refused = True
            continue
        if settings.json:
            render.write_json(answer if answer is not None else {"id": item}, lines=True)
        else:
            click.echo(said(item, answer))
    if refused:
        ctx.exit(1)


def _group_ids(ids: Sequence[str], array: Optional[str], batch: Optional[str]) -> None:
    if sum(1 for g in (ids, array, batch) if g) != 1:
        raise click.UsageError("name jobs (ID...), --array ID or --batch ID: one of them")


@api_command()
@click.argument("ids", nargs=-1, metavar="ID...", shell_complete=_complete_job_ids)
@click.option("--array", metavar="ID", help="Every unfinished job of this array.")
@click.option("--batch", metavar="ID", help="Every unfinished job of this batch.")
def cancel(settings: Settings, ids: Sequence[str], array: Optional[str],
           batch: Optional[str]) -> None:
    """
    Cancel jobs: at once if they had not started; a running one's
    processes get SIGTERM, then SIGKILL.
    """
    _group_ids(ids, array, batch)
    client = connect(settings)
    if array or batch:
        act = client.cancel_array if array else client.cancel_batch
        _each(settings, [array or batch], act,
              lambda i, g: f"cancelling {render.get(g, 'kind')} {i}: "
                           f"{render.get(g, 'finished')} of {render.get(g, 'size')} finished")
        return

    def said(job_id: str, job: Any) -> str:
        state = state_of(job)
        if state == "cancelled":
            return f"cancelled {job_id}"
        return f"cancelling {job_id} ({state}: its processes are being stopped)"

    _each(settings, ids, client.cancel, said)


@api_command()
@click.argument("ids", nargs=-1, metavar="ID...", shell_complete=_complete_job_ids)
@click.option("--array", metavar="ID", help="Every failed or cancelled job of this array.")
@click.option("--batch", metavar="ID", help="Every failed or cancelled job of this batch.")
@click.option("--dependents", is_flag=True,
              help="Also bring back the jobs cancelled because this one failed.")
def retry(settings: Settings, ids: Sequence[str], array: Optional[str],
          batch: Optional[str], dependents: bool) -> None:
    """
    Put failed or cancelled jobs back in line, with a fresh budget of
    attempts.
    """
    _group_ids(ids, array, batch)
    client = connect(settings)
    if array or batch:
        if dependents:
            raise click.UsageError("--dependents: for jobs named by id")
        act = client.retry_array if array else client.retry_batch
        _each(settings, [array or batch], act,
              lambda i, g: f"retrying {render.get(g, 'kind')} {i}")
        return
    extra = {"dependents": True} if dependents else {}
    _each(settings, ids, lambda job_id: client.retry(job_id, **extra),
          lambda job_id, job: f"retrying {job_id} ({state_of(job)})")


@api_command("rm")
@click.argument("ids", nargs=-1, required=True, metavar="ID...",
                shell_complete=_complete_job_ids)
def rm(settings: Settings, ids: Sequence[str]) -> None:
    """
    Delete finished jobs now, with their attempts, logs and files.
    """
    client = connect(settings)
    _each(settings, ids, client.delete, lambda job_id, _: f"deleted {job_id}")


# queues, workers, me

@api_command()
def queues(settings: Settings) -> None:
    """
    The queues: how many jobs are in each state, how many run, the limit.
    --json: an object of the queues by name.
    """
    _show(connect(settings).queues(), render.queue_table, settings)


@api_command()
def workers(settings: Settings) -> None:
    """
    The connected remote workers: capacity, labels, jobs held, last contact.
    --json: an array of the workers.
    """
    _show(connect(settings).workers(), render.worker_table, settings)


@api_command()
def me(settings: Settings) -> None:
    """
    Who the dispatcher takes you for: your credential's name and role.
    """
    answer = connect(settings).me()
    if settings.json:
        render.write_json(answer)
        return
    names = render.get(answer, "worker_names")
    click.echo(f"{render.get(answer, 'name')} ({render.text(render.get(answer, 'role'))})"
               + (f", worker names {', '.join(names)}" if names else "")
               + f" at {settings.where()}")


# events

@api_command()
@click.option("--job", metavar="ID", help="Only this job's events.")
@click.option("--array", metavar="ID", help="Only this array's jobs' events.")
@click.option("--batch", metavar="ID", help="Only this batch's jobs' events.")
@click.option("--label", "-l", "labels", multiple=True, metavar="KEY=VALUE",
              help="Only jobs with this label (repeat: all of them).")
@click.option("--owner", help="Only this owner's jobs.")
@click.option("--state", "-s", "states", multiple=True, type=click.Choice(STATES),
              metavar="STATE", help="Only changes to this state (repeat: any of them).")
@click.option("--type", "types", multiple=True, type=click.Choice(("job", "worker")),
              help="Only events of this type (repeat).")
@click.option("--after", type=click.IntRange(min=0), metavar="EVENT_ID",
              help="Start after this event (default: from now on).")
@click.option("--count", "-c", type=click.IntRange(min=1), metavar="N",
              help="Stop after N events.")
def events(settings: Settings, labels: Sequence[str], states: Sequence[str],
           types: Sequence[str], after: Optional[int], count: Optional[int],
           **filters: Any) -> None:
    """
    Print the dispatcher's events as they happen: jobs changing state,
    workers coming and going.  --json: one JSON line per event,
    {"id", "type", "data"}.  Ctrl-C ends.
    """
    query = {k: v for k, v in filters.items() if v is not None}
    for key, values in (("label", labels), ("state", states), ("type", types)):
        if values:
            query[key] = list(values)
    client = connect(settings, patient=True)
    seen = 0
    for event in client.events(after=after, **query):
        kind = render.get(event, "type")
        data = render.plain(render.get(event, "data"))
        if settings.json:
            render.write_json({"id": render.get(event, "id"), "type": kind, "data": data},
                              lines=True)
        else:
            click.echo(render.event_line(kind, data))
        seen += 1
        if count is not None and seen >= count:
            return


# completion

@click.command()
@click.argument("shell", type=click.Choice(("bash", "zsh", "fish")))
def completion(shell: str) -> None:
    """
    Print the shell's completion script for dispatcher.

    \b
      bash:  eval "$(dispatcher completion bash)"       (in ~/.bashrc)
      zsh:   eval "$(dispatcher completion zsh)"        (in ~/.zshrc)
      fish:  dispatcher completion fish > ~/.config/fish/completions/dispatcher.fish
    """
    from click.shell_completion import get_completion_class

    ctx = click.get_current_context()
    shell_class = get_completion_class(shell)
    assert shell_class is not None  # a Choice of the shells click knows
    root = ctx.find_root()
    click.echo(shell_class(root.command, {}, "dispatcher", "_DISPATCHER_COMPLETE").source())


API_COMMANDS = (submit, ls, show, logs, wait, cancel, retry, rm, queues, workers, events, me,
                completion)


class DispatcherGroup(click.Group):
    """
    The C{dispatcher} command: its subcommands listed in the order they
    were added (the common ones first), not alphabetically.
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)


def api_commands(local: Sequence[click.Command] = (), epilog: Optional[str] = None
                 ) -> click.Group:
    """
    The C{dispatcher} command: the API commands, then C{local} (the
    commands that work on this host's files and processes).
    """
    group = DispatcherGroup(
        "dispatcher",
        help="Submit, list, follow and wait for a dispatcher's jobs; run a worker; "
             "look after a store and its credentials.",
        epilog=epilog,
        context_settings={"help_option_names": ["-h", "--help"]},
        no_args_is_help=True,
    )
    group.params.extend(_connection_options())
    for command in (*API_COMMANDS, *local):
        group.add_command(command)
    return group
