"""
The server and the document it serves agree both ways, checked with
schemathesis against a real daemon: what the schema forbids is refused
with a status the operation documents, what it allows is accepted, and
every answer is one the document describes.
"""

import os
import subprocess
import sys

from dispatcher.api._routes import ROUTES

from .conftest import WORKER_TOKEN
from .schemathesis_hooks import MAX_ARRAY
from .test_twistd import ROOT, Twistd

BIN = os.path.dirname(sys.executable)

INI = f"""
[executor]
slots = 0
[dispatcher]
max_array = {MAX_ARRAY}
[tasks]
add = tests.tasks:add
[workers]
token_file = {{token_file}}
"""


def test_the_server_and_its_document_agree(tmp_path):
    """Requests generated from /v1/openapi.json (a fixed number per
    operation, deterministic): a body the schema refuses is refused with a
    documented 4xx, one it takes is taken (2xx), and no answer is a 500 or
    undocumented; the worker endpoints too (a lease asked not to wait)."""
    token_file = tmp_path / "worker.token"
    token_file.write_text(WORKER_TOKEN + "\n")
    daemon = Twistd(str(tmp_path), INI.format(token_file=token_file))
    daemon.start()
    try:
        result = subprocess.run(
            [
                os.path.join(BIN, "st"), "run", daemon.url + "/v1/openapi.json",
                "--checks", "not_a_server_error,status_code_conformance,"
                "content_type_conformance,response_schema_conformance,"
                "negative_data_rejection,positive_data_acceptance",
                "--max-examples", "25",
                "--generation-deterministic",
                "--phases", "coverage,fuzzing",
                "--workers", "1",
                "--no-shrink",
                "--suppress-health-check", "all",
                # The admin token the daemon made: an admin may call every
                # operation, the worker endpoints too.
                "--header", f"Authorization: Bearer {daemon.token}",
                "--request-timeout", "10",
            ],
            cwd=str(tmp_path),
            env=dict(os.environ, PYTHONPATH=ROOT, SCHEMATHESIS_HOOKS="tests.schemathesis_hooks"),
            capture_output=True,
            text=True,
            timeout=180,
        )
    finally:
        daemon.stop()
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "No issues found" in result.stdout
    # Every operation but the document itself (which schemathesis leaves
    # out) was tried, the worker endpoints included.
    served = [r for r in ROUTES if not r.path.startswith("/v1/openapi")]
    assert f"{len(served)} selected" in result.stdout
