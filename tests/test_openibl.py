"""OpenIBL checkpoint import: same descriptors as a direct computation from the weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sfrs_dist.models import (
    build_backbone,
    build_model,
    build_model_from_openibl,
    load_openibl_checkpoint,
    sfrs_to_openibl_state_dict,
)

torch.set_num_threads(1)

VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
K = 16


def openibl_state(seed: int = 0) -> dict:
    """Random VGG16 (features[:-2]) + NetVLAD weights under OpenIBL key names."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    idx, cin = 0, 3
    for v in VGG16_CFG:
        if v == "M":
            idx += 1
            continue
        state[f"base_model.base.{idx}.weight"] = torch.randn(v, cin, 3, 3, generator=g) * math.sqrt(2.0 / (9 * cin))
        state[f"base_model.base.{idx}.bias"] = torch.randn(v, generator=g) * 0.01
        cin = v
        idx += 2  # conv, relu
    centroids = torch.randn(K, 512, generator=g) * 0.05
    state["net_vlad.centroids"] = centroids
    state["net_vlad.conv.weight"] = (20.0 * F.normalize(centroids + 0.05 * torch.randn(K, 512, generator=g), dim=1))[:, :, None, None]
    return state


def reference_features(state: dict, x: torch.Tensor) -> torch.Tensor:
    """VGG16 conv1_1 .. conv5_3 (no last ReLU, no last pool) with plain torch ops."""
    idx = 0
    convs_left = sum(1 for v in VGG16_CFG if v != "M")
    for v in VGG16_CFG:
        if v == "M":
            x = F.max_pool2d(x, 2, 2)
            idx += 1
            continue
        x = F.conv2d(x, state[f"base_model.base.{idx}.weight"], state[f"base_model.base.{idx}.bias"], padding=1)
        convs_left -= 1
        if convs_left:
            x = F.relu(x)
        idx += 2
    return x


def reference_vlad_sums(state: dict, feats: torch.Tensor) -> torch.Tensor:
    """NetVLAD residual sums per image: (B, D, H, W) -> (B, K, D)."""
    x = feats.flatten(2).double()  # (B, D, N)
    x = x / x.norm(dim=1, keepdim=True)
    w = state["net_vlad.conv.weight"][:, :, 0, 0].double()  # (K, D)
    c = state["net_vlad.centroids"].double()
    a = torch.softmax(torch.einsum("kd,bdn->bkn", w, x), dim=1)  # (B, K, N)
    return torch.einsum("bkn,bdn->bkd", a, x) - a.sum(-1, keepdim=True) * c


def reference_normalize(v: torch.Tensor) -> torch.Tensor:
    v = v / v.norm(dim=-1, keepdim=True)  # intra-normalisation
    v = v.flatten(-2)
    return v / v.norm(dim=-1, keepdim=True)


def reference_regions(state: dict, feats: torch.Tensor) -> torch.Tensor:
    h, w = feats.shape[-2:]
    hh, hw = h // 2, w // 2
    crops = [  # global, top, bottom, left, right, tl, tr, bl, br
        (slice(0, h), slice(0, w)), (slice(0, hh), slice(0, w)), (slice(hh, h), slice(0, w)),
        (slice(0, h), slice(0, hw)), (slice(0, h), slice(hw, w)), (slice(0, hh), slice(0, hw)),
        (slice(0, hh), slice(hw, w)), (slice(hh, h), slice(0, hw)), (slice(hh, h), slice(hw, w)),
    ]
    return torch.stack([reference_normalize(reference_vlad_sums(state, feats[:, :, r, c])) for r, c in crops], dim=1)


@pytest.fixture(scope="module")
def state():
    return openibl_state()


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def reference(state, images):
    with torch.no_grad():
        feats = reference_features(state, images)
    assert feats.shape == (2, 512, 4, 6)
    return reference_normalize(reference_vlad_sums(state, feats)), reference_regions(state, feats)


def min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.double(), b.double(), dim=-1).min())


@pytest.mark.parametrize("layout", ["module_prefix_in_dict", "plain_state_dict"])
def test_openibl_checkpoint_gives_reference_descriptors(tmp_path, state, images, reference, layout):
    path = tmp_path / "openibl.pth.tar"
    if layout == "module_prefix_in_dict":
        torch.save({"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 5,
                    "best_recall5": np.float64(0.912)}, path)
    else:
        torch.save(state, path)
    model = build_model_from_openibl(str(path)).eval()
    assert model.netvlad.num_clusters == K
    with torch.no_grad():
        glob = model(images)
        regions = model(images, regions=True)
    ref_glob, ref_regions = reference
    assert glob.shape == (2, K * 512) and regions.shape == (2, 9, K * 512)
    assert min_cosine(glob, ref_glob) > 0.99999
    assert min_cosine(regions, ref_regions) > 0.99999
    # the region similarities actually differ between regions (a non-trivial check)
    assert float((ref_regions[:, 1:] * ref_regions[:, :1]).sum(-1).min()) < 0.999
    # export back to OpenIBL names reproduces the file's keys and tensors
    exported = sfrs_to_openibl_state_dict(model, prefix="")
    assert set(exported) == set(state)
    for k, v in state.items():
        assert torch.equal(exported[k], v)


def test_backbone_weights_from_openibl_checkpoint(tmp_path, state, images):
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, path)
    backbone, _, _ = build_backbone("vgg16", weights=str(path))
    with torch.no_grad():
        torch.testing.assert_close(backbone(images[:1]), reference_features(state, images[:1]), atol=1e-4, rtol=1e-4)


def test_mismatched_checkpoints_list_keys(tmp_path, state):
    broken = dict(state)
    del broken["base_model.base.28.bias"]
    broken["base_model.classifier.weight"] = torch.zeros(3)
    path = tmp_path / "broken.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in broken.items()}}, path)
    with pytest.raises(ValueError) as info:
        build_model_from_openibl(str(path))
    msg = str(info.value)
    assert "broken.pth" in msg and "base_model.base.28.bias" in msg and "base_model.classifier.weight" in msg

    no_vlad = {k: v for k, v in state.items() if not k.startswith("net_vlad.")}
    path2 = tmp_path / "novlad.pth"
    torch.save(no_vlad, path2)
    with pytest.raises(ValueError, match="net_vlad.centroids"):
        build_model_from_openibl(str(path2))

    # a K=16 checkpoint into a K=8 model: the shapes are named
    path3 = tmp_path / "k16.pth"
    torch.save(state, path3)
    with pytest.raises(ValueError) as info:
        load_openibl_checkpoint(build_model("vgg16", num_clusters=8), str(path3))
    assert "net_vlad.centroids: file (16, 512) vs model (8, 512)" in str(info.value)
