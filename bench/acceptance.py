"""The multi-process items of ``bench/gpu_check.py --acceptance``: real torchrun jobs.

Every item starts ``torchrun --standalone --nproc_per_node N launch/train.py`` (N: every
local GPU, 2 processes with ``--device cpu``) on the tiny synthetic shards and checks what
the job left behind (checkpoints, MLflow runs), one PASS/FAIL line each, with the stage
times the job logged:

- ``ddp_two_generations``: DDP through generation 0 and 1 (teacher pass, re-ranking,
  soft loss);
- ``deepspeed_zero2_bf16``: the same under DeepSpeed ZeRO-2 bf16 (float32 checkpoints);
- ``kill_and_resume``: a worker is killed after the first cache subset, torchrun restarts the
  group, the job resumes and ends with the same number of steps as the uninterrupted one;
- ``rank_agreement``: one cache subset holding every query, mined with the untrained network
  (the same NetVLAD init: the 1-rank job's is copied, since its k-means samples are drawn per
  rank) on 1 rank and on N ranks: the fraction of identical hard-negative lists (identical on CPU;
  on GPU, TF32 and cuDNN's per-batch-size algorithm choice may swap near-ties, and this
  measures how many);
- ``real_size_slice``: VGG16 + NetVLAD 64 x 512 (32,768-d) at 480 x 640 on the synthetic
  images (a few hundred): extraction, mining, training steps, PCA, test.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "tiny.yaml"


class Skip(Exception):
    """An item that cannot run here (the reason is the message)."""


def _env(ctx: SimpleNamespace) -> Dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if ctx.device.type == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def command(ctx: SimpleNamespace, out: Path, *sets: str, nproc: int = 0, extra: List[str] = ()) -> List[str]:
    args = [f"data.shards={ctx.shards}", f"run.out_dir={out}", f"run.device={ctx.device.type}", *sets]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", *extra, "--nproc_per_node",
            str(nproc or ctx.nproc), str(REPO / "launch" / "train.py"), "--config", str(CONFIG),
            *[a for s in args for a in ("--set", s)]]


def run(ctx: SimpleNamespace, cmd: List[str], log: Path, timeout: float = 900) -> None:
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(ctx), timeout=timeout, cwd=REPO)
    if proc.returncode != 0:
        tail = [ln for ln in log.read_text().splitlines() if ln.strip()][-3:]
        raise AssertionError(f"job failed ({proc.returncode}), log {log}: {' | '.join(tail)}")


def final_state(out: Path) -> dict:
    from sfrs_dist.training.checkpoint import latest_checkpoint, load_checkpoint

    return load_checkpoint(latest_checkpoint(out / "checkpoints"))


def float32_networks(out: Path) -> int:
    from sfrs_dist.training.checkpoint import load_checkpoint

    paths = sorted((out / "checkpoints").glob("generation*_final.pt"))
    for p in paths:
        model = load_checkpoint(p)["model"]
        bad = sorted({str(v.dtype) for v in model.values()} - {"torch.float32", "torch.int64"})
        if bad or not all(torch.isfinite(v.float()).all() for v in model.values()):
            raise AssertionError(f"{p.name}: {bad or 'non-finite'} weights")
    return len(paths)


def generation_metrics(out: Path) -> Dict[str, Dict[str, float]]:
    """Latest metric values of each generation's MLflow run, by generation tag."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("sfrs").experiment_id])
    return {r.data.tags["generation"]: r.data.metrics for r in runs if "generation" in r.data.tags}


def stage_times(metrics: Dict[str, Dict[str, float]]) -> str:
    parts = []
    for gen in sorted(metrics):
        m = metrics[gen]
        s = f"g{gen}: extract {m.get('extract_s', float('nan')):.1f} s, mining {m.get('mining_s', float('nan')):.1f} s"
        if "teacher_pass_s" in m:
            s += f", teacher pass {m['teacher_pass_s']:.1f} s"
        if "tuples_per_s" in m:
            s += f", {m['tuples_per_s']:.1f} tuples/s"
        parts.append(s)
    return "; ".join(parts)


def two_generations(ctx: SimpleNamespace, name: str, *sets: str) -> str:
    out = ctx.work / name
    run(ctx, command(ctx, out, "train.generations=2", *sets), ctx.work / f"{name}.log")
    st = final_state(out)
    if st["state"]["generation"] != 2:
        raise AssertionError(f"ended at generation {st['state']['generation']}, not 2")
    metrics = generation_metrics(out)
    if not metrics.get("1", {}).get("loss_soft", 0) > 0:
        raise AssertionError("generation 1 logged no soft loss")
    if not list((out / "cache").glob("teacher_*")):
        raise AssertionError("no teacher cache written")
    steps = [st["history"][g]["steps"] for g in (0, 1)]
    ctx.steps[name] = steps
    return f"{ctx.nproc} ranks, steps {steps}, {float32_networks(out)} float32 networks; {stage_times(metrics)}"


def ddp_two_generations(ctx: SimpleNamespace) -> str:
    return two_generations(ctx, "ddp")


def deepspeed_zero2_bf16(ctx: SimpleNamespace) -> str:
    if ctx.device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise Skip("the GPU has no bf16")
    return two_generations(ctx, "zero2_bf16", "train.engine=deepspeed", "train.zero_stage=2", "train.precision=bf16")


def kill_and_resume(ctx: SimpleNamespace) -> str:
    import psutil

    if "ddp" not in ctx.steps:
        raise Skip("no uninterrupted run to compare with (ddp_two_generations failed)")
    out, log_path = ctx.work / "kill", ctx.work / "kill.log"
    cmd = command(ctx, out, "train.generations=1", extra=["--max-restarts", "1"])
    with open(log_path, "w") as log:
        agent = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(ctx), cwd=REPO)
        target = out / "checkpoints" / "ckpt_g00_e000_s0001.pt"
        deadline = time.time() + 600
        while not target.exists() and agent.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        if not target.exists():
            agent.kill()
            raise AssertionError(f"no checkpoint after the first subset (log {log_path})")
        workers = [p for p in psutil.Process(agent.pid).children(recursive=True) if "train.py" in " ".join(p.cmdline())]
        os.kill(workers[-1].pid, signal.SIGKILL)
        t_kill = time.time()
        if agent.wait(timeout=900) != 0:
            raise AssertionError(f"the restarted job failed (log {log_path})")
    if "resuming from" not in log_path.read_text():
        raise AssertionError("the restarted workers did not resume from a checkpoint")
    steps = final_state(out)["history"][0]["steps"]
    if steps != ctx.steps["ddp"][0]:
        raise AssertionError(f"{steps} steps after the restart, {ctx.steps['ddp'][0]} uninterrupted")
    return f"worker {workers[-1].pid} killed, group restarted and resumed: {steps} steps as uninterrupted, " \
           f"{time.time() - t_kill:.1f} s from the kill to the end"


def rank_agreement(ctx: SimpleNamespace) -> str:
    if ctx.nproc < 2:
        raise Skip("one GPU: nothing to compare")
    # one subset per epoch: its tuples come from the network before any step
    sets = ["train.generations=1", "train.gen0_epochs=1", "mining.cache_subset_size=1000000",
            "train.max_steps_per_epoch=1", "eval.pca_dim=0", "data.test_sets=[]"]
    negs = []
    for n in (1, ctx.nproc):
        out = ctx.work / f"agree{n}"
        if n > 1:  # the same NetVLAD init: its descriptor samples are drawn per rank
            (out / "cache").mkdir(parents=True, exist_ok=True)
            for f in (ctx.work / "agree1" / "cache").glob("netvlad_init_*.pt"):
                shutil.copy(f, out / "cache" / f.name)
        run(ctx, command(ctx, out, *sets, nproc=n), ctx.work / f"agree{n}.log")
        negs.append(np.asarray(final_state(out)["negatives"]["ids"]))
    same = (negs[0] == negs[1]).all(1)
    frac = float(same.mean())
    detail = f"hard-negative lists identical on 1 and {ctx.nproc} ranks for {100 * frac:.2f}% of queries"
    if ctx.device.type == "cpu" and frac < 1.0:
        raise AssertionError(detail + " (CPU: must be 100%)")
    if frac < 0.99:
        raise AssertionError(detail + " (below 99%)")
    return detail


def real_size_slice(ctx: SimpleNamespace) -> str:
    if ctx.device.type != "cuda":
        raise Skip("VGG16 at 480 x 640 needs a GPU")
    out = ctx.work / "real_size"
    run(ctx, command(ctx, out, "model.backbone=vgg16", "model.weights=null", "model.num_clusters=64",
                     "data.image_size=[480,640]", "data.extract_batch_size=16",
                     "train.generations=1", "train.max_steps_per_epoch=4", "train.precision=bf16",
                     "eval.pca_dim=256", "eval.test_untrained=false"), ctx.work / "real_size.log")
    from sfrs_dist.training.checkpoint import load_checkpoint

    st = final_state(out)
    model = load_checkpoint(out / "checkpoints" / "generation00_final.pt")["model"]
    k, d = next(tuple(v.shape) for n, v in model.items() if n.endswith("centroids"))
    if k * d != 32768:
        raise AssertionError(f"descriptor of {k} x {d} dimensions, not 32,768")
    metrics = generation_metrics(out)
    return f"{ctx.nproc} ranks, {st['history'][0]['steps']} steps, {k} x {d} = {k * d}-d; {stage_times(metrics)}"


ITEMS = [("ddp_two_generations", ddp_two_generations), ("deepspeed_zero2_bf16", deepspeed_zero2_bf16),
         ("kill_and_resume", kill_and_resume), ("rank_agreement", rank_agreement),
         ("real_size_slice", real_size_slice)]
