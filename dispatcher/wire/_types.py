"""
Every JSON shape of the API and of the worker protocol, declared once, as
msgspec C{Struct}s.

Why msgspec: a C{Struct} is both the check and the codec.  Decoding the
bytes of a request straight into a C{Struct} checks the types, the
ranges, the lengths and the patterns declared here in one C pass, with an
error that gives the path of the value at fault (C{$.jobs[3].env}); the
same C{Struct}s encode answers and give the JSON Schema of the OpenAPI
document (C{msgspec.json.schema_components}).  A small submission decodes
and checks in about a microsecond, as fast as the hand-written checks it
replaces (docs/wire.md has the measurement).  attrs with cattrs was the
other fit; it checks in Python, several times slower, and has no schema
of its own.

Each limit is one constant here: the C{Meta} of a type reads it, so the
check and the schema cannot drift.  A rule that msgspec cannot check (a
relation between fields, a rule on a value that needs the configuration)
is checked in L{dispatcher.wire._submission}; where JSON Schema can
express it, it is stated in the schema next to the type it constrains,
from the same constant, and where it cannot (the nesting of a task's
arguments, two inputs to one path, a batch's total of jobs), it is said
in the field's description.  Limits that depend on the configuration
(C{max_array}, the configured queues and tasks) are filled into the
document when it is served (L{dispatcher.api._openapi}).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

import attrs
import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from dispatcher.model._jobs import FINAL_STATES, NO_RESOURCES, JobSpec, JobState
from dispatcher.model._limits import MAX_RESULT_BYTES
# How deep a task's arguments (and its result) may nest arrays and
# objects is the model's rule, which a task's result is checked against
# where it is made.
from dispatcher.model._values import MAX_NESTING
from dispatcher.model._principals import (
    MAX_PRINCIPAL_NAME,
    MAX_WORKER_NAMES,
    PRINCIPAL_NAME_PATTERN,
    PRINCIPAL_NAME_RULE,
    Role,
)

# Limits.
MAX_CPUS = 1_000_000
MAX_MEMORY_MB = 1 << 40
MAX_GPUS = 100_000
MAX_PRIORITY = 1_000_000
MAX_ATTEMPTS = 100
MAX_DEPENDENCIES = 1000
MAX_SECONDS = 366 * 86400.0
MAX_NAME = 200
MAX_LABEL = 200
# A worker runs at most this many jobs at once: a description beyond it is
# refused (a credential that asked for 100,000 slots could hold as many
# jobs, their env secrets with them).
MAX_SLOTS = 10_000
# A worker's description is kept in memory for every name heard (a few
# thousand at most: [workers] max_names), so what one may hold is small.
MAX_WORKER_LABELS = 64
MAX_WORKER_TASKS = 256
# As [tasks] names them (dispatcher.config): a longer name names no task.
MAX_TASK_NAME = 100
MAX_ITEMS = 10_000
# The fencing counter a lease token carries (the store's, an SQLite
# INTEGER).
MAX_COUNTER = 2**63 - 1
MAX_WAIT = 60.0
DEFAULT_WAIT = 30.0
MAX_EXIT_CODE = 255
MAX_IDEMPOTENCY_KEY = 255
MAX_LIST_LIMIT = 1000
DEFAULT_LIST_LIMIT = 100
# A list's cursor is a job's place in the store (an SQLite INTEGER), and a
# log's offset a file offset (a signed 64-bit off_t): a larger one is a
# 400, not an overflow.
MAX_CURSOR = 2**63 - 1
MAX_OFFSET = 2**63 - 1
# The largest event id a client may resume after (?after=, Last-Event-ID):
# SQLite's largest integer key.
MAX_EVENT_ID = 2**63 - 1
# The longest a request may wait (?wait=SECONDS) for a job, an array or a
# batch to be final (issue 17).
MAX_CLIENT_WAIT = 300.0
# How many state= filters one list of jobs may give (there are seven
# states; a state given again is the same filter).
MAX_STATE_FILTERS = 16
# An attempt's number (they grow across retries, without a bound of their
# own): a stored SQLite INTEGER, as a cursor is.
MAX_ATTEMPT_NUMBER = 2**63 - 1
# The longest URL a job's notify may name.
MAX_URL = 2048
# How many label= filters one list of jobs may give: each is a lookup in
# the labels table, and 900 of them took 2.7 s a query (six at once held
# every store reader, and GET /v1/queues waited 7 s).
MAX_LABEL_FILTERS = 16

# Patterns, each with what a person is told when a value does not match.
NO_NUL = "^[^\x00]*$"
ENV_NAME = "^[A-Za-z_][A-Za-z0-9_]*$"
RESERVED_ENV = "DISPATCHER_"
IDENTIFIER = "^[_A-Za-z][_A-Za-z0-9]*$"
# An http(s) URL without credentials: no "@" before the authority ends (at
# the first "/", "?" or "#").  The fetch would never send them, and they
# would be kept with the job for whoever may read it.
HTTP_URL = "^https?://[^/?#@\x00]*(?:[/?#][^\x00]*)?$"
SHA256 = "^[0-9a-fA-F]{64}$"
# A relative path (no leading /) naming a file (not ending in /, some part
# neither empty nor "."), with no ".." part and no NUL.
INPUT_PATH = (
    r"^(?!/)(?!(?:.*/)?\.\.(?:/|$))(?=(?:.*/)?(?:[^/.]|\.[^/]))[^\x00]*[^/\x00]$"
)
# An RFC 3339 time with its zone (Z or an offset), from 1970 to 9998.
# A lease token (dispatcher.wire._tokens): the lease's fencing counter, a
# dot, and 128 bits of its MAC in base64url.  Workers send it back as they
# were given it; they need not know its form.
LEASE_TOKEN = r"^[1-9][0-9]{0,18}\.[A-Za-z0-9_-]{22}$"
ZONED_TIME = (
    r"^(?:19[7-9]\d|[2-8]\d{3}|9[0-8]\d\d|99[0-8]\d|999[0-8])-(?:0[1-9]|1[0-2])"
    r"-(?:0[1-9]|[12]\d|3[01])[Tt ](?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d(?:\.\d{1,6})?"
    r"(?:[Zz]|[+-](?:[01]\d|2[0-3]):[0-5]\d)$"
)

PATTERN_MESSAGES = {
    NO_NUL: "must not contain a NUL character",
    ENV_NAME: "not a valid environment variable name",
    IDENTIFIER: "not a valid Python argument name (ASCII letters, digits, _)",
    HTTP_URL: "only http:// and https:// URLs without credentials (user:password@) "
    "are allowed",
    SHA256: "expected 64 hexadecimal digits",
    INPUT_PATH: "must be a relative path (no leading /) naming a file (not ending "
    "in /), with no '..' part",
    LEASE_TOKEN: "not a lease token: send the token as the lease's grant gave it",
    ZONED_TIME: "expected an RFC 3339 time with its zone, such as "
    "2026-11-25T13:00:00Z or 2026-11-25T14:00:00+01:00 (1970 to 9998)",
}

# Strings.
Text = Annotated[str, Meta(pattern=NO_NUL)]
NonEmpty = Annotated[str, Meta(min_length=1, pattern=NO_NUL)]
ShortName = Annotated[str, Meta(min_length=1, max_length=MAX_NAME, pattern=NO_NUL)]
LabelKey = Annotated[str, Meta(min_length=1, max_length=MAX_LABEL, pattern=NO_NUL)]
LabelValue = Annotated[str, Meta(max_length=MAX_LABEL, pattern=NO_NUL)]
LabelMap = dict[LabelKey, LabelValue]
EnvName = Annotated[
    str,
    Meta(
        pattern=ENV_NAME,
        extra_json_schema={"not": {"pattern": f"^{RESERVED_ENV}"}},
        description=f"An environment variable name; names starting {RESERVED_ENV} "
        "are reserved.",
    ),
]
Identifier = Annotated[str, Meta(pattern=IDENTIFIER)]
Seconds = Annotated[float, Meta(ge=0, le=MAX_SECONDS)]
Time = Annotated[str, Meta(extra_json_schema={"format": "date-time"})]

# Integers and numbers.
Priority = Annotated[int, Meta(ge=-MAX_PRIORITY, le=MAX_PRIORITY)]
Cpus = Annotated[float, Meta(ge=0, le=MAX_CPUS, description="Fractions allowed.")]
MemoryMb = Annotated[int, Meta(ge=0, le=MAX_MEMORY_MB, description="MiB.")]
Gpus = Annotated[int, Meta(ge=0, le=MAX_GPUS)]
Token = Annotated[
    str,
    Meta(
        pattern=LEASE_TOKEN,
        description="The lease's token: opaque to the worker, which sends it "
        "back as it was given.  It cannot be guessed: a token the dispatcher did "
        "not give is refused as a stale one is.",
    ),
]


class _In(Struct, forbid_unknown_fields=True):
    """
    A shape a client or a worker sends: an unknown field is refused.
    """


class _Out(Struct):
    """
    A shape the dispatcher answers; a reader ignores fields it does not
    know, so that answers may grow.
    """


# Submissions

class Resources(_In):
    """
    CPUs, memory and GPUs, each 0 when not given.
    """

    cpus: Cpus = 0.0
    memory_mb: MemoryMb = 0
    gpus: Gpus = 0


class InputFile(_In):
    """
    An input file of a job: fetched from C{url} to C{path} (relative to
    the job's working directory) before the job starts, and checked
    against C{sha256} when given.
    """

    url: Annotated[str, Meta(min_length=1, pattern=HTTP_URL)]
    path: Annotated[
        str,
        Meta(
            pattern=INPUT_PATH,
            description="Relative to the job's working directory; names a file; "
            "no '..' part.",
        ),
    ]
    sha256: Optional[Annotated[str, Meta(pattern=SHA256)]] = None


# An argument of a command: checked for NUL by the submission's checks (a
# join and one search over the whole argv), not by a pattern per argument,
# which was most of a plain batch's decoding time.
Argument = Annotated[str, Meta(extra_json_schema={"pattern": NO_NUL})]
Command = Annotated[
    list[Argument],
    Meta(
        min_length=1,
        description="argv; never run through a shell. The program (the first) "
        "is not empty.",
        # (In JSON Schema 2020-12, items covers only what follows
        # prefixItems: the program's schema is whole here.)
        extra_json_schema={
            "prefixItems": [{"type": "string", "minLength": 1, "pattern": NO_NUL}]
        },
    ),
]
# Checked after decoding (JSON Schema cannot bound nesting): said here.
_NESTING = (
    f"Arrays and objects in it nest at most {MAX_NESTING} deep (not expressible "
    "in JSON Schema; a deeper value is refused with a 400)."
)
TaskArgs = Annotated[
    list[Any], Meta(description=f"Task jobs only: the positional arguments. {_NESTING}")
]
TaskKwargs = Annotated[
    dict[Identifier, Any],
    Meta(description=f"Task jobs only: the keyword arguments. {_NESTING}"),
]
TaskName = Annotated[str, Meta(min_length=1, pattern=NO_NUL, description="A name from [tasks].")]


# The states a job's webhook is told of when it names none: the final ones,
# in the order the job states are declared.
DEFAULT_NOTIFY_EVENTS = [state for state in JobState if state in FINAL_STATES]


class Notify(_In):
    """
    A job's webhook: each change of the job's state to one of C{events} is
    posted to C{url} as JSON (a L{JobEvent}), signed with the dispatcher's
    secret (docs/webhooks.md).
    """

    url: Annotated[
        str,
        Meta(
            min_length=1,
            max_length=MAX_URL,
            pattern=HTTP_URL,
            description="An http:// or https:// URL without credentials, posted "
            "to from the dispatcher's host; an address the fetch policy refuses "
            "(loopback, private, link-local networks and the like, unless "
            "[fetch] allow names them) is refused with a 400 naming notify.url "
            "when the URL gives it, and never connected to when its name "
            "resolves to it; so is a URL that names no host, or a port "
            "beyond 65535 (not expressible in JSON Schema).",
        ),
    ]
    events: Annotated[
        list[JobState],
        Meta(
            min_length=1,
            max_length=len(JobState),
            description="The states whose reaching is posted; by default the "
            "final ones: succeeded, failed, cancelled.",
        ),
    ] = msgspec.field(default_factory=lambda: list(DEFAULT_NOTIFY_EVENTS))


class JobSubmission(_In):
    """
    One job as a client submits it: exactly one of C{command} or C{task},
    and how it is to be scheduled.  A C{null} scheduling field means its
    default.
    """

    command: Optional[Command] = None
    task: Optional[TaskName] = None
    args: Union[TaskArgs, UnsetType] = UNSET
    kwargs: Union[TaskKwargs, UnsetType] = UNSET
    name: Optional[Annotated[str, Meta(max_length=MAX_NAME, pattern=NO_NUL)]] = None
    env: Union[
        Annotated[
            dict[EnvName, Text],
            Meta(description="Command jobs only; merged over a clean base "
                 "environment (PATH, LANG, HOME)."),
        ],
        UnsetType,
    ] = UNSET
    labels: LabelMap = {}
    inputs: Annotated[
        list[InputFile],
        Meta(description="No two go to one path, and none to a directory of "
             "another's path (staging writes each as a file); not expressible in "
             "JSON Schema, refused with a 400 naming inputs[i].path."),
    ] = []
    resources: Optional[Resources] = None
    requirements: Annotated[
        LabelMap,
        Meta(description="Worker labels that must equal these; a job runs only on "
             "a worker that has them all."),
    ] = {}
    priority: Optional[
        Annotated[Priority, Meta(description="Higher runs first. Default: the queue's.")]
    ] = None
    queue: Optional[
        Annotated[NonEmpty, Meta(description="A queue from [queue:NAME]; default 'default'.")]
    ] = None
    timeout: Optional[
        Annotated[float, Meta(gt=0, le=MAX_SECONDS, description="Seconds of wall time.")]
    ] = None
    max_attempts: Optional[Annotated[int, Meta(ge=1, le=MAX_ATTEMPTS)]] = None
    retry_delay: Optional[Seconds] = None
    not_before: Optional[
        Annotated[str, Meta(pattern=ZONED_TIME, extra_json_schema={"format": "date-time"})]
    ] = None
    delay: Optional[
        Annotated[Seconds, Meta(description="Seconds from now; instead of not_before.")]
    ] = None
    depends_on: Optional[
        Annotated[
            list[NonEmpty],
            Meta(max_length=MAX_DEPENDENCIES,
                 description="Job ids or array ids that must succeed first."),
        ]
    ] = None
    array: Optional[
        Annotated[int, Meta(ge=1, description="Make this many jobs of the spec "
                            "(at most [dispatcher] max_array). Each member stores the "
                            "whole spec: the members of one request's arrays store at "
                            "most [dispatcher] max_stored_bytes in all, each counted as "
                            "the job's JSON as submitted (compact, every field; not "
                            "expressible in JSON Schema, refused with a 400 naming "
                            "array, or jobs for a batch's total).")]
    ] = None
    notify: Annotated[
        Optional[Notify],
        Meta(description="A webhook: where to post the job's changes of state. "
             "Refused with a 400 naming notify while the dispatcher has no "
             "[webhooks] secret_file to sign them with."),
    ] = None


class BatchJob(JobSubmission):
    """
    A job of a batch: as L{JobSubmission}, and C{depends_on} may name an
    earlier job of the same batch by its index.
    """

    depends_on: Optional[
        Annotated[
            list[Union[NonEmpty, Annotated[int, Meta(ge=0)]]],
            Meta(max_length=MAX_DEPENDENCIES,
                 description="Job ids, array ids, or the index of an earlier job "
                 "of this batch."),
        ]
    ] = None


class Batch(_In):
    """
    Several jobs, stored all or nothing.
    """

    jobs: Annotated[
        list[BatchJob],
        Meta(min_length=1, description="At most [dispatcher] max_array jobs, and "
             "at most max_array made in all, a job with array counting as that "
             "many (the sum is not expressible in JSON Schema; refused with a 400 "
             "naming jobs)."),
    ]


class PlainJob(_In):
    """
    A job of a batch that says only what it runs: the common bulk
    submission, decoded first and handed to the store as what it runs
    (L{dispatcher.wire._submission.plain_jobs}).  Its fields are
    L{JobSubmission}'s.
    """

    command: Optional[Command] = None
    task: Optional[TaskName] = None
    args: Union[TaskArgs, UnsetType] = UNSET
    kwargs: Union[TaskKwargs, UnsetType] = UNSET


class PlainBatch(_In):
    """
    A batch of L{PlainJob}s only.
    """

    jobs: Annotated[list[PlainJob], Meta(min_length=1)]


class RetryRequest(_In):
    """
    How to retry a job.
    """

    dependents: Annotated[
        bool, Meta(description="Also retry the jobs cancelled because of this one.")
    ] = False


# What is shown

class ResourcesView(_Out):
    """
    Resources, all three given.
    """

    cpus: float
    memory_mb: int
    gpus: int


class InputView(_Out, omit_defaults=True):
    """
    An input file as stored and shown.
    """

    url: str
    path: str
    sha256: Union[str, UnsetType] = UNSET


class Limits(_In):
    """
    The limits a command's attempt ran under, as its holder reports them
    and as the attempt shows them.
    """

    memory_mb: Annotated[
        Optional[Annotated[int, Meta(ge=1, le=MAX_MEMORY_MB)]],
        Meta(description="Its memory limit in MiB (resources.memory_mb); null: none."),
    ]
    processes: Annotated[
        Optional[Annotated[int, Meta(ge=1)]],
        Meta(description="The most processes and threads it could have "
             "([executor] max_processes of its holder); null: none."),
    ]
    enforced: Annotated[
        bool,
        Meta(description="Whether these limits held: the attempt ran in cgroups of "
             "its own, which bounded them and killed every process it left at its "
             "end (exit, cancel, timeout).  False on a host that does not allow "
             "it (README, 'What a job is held to')."),
    ]


# The streams of a job's log.
LogStream = Literal["stdout", "stderr"]
LogCut = Annotated[
    list[LogStream],
    Meta(description="The streams of its log cut at [executor] max_log_bytes: the "
         "rest was dropped, and a marker line in the log says where."),
]


class AttemptView(_Out):
    """
    One try at running a job.
    """

    number: Annotated[int, Meta(ge=1)]
    holder: str
    started_at: Optional[Time]
    finished_at: Optional[Time]
    exit_code: Optional[int]
    error: Optional[str]
    limits: Annotated[
        Optional[Limits],
        Meta(description="A command's attempt that ran: the limits it ran under; "
             "null otherwise."),
    ] = None
    log_cut: LogCut = msgspec.field(default_factory=list)


_SPEC = attrs.fields(JobSpec)


class JobView(_Out):
    """
    A job as the API shows it.  A command job has C{command} and C{env}, a
    task job C{task}, C{args} and C{kwargs}.
    """

    id: str
    state: JobState
    name: Optional[str]
    labels: dict[str, str]
    created_at: Time
    started_at: Optional[Time]
    finished_at: Optional[Time]
    exit_code: Optional[
        Annotated[int, Meta(description="Negative: the signal that killed it.")]
    ]
    result: Annotated[Any, Meta(description="Task jobs: the function's return value.")]
    error: Optional[str]
    wait_reason: Optional[
        Annotated[str, Meta(description="Why a pending or queued job waits.")]
    ]
    attempts: list[AttemptView]
    worker: Optional[
        Annotated[str, Meta(description="The holder of the job's latest attempt.")]
    ]
    owner: Optional[
        Annotated[
            PrincipalName,
            Meta(description="The principal that submitted it; null for a job "
                 "stored before jobs had owners."),
        ]
    ]
    command: Union[list[str], UnsetType] = UNSET
    env: Union[dict[str, str], UnsetType] = UNSET
    task: Union[str, UnsetType] = UNSET
    args: Union[list[Any], UnsetType] = UNSET
    kwargs: Union[dict[str, Any], UnsetType] = UNSET
    inputs: list[InputView] = msgspec.field(default_factory=list)
    # A spec's own defaults, written once, in the model.
    priority: int = _SPEC.priority.default
    queue: str = _SPEC.queue.default
    timeout: Optional[float] = _SPEC.timeout.default
    max_attempts: int = _SPEC.max_attempts.default
    retry_delay: float = _SPEC.retry_delay.default
    not_before: Optional[Time] = None
    depends_on: list[str] = msgspec.field(default_factory=list)
    array_id: Optional[str] = _SPEC.array_id.default
    array_index: Optional[int] = _SPEC.array_index.default
    batch_id: Optional[
        Annotated[str, Meta(description="The batch (POST /v1/jobs/batch) it was "
                            "submitted in; GET /v1/batches/{id} shows it whole.")]
    ] = _SPEC.batch_id.default
    resources: ResourcesView = msgspec.field(
        default_factory=lambda: ResourcesView(
            NO_RESOURCES.cpus, NO_RESOURCES.memory_mb, NO_RESOURCES.gpus
        )
    )
    requirements: dict[str, str] = msgspec.field(default_factory=dict)
    notify: Optional[Notify] = None


class JobSummary(_Out, omit_defaults=True):
    """
    A job a request made, unless the whole job was asked for: its id and
    state, and its place in its array if it has one.
    """

    id: str
    state: JobState
    array_id: Union[str, UnsetType] = UNSET
    array_index: Union[int, UnsetType] = UNSET
    batch_id: Union[str, UnsetType] = UNSET


class JobGroup(_Out):
    """
    An array (the members one submission's C{array} made) or a batch (the
    jobs of one C{POST /v1/jobs/batch}), as its members stand.
    """

    id: str
    kind: Literal["array", "batch"]
    owner: Optional[
        Annotated[str, Meta(description="The principal that submitted it; null for "
                            "jobs stored before jobs had owners.")]
    ]
    created_at: Time
    size: Annotated[int, Meta(ge=1, description="How many members it has.")]
    counts: Annotated[
        dict[JobState, Annotated[int, Meta(ge=0)]],
        Meta(description="Every state, with its number of members."),
    ]
    finished: Annotated[
        int, Meta(ge=0, description="How many members are final (succeeded, failed, "
                  "cancelled).")
    ]
    final: Annotated[bool, Meta(description="Whether every member is final.")]
    succeeded: Annotated[bool, Meta(description="Whether every member succeeded.")]


class SubmittedJobs(_Out):
    """
    The jobs a batch (or an array) made, in order, as the client reads
    them: each one's id and state and its place in its array.  The served
    document's C{SubmittedJobs} also allows each job whole (C{Prefer:
    return=representation}); a whole job has every field read here.
    """

    jobs: list[JobSummary]
    batch_id: Annotated[
        Optional[str], Meta(description="A batch's id (null for an array).")
    ] = None


# The events of GET /v1/events (the data of each Server-Sent Event).

class JobEvent(_Out):
    """
    A job's committed change of state (event type C{job}).
    """

    id: int
    at: Time
    job_id: str
    state: JobState
    previous: Optional[JobState]
    owner: Optional[str]
    queue: str
    name: Optional[str]
    array_id: Optional[str] = None
    batch_id: Optional[str] = None
    attempt: Optional[int] = None
    exit_code: Optional[int] = None
    error: Optional[str] = None


class WorkerEvent(_Out):
    """
    A remote worker connected or left (event type C{worker}).
    """

    id: int
    at: Time
    worker: str
    change: Literal["connected", "left"]


class EventsDropped(_Out):
    """
    The subscriber fell too far behind and its stream ends (event type
    C{dropped}): it resumes after C{id}.
    """

    id: int
    reason: str


class EventsReset(_Out):
    """
    The events asked for are older than those kept (event type C{reset},
    sent first): the oldest kept is C{oldest}; re-list to catch up.
    """

    oldest: int


class JobPage(_Out):
    """
    A page of jobs.
    """

    jobs: list[JobView]
    next_cursor: Annotated[
        Optional[str],
        Meta(description="Give it as cursor for the next page; null on the last. A "
             "page with filters may hold fewer jobs than limit, even none, and still "
             "give one: follow it until it is null."),
    ]


class Health(_Out):
    """
    The daemon serves.
    """

    status: Literal["ok"]


class QueueView(_Out):
    """
    One queue: its jobs by state, its running jobs against its limit.
    """

    counts: dict[str, int]
    running: int
    max_running: Optional[int]


class QueueList(_Out):
    """
    The queues by name.
    """

    queues: dict[str, QueueView]


class JobEvent(_Out):
    """
    A change of a job's state, as committed: what a webhook is posted
    (and the C{job} event's data).
    """

    id: Annotated[
        int,
        Meta(ge=1, description="The event's own number, increasing; a webhook's "
             "Dispatcher-Event-Id, the same for each try of one delivery."),
    ]
    at: Annotated[Time, Meta(description="When the change was committed.")]
    job_id: str
    state: JobState
    previous: Annotated[
        Optional[JobState], Meta(description="The state before; null: the job was made.")
    ]
    owner: Optional[str]
    queue: str
    name: Optional[str]
    array_id: Optional[str]
    batch_id: Optional[str]
    attempt: Annotated[
        Optional[int],
        Meta(description="The number of the job's latest attempt; null: none yet."),
    ]
    exit_code: Optional[int]
    error: Optional[str]


class ErrorDetail(_Out, omit_defaults=True):
    """
    What was wrong: a stable code, a message for a person, the field at
    fault (or C{null}).
    """

    code: str
    message: str
    field: Optional[str]
    size: Union[
        Annotated[int, Meta(ge=0, description="offset_past_end only: the stream's "
                            "size; send from there.")],
        UnsetType,
    ] = UNSET
    retry_after: Union[
        Annotated[int, Meta(ge=1, description="A 429 only: seconds to wait before "
                            "trying again, as its Retry-After header says.")],
        UnsetType,
    ] = UNSET


class Error(_Out):
    """
    Every error answer.
    """

    error: ErrorDetail


# The worker protocol (docs/worker-protocol.md)

class WorkerOffer(_In):
    """
    A worker, as it describes itself in every request; the latest
    description counts.
    """

    name: Annotated[ShortName, Meta(description="Unique per worker process.")]
    slots: Annotated[int, Meta(ge=1, le=MAX_SLOTS, description="Jobs it runs at once.")]
    cpus: Cpus = 0.0
    memory_mb: MemoryMb = 0
    gpus: Gpus = 0
    labels: Annotated[
        LabelMap,
        Meta(max_length=MAX_WORKER_LABELS, description="Matched against jobs' requirements."),
    ] = {}
    tasks: Annotated[
        list[Annotated[str, Meta(min_length=1, max_length=MAX_TASK_NAME, pattern=NO_NUL)]],
        Meta(max_length=MAX_WORKER_TASKS, description="The task names it can run."),
    ] = []
    instance: Optional[
        Annotated[ShortName, Meta(description="The worker process's own random id.")]
    ] = None
    # Left out rather than sent as 0: a dispatcher older than the field
    # refuses it by name, and the worker then goes without.
    prefetch: Union[
        Annotated[
            int,
            Meta(
                ge=0,
                le=MAX_SLOTS,
                description="Leases it may hold beyond its slots, their jobs "
                "started as slots free (absent: none).",
            ),
        ],
        UnsetType,
    ] = UNSET


class LeaseHeld(_In):
    """
    A lease the worker holds, as a request for work lists it.
    """

    job_id: ShortName
    token: Token


class LeaseRequest(_In):
    """
    Ask for work (a long-poll).
    """

    worker: WorkerOffer
    max_jobs: Optional[
        Annotated[int, Meta(ge=1, le=MAX_SLOTS, description="How many jobs it can "
                            "take now, up to its slots and prefetch (its slots the "
                            "default).  A poll is "
                            "granted at most [workers] max_jobs_per_poll.")]
    ] = None
    wait: Annotated[
        float, Meta(ge=0, le=MAX_WAIT, description="Seconds to hold the request "
                    "open when nothing fits.")
    ] = DEFAULT_WAIT
    # Left out rather than null when not sent: a dispatcher older than the
    # field refuses it by name, and the worker then asks without it.
    held: Union[
        Annotated[
            list[LeaseHeld],
            Meta(
                max_length=MAX_ITEMS,
                description="Every lease the worker process holds: one granted "
                "to it and not listed never reached it, and goes back to the "
                "queue unspent (absent: it does not say, nothing is released).",
            ),
        ],
        UnsetType,
    ] = UNSET


class HeartbeatItem(_In, omit_defaults=True):
    """
    A lease the worker holds (C{running} is sent only when true).
    """

    job_id: ShortName
    token: Token
    running: Annotated[
        bool, Meta(description="The job has started: a staging job becomes running.")
    ] = False


class HeartbeatRequest(_In):
    """
    Renew leases.
    """

    worker: WorkerOffer
    leases: Annotated[list[HeartbeatItem], Meta(max_length=MAX_ITEMS)]


class ResultItem(_In):
    """
    How an attempt ended (C{released}: given back unrun).
    """

    job_id: ShortName
    token: Token
    state: Literal["succeeded", "failed", "released"]
    exit_code: Optional[Annotated[int, Meta(ge=-MAX_EXIT_CODE, le=MAX_EXIT_CODE)]] = None
    result: Annotated[
        Any,
        Meta(description=f"A task's return value: at most {MAX_RESULT_BYTES} bytes "
             f"as JSON (compact, UTF-8), a larger one refused with a 400 naming "
             f"results[i].result. {_NESTING} A worker fails a job whose result JSON "
             "cannot carry (NaN, a set, two keys written alike), or that is larger, "
             "rather than report it."),
    ] = None
    error: Optional[str] = None
    stopped: Annotated[bool, Meta(description="The worker stopped it (a cancel).")] = False
    # Left out rather than null when not known: a dispatcher older than the
    # fields refuses them by name, and the worker then reports without.
    limits: Union[
        Annotated[Limits, Meta(description="A command: the limits it ran under.")],
        UnsetType,
    ] = UNSET
    log_cut: Union[LogCut, UnsetType] = UNSET


class ResultsRequest(_In):
    """
    Report how attempts ended, and (with C{max_jobs}) ask for more work in
    the same round trip: the answer then grants leases as a request for
    work's does, once the results have been recorded, without waiting.
    """

    worker: WorkerOffer
    results: Annotated[list[ResultItem], Meta(max_length=MAX_ITEMS)]
    # Left out rather than null when not asking: a dispatcher older than
    # the field refuses it by name, and the worker then asks apart.
    max_jobs: Union[
        Annotated[int, Meta(ge=1, le=MAX_SLOTS, description="Ask for up to this "
                            "many new leases once these results are recorded (its "
                            "slots free then, these results' included; at most "
                            "worker.slots and worker.prefetch).  The answer is not held open: it grants "
                            "what is queued for the worker, maybe nothing.  A "
                            "request for work, like one to /v1/leases: the worker "
                            "has no other open at the same time.")],
        UnsetType,
    ] = UNSET
    held: Union[
        Annotated[
            list[LeaseHeld],
            Meta(
                max_length=MAX_ITEMS,
                description="With max_jobs: every lease the worker process holds, "
                "as in a request for work (these results' leases may be listed "
                "or not).  Ignored without max_jobs.",
            ),
        ],
        UnsetType,
    ] = UNSET


class LeaseSpec(_Out):
    """
    What a lease runs.  C{env}, C{inputs}, C{resources} and
    C{requirements} are left out when empty.
    """

    name: Optional[str]
    labels: dict[str, str]
    timeout: Optional[float]
    array_id: Optional[str]
    array_index: Optional[int]
    command: Union[list[str], UnsetType] = UNSET
    env: Union[dict[str, str], UnsetType] = UNSET
    task: Union[str, UnsetType] = UNSET
    args: Union[list[Any], UnsetType] = UNSET
    kwargs: Union[dict[str, Any], UnsetType] = UNSET
    inputs: Union[list[InputView], UnsetType] = UNSET
    resources: Union[ResourcesView, UnsetType] = UNSET
    requirements: Union[dict[str, str], UnsetType] = UNSET


class LeaseGrant(_Out):
    """
    A lease as a worker gets it: everything it needs to run the attempt,
    and the fencing token its every write must carry.
    """

    job_id: str
    attempt: Annotated[int, Meta(ge=1)]
    token: Token
    holder: str
    expires_at: Annotated[
        Time, Meta(description="On the dispatcher's clock; the worker heartbeats "
                   "every heartbeat_seconds instead of comparing clocks.")
    ]
    spec: LeaseSpec
    owner: Annotated[
        Optional[str],
        Meta(description="The job's owner: a worker running as root runs its "
             "command as the account its [run_as] map gives this owner. null: "
             "stored before jobs had owners."),
    ] = None


FenceSeconds = Annotated[
    float,
    Meta(
        ge=0,
        description="Seconds from when the worker sent this request until "
        "it must have stopped the jobs whose leases the answer granted or "
        "renewed, unless a later request renews them: the dispatcher's "
        "fence margin before their expiry (0: not given).",
    ),
]


class LeaseAnswer(_Out):
    """
    The leases granted (maybe none), and the timing to keep.
    """

    leases: list[LeaseGrant]
    lease_seconds: Annotated[
        float, Meta(description="A lease lives this long after the last heartbeat.")
    ]
    heartbeat_seconds: Annotated[float, Meta(description="How often to heartbeat.")]
    fence_seconds: FenceSeconds = 0.0


class LeaseStatus(_Out, omit_defaults=True):
    """
    The answer for one lease of a heartbeat or a report: C{ok} with the
    new expiry (a heartbeat), or refused (the lease is not current:
    nothing was written; the worker stops the job and forgets the lease).
    """

    job_id: str
    token: str
    ok: bool
    expires_at: Union[Time, UnsetType] = UNSET
    status: Union[Literal[409], UnsetType] = UNSET
    reason: Union[Literal["cancelled", "expired", "reported", "superseded"], UnsetType] = UNSET
    message: Union[str, UnsetType] = UNSET


class HeartbeatAnswer(_Out):
    """
    One answer per lease sent, in order.
    """

    leases: list[LeaseStatus]
    lease_seconds: float
    heartbeat_seconds: float
    fence_seconds: FenceSeconds = 0.0


class ResultsAnswer(_Out):
    """
    One answer per result sent, in order; with the request's C{max_jobs},
    the leases granted (maybe none) and the timing to keep, as a
    L{LeaseAnswer}'s.
    """

    results: list[LeaseStatus]
    leases: list[LeaseGrant] = []
    lease_seconds: float = 0.0
    heartbeat_seconds: float = 0.0
    fence_seconds: FenceSeconds = 0.0


class LogWritten(_Out):
    """
    A log chunk was written.
    """

    size: Annotated[int, Meta(ge=0, description="The stream's size now.")]


class FreeCapacity(_Out):
    """
    What a worker has free; no lower bound, since after a restart running
    leases count against an offer of nothing until the worker calls again.
    """

    slots: int
    cpus: float
    memory_mb: int
    gpus: int


class WorkerView(_Out):
    """
    A worker heard from within a lease's life.
    """

    name: str
    slots: int
    resources: ResourcesView
    labels: dict[str, str]
    tasks: list[str]
    free: FreeCapacity
    running: Annotated[list[str], Meta(description="The ids of the jobs it holds.")]
    waiting_for_work: bool
    last_contact: Time
    name_shared: Annotated[
        bool, Meta(description="Another process called under this name within "
                   "lease_seconds: give each its own name.")
    ]
    prefetch: Annotated[
        int, Meta(description="Leases it may hold beyond its slots (the free "
                  "slots count them).")
    ] = 0


class WorkerList(_Out):
    """
    The workers, and the timing they keep.
    """

    workers: list[WorkerView]
    lease_seconds: float
    heartbeat_seconds: float



# Credentials (docs/security.md)

PrincipalName = Annotated[
    str,
    Meta(
        pattern=PRINCIPAL_NAME_PATTERN,
        min_length=1,
        max_length=MAX_PRINCIPAL_NAME,
        description=f"A credential's name, and the owner of the jobs it submits: {PRINCIPAL_NAME_RULE}.",
    ),
]


class CredentialRequest(_In):
    """
    A credential to make.
    """

    name: PrincipalName
    role: Role
    worker_names: Optional[
        Annotated[
            list[PrincipalName],
            Meta(
                min_length=1,
                max_length=MAX_WORKER_NAMES,
                description="For a worker credential: the worker names it may act "
                "under (by default its own name alone).",
            ),
        ]
    ] = None


class CredentialView(_Out):
    """
    A credential as kept: never its token.
    """

    name: str
    role: Role
    worker_names: Optional[list[str]]
    created_at: Time


class CredentialCreated(CredentialView):
    """
    A credential just made, with its token: shown this once, and kept
    nowhere but as a hash.
    """

    token: str


class CredentialList(_Out):
    """
    The credentials of the credentials file, in the order they were made
    (the token files' are not listed).
    """

    credentials: list[CredentialView]


class Identity(_Out):
    """
    Who the caller is to this dispatcher.
    """

    name: str
    role: Role
    worker_names: Optional[list[str]]


# The dashboard's sessions (/ui/session, dispatcher.api._dashboard).

# The longest token a login may carry: a credential's is 47 characters; a
# token file's may be longer, and no credential is near this.
MAX_LOGIN_TOKEN = 512


class LoginRequest(_In):
    """
    A login to the dashboard: a credential's token, as C{Authorization:
    Bearer} would carry it.
    """

    token: Annotated[str, Meta(min_length=1, max_length=MAX_LOGIN_TOKEN)]


class SessionView(_Out):
    """
    Who a dashboard's caller is, and the CSRF token its writes must send
    (C{X-CSRF-Token}) while its session cookie authenticates them.
    """

    name: str
    role: Role
    csrf_token: Annotated[
        Optional[str],
        Meta(description="The session's CSRF token; null when the caller is "
             "not authenticated by the session cookie (a bearer token, or "
             "authentication off)."),
    ]
    expires_at: Annotated[
        Optional[Time],
        Meta(description="When the session ends at the latest; null without one."),
    ]
    authentication: Annotated[
        bool, Meta(description="Whether the dispatcher needs a credential at all.")
    ]


# Events (GET /v1/events): each event's data, one JSON line.

class JobEventData(_Out):
    """
    The data of a C{job} event: a job's committed change of state.
    C{owner}, C{queue}, C{name}, C{array_id} and C{batch_id} are null for
    a job removed before a stored event was read.
    """

    id: Annotated[int, Meta(description="The event's id, as its id: line says.")]
    at: Time
    job_id: str
    state: JobState
    previous: Optional[
        Annotated[JobState, Meta(description="The state it left; null for a new job.")]
    ]
    owner: Optional[str]
    queue: Optional[str]
    name: Optional[str]
    array_id: Optional[str]
    batch_id: Optional[str]
    attempt: Optional[
        Annotated[int, Meta(description="The attempt a claim, a start or an end "
                            "belongs to.")]
    ]
    exit_code: Optional[int]
    error: Optional[str]


class WorkerEventData(_Out):
    """
    The data of a C{worker} event: a remote worker connected (heard from
    while it was not) or left (no request open, and none for a lease's
    life).
    """

    id: int
    at: Time
    worker: str
    change: Literal["connected", "left"]


class DroppedEventData(_Out):
    """
    The data of a C{dropped} event, the stream's last: the subscriber fell
    too far behind ([events] buffer); it resumes with after = C{id}, the
    last id it was sent.
    """

    id: int
    reason: Literal["too_far_behind"]


class ResetEventData(_Out):
    """
    The data of a C{reset} event, sent first when the id resumed after is
    older than the events kept ([events] retention), or newer than any:
    events were missed, so re-list the jobs to catch up.  The stream goes
    on from C{oldest}, the oldest event kept.
    """

    oldest: int

