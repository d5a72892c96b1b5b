"""Tracking against a real MLflow tracking server over HTTP.

A ``mlflow server`` (SQLite backend, proxied artifact store, both in a temporary folder) is
started on 127.0.0.1; the tiny job (2 generations, 2 processes under torchrun) logs to it
through ``tracking.uri=http://...``; the runs are then read back through the REST API with
plain ``urllib``, as any other client of the server would see them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest
import torch

from sfrs_dist.mlflow_server import LOG_NAME, free_port, start_server, stop_server, wait_until_up
from sfrs_dist.training.checkpoint import latest_checkpoint

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "tiny.yaml"
HOST = "127.0.0.1"
EXPERIMENT = "sfrs-server-test"
SERVER_START_TIMEOUT_S = 120.0
JOB_TIMEOUT_S = 300.0
HTTP_TIMEOUT_S = 10.0


def _env() -> Dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def get_json(url: str) -> Dict[str, Any]:
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as r:
        return json.loads(r.read())


def post_json(url: str, body: Dict[str, Any]) -> Dict[str, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> Iterator[Dict[str, Any]]:
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port(HOST)
    base = f"http://{HOST}:{port}"
    proc = start_server(f"sqlite:///{root / 'mlflow.db'}", root / "artifacts", HOST, port, root, env=_env())
    log = root / LOG_NAME
    try:
        try:
            wait_until_up(base, proc, SERVER_START_TIMEOUT_S, log_path=log)
        except RuntimeError as exc:
            raise AssertionError(str(exc)) from None
        yield {"url": base, "artifacts": root / "artifacts", "log": log}
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def tiny_job(mlflow_server, synthetic_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mlflow_job") / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "launch" / "train.py"), "--config", str(CONFIG),
           "--set", f"data.shards={synthetic_shards}", "--set", f"run.out_dir={out}",
           "--set", f"tracking.uri={mlflow_server['url']}", "--set", f"tracking.experiment={EXPERIMENT}",
           "--set", "tracking.run_name=tiny-over-http"]
    log = out.parent / "train.log"
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(), cwd=REPO,
                              timeout=JOB_TIMEOUT_S)
    assert proc.returncode == 0, f"training failed ({proc.returncode}):\n{log.read_text()[-4000:]}"
    return out


def search_runs(base: str, experiment: str) -> List[Dict[str, Any]]:
    """Every run of ``experiment`` through the REST API, as flat dicts of info/metrics/params/tags."""
    q = urllib.parse.urlencode({"experiment_name": experiment})
    exp_id = get_json(f"{base}/api/2.0/mlflow/experiments/get-by-name?{q}")["experiment"]["experiment_id"]
    runs, token = [], None
    while True:
        body: Dict[str, Any] = {"experiment_ids": [exp_id], "max_results": 100}
        if token:
            body["page_token"] = token
        page = post_json(f"{base}/api/2.0/mlflow/runs/search", body)
        for r in page.get("runs", []):
            data = r.get("data", {})
            runs.append({
                "info": r["info"],
                "metrics": {m["key"]: m["value"] for m in data.get("metrics", [])},
                "params": {p["key"]: p["value"] for p in data.get("params", [])},
                "tags": {t["key"]: t["value"] for t in data.get("tags", [])},
            })
        token = page.get("next_page_token")
        if not token:
            return runs


def list_artifacts(base: str, run_id: str, path: str) -> List[str]:
    q = urllib.parse.urlencode({"run_id": run_id, "path": path})
    return [f["path"] for f in get_json(f"{base}/api/2.0/mlflow/artifacts/list?{q}").get("files", [])]


def test_generations_read_back_through_rest_api(mlflow_server, tiny_job):
    base = mlflow_server["url"]
    runs = search_runs(base, EXPERIMENT)
    parents = [r for r in runs if "mlflow.parentRunId" not in r["tags"]]
    children = [r for r in runs if "mlflow.parentRunId" in r["tags"]]
    assert len(parents) == 1, [r["info"]["run_name"] for r in parents]
    parent = parents[0]
    assert parent["info"]["status"] == "FINISHED"
    assert parent["info"]["run_name"] == "tiny-over-http"
    assert parent["params"]["tracking.uri"] == base

    # exactly one child per generation, each nested under the job's parent run
    assert sorted(r["tags"]["generation"] for r in children) == ["0", "1"]
    history = torch.load(latest_checkpoint(tiny_job / "checkpoints"), map_location="cpu",
                         weights_only=False)["history"]
    for child in children:
        gen = int(child["tags"]["generation"])
        assert child["tags"]["mlflow.parentRunId"] == parent["info"]["run_id"]
        assert child["info"]["status"] == "FINISHED"
        assert child["info"]["run_name"] == f"generation-{gen}"
        m = child["metrics"]
        # the recalls the server holds are the ones the trainer computed (checkpointed history)
        for sid, (table, _) in history[gen]["test"].items():
            for cond, row in table.items():
                for n in (1, 5, 10):
                    assert m[f"{sid}/{cond}/recall_{n}"] == pytest.approx(100.0 * row[n], abs=1e-9)
        for sid in ("pitts30k_test", "tokyo247_test"):
            r1, r5, r10 = (m[f"{sid}/all/recall_{n}"] for n in (1, 5, 10))
            assert 0.0 <= r1 <= r5 <= r10 <= 100.0
        assert m["loss_hard"] > 0
        assert child["params"]["train.generations"] == "2"
    gen1 = next(c for c in children if c["tags"]["generation"] == "1")
    assert gen1["metrics"]["loss_soft"] > 0 and gen1["tags"]["teacher_checkpoint"] != "none"


def test_artifacts_uploaded_through_the_server(mlflow_server, tiny_job):
    """Artifacts go through the server's proxy into its --artifacts-destination, byte for byte."""
    base = mlflow_server["url"]
    runs = search_runs(base, EXPERIMENT)
    parent = next(r for r in runs if "mlflow.parentRunId" not in r["tags"])
    assert "config.yaml" in list_artifacts(base, parent["info"]["run_id"], "")
    for child in (r for r in runs if "mlflow.parentRunId" in r["tags"]):
        gen = int(child["tags"]["generation"])
        name = f"generation{gen:02d}_pca.h5"
        assert list_artifacts(base, child["info"]["run_id"], "pca") == [f"pca/{name}"]
        stored = [p for p in mlflow_server["artifacts"].rglob(name) if child["info"]["run_id"] in p.parts]
        assert len(stored) == 1
        assert stored[0].read_bytes() == (tiny_job / "checkpoints" / name).read_bytes()
