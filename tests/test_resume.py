"""A job interrupted and continued ends with the weights of an uninterrupted one.

Real torchrun jobs (2 gloo ranks, the tiny config, 1 generation): a killed worker restarted
by torchrun, SIGTERM to every process and a rerun, a full disk on a checkpoint write and a
rerun, and a hung rank named and restarted. Two identical runs give bit-identical weights,
so a restart from step 0 or a redone cache subset would not pass.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import test_train as tt
import torch

from sfrs_dist.checkpoint_io import load_checkpoint

REPO = tt.REPO
FULL_DISK_RUNNER = REPO / "tests" / "full_disk_train.py"


def _weights(out: Path) -> dict:
    return torch.load(out / "checkpoints" / "generation00_final.pt", map_location="cpu", weights_only=False)["model"]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _args(shards: Path, out: Path, *more: str):
    return tt.overrides(shards, out, "train.generations=1", *more)


@pytest.fixture(scope="module")
def reference_run(synthetic_shards, tmp_path_factory) -> Path:
    """The uninterrupted job's run directory."""
    out = tmp_path_factory.mktemp("reference") / "run"
    tt.run(tt.torchrun(_args(synthetic_shards, out), extra=["--standalone"]), out.parent / "log")
    return out


@pytest.fixture(scope="module")
def reference(reference_run) -> dict:
    """Final weights of the uninterrupted job."""
    return _weights(reference_run)


def test_every_rank_records_time_and_peak_memory_of_its_phases(reference_run):
    for rank in (0, 1):
        rows = [json.loads(line) for line in (reference_run / "stages" / f"rank{rank}.jsonl").read_text().splitlines()]
        count = {p: sum(r["phase"] == p for r in rows) for p in ("setup", "refresh", "training", "validation", "test",
                                                                  "checkpoint")}
        assert count["refresh"] == count["training"] > 1, count  # one of each per cache subset
        assert count["setup"] == count["validation"] == count["test"] == 1, count  # 1 generation of 1 epoch
        assert count["checkpoint"] > count["training"], count
        assert all(r["rank"] == rank and r["seconds"] >= 0 and r["peak_rss_mb"] > 50 for r in rows)


def _start(cmd, log: Path, env=None) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env or tt._env(), cwd=REPO)


def _wait_for(path: Path, agent: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists() and agent.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert path.exists(), log.read_text()[-3000:]


def _wait_for_refresh_of_subset_1(out: Path, agent: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    """Return once rank 0 has saved the checkpoint after subset 0 and passed the stop check that
    follows it: the job is then in the refresh of subset 1 (0.7 s here), before its 4 steps."""
    stages = out / "stages" / "rank0.jsonl"
    deadline = time.time() + timeout
    while agent.poll() is None and time.time() < deadline:
        rows = [json.loads(line) for line in stages.read_text().splitlines()] if stages.exists() else []
        if any(r["phase"] == "checkpoint" and r["where"].startswith("generation 0 epoch 0 subset 1 ") for r in rows):
            time.sleep(0.1)
            return
        time.sleep(0.02)
    raise AssertionError(log.read_text()[-3000:])


def _workers(agent: subprocess.Popen):
    return [p for p in psutil.Process(agent.pid).children(recursive=True) if "train.py" in " ".join(p.cmdline())]


def test_killed_worker_restarts_and_ends_with_the_uninterrupted_weights(reference, synthetic_shards, tmp_path):
    out, log = tmp_path / "run", tmp_path / "log"
    agent = _start(tt.torchrun(_args(synthetic_shards, out), extra=["--standalone", "--max-restarts", "1"]), log)
    _wait_for(out / "checkpoints" / "ckpt_g00_e000_s0001.pt", agent, log)
    workers = _workers(agent)
    assert len(workers) == 2
    os.kill(workers[-1].pid, signal.SIGKILL)
    assert agent.wait(timeout=400) == 0, log.read_text()[-4000:]
    assert "resuming from" in log.read_text()
    assert _same(_weights(out), reference)


def test_sigterm_saves_the_position_and_the_rerun_continues_it(reference, synthetic_shards, tmp_path):
    """SIGTERM to torchrun and both ranks (as Slurm sends it) during the refresh of subset 1."""
    out, log = tmp_path / "run", tmp_path / "log"
    record = tmp_path / "stopped.json"
    cmd = tt.torchrun(_args(synthetic_shards, out), extra=["--standalone"])
    agent = _start(cmd, log, env=dict(tt._env(), SFRS_STOP_FILE=str(record)))
    _wait_for_refresh_of_subset_1(out, agent, log)
    processes = [psutil.Process(agent.pid), *_workers(agent)]
    assert len(processes) == 3
    t0 = time.time()
    for p in processes:
        p.send_signal(signal.SIGTERM)
    agent.wait(timeout=120)
    seconds = time.time() - t0
    text = log.read_text()
    assert seconds < 60, text[-3000:]  # run.stop_grace_s
    assert text.count("stopped on SIGTERM") == 2 and "exit code 75" in text, text[-3000:]
    stop = json.loads(record.read_text())
    assert stop["exit_code"] == 75 and stop["signal"] == "SIGTERM"
    saved = Path(stop["checkpoint"])
    # stopped after the first step of subset 1: the position inside the subset is in the checkpoint
    assert saved.name.startswith("ckpt_g00_e000_s0001_k"), saved
    position = load_checkpoint(saved)["position"]
    assert 0 < position["subset_step"] < position["subset_steps"] and len(position["rng"]) == 2
    assert len(position["tuples"]) >= 2 * position["subset_steps"]
    tt.run(cmd, tmp_path / "log2")
    text = (tmp_path / "log2").read_text()
    assert f"resuming from {saved}" in text
    assert f"subset 1 at step {position['subset_step']} of {position['subset_steps']}" in text
    assert text.count("no refresh") == 1
    assert _same(_weights(out), reference)


def test_full_disk_on_a_checkpoint_write_then_rerun(reference, synthetic_shards, tmp_path):
    """The write of the checkpoint after subset 2 fails with ENOSPC, leaving half a file behind."""
    out, log = tmp_path / "run", tmp_path / "log"
    args = _args(synthetic_shards, out)
    full = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(FULL_DISK_RUNNER), "--config", str(tt.CONFIG), *args]
    env = dict(tt._env(), SFRS_TEST_FULL_DISK_AT="ckpt_g00_e000_s0002.pt")
    proc = subprocess.run(full, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, timeout=400, cwd=REPO)
    text = log.read_text()
    assert proc.returncode != 0 and "No space left on device" in text, text[-3000:]
    ckpts = out / "checkpoints"
    left = sorted(p.name for p in ckpts.iterdir())
    assert left == ["ckpt_g00_e000_s0001.pt"], left  # no partial file, the failed one absent
    assert load_checkpoint(ckpts / left[0])["state"]["subset"] == 1
    tt.run(tt.torchrun(args, extra=["--standalone"]), tmp_path / "log2")
    assert f"resuming from {ckpts / left[0]}" in (tmp_path / "log2").read_text()
    assert _same(_weights(out), reference)


def test_hung_rank_is_named_and_the_restarted_group_resumes(reference, synthetic_shards, tmp_path):
    out, log = tmp_path / "run", tmp_path / "log"
    cmd = tt.torchrun(_args(synthetic_shards, out, "run.dist_timeout_s=20"),
                      extra=["--standalone", "--max-restarts", "1", "--shutdown-timeout", "5"])
    agent = _start(cmd, log)
    _wait_for(out / "checkpoints" / "ckpt_g00_e000_s0001.pt", agent, log)
    hung = _workers(agent)[-1]
    hung.send_signal(signal.SIGSTOP)
    try:
        assert agent.wait(timeout=400) == 0, log.read_text()[-4000:]
    finally:
        if hung.is_running():
            hung.kill()
    text = log.read_text()
    line = next((ln for ln in text.splitlines() if "a collective failed in the" in ln), "")
    assert line, text[-4000:]
    assert "rank 0:" in line and "did not arrive: rank 1 (last seen in " in line, line
    assert any(f"in the {p} phase" in line for p in ("refresh", "training", "checkpoint")), line
    assert "resuming from" in text
    assert _same(_weights(out), reference)


_SRUN = """#!/bin/bash
# srun on one node: drop srun's own options and run the task here
while [ $# -gt 0 ]; do
    case "$1" in
        --nodes|--ntasks-per-node|--cpus-per-task) shift 2 ;;
        --*) shift ;;
        *) break ;;
    esac
done
exec "$@"
"""
_SCONTROL = """#!/bin/bash
# scontrol: the node list is this host; other calls are recorded
if [ "$1 $2" = "show hostnames" ]; then echo 127.0.0.1; exit 0; fi
echo "$@" >> "$SCONTROL_LOG"
"""


def test_slurm_script_requeues_on_the_early_signal_and_the_requeued_job_finishes(reference, synthetic_shards,
                                                                                 tmp_path):
    """launch/slurm_train.sh on one node with srun and scontrol stand-ins: SIGUSR1 to the step's
    processes (as ``--signal=USR1@<s>`` sends it), then the requeued job run again."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", _SRUN), ("scontrol", _SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    out = tmp_path / "run"
    env = dict(tt._env(), PATH=f"{bin_dir}:{os.environ['PATH']}", SCONTROL_LOG=str(tmp_path / "scontrol.log"),
               SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node01", SLURM_NNODES="1", GPUS="2",
               RDZV_PORT=str(tt._free_port()), SFRS_PYTHON=sys.executable, SFRS_REPO=str(REPO),
               SFRS_STOP_FILE=str(tmp_path / "stop.json"), SHUTDOWN_TIMEOUT="30")
    cmd = ["bash", str(REPO / "launch" / "slurm_train.sh"), str(tt.CONFIG), *_args(synthetic_shards, out)]
    log = tmp_path / "log"
    job = _start(cmd, log, env=env)
    _wait_for_refresh_of_subset_1(out, job, log)
    step = [p for p in psutil.Process(job.pid).children(recursive=True)
            if {"torch.distributed.run", str(REPO / "launch" / "train.py")} & set(p.cmdline())]
    assert len(step) == 3  # torchrun and its 2 workers; the batch shell is not signalled
    for p in step:
        p.send_signal(signal.SIGUSR1)
    assert job.wait(timeout=120) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert text.count("stopped on SIGUSR1") == 2 and "requeueing job 4242" in text, text[-3000:]
    assert (tmp_path / "scontrol.log").read_text().split("\n")[0] == "requeue 4242"
    # the requeued job: the same script and arguments
    assert subprocess.run(cmd, stdout=open(tmp_path / "log2", "w"), stderr=subprocess.STDOUT, env=env,
                          timeout=400, cwd=REPO).returncode == 0, (tmp_path / "log2").read_text()[-3000:]
    assert "no refresh" in (tmp_path / "log2").read_text()
    assert (tmp_path / "scontrol.log").read_text().count("requeue") == 1
    assert _same(_weights(out), reference)
