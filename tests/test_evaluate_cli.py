"""Checkpoints given to ``launch/evaluate.py``: ours with a network, and ours without one.

A training checkpoint saved at the start of a generation holds the training state but no
``model``; ``load_for_eval`` must name it in a ValueError instead of reading it as OpenIBL.
"""

from __future__ import annotations

import pytest
import torch

from sfrs_dist.config import load_config
from sfrs_dist.evaluation.checkpoints import NoNetworkError, load_for_eval
from sfrs_dist.models import build_model
from sfrs_dist.training.checkpoint import TrainState, atomic_torch_save, checkpoint_name

OVERRIDES = ["model.backbone=smallcnn", "model.num_clusters=4"]


@pytest.fixture
def cfg():
    return load_config(None, OVERRIDES)


def _saved_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = build_model("smallcnn", num_clusters=4).eval()
    with torch.no_grad():  # move every weight off its initialisation, as training would
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def test_checkpoint_with_model_gives_the_saved_network(tmp_path, cfg):
    torch.set_num_threads(1)
    saved = _saved_model(seed=3)
    path = tmp_path / "checkpoints" / "generation00_final.pt"
    atomic_torch_save({"model": saved.state_dict(), "generation": 0, "config": cfg.to_dict()}, path)

    net = load_for_eval(cfg, path, torch.device("cpu"))

    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = saved(x)
        got = net(x)
        fresh = build_model("smallcnn", num_clusters=4).eval()(x)
    assert not net.training
    assert not any(p.requires_grad for p in net.parameters())
    assert got.shape == (2, net.output_dim)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # a network built without the checkpoint gives other descriptors: the weights came from the file
    assert not torch.allclose(fresh, expected, atol=1e-3)


def test_checkpoint_without_model_is_named_in_a_value_error(tmp_path, cfg):
    path = tmp_path / "checkpoints" / checkpoint_name(1, 0, 0)
    state = TrainState(generation=1).state_dict()
    atomic_torch_save({"state": state, "tracker": {}, "history": {0: {}}, "config": cfg.to_dict()}, path)

    with pytest.raises(ValueError, match=r"ckpt_g01_e000_s0000\.pt") as info:
        load_for_eval(cfg, path, torch.device("cpu"))
    assert str(path) in str(info.value)
    assert "model" in str(info.value)
    # the type launch/evaluate.py skips (any other ValueError stops it)
    assert info.type is NoNetworkError
