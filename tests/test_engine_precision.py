"""DeepSpeed engines in bf16 on the CPU: 2 real processes over gloo, no data loaders.

Each case trains a few steps (batch-norm backbones included), saves an engine checkpoint,
keeps training, then a second engine resumes from the checkpoint and must reach the same
float32 weights. Extraction networks and saved weights are float32.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from gloo import gloo_group

CASES = [("smallcnn", None, 0), ("smallcnn", None, 1), ("smallcnn", None, 2), ("resnet18", "layer3", 1)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _images(rank: int, i: int) -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1000 * rank + i)) * 50


def _steps(engine, rank: int, first: int, n: int) -> list:
    losses = []
    engine.train(True)
    for i in range(first, first + n):
        r = engine.forward(_images(rank, i), regions=True)  # (2, 9, D)
        loss = 1.0 - (r[0] * r[1]).sum(-1).mean()
        engine.backward_step(loss)
        losses.append(float(loss.detach()))
    return losses


def _case(rank: int, out: Path, backbone: str, layer, stage: int) -> dict:
    from sfrs_dist import distributed as du
    from sfrs_dist.models import build_model
    from sfrs_dist.training.checkpoint import atomic_torch_save, deepspeed_dir, load_checkpoint
    from sfrs_dist.training.engine import build_engine

    def new_engine(seed: int):
        torch.manual_seed(seed)
        net = build_model(backbone, weights=None, num_clusters=4, layer=layer)
        return build_engine("deepspeed", net, torch.device("cpu"), 0.05, 0.9, 0.001, "bf16", stage, 2)

    res: dict = {}
    engine = new_engine(0)
    assert engine.module.netvlad.conv.weight.dtype == torch.bfloat16  # DeepSpeed cast the module
    res["losses"] = _steps(engine, rank, 0, 2)
    path = out / f"ckpt_{backbone}_z{stage}.pt"
    payload = engine.checkpoint_state(path)  # every rank
    if rank == 0:
        atomic_torch_save(payload, path)
    du.barrier()
    model = payload["model"]
    res["dtypes"] = sorted({str(v.dtype) for v in model.values()})
    # float32 masters / float32 frozen weights, not their bf16 casts
    res["fp32_exact"] = sum(bool((v != v.bfloat16().float()).any()) for v in model.values() if v.is_floating_point())
    res["tag_dir"] = (deepspeed_dir(out) / payload["deepspeed_tag"]).is_dir()
    res["comm_dtype"] = str(engine.model.communication_data_type)
    # every trained weight saved is its float32 master, not the module's bf16 cast
    trained = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    res["trained_rounded"] = sum(bool(torch.equal(model[n], p.detach().float())) for n, p in trained)
    if stage == 0:  # the masters are the tensors the torch SGD inside DeepSpeed's wrapper steps
        masters = [q for g in engine.optimizer.optimizer.param_groups for q in g["params"]]
        res["stage0_masters_equal"] = (len(masters) == len(trained) and all(
            q.dtype == torch.float32 and torch.equal(model[n], q.detach().cpu()) for (n, _), q in zip(trained, masters)))
    # the extraction network takes float32 images and holds the float32 weights
    net = engine.eval_network().eval()
    with torch.no_grad():
        d = net(_images(7, 7))
    res["eval_dtype"] = str(d.dtype)
    res["eval_desc"] = d[0, :8].tolist()
    res["eval_matches_ckpt"] = all(torch.equal(net.state_dict()[k].float(), v.float()) for k, v in model.items())
    res["losses"] += _steps(engine, rank, 2, 2)
    final = engine.fp32_state_dict()
    # resume into a freshly initialised engine
    resumed = new_engine(1)
    resumed.load_checkpoint_state(load_checkpoint(path), path)
    res["resumed_losses"] = _steps(resumed, rank, 2, 2)
    again = resumed.fp32_state_dict()
    res["resume_max_diff"] = max(float((again[k].float() - final[k].float()).abs().max()) for k in final)
    return res


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    with gloo_group(rank, world, port=port):
        out = {f"{b}-z{s}": _case(rank, Path(out_dir), b, layer, s) for b, layer, s in CASES}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("engine_bf16")
    mp.start_processes(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True, start_method="spawn")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("case", [f"{b}-z{s}" for b, _, s in CASES])
def test_deepspeed_bf16_steps_fp32_checkpoint_and_resume(results, case):
    r0, r1 = results[0][case], results[1][case]
    for r in (r0, r1):
        assert all(0.0 <= v <= 2.0 for v in r["losses"] + r["resumed_losses"])  # finite, bf16 steps ran
        assert r["dtypes"] == ["torch.float32", "torch.int64"]
        assert r["fp32_exact"] > 0
        assert r["tag_dir"] and r["eval_dtype"] == "torch.float32" and r["eval_matches_ckpt"]
        assert r["trained_rounded"] == 0 and r.get("stage0_masters_equal", True)
        assert r["comm_dtype"] == "torch.float32"  # gradients averaged in float32, as DDP
        # the resumed engine continues exactly where the first one went on
        assert r["resumed_losses"] == r["losses"][2:]
        assert r["resume_max_diff"] == 0.0
    # every rank extracts with the same weights and batch-norm statistics
    assert r0["eval_desc"] == r1["eval_desc"]


def test_ddp_fp16_scales_the_loss_and_checkpoints_the_scale(tmp_path):
    """fp16 autocast trains with a GradScaler (CUDA in practice; its bookkeeping runs on CPU too)."""
    from torch import nn

    from sfrs_dist.training.engine import DDPEngine, make_sgd

    def engine():
        torch.manual_seed(0)
        m = nn.Linear(4, 2)
        return DDPEngine(m, make_sgd(m.parameters(), 0.1, 0.9, 0.0), torch.device("cpu"), "fp16")

    e = engine()
    for _ in range(2):
        e.backward_step(e.module(torch.ones(3, 4)).pow(2).mean())
    state = e.checkpoint_state(tmp_path / "ckpt.pt")
    assert state["grad_scaler"]["scale"] == 65536.0 and state["grad_scaler"]["_growth_tracker"] == 2
    again = engine()
    again.load_checkpoint_state(state, tmp_path / "ckpt.pt")
    assert again.scaler.state_dict() == e.scaler.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(again.module.parameters(), e.module.parameters()))
