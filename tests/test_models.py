"""Backbones, NetVLAD and the SFRS region network against brute-force references."""

from __future__ import annotations

import math
import os
import re

import faiss
import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from sfrs_dist.models import (
    REGION_NAMES,
    NetVLAD,
    NetVLADInit,
    SFRSNet,
    alpha_from_centroids,
    build_backbone,
    build_model,
    global_region_similarity,
    init_netvlad_from_descriptors,
    kmeans_init,
    kmeans_pp_seeds,
    load_or_compute_init,
    read_centroid_file,
    region_similarity,
    sample_local_descriptors,
    state_fingerprint,
)

torch.set_num_threads(1)


# ----------------------------------------------------------------- brute-force references


def ref_residual_sums(feat: torch.Tensor, conv_w: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """NetVLAD residual sums of one (D, H, W) map by explicit loops, in float64."""
    feat, conv_w, centroids = feat.double(), conv_w.double(), centroids.double()
    d = feat.shape[0]
    k = centroids.shape[0]
    out = torch.zeros(k, d, dtype=torch.float64)
    for y in range(feat.shape[1]):
        for x in range(feat.shape[2]):
            v = feat[:, y, x]
            v = v / v.norm()
            logits = [float(conv_w[j] @ v) for j in range(k)]
            m = max(logits)
            e = [math.exp(z - m) for z in logits]
            for j in range(k):
                out[j] += (e[j] / sum(e)) * (v - centroids[j])
    return out


def ref_normalize(v: torch.Tensor) -> torch.Tensor:
    v = v / v.norm(dim=1, keepdim=True)
    v = v.flatten()
    return v / v.norm()


def region_crops(h: int, w: int):
    """(row slice, col slice) of each region, in REGION_NAMES order."""
    hh, hw = h // 2, w // 2
    full, top, bot, left, right = slice(0, h), slice(0, hh), slice(hh, h), slice(0, hw), slice(hw, w)
    return {
        "global": (full, slice(0, w)), "top": (top, slice(0, w)), "bottom": (bot, slice(0, w)),
        "left": (full, left), "right": (full, right), "top_left": (top, left), "top_right": (top, right),
        "bottom_left": (bot, left), "bottom_right": (bot, right),
    }


def randomize_netvlad(layer: NetVLAD, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.conv.weight.copy_(torch.randn(layer.conv.weight.shape, generator=g) * 3)
        layer.centroids.copy_(torch.randn(layer.centroids.shape, generator=g) * 0.3)


def small_model(num_clusters: int = 4, **kw) -> SFRSNet:
    torch.manual_seed(0)
    model = build_model("smallcnn", num_clusters=num_clusters, **kw)
    randomize_netvlad(model.netvlad)
    return model


# ----------------------------------------------------------------- NetVLAD


def test_netvlad_matches_bruteforce():
    layer = NetVLAD(num_clusters=5, dim=16)
    randomize_netvlad(layer, seed=1)
    feats = torch.randn(2, 16, 4, 6)
    out = layer(feats)
    assert out.shape == (2, 5 * 16)
    for b in range(2):
        ref = ref_normalize(ref_residual_sums(feats[b], layer.conv.weight[:, :, 0, 0].detach(), layer.centroids.detach()))
        torch.testing.assert_close(out[b].double(), ref, atol=1e-5, rtol=1e-5)


def test_regions_match_netvlad_on_each_crop():
    model = small_model().eval()
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        regions = model(x, regions=True)
        glob = model(x)
        feats = model.backbone(x)
    assert regions.shape == (2, 9, model.output_dim)
    h, w = feats.shape[-2:]
    assert (h, w) == (8, 6)
    crops = region_crops(h, w)
    conv_w = model.netvlad.conv.weight[:, :, 0, 0].detach()
    for b in range(2):
        for i, name in enumerate(REGION_NAMES):
            rows, cols = crops[name]
            ref = ref_normalize(ref_residual_sums(feats[b, :, rows, cols], conv_w, model.netvlad.centroids.detach()))
            torch.testing.assert_close(regions[b, i].double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(glob, regions[:, 0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model.regions(x).detach(), regions)


def test_region_similarities_match_loops():
    a = torch.nn.functional.normalize(torch.randn(3, 9, 20), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(3, 9, 20), dim=-1)
    s = region_similarity(a, b)
    assert s.shape == (3, 9, 9)
    for n in range(3):
        for i in range(9):
            for j in range(9):
                assert abs(float(s[n, i, j]) - float(a[n, i] @ b[n, j])) < 1e-5
    with torch.autocast("cpu", dtype=torch.bfloat16):  # computed in float32 all the same
        torch.testing.assert_close(region_similarity(a, b), s)
    q = torch.nn.functional.normalize(torch.randn(2, 20), dim=-1)
    regs = torch.nn.functional.normalize(torch.randn(2, 4, 9, 20), dim=-1)
    g = global_region_similarity(q, regs)
    assert g.shape == (2, 4, 9)
    for n in range(2):
        for k in range(4):
            for r in range(9):
                assert abs(float(g[n, k, r]) - float(q[n] @ regs[n, k, r])) < 1e-5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(global_region_similarity(q, regs), g)


def test_odd_feature_map_error_names_sizes_and_suggestions_work():
    model = small_model().eval()
    with pytest.raises(ValueError) as info:
        model(torch.randn(1, 3, 72, 64), regions=True)
    msg = str(info.value)
    assert "72x64" in msg and "9x8" in msg and "multiples of 16" in msg
    heights = [int(v) for v in re.search(r"height e\.g\. (\d+(?:, \d+)*)", msg).group(1).split(",")]
    for h in heights:
        assert model(torch.randn(1, 3, h, 64), regions=True).shape[1] == 9
    # global descriptors do not need an even map
    assert model(torch.randn(1, 3, 72, 64)).shape == (1, model.output_dim)


# ----------------------------------------------------------------- backbones


def test_vgg16_cut_and_trainable_layers():
    module, channels, stride = build_backbone("vgg16", weights=None)
    assert (channels, stride) == (512, 16)
    layers = list(module.children())
    assert len(layers) == 29 and isinstance(layers[-1], nn.Conv2d)  # conv5_3, no ReLU/pool
    trainable = {i for i, layer in enumerate(layers) for p in layer.parameters() if p.requires_grad}
    assert trainable == {24, 26, 28}  # conv5_1 .. conv5_3
    module4, _, _ = build_backbone("vgg16", weights=None, trainable="conv4")
    assert {i for i, layer in enumerate(module4) for p in layer.parameters() if p.requires_grad} == {
        17, 19, 21, 24, 26, 28}
    module_int, _, _ = build_backbone("vgg16", weights=None, trainable=26)
    assert {i for i, layer in enumerate(module_int) for p in layer.parameters() if p.requires_grad} == {26, 28}
    out = module(torch.randn(1, 3, 64, 96))
    assert out.shape == (1, 512, 4, 6)
    assert (out < 0).any()  # pre-ReLU output
    with pytest.raises(ValueError, match="conv9"):
        build_backbone("vgg16", trainable="conv9")
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("alexnet")


def test_frozen_layers_get_no_gradient():
    torch.manual_seed(0)
    model = build_model("vgg16", num_clusters=4).train()
    model(torch.randn(1, 3, 64, 64), regions=True).sum().backward()
    for i, layer in enumerate(model.backbone):
        for p in layer.parameters():
            assert (p.grad is not None) == (i >= 24), i
    assert model.netvlad.conv.weight.grad is not None and model.netvlad.centroids.grad is not None


def test_vgg16_from_torchvision_state_dict(tmp_path):
    torch.manual_seed(1)
    # torchvision VGG16 layout: features.<i>.* plus classifier.* (kept small here)
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"]).eval()
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state["classifier.6.weight"] = torch.zeros(10, 4)
    state["classifier.6.bias"] = torch.zeros(10)
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    module, _, _ = build_backbone("vgg16", weights=str(path))
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        torch.testing.assert_close(module(x), features[:29](x))


def test_resnet_from_torchvision_state_dict_and_frozen_bn(tmp_path):
    torch.manual_seed(2)
    tv = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    tv.eval()
    path = tmp_path / "r18.pth"
    torch.save(tv.state_dict(), path)
    module, channels, stride = build_backbone("resnet18", weights=str(path), layer="layer3", trainable="layer3")
    assert (channels, stride) == (256, 16)
    assert not hasattr(module, "layer4")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x)))))))
        out = module.eval()(x)
    assert out.shape == (2, 256, 4, 4)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    # frozen stages keep their statistics in training mode, trainable ones update them
    frozen_mean = module.layer1[0].bn1.running_mean.clone()
    train_mean = module.layer3[0].bn1.running_mean.clone()
    module.train()(x)
    assert torch.equal(module.layer1[0].bn1.running_mean, frozen_mean)
    assert not torch.equal(module.layer3[0].bn1.running_mean, train_mean)
    _, channels4, stride4 = build_backbone("resnet18", weights=str(path), layer="layer4")
    assert (channels4, stride4) == (512, 32)
    with pytest.raises(ValueError, match="no layer4"):
        build_backbone("resnet18", layer="layer3", trainable="layer4")


def test_imagenet_weights_come_from_torch_hub_cache(tmp_path, monkeypatch):
    torch.manual_seed(3)
    tv = torchvision.models.resnet18(weights=None)
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    file_name = os.path.basename(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url)
    torch.save(tv.state_dict(), checkpoints / file_name)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    module, _, _ = build_backbone("resnet18", weights="imagenet")
    torch.testing.assert_close(module.conv1.weight, tv.conv1.weight)
    torch.testing.assert_close(module.layer4[1].conv2.weight, tv.layer4[1].conv2.weight)


def test_bad_weight_files_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_backbone("smallcnn", weights=str(tmp_path / "nowhere.pth"))
    path = tmp_path / "other.pth"
    torch.save({"state_dict": {"head.weight": torch.zeros(3)}}, path)
    with pytest.raises(ValueError) as info:
        build_backbone("smallcnn", weights=str(path))
    msg = str(info.value)
    assert "other.pth" in msg and "head.weight" in msg and "0.weight" in msg
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        build_backbone("smallcnn", weights=str(junk))


def test_smallcnn_weights_round_trip(tmp_path):
    module, channels, stride = build_backbone("smallcnn", layer="stride16")
    assert (channels, stride) == (128, 16)
    path = tmp_path / "small.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in module.state_dict().items()}}, path)
    loaded, _, _ = build_backbone("smallcnn", weights=str(path), layer="stride16")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = loaded(x)
        torch.testing.assert_close(out, module(x))
    assert out.shape == (1, 128, 4, 4)


def test_smallcnn_ignores_per_image_exposure_and_white_balance():
    """Each input channel is standardised per image: gain and offset per channel change nothing,
    other images in the batch do not matter, and a different scene does change the output."""
    torch.manual_seed(0)
    net = build_model("smallcnn", weights=None, num_clusters=8).eval()
    def scenes(n):  # smooth random images: structure the network can tell apart
        return torch.nn.functional.interpolate(torch.rand(n, 3, 8, 10), size=(64, 80), mode="bilinear") * 255 - 120

    x = scenes(3)
    gain = torch.tensor([0.3, 0.5, 0.4]).view(1, 3, 1, 1)
    offset = torch.tensor([-40.0, 10.0, 25.0]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = net(x)
        dark = net(x * gain + offset)
        alone = net(x[:1] * gain + offset)
        other = net(scenes(3))
    change = (other - ref).norm(dim=1)
    assert ((dark - ref).norm(dim=1) < change / 100).all()
    assert ((alone - ref[:1]).norm(dim=1) < change[:1] / 100).all()


# ----------------------------------------------------------------- initialisation


def test_kmeans_init_finds_clusters_and_alpha_formula():
    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=1)
    labels = torch.arange(400) % 4
    descs = torch.nn.functional.normalize(centres[labels] + 0.05 * torch.randn(400, 8, generator=g), dim=1)
    layer = NetVLAD(num_clusters=4, dim=8)
    init = init_netvlad_from_descriptors(layer, descs, seed=0)
    # every true centre has a centroid next to it
    dist = torch.cdist(centres, init.centroids)
    assert dist.min(dim=1).values.max() < 0.05
    assert sorted(dist.argmin(dim=1).tolist()) == [0, 1, 2, 3]
    # alpha = -log(0.01) / mean(top1 - top2), by a loop
    cn = init.centroids / init.centroids.norm(dim=1, keepdim=True)
    gaps = []
    for v in descs:
        dots = sorted((float(v @ c) for c in cn), reverse=True)
        gaps.append(dots[0] - dots[1])
    assert init.alpha == pytest.approx(-math.log(0.01) / np.mean(gaps), rel=1e-4)
    assert layer.alpha == init.alpha
    torch.testing.assert_close(layer.centroids.detach(), init.centroids)
    torch.testing.assert_close(layer.conv.weight[:, :, 0, 0].detach(), init.alpha * cn)
    with pytest.raises(ValueError, match="at least 4"):
        init_netvlad_from_descriptors(layer, descs[:3])


def test_sample_local_descriptors_are_normalised_positions():
    torch.manual_seed(0)
    backbone, _, _ = build_backbone("smallcnn")
    images = torch.randn(3, 3, 32, 40)
    descs = sample_local_descriptors(backbone, images, per_image=7, generator=torch.Generator().manual_seed(1))
    assert descs.shape == (21, 128)
    torch.testing.assert_close(descs.norm(dim=1), torch.ones(21))
    with torch.no_grad():
        feats = torch.nn.functional.normalize(backbone(images), dim=1).flatten(2)  # (3, 128, 20)
    for i in range(3):
        chunk = descs[7 * i: 7 * (i + 1)]
        matches = (torch.cdist(chunk, feats[i].t()) < 1e-5).nonzero()
        assert len(matches) == 7 and len(set(matches[:, 1].tolist())) == 7  # distinct positions of image i
    assert sample_local_descriptors(backbone, images[:1], per_image=100).shape == (20, 128)


def test_load_or_compute_init_cache(tmp_path):
    path = str(tmp_path / "cache" / "netvlad_init.pt")
    calls = []

    def compute():
        calls.append(1)
        return NetVLADInit(centroids=torch.randn(4, 8), alpha=12.5 + len(calls))

    first = load_or_compute_init(path, compute, fingerprint="abc")
    second = load_or_compute_init(path, compute, fingerprint="abc")
    assert len(calls) == 1
    torch.testing.assert_close(second.centroids, first.centroids)
    assert second.alpha == first.alpha == 13.5
    third = load_or_compute_init(path, compute, fingerprint="other")
    assert len(calls) == 2 and third.alpha == 14.5
    assert load_or_compute_init(path, compute, fingerprint="other").alpha == 14.5
    assert sorted(os.listdir(tmp_path / "cache")) == ["netvlad_init.pt"]


def test_state_fingerprint_tracks_weights():
    torch.manual_seed(0)
    a, _, _ = build_backbone("smallcnn")
    fp = state_fingerprint(a, "pitts30k", 64)
    assert fp == state_fingerprint(a, "pitts30k", 64)
    assert fp != state_fingerprint(a, "pitts30k", 32)
    with torch.no_grad():
        a[1].weight[0, 0, 0, 0] += 1e-3  # the first convolution
    assert fp != state_fingerprint(a, "pitts30k", 64)


# ----------------------------------------------------------------- memory / precision options


def test_gradient_checkpointing_gives_same_outputs_and_grads():
    plain = small_model().train()
    ckpt = small_model(checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    grads, runs = [], []
    for model in (plain, ckpt):
        calls = []
        hook = model.backbone[0].register_forward_hook(lambda *_, calls=calls: calls.append(1))
        out = model(x, regions=True)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        hook.remove()
        runs.append(len(calls))
        grads.append([p.grad.clone() for p in model.parameters()])
        outs = out.detach()
    # the first segment's layers run again in the backward pass only when checkpointing
    assert runs == [1, 2]
    torch.testing.assert_close(outs, plain(x, regions=True).detach())
    for ga, gb in zip(*grads):
        torch.testing.assert_close(ga, gb, atol=1e-6, rtol=1e-5)


def test_autocast_bfloat16_keeps_float32_descriptors():
    model = small_model(num_clusters=8).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x, regions=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, regions=True)
            glob = model(x)
    assert out.dtype == torch.float32 and glob.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2, 9))
    cos = (out * ref).sum(-1)
    assert cos.min() > 0.99
    torch.testing.assert_close(glob, out[:, 0], atol=1e-5, rtol=1e-5)


def test_kmeans_uses_every_descriptor_and_kmeanspp_seeds():
    """The centroids are a fixed point of Lloyd's step over *all* descriptors (each centroid the
    mean of the descriptors nearest to it). faiss's default (256 points per centroid) breaks
    this: the same call with that cap is shown to miss it, so the check can fail."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 8)).astype(np.float32) * 4
    x = (centres[np.arange(8000) % 4] + rng.normal(size=(8000, 8))).astype(np.float32)
    init = kmeans_init(torch.from_numpy(x), 4, seed=0)

    def lloyd_gap(c: np.ndarray) -> float:
        assign = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
        return float(max(np.abs(x[assign == k].mean(0) - c[k]).max() for k in range(4)))

    assert lloyd_gap(init.centroids.numpy()) < 1e-3
    capped = faiss.Kmeans(8, 4, niter=100, seed=0, max_points_per_centroid=256)
    capped.train(x, init_centroids=kmeans_pp_seeds(x, 4, 0))
    assert lloyd_gap(np.asarray(capped.centroids)) > 3e-3  # a subsample's means are off by ~1/16
    # k-means++ seeds: rows of x, one in each of four far-apart tight blobs
    tight = (centres[np.arange(400) % 4] * 10 + 0.01 * rng.normal(size=(400, 8))).astype(np.float32)
    for seed in range(5):
        seeds = kmeans_pp_seeds(tight, 4, seed)
        rows = [int(np.flatnonzero((tight == s).all(1))[0]) for s in seeds]
        assert sorted(r % 4 for r in rows) == [0, 1, 2, 3]


def test_centroid_file_as_the_netvlad_authors_write_it(tmp_path):
    import h5py

    rng = np.random.default_rng(1)
    cen = rng.normal(size=(4, 8)).astype(np.float32)
    descs = rng.normal(size=(50, 8)).astype(np.float32)
    descs /= np.linalg.norm(descs, axis=1, keepdims=True)
    good = tmp_path / "vgg16_pitts_4_desc_cen.hdf5"
    with h5py.File(good, "w") as h5:
        h5.create_dataset("centroids", data=cen)
        h5.create_dataset("descriptors", data=descs)
    init = read_centroid_file(str(good), 4, 8)
    torch.testing.assert_close(init.centroids, torch.from_numpy(cen))
    assert init.alpha == pytest.approx(alpha_from_centroids(torch.from_numpy(descs), torch.from_numpy(cen)))
    with pytest.raises(ValueError, match=r"centroids.*\(4, 8\).*\(8, 8\)"):
        read_centroid_file(str(good), 8, 8)
    missing = tmp_path / "no_descriptors.hdf5"
    with h5py.File(missing, "w") as h5:
        h5.create_dataset("centroids", data=cen)
    with pytest.raises(ValueError, match="no_descriptors.hdf5 has no dataset 'descriptors'"):
        read_centroid_file(str(missing), 4, 8)
    with pytest.raises(ValueError, match="no such file"):
        read_centroid_file(str(tmp_path / "absent.hdf5"), 4, 8)
