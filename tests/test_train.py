"""End-to-end training under torchrun: real processes, gloo, the tiny synthetic shards.

One module-scoped 2-process DDP job through 2 generations is shared by several checks;
DeepSpeed and a 2-node run are jobs of their own (1 generation each); interrupted and resumed
jobs are in test_resume.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
import torch
from mlflow.tracking import MlflowClient

from sfrs_dist.training.checkpoint import latest_checkpoint

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "tiny.yaml"


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def torchrun(args: List[str], nproc: int = 2, extra: List[str] = ()) -> List[str]:
    return [sys.executable, "-m", "torch.distributed.run", *extra, "--nproc_per_node", str(nproc),
            str(REPO / "launch" / "train.py"), "--config", str(CONFIG), *args]


def overrides(shards: Path, out: Path, *more: str) -> List[str]:
    out_args = ["--set", f"data.shards={shards}", "--set", f"run.out_dir={out}"]
    for m in more:
        out_args += ["--set", m]
    return out_args


def run(cmd: List[str], log: Path, timeout: float = 400) -> subprocess.CompletedProcess:
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(), timeout=timeout, cwd=REPO)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{log.read_text()[-4000:]}")
    return proc


def final_state(out: Path) -> dict:
    ck = torch.load(latest_checkpoint(out / "checkpoints"), map_location="cpu", weights_only=False)
    return ck


@pytest.fixture(scope="module")
def ddp_job(split_shard_sets, tmp_path_factory):
    """Trained on the Pittsburgh-style shard set, tested on Tokyo 24/7 from a second shard set too."""
    pitts, tokyo = split_shard_sets
    out = tmp_path_factory.mktemp("ddp") / "run"
    run(torchrun(overrides(pitts, out, "eval.test_untrained=true", f"data.test_shards=[{tokyo}]"),
                 extra=["--standalone"]), out.parent / "log")
    return out


def test_ddp_two_generations_tracked_in_mlflow(ddp_job):
    client = MlflowClient(f"sqlite:///{ddp_job / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sfrs")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(r.data.tags["generation"] for r in children) == ["0", "1"]
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        m = child.data.metrics
        for key in ("pitts30k_val/all/recall_1", "pitts30k_test/all/recall_5", "tokyo247_test/night/recall_1"):
            assert 0.0 <= m[key] <= 100.0
        assert m["loss_hard"] > 0 and m["mining_s"] >= 0
        assert -1.0 <= m["desc_mean_sim"] < 0.999  # the descriptor health check is tracked
        assert child.data.params["train.generations"] == "2"
    gen1 = next(c for c in children if c.data.tags["generation"] == "1")
    assert gen1.data.metrics["loss_soft"] > 0 and gen1.data.metrics["teacher_pass_s"] > 0
    assert gen1.data.tags["teacher_checkpoint"] != "none"
    ck = final_state(ddp_job)
    assert ck["state"]["generation"] == 2
    assert ck["state"]["total_steps"] == sum(ck["history"][g]["steps"] for g in (0, 1)) > 0
    # the reference's reported network: best validation R@5 over all generations, on the parent run
    best = max((ck["history"][g]["best_val_r5"], -g) for g in (0, 1))
    sel = ck["selected"]
    assert sel["generation"] == -best[1] and sel["val_recall5"] == best[0]
    # one epoch per generation: the best network is that generation's final one, whose tables
    # (same network, same PCA seed) are reused instead of testing it twice
    assert ck["history"][sel["generation"]]["best_epoch"] == 0
    assert sel["test"] == ck["history"][sel["generation"]]["test"]
    pm = parents[0].data.metrics
    assert pm["selected/generation"] == sel["generation"]
    assert pm["selected/pitts30k_test/all/recall_5"] == pytest.approx(
        100 * sel["test"]["pitts30k_test"][0]["all"][5])
    # the off-the-shelf baseline (backbone + NetVLAD init) is tested before any training step
    assert set(ck["untrained"]["test"]) == {"pitts30k_test", "tokyo247_test"}
    assert pm["untrained/tokyo247_test/night/recall_1"] == pytest.approx(
        100 * ck["untrained"]["test"]["tokyo247_test"][0]["night"][1])
    assert "off" in (ddp_job.parent / "log").read_text()  # its rows in the final table
    # hard negatives are carried across generations (the reference's per-query cache)
    assert (ck["negatives"]["ids"] >= 0).any()


def test_teacher_rerun_reuses_cache(ddp_job, tmp_path):
    cache = ddp_job / "cache"
    shards_before = {p: p.stat().st_mtime_ns for p in cache.glob("teacher_*rank*.npz")}
    assert len(shards_before) == 2  # one shard per rank
    shards_dir = final_state(ddp_job)["config"]["data"]["shards"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "launch" / "teacher.py"), "--config", str(CONFIG), "--generation", "1",
           *overrides(Path(shards_dir), ddp_job)]
    run(cmd, tmp_path / "log")
    assert "teacher pass skipped" in (tmp_path / "log").read_text()
    assert {p: p.stat().st_mtime_ns for p in cache.glob("teacher_*rank*.npz")} == shards_before


def _fp32_weights(path: Path) -> dict:
    model = torch.load(path, map_location="cpu", weights_only=False)["model"]
    assert {v.dtype for v in model.values()} <= {torch.float32, torch.int64}, path
    return model


def test_deepspeed_bf16_one_generation_same_steps_and_resume(ddp_job, synthetic_shards, tmp_path):
    """ZeRO-1 bf16 (a batch-norm backbone) through refreshes, validation, test and PCA; resumed under ZeRO."""
    out = tmp_path / "run"
    args = overrides(synthetic_shards, out, "train.engine=deepspeed", "train.zero_stage=1", "train.precision=bf16",
                     "train.generations=1")
    run(torchrun(args, extra=["--standalone"]), tmp_path / "log")
    ck = final_state(out)
    # DeepSpeed saved its engine state (each rank's ZeRO partition) under the tag the checkpoint names
    ckpts = out / "checkpoints"
    epoch_end = torch.load(ckpts / "ckpt_g00_e001_s0000.pt", map_location="cpu", weights_only=False)
    tag_dir = ckpts / "deepspeed" / epoch_end["deepspeed_tag"]
    assert len(list(tag_dir.glob("*zero_pp_rank_[01]_mp_rank_00_optim_states.pt"))) == 2
    assert ck["state"]["generation"] == 1
    assert ck["history"][0]["steps"] == final_state(ddp_job)["history"][0]["steps"]
    assert "pitts30k_test" in ck["history"][0]["test"]
    final = _fp32_weights(ckpts / "generation00_final.pt")
    _fp32_weights(ckpts / "generation00_best.pt")
    # the precision choice is a parameter of the job's parent run
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("sfrs").experiment_id])
    params = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags).data.params
    assert (params["train.precision"], params["precision.train"]) == ("bf16", "bf16")
    assert params["precision.sources"].startswith("explicit,")
    # resume from the last mid-epoch checkpoint: DeepSpeed reloads its ZeRO partitions
    mid = max(p for p in ckpts.glob("ckpt_g00_e000_s*.pt"))
    run(torchrun(args + ["--set", f"run.resume={mid}"], extra=["--standalone"]), tmp_path / "log2")
    assert "resuming from" in (tmp_path / "log2").read_text()
    again = _fp32_weights(ckpts / "generation00_final.pt")
    assert all(torch.equal(again[k], final[k]) for k in final)
    # the tags of superseded checkpoints went with them
    named = [torch.load(p, map_location="cpu", weights_only=False).get("deepspeed_tag") for p in ckpts.glob("ckpt_*.pt")]
    assert sorted(d.name for d in (ckpts / "deepspeed").iterdir() if d.is_dir()) == sorted(t for t in named if t)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_agents_two_nodes(ddp_job, synthetic_shards, tmp_path):
    out = tmp_path / "run"
    port = _free_port()
    agents = []
    for node in range(2):
        cmd = torchrun(overrides(synthetic_shards, out, "train.generations=1"), nproc=1,
                       extra=["--nnodes", "2", "--node_rank", str(node), "--rdzv_backend", "c10d",
                              "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "sfrs-test"])
        log = open(tmp_path / f"log{node}", "w")
        agents.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=REPO))
    codes = [a.wait(timeout=400) for a in agents]
    assert codes == [0, 0], (tmp_path / "log0").read_text()[-3000:] + (tmp_path / "log1").read_text()[-3000:]
    ck = final_state(out)
    assert ck["history"][0]["steps"] == final_state(ddp_job)["history"][0]["steps"]


def test_bad_config_stops_every_rank_with_one_message(tmp_path):
    out = tmp_path / "run"
    cmd = torchrun(["--set", "train.engine=horovod", "--set", f"run.out_dir={out}"], extra=["--standalone"])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=120, cwd=REPO)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert text.count("config error:") == 1
    assert "train.engine must be ddp or deepspeed, got 'horovod'" in text
    assert not out.exists()  # no work started


def test_online_teacher_under_deepspeed_writes_no_cache_and_resumes_exactly(ddp_job, synthetic_shards, tmp_path):
    """train.teacher=online: the teacher runs inside the steps (soft loss logged, no teacher pass, no
    cache file) under the DeepSpeed engine; resumed from a mid-generation-1 checkpoint, it ends with
    the same weights."""
    out = tmp_path / "run"
    args = overrides(synthetic_shards, out, "train.teacher=online", "train.engine=deepspeed", "train.zero_stage=1",
                     "train.precision=fp32", "eval.pca_dim=0")
    run(torchrun(args, extra=["--standalone"]), tmp_path / "log")
    ck = final_state(out)
    assert ck["state"]["generation"] == 2
    assert not list((out / "cache").glob("teacher_*")), "the online teacher writes no cache"
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("sfrs").experiment_id])
    gen1 = next(r for r in runs if r.data.tags.get("generation") == "1")
    assert gen1.data.metrics["loss_soft"] > 0 and "teacher_pass_s" not in gen1.data.metrics
    assert gen1.data.tags["teacher_checkpoint"] == "online generation00_final.pt"
    ckpts = out / "checkpoints"
    final = _fp32_weights(ckpts / "generation01_final.pt")
    mid = max(ckpts.glob("ckpt_g01_e000_s*.pt"))
    run(torchrun(args + ["--set", f"run.resume={mid}"], extra=["--standalone"]), tmp_path / "log2")
    assert "resuming from" in (tmp_path / "log2").read_text()
    again = _fp32_weights(ckpts / "generation01_final.pt")
    assert all(torch.equal(again[k], final[k]) for k in final)
