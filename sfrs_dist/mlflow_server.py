"""A local ``mlflow server`` subprocess: start it, wait for ``/health``, stop it.

The server runs in its own process group (the CLI starts uvicorn as a child process), so
``stop_server`` ends the whole group. Its output goes to a log file whose tail is quoted
when the server fails to come up.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import List, Mapping, Optional

LOG_NAME = "server.log"
LOG_TAIL_CHARS = 3000


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that is free at the time of the call."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def mlflow_cli() -> List[str]:
    """The ``mlflow`` command installed beside this interpreter (``python -m mlflow`` otherwise)."""
    exe = shutil.which("mlflow", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "mlflow"]


def start_server(store_uri: str, artifacts_dir: Path, host: str, port: int, workdir: Path,
                 env: Optional[Mapping[str, str]] = None) -> subprocess.Popen:
    """Start ``mlflow server`` with backend ``store_uri`` and proxied artifacts in ``artifacts_dir``.

    The process runs in ``workdir`` in a new session, writes its output to
    ``workdir / "server.log"``, and gets ``env`` (default: this process's environment)
    without ``MLFLOW_TRACKING_URI``. Stop it with ``stop_server``.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [*mlflow_cli(), "server", "--backend-store-uri", store_uri,
           "--default-artifact-root", "mlflow-artifacts:/", "--artifacts-destination", str(artifacts_dir),
           "--host", host, "--port", str(port), "--workers", "1"]
    child_env = dict(os.environ if env is None else env)
    child_env.pop("MLFLOW_TRACKING_URI", None)
    with open(workdir / LOG_NAME, "w") as logf:
        return subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=workdir, env=child_env,
                                start_new_session=True)


def _log_tail(log_path: Optional[Path]) -> str:
    if log_path is None or not Path(log_path).is_file():
        return ""
    return f":\n{Path(log_path).read_text(errors='replace')[-LOG_TAIL_CHARS:]}"


def wait_until_up(base_url: str, proc: subprocess.Popen, timeout: float, log_path: Optional[Path] = None) -> None:
    """Poll ``<base_url>/health`` until it answers 200.

    Raises RuntimeError (with the tail of ``log_path``, if given) when ``proc`` exits first
    or ``timeout`` seconds pass.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with status {proc.returncode}{_log_tail(log_path)}")
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"mlflow server at {base_url} did not answer within {timeout:.0f} s{_log_tail(log_path)}")


def stop_server(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """Terminate a process started in its own session and its children (SIGKILL after ``timeout``)."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
