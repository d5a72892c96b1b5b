"""First contact with a GPU node: one command, a few minutes, no network.

    python bench/gpu_check.py [--device auto|cuda|cpu] [--acceptance] [--work DIR] [--keep]

``--acceptance`` makes it the acceptance run of a new node: after the one-process items
below, real ``torchrun`` jobs over every local GPU (``bench/acceptance.py``: two generations
under DDP and under DeepSpeed ZeRO-2 bf16, a killed worker and the resumed job, the mined
tuples on 1 rank against N ranks, a real-size slice with 32,768-d descriptors at 480 x 640),
each with its stage times.

Builds tiny synthetic shards in a temporary folder, then checks, one line each
(``PASS``/``FAIL``/``SKIP name: detail``):

- ``nccl``: a one-rank NCCL process group and every collective the job uses (the helpers
  of ``sfrs_dist.distributed``, the tensor collectives DeepSpeed ZeRO runs), and that a CPU
  tensor is refused before NCCL sees it;
- ``faiss_gpu``: faiss GPU top-k (evaluation search and the mining kNN) equals CPU faiss;
- ``bf16_extraction``: bf16-autocast descriptors of the recipe networks against fp32
  (cosine > 0.999);
- ``train_ddp_fp32`` / ``train_ddp_bf16`` / ``train_ddp_fp16``: a few steps of the tiny
  recipe (refresh, training, validation, test, PCA, checkpoints) through the DDP engine;
- ``train_deepspeed_zero1_bf16``: the same under DeepSpeed ZeRO-1 bf16, then a resume from
  the epoch checkpoint that must reach the same float32 weights;
- ``teacher_pass``: the teacher pass of generation 1 from the fp32 job's final network;
- ``loader_vs_step``: tuples/s of the training loader against tuples/s of the step.

Exit status 1 if any item FAILs. GPUs that torch cannot use (``nvidia-smi`` lists them, or
faiss sees them) are one FAIL line naming the driver and the fix. On a machine without any
GPU every item prints SKIP (reason) and the exit status is 0; ``--device cpu`` runs the items
that make sense on a CPU (gloo instead of NCCL, 2 processes for the torchrun items) to check
the script itself.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "bench"))  # acceptance.py

import numpy as np  # noqa: E402
import torch  # noqa: E402

log = logging.getLogger("gpu_check")


class Skip(Exception):
    """An item that cannot run here (the reason is the message)."""


class Check:
    """Runs items, prints one line each, remembers failures."""

    def __init__(self) -> None:
        self.failed: List[str] = []

    def item(self, name: str, fn: Callable[[], str], skip: Optional[str] = None) -> bool:
        if skip:
            print(f"SKIP {name}: {skip}", flush=True)
            return False
        t0 = time.time()
        try:
            detail = fn()
        except Skip as exc:
            print(f"SKIP {name}: {exc}", flush=True)
            return False
        except Exception as exc:  # noqa: BLE001 - every failure becomes a FAIL line
            log.debug("%s failed:\n%s", name, traceback.format_exc())
            self.failed.append(name)
            print(f"FAIL {name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                  f"({time.time() - t0:.1f} s)", flush=True)
            return False
        print(f"PASS {name}: {detail} ({time.time() - t0:.1f} s)", flush=True)
        return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_shards(work: Path) -> Path:
    """The ``tiny`` synthetic raw set and its shards (as tests/conftest.py builds them)."""
    from sfrs_dist.data.datasets import load_dataset
    from sfrs_dist.data.shards import build_shards as build
    from sfrs_dist.data.synthetic import generate

    raw, out = work / "raw", work / "shards"
    generate(raw, preset="tiny", seed=0)
    build(load_dataset("synthetic", raw), out, shard_size=16, workers=1, progress=False,
          source={"dataset": "synthetic", "root": str(raw), "scale": "30k"})
    return out


def init_group(device: torch.device) -> str:
    """A one-rank process group on ``device``'s backend (NCCL on CUDA, gloo on CPU)."""
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=0, world_size=1, timeout=datetime.timedelta(seconds=120))
    return backend


# ------------------------------------------------------------------ items
def check_collectives(device: torch.device) -> str:
    import torch.distributed as dist

    from sfrs_dist import distributed as du

    backend = init_group(device)
    dev = du.collective_device()
    if dev.type != device.type:
        raise AssertionError(f"collective device {dev} for backend {backend}, expected {device.type}")
    t = du.all_reduce_sum(du.collective_tensor([1.0, 2.0]))
    assert t.tolist() == [1.0, 2.0]
    assert du.all_reduce_int_sum(5) == 5
    b = du.broadcast_tensor(torch.arange(4, device=dev))
    assert b.tolist() == [0, 1, 2, 3]
    assert du.all_gather_object({"a": 1}) == [{"a": 1}]
    assert du.broadcast_object("x") == "x"
    du.barrier()
    # what DeepSpeed ZeRO and its fp32 gathers run, on the reduced dtypes too
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        if device.type == "cpu" and dtype != torch.float32:
            continue  # gloo: no half-precision reductions
        x = torch.ones(8, device=dev, dtype=dtype)
        dist.all_reduce(x)
        out = torch.empty(8, device=dev, dtype=dtype)
        dist.all_gather_into_tensor(out, x)
        dist.reduce_scatter_tensor(out, x)
        dist.broadcast(x, src=0)
    if device.type == "cuda":
        try:
            du.all_reduce_sum(torch.zeros(1))
        except ValueError:
            pass
        else:
            raise AssertionError("a CPU tensor reached the NCCL all_reduce")
    return f"backend {backend}, collective device {dev}"


def check_faiss_gpu(device: torch.device) -> str:
    from sfrs_dist.evaluation.search import num_faiss_gpus, search_topk
    from sfrs_dist.mining.knn import self_topk

    if num_faiss_gpus() == 0:
        raise Skip("faiss has no GPU (faiss-cpu build or no device)")
    rng = np.random.default_rng(0)
    db = rng.standard_normal((5000, 256)).astype(np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q = db[:300] + 0.05 * rng.standard_normal((300, 256)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    sg, ig = search_topk(db, q, 50, use_gpu=True)
    sc, ic = search_topk(db, q, 50, use_gpu=False)
    # cuBLAS and CPU BLAS round differently: ids may swap at near-ties, scores must agree
    exact = q.astype(np.float64) @ db.T.astype(np.float64)
    gap = max(_score_gap(sg, sc), _score_gap(np.take_along_axis(exact, ig, 1), np.take_along_axis(exact, ic, 1)))
    if gap > 1e-4:
        raise AssertionError(f"evaluation search: scores differ from CPU faiss by up to {gap:.2e}")
    swapped = int((ig != ic).any(1).sum())
    x = db[:2000]
    s_knn, i_knn = self_topk(x, 21)  # GPU flat index inside
    exact = x.astype(np.float64) @ x.T.astype(np.float64)
    ref = -np.sort(-exact, axis=1)[:, :21]
    knn_gap = _score_gap(np.take_along_axis(exact, i_knn, 1), ref)
    if knn_gap > 1e-4:
        raise AssertionError(f"mining kNN: scores differ from the exact top-21 by up to {knn_gap:.2e}")
    return (f"{num_faiss_gpus()} GPU(s); evaluation top-50 scores within {gap:.1e} of CPU ({swapped} rows with "
            f"near-tie swaps), mining top-21 within {knn_gap:.1e} of exact")


def _score_gap(a: np.ndarray, b: np.ndarray) -> float:
    """Largest difference between two (rows, k) score lists, position by position."""
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max(initial=0.0))


def check_bf16_extraction(device: torch.device, shards: Path) -> str:
    from sfrs_dist.config import load_config
    from sfrs_dist.data.manifest import Manifest
    from sfrs_dist.extraction.descriptors import extract_descriptors
    from sfrs_dist.extraction.passes import pass_loader
    from sfrs_dist.models import build_model

    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"data.shards={shards}", "data.num_workers=0"])
    manifest = Manifest.load(shards)
    out = []
    for backbone, clusters in (("smallcnn", 8), ("vgg16", 16)):
        torch.manual_seed(0)
        net = build_model(backbone, weights=None, num_clusters=clusters).to(device).eval()
        loader = lambda: pass_loader(manifest, "pitts30k_test", "db", cfg.data)  # noqa: E731
        _, ref = extract_descriptors(net, loader(), net.output_dim, device, progress=False)
        _, low = extract_descriptors(net, loader(), net.output_dim, device, autocast_dtype=torch.bfloat16,
                                     progress=False)
        cos = (ref * low).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(low, axis=1))
        if not cos.min() > 0.999:
            raise AssertionError(f"{backbone}: min cosine {cos.min():.5f} <= 0.999")
        out.append(f"{backbone} min cosine {cos.min():.6f}")
    return ", ".join(out)


def _tiny_cfg(shards: Path, out: Path, *sets: str):
    from sfrs_dist.config import load_config

    workers = min(4, os.cpu_count() or 1)
    return load_config(REPO / "configs" / "tiny.yaml", [
        f"data.shards={shards}", f"run.out_dir={out}", "train.generations=1", "train.max_steps_per_epoch=3",
        f"data.num_workers={workers}", "run.resume=auto", *sets])


def _weights(path: Path) -> Dict[str, torch.Tensor]:
    from sfrs_dist.training.checkpoint import load_checkpoint

    model = load_checkpoint(path)["model"]
    bad = sorted({str(v.dtype) for v in model.values()} - {"torch.float32", "torch.int64"})
    if bad:
        raise AssertionError(f"{path.name} holds {bad} weights, not float32")
    if not all(torch.isfinite(v.float()).all() for v in model.values()):
        raise AssertionError(f"{path.name} holds non-finite weights")
    return model


def run_job(device: torch.device, shards: Path, out: Path, *sets: str) -> Tuple[dict, Path]:
    from sfrs_dist.training.trainer import Trainer

    cfg = _tiny_cfg(shards, out, *sets)
    trainer = Trainer(cfg, device)
    history = trainer.run()
    steps = history[0]["steps"]
    if steps <= 0:
        raise AssertionError("no training step ran")
    final = out / "checkpoints" / "generation00_final.pt"
    _weights(final)
    _weights(out / "checkpoints" / "generation00_best.pt")
    return history, final


def check_train(device: torch.device, shards: Path, work: Path, name: str, *sets: str) -> str:
    history, _ = run_job(device, shards, work / name, *sets)
    r5 = history[0]["test"]["pitts30k_test"][0]["all"].get(5)
    return f"{history[0]['steps']} steps, float32 checkpoints, pitts30k_test R@5 {100 * r5:.1f}"


def check_deepspeed(device: torch.device, shards: Path, work: Path) -> str:
    ds = ["train.engine=deepspeed", "train.zero_stage=1", "train.precision=bf16", "train.gen0_epochs=2"]
    out = work / "deepspeed"
    history, final = run_job(device, shards, out, *ds)
    first = _weights(final)
    epoch_ckpt = out / "checkpoints" / "ckpt_g00_e001_s0000.pt"
    from sfrs_dist.training.checkpoint import load_checkpoint

    tag = load_checkpoint(epoch_ckpt).get("deepspeed_tag")
    if not tag or not (out / "checkpoints" / "deepspeed" / tag).is_dir():
        raise AssertionError(f"{epoch_ckpt.name} names no DeepSpeed checkpoint folder")
    run_job(device, shards, out, *ds, f"run.resume={epoch_ckpt}")
    again = _weights(final)
    diff = max(float((again[k].float() - first[k].float()).abs().max()) for k in first)
    if diff > 1e-3:
        raise AssertionError(f"resumed run ends {diff:.2e} away from the uninterrupted one")
    return f"{history[0]['steps']} steps, saved under tag {tag}, resumed: max weight difference {diff:.1e}"


def check_teacher(device: torch.device, shards: Path, work: Path) -> str:
    from sfrs_dist.data.manifest import Manifest
    from sfrs_dist.teacher import run_teacher_pass
    from sfrs_dist.training.trainer import TrainSplit

    final = work / "ddp_fp32" / "checkpoints" / "generation00_final.pt"
    if not final.is_file():
        raise Skip("no generation-0 network (train_ddp_fp32 did not finish)")
    cfg = _tiny_cfg(shards, work / "ddp_fp32")
    manifest = Manifest.load(shards)
    split = TrainSplit.from_manifest(manifest, cfg.data.train_set)
    t0 = time.time()
    cache, key = run_teacher_pass(cfg, manifest, split.train_pos, final, work / "teacher_cache", device)
    if not cache.covers(split.train_pos):
        raise AssertionError("teacher cache does not cover every training positive")
    return f"cache {key}: {len(cache.pos)} (query, positive) entries in {time.time() - t0:.1f} s"


def check_loader_vs_step(device: torch.device, shards: Path, work: Path) -> str:
    from sfrs_dist.data.manifest import Manifest
    from sfrs_dist.models import build_model
    from sfrs_dist.precision import resolve_config
    from sfrs_dist.training.engine import build_engine
    from sfrs_dist.training.trainer import TrainSplit
    from sfrs_dist.training.tuples_data import TupleImages, TupleLoader

    cfg, choice = resolve_config(_tiny_cfg(shards, work / "loader"), device)
    manifest = Manifest.load(shards)
    split = TrainSplit.from_manifest(manifest, cfg.data.train_set)
    rng = np.random.default_rng(0)
    n_db, n_neg = len(split.db_keys), cfg.mining.num_negatives
    tuples = []
    for q in np.resize(split.queries, 48):
        near = set(int(j) for j in split.potential[q])
        far = [j for j in rng.permutation(n_db) if int(j) not in near][:n_neg]
        tuples.append(SimpleNamespace(query=int(q), positive=int(split.train_pos[q][0]), negatives=far,
                                      difficult_positives=list(split.train_pos[q][:cfg.mining.num_difficult])))
    ds = TupleImages(cfg.data.shards, split.q_keys, split.db_keys, cfg.data.image_size, cfg.data.color_jitter)
    workers = cfg.data.num_workers if cfg.data.train_workers is None else cfg.data.train_workers
    with TupleLoader(ds, cfg.train.batch_size, workers, pin_memory=device.type == "cuda") as loader:
        t0 = time.time()
        batches = list(loader.subset(tuples, seed=0))
        load_rate = len(tuples) / (time.time() - t0)
    torch.manual_seed(0)
    net = build_model(cfg.model.backbone, weights=None, num_clusters=cfg.model.num_clusters, layer=cfg.model.layer)
    engine = build_engine("ddp", net, device, 0.001, 0.9, 0.001, cfg.train.precision)
    engine.train(True)

    def step(batch):
        images = batch["images"].to(device, non_blocking=True)
        r = engine.forward(images, regions=True)
        engine.backward_step(1.0 - (r[0, 0] * r[1:, 0]).sum(-1).mean())

    for batch in batches[:3]:  # warm-up (cuDNN autotuning, allocator)
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.time()
    for batch in batches:
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    step_rate = len(tuples) / (time.time() - t0)
    slower = "loader" if load_rate < step_rate else "step"
    return (f"loader {load_rate:.1f} tuples/s ({workers} workers), step {step_rate:.1f} tuples/s "
            f"({choice.train}, {cfg.model.backbone} {cfg.data.image_size[0]}x{cfg.data.image_size[1]}): "
            f"the {slower} is the bottleneck")


def run_acceptance(check: "Check", device: torch.device, shards: Path, work: Path) -> None:
    """The torchrun items of ``bench/acceptance.py``, one line each."""
    import acceptance

    nproc = torch.cuda.device_count() if device.type == "cuda" else 2
    print(f"acceptance: torchrun jobs on {nproc} {'GPU' if device.type == 'cuda' else 'CPU process'}(es)", flush=True)
    ctx = SimpleNamespace(device=device, nproc=nproc, shards=shards, work=work / "acceptance", steps={})
    ctx.work.mkdir(parents=True, exist_ok=True)
    for name, fn in acceptance.ITEMS:
        def item(fn=fn):
            try:
                return fn(ctx)
            except acceptance.Skip as exc:
                raise Skip(str(exc)) from None
        check.item(name, item)


# ------------------------------------------------------------------- main
def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: the GPU if CUDA sees one, else every item SKIPs; cpu: run what a CPU can (gloo)")
    p.add_argument("--acceptance", action="store_true",
                   help="also the torchrun jobs over every local GPU (bench/acceptance.py)")
    p.add_argument("--work", default=None, help="working folder (default: a temporary one, removed after)")
    p.add_argument("--keep", action="store_true", help="keep the working folder")
    p.add_argument("-v", "--verbose", action="store_true", help="log the job output and failure tracebacks")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("mlflow", "alembic", "DeepSpeed", "deepspeed", "torch.distributed", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR if not args.verbose else logging.INFO)
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # each job's own store under its run folder

    check = Check()
    names = ["nccl", "faiss_gpu", "bf16_extraction", "train_ddp_fp32", "train_ddp_bf16", "train_ddp_fp16",
             "train_deepspeed_zero1_bf16", "teacher_pass", "loader_vs_step"]
    if args.acceptance:
        import acceptance

        names += [n for n, _ in acceptance.ITEMS]
    cuda = torch.cuda.is_available()
    if args.device != "cpu":  # GPUs that torch cannot use are a failure, not a reason to skip
        from sfrs_dist.device_check import DeviceUnusable, resolve_device

        try:
            resolve_device("auto")
        except DeviceUnusable as exc:
            print(f"FAIL device: {exc}", flush=True)
            return 1
    if args.device == "cuda" and not cuda:
        print("FAIL cuda: --device cuda but torch sees no CUDA device", flush=True)
        return 1
    if args.device == "auto" and not cuda:
        for n in names:
            check.item(n, lambda: "", skip=f"no CUDA device (torch {torch.__version__}, "
                                           f"cuda build {torch.version.cuda or 'none'})")
        return 0
    device = torch.device("cuda", 0) if args.device != "cpu" else torch.device("cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True  # the resume check compares weights
        print(f"device: {torch.cuda.get_device_name(device)}, capability "
              f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}", flush=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="sfrs-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    try:
        t0 = time.time()
        shards = build_shards(work)
        print(f"synthetic shards in {work} ({time.time() - t0:.1f} s)", flush=True)
        group = check.item("nccl" if device.type == "cuda" else "nccl (gloo on cpu)",
                           lambda: check_collectives(device))
        no_group = None if group else "no process group"
        check.item("faiss_gpu", lambda: check_faiss_gpu(device),
                   skip=None if device.type == "cuda" else "CPU run")
        check.item("bf16_extraction", lambda: check_bf16_extraction(device, shards))
        for prec in ("fp32", "bf16", "fp16"):
            skip = no_group or ("fp16 needs CUDA" if prec == "fp16" and device.type == "cpu" else None)
            check.item(f"train_ddp_{prec}", lambda prec=prec: check_train(device, shards, work, f"ddp_{prec}",
                                                                          f"train.precision={prec}"), skip=skip)
        check.item("train_deepspeed_zero1_bf16", lambda: check_deepspeed(device, shards, work), skip=no_group)
        check.item("teacher_pass", lambda: check_teacher(device, shards, work), skip=no_group)
        check.item("loader_vs_step", lambda: check_loader_vs_step(device, shards, work))
        if args.acceptance:
            run_acceptance(check, device, shards, work)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{'FAILED: ' + ', '.join(check.failed) if check.failed else 'all passed or skipped'} "
          f"({time.time() - t_start:.0f} s)", flush=True)
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
