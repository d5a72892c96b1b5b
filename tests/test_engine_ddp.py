"""The DDP engine in 2 real gloo processes: gradients averaged, ranks that agree.

Each rank trains a batch-norm backbone on its own batches. Both must end with the same
weights, those of one process stepping on the mean of the two ranks' gradients, and must
extract the same descriptor for the same image and save the same checkpoint, batch-norm
running statistics included (each rank's statistics last saw its own batch).
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from gloo import gloo_group

STEPS, LR = 3, 0.05


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _net():
    from sfrs_dist.models import build_model

    torch.manual_seed(0)
    return build_model("resnet18", weights=None, num_clusters=4, layer="layer3")  # layer3 trained, batch norms too


def _images(rank: int, step: int) -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(100 * rank + step)) * 50


def _loss(regions: torch.Tensor) -> torch.Tensor:
    return 1.0 - (regions[0] * regions[1]).sum(-1).mean()


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    with gloo_group(rank, world, port=port):
        from sfrs_dist.training.engine import build_engine

        engine = build_engine("ddp", _net(), torch.device("cpu"), LR, 0.0, 0.0, "fp32")
        res = {"wrapped": type(engine.model).__name__}
        initial = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        engine.train(True)
        for i in range(STEPS):
            engine.backward_step(_loss(engine.forward(_images(rank, i), regions=True)))
        params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        res["moved"] = sum(not torch.equal(params[n], initial[n])
                           for n, p in engine.module.named_parameters() if p.requires_grad)
        torch.save(params, Path(out_dir, f"params{rank}.pt"))
        state = engine.fp32_state_dict()  # a checkpoint's network
        torch.save(state, Path(out_dir, f"state{rank}.pt"))
        net = engine.eval_network().eval()  # an extraction pass's network
        with torch.no_grad():
            res["desc"] = net(_images(7, 7))[0].tolist()
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(res))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("engine_ddp")
    mp.start_processes(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True, start_method="spawn")
    return [(json.loads((out / f"rank{r}.json").read_text()), torch.load(out / f"params{r}.pt"),
             torch.load(out / f"state{r}.pt")) for r in range(2)]


def test_ddp_averages_gradients(results):
    (r0, p0, _), (r1, p1, _) = results
    assert r0["wrapped"] == r1["wrapped"] == "DistributedDataParallel"
    assert r0["moved"] > 0 and r0["moved"] == r1["moved"]
    for n in p0:
        assert torch.equal(p0[n], p1[n]), f"{n} differs between ranks"
    # one process stepping on the mean of both ranks' gradients reaches the same weights
    from sfrs_dist.training.engine import make_sgd

    net = _net().train()
    opt = make_sgd(net.parameters(), LR, 0.0, 0.0)
    for i in range(STEPS):
        opt.zero_grad()
        (sum(_loss(net(_images(r, i), regions=True)) for r in range(2)) / 2).backward()
        opt.step()
    for n, p in net.named_parameters():
        torch.testing.assert_close(p0[n], p.detach(), rtol=1e-4, atol=1e-5, msg=f"{n}")


def test_ranks_extract_and_save_the_same_network(results):
    (r0, _, s0), (r1, _, s1) = results
    stats = [k for k in s0 if k.endswith("running_mean")]
    assert stats  # the backbone trains batch norms
    for k in s0:
        assert torch.equal(s0[k], s1[k]), f"{k} differs between ranks"
    assert r0["desc"] == r1["desc"]  # the same image, the same descriptor on every rank
