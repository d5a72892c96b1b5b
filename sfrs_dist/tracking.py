"""Rank-0 I/O through one object: a tracker that is MLflow on rank 0 and a no-op elsewhere.

One parent run per training job, one nested child run per generation. Run ids are part of
the checkpointed training state, so a resumed job keeps logging into the same runs.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

log = logging.getLogger(__name__)


def git_commit(repo: Optional[Path] = None) -> str:
    """The code version: ``git rev-parse HEAD`` (+ ``-dirty``), or ``unknown``."""
    repo = repo or Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def default_tracking_uri(run_dir: Path) -> str:
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


class Tracker:
    """The no-op tracker every rank but 0 holds; also the interface."""

    def start_job(self, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> None:
        pass

    def start_generation(self, generation: int, params: Mapping[str, Any], tags: Mapping[str, str]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int, parent: bool = False) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None, parent: bool = False) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def end_generation(self) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


class MLflowTracker(Tracker):
    """MLflow through ``MlflowClient``: explicit run ids, no global active-run state."""

    def __init__(self, tracking_uri: str, experiment: str) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        self._mlflow = mlflow
        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        self.parent_id: Optional[str] = None
        self.child_ids: Dict[int, str] = {}
        self.current: Optional[int] = None

    @staticmethod
    def _clean_params(params: Mapping[str, Any]) -> Dict[str, str]:
        return {k: str(v)[:6000] for k, v in params.items()}

    def start_job(self, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> None:
        if self.parent_id is not None:
            self.client.update_run(self.parent_id, status="RUNNING")
            return
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=dict(tags))
        self.parent_id = run.info.run_id
        self._log_params(self.parent_id, params)
        log.info("MLflow parent run %s (%s)", self.parent_id, self.uri)

    def _log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in self._clean_params(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])

    def start_generation(self, generation: int, params: Mapping[str, Any], tags: Mapping[str, str]) -> None:
        assert self.parent_id is not None, "start_job first"
        self.current = generation
        if generation in self.child_ids:
            self.client.update_run(self.child_ids[generation], status="RUNNING")
            return
        all_tags = {"mlflow.parentRunId": self.parent_id, "generation": str(generation), **tags}
        run = self.client.create_run(self.experiment_id, run_name=f"generation-{generation}", tags=all_tags)
        self.child_ids[generation] = run.info.run_id
        self._log_params(run.info.run_id, params)

    def _target(self, parent: bool) -> Optional[str]:
        if parent or self.current is None:
            return self.parent_id
        return self.child_ids[self.current]

    def log_metrics(self, metrics: Mapping[str, float], step: int, parent: bool = False) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for k, v in metrics.items() if v is not None and math.isfinite(float(v))]
        if items:
            self.client.log_batch(self._target(parent), metrics=items)

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None, parent: bool = False) -> None:
        if Path(path).exists():
            self.client.log_artifact(self._target(parent), str(path), artifact_path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self._target(False), k, str(v))

    def end_generation(self) -> None:
        if self.current is not None:
            self.client.set_terminated(self.child_ids[self.current], status="FINISHED")
        self.current = None

    def finish(self, status: str = "FINISHED") -> None:
        if self.current is not None:
            self.client.set_terminated(self.child_ids[self.current], status=status)
            self.current = None
        if self.parent_id is not None:
            self.client.set_terminated(self.parent_id, status=status)

    def state_dict(self) -> Dict[str, Any]:
        return {"parent": self.parent_id, "children": {str(k): v for k, v in self.child_ids.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            self.parent_id = state.get("parent")
            self.child_ids = {int(k): v for k, v in state.get("children", {}).items()}


def build_tracker(rank: int, tracking_uri: Optional[str], experiment: str, run_dir: Path) -> Tracker:
    """MLflow on rank 0, the no-op tracker elsewhere."""
    if rank != 0:
        return Tracker()
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(run_dir)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return MLflowTracker(uri, experiment)
