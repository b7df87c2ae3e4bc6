"""
The OpenAPI 3.1 document of the API, served at C{/v1/openapi.json}.  The
tests check the server's answers against the schemas here.
"""

from __future__ import annotations

from typing import Any

from ._model import JobState

_TIME = {"type": ["string", "null"], "format": "date-time"}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}


def _error_response(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}
        },
    }


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
            "labels": _STRING_MAP,
            "inputs": {"type": "array", "items": input_schema},
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
            "wait_reason": {"type": ["string", "null"]},
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
            "worker": {
                "type": ["string", "null"],
                "description": "The holder of the current or last attempt.",
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
                },
            }
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
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "dispatcher",
            "version": "1",
            "description": "Submit jobs, follow them, cancel them, read their logs.",
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
        },
        "components": {
            "schemas": {
                "JobSubmission": submit_schema,
                "Job": job_schema,
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
