"""
How the dispatcher is installed and supervised: the wheel (with the
plugin and package data) in a fresh venv, its daemon, command and
dashboard run from there, the systemd units as systemd-analyze reads
them, and the Containerfile where docker runs.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
import zipfile

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import as_the_tests_account, poll

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNITS = ("dispatcher.service", "dispatcher-worker.service")
# Where the units expect the venv (their ExecStart).
INSTALLED_TWISTD = "/opt/dispatcher/bin/twistd"


def tracked_files():
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                            check=True).stdout
    return [name for name in listed.decode().split("\0") if name]


def build_wheel(tmp_path, extra=()):
    """A wheel built from the tree's tracked files (and C{extra}, paths
    relative to the tree with their text), as pip builds one."""
    tree = tmp_path / "tree"
    for name in tracked_files():
        if name.startswith(("dispatcher/", "twisted/")) or name in (
                "pyproject.toml", "README.md"):
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), tree / name)
    for name, text in extra:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text(text)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--wheel-dir", str(wheels), str(tree)],
                   check=True, capture_output=True, timeout=600)
    (wheel,) = wheels.glob("dispatcher-*.whl")
    return wheel


def get(url, token=None):
    """GET url: the status and the body's bytes."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                timeout=30) as answer:
        return answer.status, answer.read()


def test_the_wheel_installs_twistd_dispatcher_the_cli_and_package_data(tmp_path):
    """A wheel built from the tree holds every Python file of dispatcher/
    and the twistd plugin, and every dashboard file; installed alone into
    a fresh venv it gives `twistd dispatcher --version` (the dispatcher's
    version), the `dispatcher` command, and any file under a static/
    directory of the package; and the daemon it installed starts, serves
    the dashboard from the installed files and GET /metrics, and runs a
    job the installed command submits and waits for."""
    probe_name = "dispatcher/probe_ui/static/css/probe.css"
    wheel = build_wheel(tmp_path, [(probe_name, "body { color: black }\n")])
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "twisted/plugins/dispatcher_plugin.py" in names
    assert probe_name in names
    assert "twisted/__init__.py" not in names
    shipped = [name for name in tracked_files()
               if name.startswith("dispatcher/") and (
                   name.endswith(".py") or name.startswith("dispatcher/api/dashboard/"))]
    assert "dispatcher/api/dashboard/app.js" in shipped
    assert "dispatcher/backends/_direct.py" in shipped
    assert sorted(set(shipped) - names) == []
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)],
                   check=True, capture_output=True, timeout=900)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    version = subprocess.run([str(venv / "bin" / "twistd"), "dispatcher", "--version"],
                             cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=60)
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("dispatcher 0.") and "Twisted" in version.stdout
    worker = subprocess.run([str(venv / "bin" / "twistd"), "dispatcher-worker", "--version"],
                            cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=60)
    assert worker.stdout.startswith("dispatcher-worker 0.")
    cli = subprocess.run([str(venv / "bin" / "dispatcher"), "--help"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0 and "submit" in cli.stdout
    found = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import dispatcher, pathlib; print(pathlib.Path(dispatcher.__file__).parent)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert found.startswith(str(venv))
    assert os.path.exists(os.path.join(found, "probe_ui", "static", "css", "probe.css"))

    ini = tmp_path / "dispatcher.ini"
    ini.write_text(as_the_tests_account(""))
    data = tmp_path / "data"
    out = tmp_path / "daemon.log"
    with open(out, "wb") as log:
        daemon = subprocess.Popen(
            [str(venv / "bin" / "twistd"), "-n", "--pidfile", "", "dispatcher",
             "--config", str(ini), "--listen", "tcp:0:interface=127.0.0.1",
             "--data-dir", str(data)],
            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        def listening():
            assert daemon.poll() is None, out.read_text()
            port = re.findall(r"dispatcher listening on [\d.]+:(\d+)", out.read_text())
            return port and f"http://127.0.0.1:{port[-1]}"

        url = poll(listening, timeout=60, what="the installed daemon to listen")
        assert f"data directory {data}" in out.read_text()
        token = (data / "admin.token").read_text().strip()
        status, page = get(url + "/ui/")
        assert status == 200 and b'src="/ui/app.js"' in page
        installed = os.path.join(found, "api", "dashboard", "app.js")
        assert get(url + "/ui/app.js") == (200, open(installed, "rb").read())
        submitted = subprocess.run(
            [str(venv / "bin" / "dispatcher"), "submit", "--wait", "--timeout", "60", "--",
             "sh", "-c", "echo from the wheel"],
            cwd=tmp_path, env=dict(env, DISPATCHER_URL=url, DISPATCHER_TOKEN=token),
            capture_output=True, text=True, timeout=120)
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        status, text = get(url + "/metrics", token)
        families = {f.name: f for f in text_string_to_metric_families(text.decode())}
        ended = {tuple(sorted(s.labels.items())): s.value
                 for s in families["dispatcher_jobs_ended"].samples
                 if s.name == "dispatcher_jobs_ended_total"}
        assert ended == {(("outcome", "succeeded"), ("queue", "default")): 1.0}
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
    assert "dispatcher stopped" in out.read_text()


def test_what_a_daemon_leaves_in_a_checkout_is_ignored():
    """A daemon started from the checkout (twistd -n dispatcher, as the
    README's walk-through does) leaves its pid file, its log and its data
    directory (./var) there: git ignores them all, and nothing tracked
    lives under them."""
    left = ["twistd.pid", "twistd.log", "twistd.log.1", "var/dispatcher.sqlite3",
            "var/admin.token"]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *left], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert ignored.stdout.split() == left, ignored.stdout + ignored.stderr
    assert [name for name in tracked_files()
            if name.startswith("var/") or name.startswith("twistd.")] == []


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is missing: .ci/run installs the systemd "
                           "package, which provides it (it reads unit files without "
                           "systemd running as PID 1)")
@pytest.mark.parametrize("unit", UNITS)
def test_the_systemd_units_verify(tmp_path, unit):
    """systemd-analyze verify reads each unit without a warning (no unknown
    key, no bad value), its ExecStart pointed at this venv's twistd, which
    it checks is executable; and each keeps what the daemon needs: its
    jobs' cgroups delegated, SIGTERM for the daemon alone, restarts on
    failure, and no setuid gain for jobs."""
    text = open(os.path.join(ROOT, "etc", unit)).read()
    assert INSTALLED_TWISTD in text
    for line in ("Delegate=yes", "KillMode=mixed", "Restart=on-failure",
                 "NoNewPrivileges=yes", "ProtectSystem=full", "User=dispatcher"):
        assert f"\n{line}\n" in text, line
    assert "ProtectControlGroups=yes" not in text
    here = tmp_path / unit
    here.write_text(text.replace(INSTALLED_TWISTD, os.path.join(os.path.dirname(
        sys.executable), "twistd")))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(here)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""
    broken = tmp_path / ("broken-" + unit)
    broken.write_text(here.read_text().replace("Delegate=yes", "Delegat=yes"))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(broken)],
                            capture_output=True, text=True, timeout=120)
    assert "Unknown key" in result.stderr


# The Containerfile's base image (its FROM lines).
BASE_IMAGE = "python:3.11-slim"


def docker_unavailable():
    """Why the Containerfile cannot be built here, or None."""
    if shutil.which("docker") is None:
        return "docker is not installed"
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        return ("no Docker daemon answers the docker client (docker info: "
                f"{(info.stderr.strip().splitlines() or ['?'])[-1]}), and a container "
                "build needs one. This project's machines run none; Debian's docker.io "
                f"dockerd can be started there as root, but the build's {BASE_IMAGE} "
                "comes from Docker Hub, which they cannot reach, so .ci/run starts none")
    have = subprocess.run(["docker", "image", "inspect", BASE_IMAGE], capture_output=True,
                          text=True, timeout=60)
    if have.returncode != 0:
        pull = subprocess.run(["docker", "pull", BASE_IMAGE], capture_output=True,
                              text=True, timeout=900)
        if pull.returncode != 0:
            return (f"a Docker daemon answers, but the base image {BASE_IMAGE} is not "
                    "here and cannot be pulled (docker pull: "
                    f"{(pull.stderr.strip().splitlines() or ['?'])[-1]})")
    return None


def test_the_containerfile_names_the_base_image_the_test_looks_for():
    """The image the build test checks for (or pulls) is the one the
    Containerfile builds from, in both its stages."""
    text = open(os.path.join(ROOT, "Containerfile")).read()
    assert re.findall(r"^FROM (\S+)", text, re.M) == [BASE_IMAGE, BASE_IMAGE]


def test_the_containerfile_builds_from_the_wheel():
    """The Containerfile builds an image from the tree's wheel whose
    `twistd dispatcher --version` runs."""
    why = docker_unavailable()
    if why is not None:
        pytest.skip(why)
    tag = "dispatcher-test:latest"
    subprocess.run(["docker", "build", "-f", "Containerfile", "-t", tag, "."], cwd=ROOT,
                   check=True, timeout=1800)
    try:
        out = subprocess.run(["docker", "run", "--rm", tag, "twistd", "dispatcher",
                              "--version"], capture_output=True, text=True, check=True,
                             timeout=300)
        assert out.stdout.startswith("dispatcher ")
    finally:
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True, timeout=300)
