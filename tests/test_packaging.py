"""
How the dispatcher is installed and supervised: the wheel (with the
plugin and package data) in a fresh venv, the systemd units as
systemd-analyze reads them, and the Containerfile where docker runs.
"""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNITS = ("dispatcher.service", "dispatcher-worker.service")
# Where the units expect the venv (their ExecStart).
INSTALLED_TWISTD = "/opt/dispatcher/bin/twistd"


def tracked_files():
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                            check=True).stdout
    return [name for name in listed.decode().split("\0") if name]


def test_the_wheel_installs_twistd_dispatcher_the_cli_and_package_data(tmp_path):
    """A wheel built from the tree, installed alone into a fresh venv, gives
    `twistd dispatcher --version` (the dispatcher's version), the
    `dispatcher` command, the twistd plugin file, and any file under a
    static/ directory of the package (where the dashboard's files live)."""
    tree = tmp_path / "tree"
    for name in tracked_files():
        if name.startswith(("dispatcher/", "twisted/")) or name in (
                "pyproject.toml", "README.md"):
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), tree / name)
    probe = tree / "dispatcher" / "probe_ui" / "static" / "css" / "probe.css"
    probe.parent.mkdir(parents=True)
    probe.write_text("body { color: black }\n")
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--wheel-dir", str(wheels), str(tree)],
                   check=True, capture_output=True, timeout=600)
    (wheel,) = wheels.glob("dispatcher-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/dispatcher_plugin.py" in names
    assert "dispatcher/probe_ui/static/css/probe.css" in names
    assert "twisted/__init__.py" not in names
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
    assert (os.path.join(found, "probe_ui", "static", "css", "probe.css")
            and os.path.exists(os.path.join(found, "probe_ui", "static", "css", "probe.css")))


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


def docker_unavailable():
    """Why the Containerfile cannot be built here, or None."""
    if shutil.which("docker") is None:
        return "docker is not installed"
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        return ("the docker client cannot reach a daemon (docker info: "
                f"{(info.stderr.strip().splitlines() or ['?'])[-1]}); this machine runs "
                "no dockerd, and a container build needs one")
    return None


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
