"""Screenshot the MLflow UI of a finished training job (the picture in docs/mlflow_compare.png).

    python bench/screenshot_mlflow.py --backend-store-uri sqlite:///runs/tiny/mlflow.db \
        --out docs/mlflow_compare.png [--experiment sfrs] [--view compare|runs]

Starts ``mlflow server`` on 127.0.0.1 over the given store, finds the newest parent run of the
experiment and its generation runs through the REST API, and has headless Chromium render
either the compare view of the generation runs (``compare``: parameters and Recall@N of every
generation side by side) or the experiment's runs table (``runs``). The server is stopped
afterwards. Needs a ``chromium`` binary (Debian: ``apt-get install chromium``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

log = logging.getLogger("screenshot_mlflow")
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 10.0) -> Dict[str, Any]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def post_json(url: str, body: Dict[str, Any], timeout: float = 10.0) -> Dict[str, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def start_server(store_uri: str, port: int, workdir: Path) -> subprocess.Popen:
    """``mlflow server`` in its own process group (stopped with ``stop_server``)."""
    exe = shutil.which("mlflow", path=str(Path(sys.executable).parent))
    cli = [exe] if exe else [sys.executable, "-m", "mlflow"]
    cmd = [*cli, "server", "--backend-store-uri", store_uri, "--artifacts-destination", str(workdir / "artifacts"),
           "--host", HOST, "--port", str(port), "--workers", "1"]
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    logf = open(workdir / "server.log", "w")
    return subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=workdir, env=env,
                            start_new_session=True)


def wait_until_up(base: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"mlflow server at {base} did not answer within {timeout:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def job_runs(base: str, experiment: str) -> Tuple[str, Dict[str, Any], List[Dict[str, Any]]]:
    """(experiment id, newest parent run, its child runs sorted by generation)."""
    q = urllib.parse.urlencode({"experiment_name": experiment})
    try:
        exp_id = get_json(f"{base}/api/2.0/mlflow/experiments/get-by-name?{q}")["experiment"]["experiment_id"]
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"experiment {experiment!r} not found in the store ({exc})") from None
    runs = post_json(f"{base}/api/2.0/mlflow/runs/search",
                     {"experiment_ids": [exp_id], "max_results": 1000,
                      "order_by": ["attributes.start_time DESC"]}).get("runs", [])

    def tags(r: Dict[str, Any]) -> Dict[str, str]:
        return {t["key"]: t["value"] for t in r.get("data", {}).get("tags", [])}

    parents = [r for r in runs if "mlflow.parentRunId" not in tags(r)]
    if not parents:
        raise RuntimeError(f"experiment {experiment!r} has no parent run")
    parent = parents[0]
    children = [r for r in runs if tags(r).get("mlflow.parentRunId") == parent["info"]["run_id"]]
    children.sort(key=lambda r: int(tags(r).get("generation", "0")))
    return exp_id, parent, children


def view_url(base: str, view: str, exp_id: str, parent: Dict[str, Any], children: List[Dict[str, Any]]) -> str:
    if view == "compare":
        ids = [c["info"]["run_id"] for c in children] or [parent["info"]["run_id"]]
        q = urllib.parse.urlencode({"runs": json.dumps(ids), "experiments": json.dumps([exp_id])})
        return f"{base}/#/compare-runs?{q}"
    return f"{base}/#/experiments/{exp_id}"


def screenshot(url: str, out: Path, chromium: str, size: Tuple[int, int], budget_ms: int, workdir: Path) -> None:
    """Headless Chromium screenshot of ``url`` (the React UI needs a virtual-time budget)."""
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--hide-scrollbars", f"--user-data-dir={workdir / 'chromium-profile'}",
           f"--window-size={size[0]},{size[1]}", f"--virtual-time-budget={budget_ms}",
           f"--screenshot={out}", url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}")


def shrink_png(path: Path, max_bytes: int) -> None:
    """Re-encode as a palette PNG if the file is larger than ``max_bytes``."""
    if path.stat().st_size <= max_bytes:
        return
    from PIL import Image

    tmp = path.with_name(path.name + ".tmp.png")
    with Image.open(path) as img:
        img.convert("RGB").quantize(colors=256).save(tmp, format="PNG", optimize=True)
    os.replace(tmp, path)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend-store-uri", required=True, help="e.g. sqlite:///runs/tiny/mlflow.db")
    p.add_argument("--out", type=Path, default=Path("docs/mlflow_compare.png"))
    p.add_argument("--experiment", default="sfrs")
    p.add_argument("--view", choices=("compare", "runs"), default="compare")
    p.add_argument("--chromium", default="chromium", help="Chromium binary")
    p.add_argument("--size", type=int, nargs=2, default=(1600, 1000), metavar=("W", "H"))
    p.add_argument("--budget-ms", type=int, default=15000, help="virtual time given to the UI to render")
    p.add_argument("--max-bytes", type=int, default=500_000, help="re-encode the PNG above this size")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    chromium = shutil.which(args.chromium)
    if chromium is None:
        print(f"error: no {args.chromium!r} binary on PATH (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="sfrs-mlflow-shot-") as tmp:
        workdir = Path(tmp)
        port = free_port()
        base = f"http://{HOST}:{port}"
        proc = start_server(args.backend_store_uri, port, workdir)
        try:
            wait_until_up(base, proc, timeout=120)
            exp_id, parent, children = job_runs(base, args.experiment)
            url = view_url(base, args.view, exp_id, parent, children)
            log.info("parent run %s with %d generation runs; rendering %s", parent["info"]["run_id"],
                     len(children), url)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            shot = workdir / "shot.png"
            screenshot(url, shot, chromium, tuple(args.size), args.budget_ms, workdir)
            shrink_png(shot, args.max_bytes)
            tmp_out = args.out.with_name(f".{args.out.name}.tmp")
            shutil.copyfile(shot, tmp_out)
            os.replace(tmp_out, args.out)
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:
            stop_server(proc)
    print(f"{args.out}: {args.out.stat().st_size // 1024} KB ({args.view} view of {len(children)} generation runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
