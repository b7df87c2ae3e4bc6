"""
The API over TLS (issue 15, Transport): a real `twistd` on an `ssl:`
endpoint with a self-signed certificate made here, spoken to by a real
`curl` and by real `dispatcher worker` processes; and the worker's refusal
of plain `http://` to another host.
"""

import datetime
import ipaddress
import json
import os
import shutil
import subprocess
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.python import usage

from dispatcher.app.worker_tap import Options

from .conftest import TEST_TASKS, WORKER_TOKEN
from .test_twistd import BIN, Twistd
from .test_remote import poll
from .test_worker import WorkerProcess, workers  # noqa: F401 (a fixture)

CURL = shutil.which("curl")


def self_signed(directory):
    """A key and a self-signed certificate for `localhost` (and 127.0.0.1),
    written as PEM files in directory; their paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path = os.path.join(directory, "key.pem")
    cert_path = os.path.join(directory, "cert.pem")
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ))
    with open(cert_path, "wb") as f:
        f.write(certificate.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


class TLSDispatcher:
    """A started `twistd -n dispatcher` on ssl:0 that runs nothing itself and
    takes workers; requests to it go through curl."""

    def __init__(self, directory, token_file):
        self.key, self.cert = self_signed(directory)
        self.daemon = Twistd(
            directory,
            f"[executor]\nslots = 0\n\n[workers]\ntoken_file = {token_file}\n",
            listen=f"ssl:0:interface=127.0.0.1:privateKey={self.key}:certKey={self.cert}",
        )
        self.daemon.start()
        self.port = int(self.daemon.url.rsplit(":", 1)[1])
        self.url = f"https://localhost:{self.port}"

    def curl(self, *args):
        """curl against the dispatcher, trusting its certificate, with the
        admin token: the completed process."""
        return subprocess.run(
            [CURL, "-sS", "--resolve", f"localhost:{self.port}:127.0.0.1",
             "--cacert", self.cert, "--max-time", "10",
             "-H", f"Authorization: Bearer {self.daemon.token}", *args],
            capture_output=True, text=True, timeout=20)

    def request(self, method, path, body=None):
        """The status and JSON answer of a request through curl."""
        args = ["-X", method, "-w", "\n%{http_code}", self.url + path]
        if body is not None:
            args += ["-H", "Content-Type: application/json", "--data", json.dumps(body)]
        done = self.curl(*args)
        assert done.returncode == 0, done.stderr
        content, _, code = done.stdout.rpartition("\n")
        return int(code), json.loads(content)


@pytest.fixture(scope="module")
def tls_dispatcher(tmp_path_factory):
    """One TLS dispatcher for the module's tests; killed at its end."""
    if CURL is None:
        pytest.fail("curl is needed (apt-get install -y curl; .ci/run installs it)")
    directory = tmp_path_factory.mktemp("tls")
    token_file = directory / "worker.token"
    token_file.write_text(WORKER_TOKEN + "\n")
    token_file.chmod(0o600)  # one others may read is refused
    dispatcher = TLSDispatcher(str(directory), token_file)
    dispatcher.token_file = token_file
    yield dispatcher
    dispatcher.daemon.stop()


def test_curl_speaks_http_1_1_over_alpn_to_an_ssl_listener(tls_dispatcher):
    """curl, which offers ALPN h2 and http/1.1 as browsers do, completes the
    handshake with an ssl: listener, settles on http/1.1 and gets the API."""
    done = tls_dispatcher.curl("-v", tls_dispatcher.url + "/v1/jobs")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["jobs"] == []
    assert "ALPN: offers h2" in done.stderr or "ALPN, offering h2" in done.stderr
    assert ("ALPN: server accepted http/1.1" in done.stderr
            or "ALPN, server accepted to use http/1.1" in done.stderr), done.stderr


def test_a_worker_given_the_certificate_with_ca_file_runs_a_job_over_tls(
        tls_dispatcher, tmp_path, workers):
    """A worker that trusts the self-signed certificate through --ca-file
    takes a job from the https:// dispatcher and reports it done."""
    worker = WorkerProcess(tmp_path, tls_dispatcher.url, tls_dispatcher.token_file,
                           slots=1, name="w-tls", ini=TEST_TASKS)
    worker.args += ["--ca-file", tls_dispatcher.cert]
    workers.append(worker.start())
    code, job = tls_dispatcher.request("POST", "/v1/jobs", {"command": ["echo", "over tls"]})
    assert code == 201, job

    def finished():
        code, got = tls_dispatcher.request("GET", f"/v1/jobs/{job['id']}")
        return got if got["state"] in ("succeeded", "failed") else None

    done = poll(finished, what=f"the job to finish; worker log:\n{worker.output()}")
    assert done["state"] == "succeeded", done
    assert done["worker"] == "w-tls"


def test_a_worker_refuses_a_certificate_it_does_not_trust(
        tls_dispatcher, tmp_path, workers):
    """Without --ca-file a worker checks the dispatcher's certificate against
    the system's CAs, refuses the self-signed one, says so and names
    --ca-file, and takes no job."""
    code, job = tls_dispatcher.request(
        "POST", "/v1/jobs", {"command": ["true"], "requirements": {"pool": "untrusting"}})
    assert code == 201, job
    worker = WorkerProcess(tmp_path, tls_dispatcher.url, tls_dispatcher.token_file,
                           slots=1, name="w-untrusting", ini=TEST_TASKS)
    worker.args += ["--label", "pool=untrusting"]
    workers.append(worker.start())
    text = poll(lambda: "not trusted" in worker.output() and worker.output(),
                what="the worker to say the certificate was not trusted")
    assert "the dispatcher's TLS certificate was not trusted" in text
    assert "--ca-file" in text
    code, job = tls_dispatcher.request("GET", f"/v1/jobs/{job['id']}")
    assert job["state"] == "queued", job


def test_a_worker_refuses_plain_http_to_another_host(tmp_path, token_file):
    """`dispatcher worker --url http://10.1.2.3:8080` exits 2 at once with one
    line that names --insecure, before it talks to anything."""
    done = subprocess.run(
        [os.path.join(BIN, "dispatcher"), "worker", "--url", "http://10.1.2.3:8080",
         "--token-file", str(token_file), "--slots", "1",
         "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    first = done.stderr.splitlines()[0]
    assert first.startswith("dispatcher worker: --url http://10.1.2.3:8080: ")
    assert "--insecure" in first and "https://" in first
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("url, insecure, allowed", [
    ("http://10.1.2.3:8080", False, False),
    ("http://dispatch.example:8080", False, False),
    ("http://[2001:db8::1]:8080", False, False),
    ("http://10.1.2.3:8080", True, True),
    ("https://dispatch.example:8443", False, True),
    ("http://127.0.0.1:8080", False, True),
    ("http://127.3.4.5:8080", False, True),
    ("http://localhost:8080", False, True),
    ("http://[::1]:8080", False, True),
])
def test_plain_http_is_allowed_to_loopback_or_with_insecure(
        token_file, tmp_path, url, insecure, allowed):
    """The worker's options take http:// only to a loopback host, or to any
    host with --insecure; https:// always."""
    args = ["--url", url, "--token-file", str(token_file), "--slots", "1",
            "--cpus", "1", "--memory", "64", "--gpus", "0"]
    if insecure:
        args.append("--insecure")
    options = Options()
    if allowed:
        options.parseOptions(args)
        assert options.settings.url == url
    else:
        with pytest.raises(usage.UsageError, match="--insecure"):
            options.parseOptions(args)


def test_ca_file_must_hold_a_certificate(token_file, tmp_path):
    """--ca-file naming a file without a PEM certificate, or no file, is a
    usage error that names the option and the file."""
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    base = ["--url", "https://dispatch.example", "--token-file", str(token_file),
            "--slots", "1", "--cpus", "1", "--memory", "64", "--gpus", "0"]
    with pytest.raises(usage.UsageError, match=f"--ca-file {not_pem}: expected one or more PEM"):
        Options().parseOptions(base + ["--ca-file", str(not_pem)])
    missing = tmp_path / "missing.pem"
    with pytest.raises(usage.UsageError, match=f"--ca-file {missing}: cannot read it"):
        Options().parseOptions(base + ["--ca-file", str(missing)])
