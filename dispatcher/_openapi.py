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
                    "summary": "Submit a job; answered once it is durably stored.",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/JobSubmission"}
                            }
                        },
                    },
                    "responses": {
                        "201": {
                            **_job_response("The job, queued."),
                            "headers": {
                                "Location": {
                                    "schema": {"type": "string"},
                                    "description": "/v1/jobs/{id}",
                                }
                            },
                        },
                        "400": _error_response("A field is wrong; it is named."),
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
            }
        },
    }
