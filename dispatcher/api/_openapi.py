"""
The OpenAPI 3.1 document of the API, served at C{/v1/openapi.json}: its
paths from the route table (L{dispatcher.api._routes}), its schemas from
the wire types (L{dispatcher.wire._types}) by
C{msgspec.json.schema_components}, with the rules the types state in
words (L{SUBMISSION_RULES}) and, when served, the limits the
configuration sets.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Iterable, Optional

import msgspec

from dispatcher.api._routes import OCTETS, OPEN, ROUTES, SUBMITTED_JOBS, Route, types_of
from dispatcher.model._principals import ALLOWED
from dispatcher.wire._submission import SUBMISSION_RULES

_REF = "#/components/schemas/{name}"


def _schema(body: Any) -> dict[str, Any]:
    if isinstance(body, type):
        return {"$ref": _REF.format(name=body.__name__)}
    return copy.deepcopy(body)


def _content(content_type: str, body: Any) -> dict[str, Any]:
    return {content_type: {"schema": _schema(body)}}


def _operation(route: Route) -> dict[str, Any]:
    operation: dict[str, Any] = {"operationId": route.operation_id, "summary": route.summary}
    if route.parameters:
        operation["parameters"] = [dict(p) for p in route.parameters]
    if route.request is OCTETS:
        # Raw bytes (OpenAPI 3.1: no schema).
        operation["requestBody"] = {"required": True, "content": {OCTETS: {}}}
    elif route.request is not None:
        operation["requestBody"] = {
            "required": route.request_required,
            "content": _content("application/json", route.request),
        }
    responses = {}
    for status, response in route.statuses().items():
        answer: dict[str, Any] = {"description": response.description}
        if response.body is not None:
            answer["content"] = _content(response.content_type, response.body)
        if response.headers:
            answer["headers"] = copy.deepcopy(dict(response.headers))
        responses[str(status)] = answer
    operation["responses"] = responses
    if route.auth is OPEN:
        operation["security"] = []
    else:
        operation["security"] = [{"bearer": []}]
        operation["x-roles"] = sorted(r.value for r in ALLOWED[route.auth])
    return operation


# Epytext markup of the types' docstrings, which become the schemas'
# descriptions: C{x} and L{x} are shown as `x`.
_MARKUP = re.compile(r"[CL]\{([^}]*)\}")


def _plain_descriptions(value: Any) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "description" and isinstance(item, str):
                value[key] = _MARKUP.sub(r"`\1`", " ".join(item.split()))
            else:
                _plain_descriptions(item)
    elif isinstance(value, list):
        for item in value:
            _plain_descriptions(item)


def _explicit_items(value: Any) -> None:
    """
    Give every array schema without C{items} (nor C{prefixItems}) an
    C{items: {}}: the same meaning (any item), said outright, since stock
    generators (openapi-python-client) drop a schema that leaves it out,
    and every operation whose body or answer refers to it.
    """
    if isinstance(value, dict):
        if value.get("type") == "array" and "items" not in value and "prefixItems" not in value:
            value["items"] = {}
        for item in value.values():
            _explicit_items(item)
    elif isinstance(value, list):
        for item in value:
            _explicit_items(item)


def _components(routes: Iterable[Route]) -> dict[str, Any]:
    _, schemas = msgspec.json.schema_components(list(types_of(tuple(routes))), ref_template=_REF)
    _plain_descriptions(schemas)
    for name, rules in SUBMISSION_RULES.items():
        if name in schemas:
            schemas[name].update(copy.deepcopy(rules))
    schemas["SubmittedJobs"] = copy.deepcopy(SUBMITTED_JOBS)
    _explicit_items(schemas)
    return schemas


def _nullable_member(schema: dict[str, Any]) -> dict[str, Any]:
    """
    The non-null branch of an C{anyOf: [X, null]} property, or the
    property itself.
    """
    for member in schema.get("anyOf", ()):
        if member.get("type") != "null":
            return member
    return schema


def openapi_document(
    max_array: Optional[int] = None,
    max_body_bytes: Optional[int] = None,
    tasks: Optional[Iterable[str]] = None,
    queues: Optional[Iterable[str]] = None,
    routes: tuple[Route, ...] = ROUTES,
    max_stored_bytes: Optional[int] = None,
) -> dict[str, Any]:
    """
    The document, as a JSON-able dict.

    @param max_array: C{[dispatcher] max_array}: the most jobs one request
        makes (a batch's length, an C{array}).
    @param max_body_bytes: C{[server] max_body_bytes}.
    @param tasks: the configured task names (C{task} takes only these).
    @param queues: the configured queue names (C{queue} takes only these).
    @param max_stored_bytes: C{[dispatcher] max_stored_bytes}: the most the
        arrays' members of one request store.
    """
    schemas = _components(routes)
    for name in ("JobSubmission", "BatchJob"):
        properties = schemas[name]["properties"]
        if max_array is not None:
            _nullable_member(properties["array"])["maximum"] = max_array
        if max_stored_bytes is not None:
            array = _nullable_member(properties["array"])
            array["description"] += f" Here: max_stored_bytes = {max_stored_bytes}."
            if max_array is not None:
                array["description"] += f" max_array = {max_array}."

        if tasks is not None:
            _nullable_member(properties["task"])["enum"] = sorted(tasks)
        if queues is not None:
            _nullable_member(properties["queue"])["enum"] = sorted(queues)
    if max_array is not None:
        schemas["Batch"]["properties"]["jobs"]["maxItems"] = max_array
    paths: dict[str, Any] = {}
    for route in routes:
        operation = _operation(route)
        if max_body_bytes is not None and "413" in operation["responses"]:
            operation["responses"]["413"]["description"] = (
                f"The body is over [server] max_body_bytes ({max_body_bytes} bytes)."
            )
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "dispatcher",
            "version": "1",
            "description": "Submit jobs, follow them, cancel them, read their logs; "
            "remote workers lease jobs under /v1/leases (docs/worker-protocol.md). "
            "Every endpoint but /healthz and /v1/openapi.json needs a credential: "
            "'Authorization: Bearer <token>' (dispatcher token create), or, on a "
            "UNIX socket, the caller's account. Each operation's x-roles lists the "
            "roles that may call it (docs/security.md). Errors are {\"error\": {\"code\", \"message\", "
            "\"field\"}}; a 400 names the field at fault, as jobs[3].env.X.",
        },
        # Relative: the URL the document was fetched from, whatever name,
        # port, TLS or proxy the caller reached the daemon through.  The
        # listen address itself is often not one a caller can use (a
        # wildcard 0.0.0.0, a unix: socket, a port a proxy maps).  "/" is
        # also what OpenAPI assumes without a servers entry; said here so
        # that tools that want an entry find one.
        "servers": [{"url": "/", "description": "This daemon, where this document was served."}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A credential's token (dispatcher token create, "
                    "POST /v1/credentials, DATA_DIR/admin.token), or the content of "
                    "[api] token_file (an admin) or [workers] token_file (a worker). "
                    "On a UNIX socket listener the caller's account stands for a "
                    "token (SO_PEERCRED; OpenAPI has no scheme for it): root and the "
                    "daemon's own account are admins, another account is the "
                    "credential of its name.",
                },
            },
            "schemas": schemas,
        },
    }
