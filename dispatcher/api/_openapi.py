"""
The OpenAPI 3.1 document of the API, served at C{/v1/openapi.json}.  The
tests check the server's answers against the schemas here.
"""

from __future__ import annotations

from typing import Any

from dispatcher.model._jobs import JobState

_TIME = {"type": ["string", "null"], "format": "date-time"}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
# Submitted labels and requirements: keys of 1 to 200 characters, values of
# at most 200 (dispatcher.wire._submission.MAX_LABEL).
_LABEL_MAP = {
    "type": "object",
    "propertyNames": {"minLength": 1, "maxLength": 200},
    "additionalProperties": {"type": "string", "maxLength": 200},
}
_WORKER_PATHS = ("/v1/leases", "/v1/leases/heartbeat", "/v1/leases/results", "/v1/leases/log")
_OPEN_PATHS = ("/healthz", "/v1/openapi.json")


def _error_response(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}
        },
    }


def _json_response(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_request(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _unauthorized(description: str) -> dict[str, Any]:
    return {
        **_error_response(description),
        "headers": {
            "WWW-Authenticate": {
                "schema": {"const": 'Bearer realm="dispatcher"'},
            }
        },
    }


def _secure(paths: dict[str, Any]) -> None:
    """
    Mark every operation with the token it needs, as
    C{DispatcherAPI._authorize} decides it: by path.
    """
    for path, operations in paths.items():
        for operation in operations.values():
            responses = operation["responses"]
            if path in _WORKER_PATHS:
                operation["security"] = [{"bearer": []}]
                responses["401"] = _unauthorized(
                    "The workers' token ([workers] token_file) is missing or wrong."
                )
                responses["403"] = _error_response(
                    "workers_disabled: this dispatcher has no [workers] token_file."
                )
            elif path in _OPEN_PATHS:
                operation["security"] = []
            else:
                operation["security"] = [{}, {"bearer": []}]
                responses["401"] = _unauthorized(
                    "[api] token_file is set and its token is missing or wrong."
                )


def _job_response(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/Job"}}
        },
    }


_JOB_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "The job's id (a UUIDv7).",
}


def openapi_document() -> dict[str, Any]:
    """
    The document, as a JSON-able dict.
    """
    resources_schema = {
        "type": "object",
        "additionalProperties": False,
        "description": "CPUs, memory and GPUs, each 0 when not given.",
        "properties": {
            "cpus": {"type": "number", "minimum": 0, "maximum": 1000000,
                     "description": "Fractions allowed."},
            "memory_mb": {"type": "integer", "minimum": 0, "maximum": 1 << 40,
                          "description": "MiB."},
            "gpus": {"type": "integer", "minimum": 0, "maximum": 100000},
        },
    }
    input_schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["url", "path"],
        "properties": {
            "url": {"type": "string", "pattern": "^https?://"},
            "path": {
                "type": "string",
                "description": "Relative to the job's working directory; no '..'.",
            },
            "sha256": {"type": ["string", "null"], "pattern": "^[0-9a-fA-F]{64}$"},
        },
    }
    submit_schema = {
        "type": "object",
        "additionalProperties": False,
        "description": "Exactly one of command or task.",
        "properties": {
            "command": {
                "type": "array",
                "minItems": 1,
                "items": {"type": "string"},
                "description": "argv; never run through a shell.",
            },
            "task": {"type": "string", "description": "A name from [tasks]."},
            "args": {"type": "array", "description": "Task jobs only."},
            "kwargs": {"type": "object", "description": "Task jobs only."},
            "name": {"type": "string", "maxLength": 200},
            "env": {
                **_STRING_MAP,
                "description": "Command jobs only; merged over a clean base "
                "environment (PATH, LANG, HOME).",
            },
            "labels": _LABEL_MAP,
            "inputs": {"type": "array", "items": input_schema},
            "resources": {
                **_ref("Resources"),
                "description": "What the job needs of its holder while it runs, "
                "besides one slot; a job that asks for nothing needs one slot only.",
            },
            "requirements": {
                **_LABEL_MAP,
                "description": "Worker labels that must equal these; a job runs "
                "only on a worker that has them all.",
            },
            "priority": {
                "type": "integer",
                "minimum": -1000000,
                "maximum": 1000000,
                "description": "Higher runs first; first in, first out within a "
                "priority. Default: the queue's priority (0).",
            },
            "queue": {
                "type": "string",
                "description": "A queue from [queue:NAME]; default 'default'.",
            },
            "timeout": {
                "type": "number",
                "exclusiveMinimum": 0,
                "description": "Seconds of wall time; past it the process group "
                "gets SIGTERM, then SIGKILL after [executor] kill_grace.",
            },
            "max_attempts": {"type": "integer", "minimum": 1, "maximum": 100},
            "retry_delay": {
                "type": "number",
                "minimum": 0,
                "description": "Seconds before the first retry; doubled for each "
                "further one, with jitter.",
            },
            "not_before": {"type": "string", "format": "date-time"},
            "delay": {
                "type": "number",
                "minimum": 0,
                "description": "Seconds from now; instead of not_before.",
            },
            "depends_on": {
                "type": "array",
                "maxItems": 1000,
                "items": {"type": ["string", "integer"]},
                "description": "Job ids or array ids (all members) that must "
                "succeed first; in a batch, an integer names an earlier job of it.",
            },
            "array": {
                "type": "integer",
                "minimum": 1,
                "description": "Make this many jobs of the spec; each gets "
                "array_index and DISPATCHER_ARRAY_INDEX.",
            },
        },
        "oneOf": [{"required": ["command"]}, {"required": ["task"]}],
    }
    attempt_schema = {
        "type": "object",
        "required": ["number", "holder", "started_at", "finished_at", "exit_code", "error"],
        "properties": {
            "number": {"type": "integer", "minimum": 1},
            "holder": {"type": "string"},
            "started_at": _TIME,
            "finished_at": _TIME,
            "exit_code": {"type": ["integer", "null"]},
            "error": {"type": ["string", "null"]},
        },
    }
    job_schema = {
        "type": "object",
        "required": [
            "id", "state", "name", "labels", "created_at", "started_at",
            "finished_at", "exit_code", "result", "error", "wait_reason", "attempts",
            "worker", "resources", "requirements",
        ],
        "properties": {
            "id": {"type": "string"},
            "state": {"enum": [s.value for s in JobState]},
            "name": {"type": ["string", "null"]},
            "labels": _STRING_MAP,
            "created_at": {"type": "string", "format": "date-time"},
            "started_at": _TIME,
            "finished_at": _TIME,
            "exit_code": {
                "type": ["integer", "null"],
                "description": "Command jobs; negative: the signal that killed it.",
            },
            "result": {"description": "Task jobs: the function's return value."},
            "error": {"type": ["string", "null"]},
            "wait_reason": {
                "type": ["string", "null"],
                "description": "Why a pending or queued job waits: for jobs to "
                "succeed, for a time, for a free slot, or, when no holder could "
                "ever run it, why (\"no worker is connected ...\", \"no connected "
                "worker can take it: ...\").",
            },
            "attempts": {"type": "array", "items": attempt_schema},
            "command": {"type": "array", "items": {"type": "string"}},
            "env": _STRING_MAP,
            "task": {"type": "string"},
            "args": {"type": "array"},
            "kwargs": {"type": "object"},
            "inputs": {"type": "array", "items": input_schema},
            "priority": {"type": "integer"},
            "queue": {"type": "string"},
            "timeout": {"type": ["number", "null"]},
            "max_attempts": {"type": "integer"},
            "retry_delay": {"type": "number"},
            "not_before": _TIME,
            "depends_on": {"type": "array", "items": {"type": "string"}},
            "array_id": {"type": ["string", "null"]},
            "array_index": {"type": ["integer", "null"]},
            "resources": {
                **_ref("Resources"),
                "required": ["cpus", "memory_mb", "gpus"],
            },
            "requirements": _STRING_MAP,
            "worker": {
                "type": ["string", "null"],
                "description": "The holder of the job's latest attempt: a remote "
                "worker's name or the local executor's; null before the first.",
            },
        },
    }
    error_schema = {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message", "field"],
                "properties": {
                    "code": {"type": "string"},
                    "message": {"type": "string"},
                    "field": {"type": ["string", "null"]},
                    "size": {
                        "type": "integer",
                        "minimum": 0,
                        "description": "offset_past_end only: the stream's size; "
                        "send from there.",
                    },
                },
            }
        },
    }
    worker_schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["name", "slots"],
        "description": "The worker, as it describes itself in every request; "
        "the latest description counts.",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 200,
                     "description": "Unique per worker process."},
            "slots": {"type": "integer", "minimum": 1, "maximum": 100000,
                      "description": "How many jobs it runs at once."},
            **resources_schema["properties"],
            "labels": {**_STRING_MAP,
                       "description": "Matched against jobs' requirements."},
            "tasks": {"type": "array", "items": {"type": "string"},
                      "description": "The task names it can run; default none."},
            "instance": {"type": "string", "minLength": 1, "maxLength": 200,
                         "description": "The worker process's own random id; a "
                         "second process calling under the same name within a "
                         "lease's life is logged and shown as name_shared."},
        },
    }
    lease_item = {
        "type": "object",
        "required": ["job_id", "token"],
        "properties": {
            "job_id": {"type": "string", "minLength": 1, "maxLength": 200},
            "token": {"type": "integer", "minimum": 1, "maximum": 2**63 - 1,
                      "description": "The lease's fencing token."},
        },
    }
    lease_spec = {
        "type": "object",
        "required": ["name", "labels", "timeout", "array_id", "array_index"],
        "description": "What to run. env, inputs, resources and requirements "
        "are left out when empty.",
        "properties": {
            "command": {"type": "array", "items": {"type": "string"}},
            "env": _STRING_MAP,
            "task": {"type": "string"},
            "args": {"type": "array"},
            "kwargs": {"type": "object"},
            "inputs": {"type": "array", "items": input_schema,
                       "description": "The worker stages them itself."},
            "resources": _ref("Resources"),
            "requirements": _STRING_MAP,
            "name": {"type": ["string", "null"]},
            "labels": _STRING_MAP,
            "timeout": {"type": ["number", "null"]},
            "array_id": {"type": ["string", "null"]},
            "array_index": {"type": ["integer", "null"]},
        },
        "oneOf": [
            {"required": ["command"]},
            {"required": ["task", "args", "kwargs"]},
        ],
    }
    lease_schema = {
        "type": "object",
        "required": ["job_id", "attempt", "token", "holder", "expires_at", "spec"],
        "properties": {
            "job_id": {"type": "string"},
            "attempt": {"type": "integer", "minimum": 1},
            "token": {"type": "integer", "minimum": 1,
                      "description": "The fencing token every write about the "
                      "lease carries."},
            "holder": {"type": "string"},
            "expires_at": {"type": "string", "format": "date-time",
                           "description": "On the dispatcher's clock; the worker "
                           "heartbeats every heartbeat_seconds instead of "
                           "comparing clocks."},
            "spec": lease_spec,
        },
    }
    timing = {
        "lease_seconds": {"type": "number",
                          "description": "A lease lives this long after the "
                          "last heartbeat that named it."},
        "heartbeat_seconds": {"type": "number",
                              "description": "How often to heartbeat."},
    }
    refusal_schema = {
        "type": "object",
        "required": ["job_id", "token", "ok", "status", "reason", "message"],
        "description": "The lease is not current: nothing was written; the "
        "worker stops the job (if it runs) and forgets the lease.",
        "properties": {
            "job_id": {"type": "string"},
            "token": {"type": "integer"},
            "ok": {"const": False},
            "status": {"const": 409},
            "reason": {"enum": ["cancelled", "expired", "reported", "superseded"]},
            "message": {"type": "string"},
        },
    }
    heartbeat_answer = {
        "type": "object",
        "required": ["leases", "lease_seconds", "heartbeat_seconds"],
        "properties": {
            "leases": {
                "type": "array",
                "description": "One answer per lease sent, in order.",
                "items": {
                    "oneOf": [
                        {
                            "type": "object",
                            "required": ["job_id", "token", "ok", "expires_at"],
                            "properties": {
                                "job_id": {"type": "string"},
                                "token": {"type": "integer"},
                                "ok": {"const": True},
                                "expires_at": {"type": "string", "format": "date-time"},
                            },
                        },
                        _ref("LeaseRefusal"),
                    ]
                },
            },
            **timing,
        },
    }
    results_answer = {
        "type": "object",
        "required": ["results"],
        "properties": {
            "results": {
                "type": "array",
                "description": "One answer per result sent, in order.",
                "items": {
                    "oneOf": [
                        {
                            "type": "object",
                            "required": ["job_id", "token", "ok"],
                            "properties": {
                                "job_id": {"type": "string"},
                                "token": {"type": "integer"},
                                "ok": {"const": True},
                            },
                        },
                        _ref("LeaseRefusal"),
                    ]
                },
            }
        },
    }
    # Free capacity has no lower bound: after a restart a worker's running
    # leases count against an offer of nothing until it calls again.
    free_schema = {
        "type": "object",
        "required": ["slots", "cpus", "memory_mb", "gpus"],
        "properties": {
            "slots": {"type": "integer", "minimum": 0},
            "cpus": {"type": "number"},
            "memory_mb": {"type": "integer"},
            "gpus": {"type": "integer"},
        },
    }
    connected_worker = {
        "type": "object",
        "required": [
            "name", "slots", "resources", "labels", "tasks", "free", "running",
            "waiting_for_work", "last_contact", "name_shared",
        ],
        "properties": {
            "name": {"type": "string"},
            "slots": {"type": "integer", "minimum": 0},
            "resources": {**_ref("Resources"), "required": ["cpus", "memory_mb", "gpus"]},
            "labels": _STRING_MAP,
            "tasks": {"type": "array", "items": {"type": "string"}},
            "free": free_schema,
            "running": {"type": "array", "items": {"type": "string"},
                        "description": "The ids of the jobs it holds leases on."},
            "waiting_for_work": {"type": "boolean",
                                 "description": "It has a long-poll open."},
            "last_contact": {"type": "string", "format": "date-time"},
            "name_shared": {"type": "boolean",
                            "description": "Another worker process (another "
                            "instance) called under this name within the last "
                            "lease_seconds: give each its own name."},
        },
    }
    jobs_body = {
        "description": "The jobs, in order: each one's id and state, or each "
        "whole with Prefer: return=representation.",
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/SubmittedJobs"}}
        },
    }
    prefer = {
        "name": "Prefer",
        "in": "header",
        "required": False,
        "schema": {"type": "string"},
        "description": "return=representation (RFC 7240): answer every job a request "
        "makes whole, as GET /v1/jobs/{id} shows it, rather than its id, state and "
        "place in its array. A request that makes one job gets it whole anyway.",
    }
    idempotency_key = {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "schema": {"type": "string", "minLength": 1, "maxLength": 255},
        "description": "The same key with a JSON-equal body answers 200 with the "
        "original jobs instead of making more; with another body, 409. Kept for "
        "[dispatcher] idempotency_ttl seconds.",
    }
    worker_errors = {
        "400": _error_response("A field is wrong; it is named."),
        "413": _error_response("The body is over [server] max_body_bytes."),
        "415": _error_response("The body is not application/json."),
    }
    document = {
        "openapi": "3.1.0",
        "info": {
            "title": "dispatcher",
            "version": "1",
            "description": "Submit jobs, follow them, cancel them, read their logs; "
            "remote workers lease jobs under /v1/leases (docs/worker-protocol.md). "
            "With [api] token_file set, every endpoint but /healthz, "
            "/v1/openapi.json and /v1/leases needs 'Authorization: Bearer <token>' "
            "with its token; /v1/leases endpoints always need the workers' token "
            "([workers] token_file).",
        },
        "paths": {
            "/healthz": {
                "get": {
                    "summary": "Whether the daemon serves.",
                    "responses": {
                        "200": {
                            "description": "It does.",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "required": ["status"],
                                        "properties": {"status": {"const": "ok"}},
                                    }
                                }
                            },
                        }
                    },
                }
            },
            "/v1/openapi.json": {
                "get": {
                    "summary": "This document.",
                    "responses": {"200": {"description": "The OpenAPI document."}},
                }
            },
            "/v1/jobs": {
                "post": {
                    "summary": "Submit a job (or, with array, several); answered "
                    "once durably stored.",
                    "parameters": [idempotency_key, prefer],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/JobSubmission"}
                            }
                        },
                    },
                    "responses": {
                        "200": {
                            "description": "A replay of an earlier request with the "
                            "same Idempotency-Key: its job (or jobs).",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "oneOf": [
                                            {"$ref": "#/components/schemas/Job"},
                                            {"$ref": "#/components/schemas/SubmittedJobs"},
                                        ]
                                    }
                                }
                            },
                        },
                        "201": {
                            "description": "The job (queued, or pending while it "
                            "waits), or {\"jobs\": [...]} for an array.",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "oneOf": [
                                            {"$ref": "#/components/schemas/Job"},
                                            {"$ref": "#/components/schemas/SubmittedJobs"},
                                        ]
                                    }
                                }
                            },
                            "headers": {
                                "Location": {
                                    "schema": {"type": "string"},
                                    "description": "/v1/jobs/{id}",
                                }
                            },
                        },
                        "400": _error_response("A field is wrong; it is named."),
                        "409": _error_response("The Idempotency-Key was used with another body."),
                        "413": _error_response("The body is over [server] max_body_bytes."),
                        "415": _error_response("The body is not application/json."),
                        "503": _error_response("The dispatcher is stopping; nothing was stored."),
                    },
                },
                "get": {
                    "summary": "List jobs in submission order, a page at a time.",
                    "parameters": [
                        {
                            "name": "state",
                            "in": "query",
                            "schema": {"enum": [s.value for s in JobState]},
                        },
                        {
                            "name": "label",
                            "in": "query",
                            "description": "key=value (or key: has the label); repeat to AND.",
                            "schema": {"type": "array", "items": {"type": "string"}},
                            "style": "form",
                            "explode": True,
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                        },
                        {
                            "name": "cursor",
                            "in": "query",
                            "description": "next_cursor of the previous page.",
                            "schema": {"type": "string"},
                        },
                    ],
                    "responses": {
                        "200": {
                            "description": "A page of jobs.",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "required": ["jobs", "next_cursor"],
                                        "properties": {
                                            "jobs": {
                                                "type": "array",
                                                "items": {"$ref": "#/components/schemas/Job"},
                                            },
                                            "next_cursor": {"type": ["string", "null"]},
                                        },
                                    }
                                }
                            },
                        },
                        "400": _error_response("A query parameter is wrong."),
                    },
                },
            },
            "/v1/jobs/batch": {
                "post": {
                    "summary": "Submit several jobs, all or nothing.",
                    "parameters": [idempotency_key, prefer],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["jobs"],
                                    "properties": {
                                        "jobs": {
                                            "type": "array",
                                            "minItems": 1,
                                            "items": {
                                                "$ref": "#/components/schemas/JobSubmission"
                                            },
                                        }
                                    },
                                }
                            }
                        },
                    },
                    "responses": {
                        "200": {**jobs_body, "description": "A replay (Idempotency-Key)."},
                        "201": jobs_body,
                        "400": _error_response("A field is wrong; it is named, as jobs[i].field."),
                        "409": _error_response("The Idempotency-Key was used with another body."),
                        "413": _error_response("The body is over [server] max_body_bytes."),
                        "415": _error_response("The body is not application/json."),
                    },
                }
            },
            "/v1/queues": {
                "get": {
                    "summary": "Per queue: jobs by state, and running jobs against the limit.",
                    "responses": {
                        "200": {
                            "description": "The queues.",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "required": ["queues"],
                                        "properties": {
                                            "queues": {
                                                "type": "object",
                                                "additionalProperties": {
                                                    "$ref": "#/components/schemas/Queue"
                                                },
                                            }
                                        },
                                    }
                                }
                            },
                        }
                    },
                }
            },
            "/v1/jobs/{id}/retry": {
                "post": {
                    "summary": "Put a failed or cancelled job back in line with a "
                    "fresh budget of attempts; its attempts stay in its history.",
                    "parameters": [_JOB_ID],
                    "requestBody": {
                        "required": False,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "properties": {
                                        "dependents": {
                                            "type": "boolean",
                                            "description": "Also retry the jobs "
                                            "cancelled because of this one.",
                                        }
                                    },
                                }
                            }
                        },
                    },
                    "responses": {
                        "200": _job_response("The job, queued (or pending)."),
                        "404": _error_response("No such job."),
                        "409": _error_response("The job is not failed or cancelled, "
                                               "or a job it depends on must be retried first."),
                    },
                }
            },
            "/v1/jobs/{id}": {
                "get": {
                    "summary": "One job.",
                    "parameters": [_JOB_ID],
                    "responses": {
                        "200": _job_response("The job."),
                        "404": _error_response("No such job."),
                    },
                }
            },
            "/v1/jobs/{id}/cancel": {
                "post": {
                    "summary": "Cancel a job; a running process is killed with its process group.",
                    "parameters": [_JOB_ID],
                    "responses": {
                        "200": _job_response("Cancelled."),
                        "202": _job_response("Running: it is being stopped."),
                        "404": _error_response("No such job."),
                        "409": _error_response("The job has already finished."),
                    },
                }
            },
            "/v1/jobs/{id}/log": {
                "get": {
                    "summary": "The output of the job's latest attempt; works while it runs.",
                    "parameters": [
                        _JOB_ID,
                        {
                            "name": "stream",
                            "in": "query",
                            "schema": {"enum": ["stdout", "stderr"], "default": "stdout"},
                        },
                        {
                            "name": "offset",
                            "in": "query",
                            "description": "Skip this many bytes: poll with the size "
                            "already read to follow a running job.",
                            "schema": {"type": "integer", "minimum": 0, "default": 0},
                        },
                    ],
                    "responses": {
                        "200": {
                            "description": "The text so far.",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        },
                        "400": _error_response("A query parameter is wrong."),
                        "404": _error_response("No such job."),
                    },
                }
            },
            "/v1/workers": {
                "get": {
                    "summary": "The workers heard from within a lease's life, or "
                    "waiting for work, by name.",
                    "responses": {
                        "200": _json_response("The workers.", _ref("WorkerList")),
                    },
                }
            },
            "/v1/leases": {
                "post": {
                    "summary": "Ask for work (a long-poll): answered as soon as a "
                    "job is leased, or with no leases when the wait ends.",
                    "requestBody": _json_request({
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["worker"],
                        "properties": {
                            "worker": _ref("Worker"),
                            "max_jobs": {
                                "type": "integer",
                                "minimum": 1,
                                "description": "How many jobs it can start now, up "
                                "to its slots (the default); the dispatcher caps it "
                                "further by the worker's free slots and resources.",
                            },
                            "wait": {
                                "type": "number",
                                "minimum": 0,
                                "maximum": 60,
                                "default": 30,
                                "description": "Seconds to hold the request open "
                                "when nothing fits.",
                            },
                        },
                    }),
                    "responses": {
                        "200": _json_response(
                            "The leases granted (maybe none).",
                            {
                                "type": "object",
                                "required": ["leases", "lease_seconds", "heartbeat_seconds"],
                                "properties": {
                                    "leases": {"type": "array", "items": _ref("Lease")},
                                    **timing,
                                },
                            },
                        ),
                        **worker_errors,
                    },
                }
            },
            "/v1/leases/heartbeat": {
                "post": {
                    "summary": "Renew leases, and hear which ones ended (a cancel, "
                    "an expiry).",
                    "requestBody": _json_request({
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["worker", "leases"],
                        "properties": {
                            "worker": _ref("Worker"),
                            "leases": {
                                "type": "array",
                                "maxItems": 10000,
                                "items": {
                                    **lease_item,
                                    "additionalProperties": False,
                                    "properties": {
                                        **lease_item["properties"],
                                        "running": {
                                            "type": "boolean",
                                            "default": False,
                                            "description": "The job has started: "
                                            "a staging job becomes running.",
                                        },
                                    },
                                },
                            },
                        },
                    }),
                    "responses": {
                        "200": _json_response("One answer per lease.", heartbeat_answer),
                        "409": _json_response("Every lease was refused.", heartbeat_answer),
                        **worker_errors,
                    },
                }
            },
            "/v1/leases/results": {
                "post": {
                    "summary": "Report how attempts ended; answered once the "
                    "accepted ones are stored.",
                    "requestBody": _json_request({
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["worker", "results"],
                        "properties": {
                            "worker": _ref("Worker"),
                            "results": {
                                "type": "array",
                                "maxItems": 10000,
                                "items": {
                                    **lease_item,
                                    "additionalProperties": False,
                                    "required": ["job_id", "token", "state"],
                                    "properties": {
                                        **lease_item["properties"],
                                        "state": {"enum": ["succeeded", "failed", "released"]},
                                        "exit_code": {
                                            "type": ["integer", "null"],
                                            "minimum": -255,
                                            "maximum": 255,
                                        },
                                        "result": {"description": "A task's return value."},
                                        "error": {"type": ["string", "null"]},
                                        "stopped": {
                                            "type": "boolean",
                                            "default": False,
                                            "description": "The worker stopped it "
                                            "(a cancel).",
                                        },
                                    },
                                },
                            },
                        },
                    }),
                    "responses": {
                        "200": _json_response("One answer per result.", results_answer),
                        "409": _json_response("Every result was refused.", results_answer),
                        **worker_errors,
                    },
                }
            },
            "/v1/leases/log": {
                "post": {
                    "summary": "Write a chunk of an attempt's log at an offset; a "
                    "resent chunk is written over.",
                    "parameters": [
                        {"name": "job_id", "in": "query", "required": True,
                         "schema": {"type": "string", "minLength": 1, "maxLength": 200}},
                        {"name": "token", "in": "query", "required": True,
                         "schema": {"type": "integer", "minimum": 1}},
                        {"name": "stream", "in": "query", "required": True,
                         "schema": {"enum": ["stdout", "stderr"]}},
                        {"name": "offset", "in": "query", "required": True,
                         "description": "Where the chunk goes in the stream; at "
                         "most its current size.",
                         "schema": {"type": "integer", "minimum": 0}},
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            # Raw bytes (OpenAPI 3.1: no schema).
                            "application/octet-stream": {}
                        },
                    },
                    "responses": {
                        "200": _json_response(
                            "Written.",
                            {
                                "type": "object",
                                "required": ["size"],
                                "properties": {
                                    "size": {"type": "integer", "minimum": 0,
                                             "description": "The stream's size now."},
                                },
                            },
                        ),
                        "400": _error_response(
                            "A query parameter is wrong, or (offset_past_end) the "
                            "offset is past the end of the stream; the message says "
                            "where to send from."
                        ),
                        "409": _error_response(
                            "stale_lease: the token is not the job's current lease."
                        ),
                        "413": worker_errors["413"],
                    },
                }
            },
        },
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "/v1/leases endpoints: the content of [workers] "
                    "token_file. The others (but /healthz and /v1/openapi.json): "
                    "the content of [api] token_file, when it is set.",
                }
            },
            "schemas": {
                "JobSubmission": submit_schema,
                "Job": job_schema,
                "Resources": resources_schema,
                "Worker": worker_schema,
                "Lease": lease_schema,
                "LeaseRefusal": refusal_schema,
                "WorkerList": {
                    "type": "object",
                    "required": ["workers", "lease_seconds", "heartbeat_seconds"],
                    "properties": {
                        "workers": {"type": "array", "items": connected_worker},
                        **timing,
                    },
                },
                "Attempt": attempt_schema,
                "Error": error_schema,
                "JobList": {
                    "type": "object",
                    "required": ["jobs"],
                    "properties": {
                        "jobs": {"type": "array", "items": {"$ref": "#/components/schemas/Job"}}
                    },
                },
                "JobSummary": {
                    "type": "object",
                    "required": ["id", "state"],
                    "additionalProperties": False,
                    "properties": {
                        "id": {"type": "string"},
                        "state": {"enum": [s.value for s in JobState]},
                        "array_id": {"type": "string"},
                        "array_index": {"type": "integer"},
                    },
                },
                "SubmittedJobs": {
                    "type": "object",
                    "required": ["jobs"],
                    "properties": {
                        "jobs": {
                            "type": "array",
                            "items": {
                                "anyOf": [
                                    {"$ref": "#/components/schemas/JobSummary"},
                                    {"$ref": "#/components/schemas/Job"},
                                ]
                            },
                        }
                    },
                },
                "Queue": {
                    "type": "object",
                    "required": ["counts", "running", "max_running"],
                    "properties": {
                        "counts": {
                            "type": "object",
                            "additionalProperties": {"type": "integer"},
                        },
                        "running": {"type": "integer"},
                        "max_running": {"type": ["integer", "null"]},
                    },
                },
            }
        },
    }
    _secure(document["paths"])
    return document
