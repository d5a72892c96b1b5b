"""The loss of a training step, rebuilt independently; the two teacher modes; a step that learns.

Each test says what it guards; each was checked to fail with the guarded thing broken on purpose.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sfrs_dist.config import LossConfig
from sfrs_dist.models import build_model
from sfrs_dist.teacher.cache import TeacherCache
from sfrs_dist.training.engine import build_engine
from sfrs_dist.training.step_loss import cached_soft_targets, online_soft_targets, step_loss

NEG, DIFF = 3, [2, 0, 3]


def _tuples():
    return [{"query": i, "positive": 10 + i, "negatives": list(range(20, 20 + NEG)), "num_negatives": NEG,
             "difficult": list(range(30 + 5 * i, 30 + 5 * i + k))} for i, k in enumerate(DIFF)]


def _regions(seed=0, d=16):
    g = torch.Generator().manual_seed(seed)
    n = sum(2 + NEG + k for k in DIFF)
    return F.normalize(torch.randn(n, 9, d, generator=g), dim=-1)


def _reference_loss(regions, teacher_sims, gen, tau0, tau, weight):
    """The loss written out image by image, sharing no code with sfrs_dist.training.step_loss."""
    hard_terms, soft_terms = [], []
    row = 0
    for b, k in enumerate(DIFF):
        q = regions[row, 0]
        p = regions[row + 1, 0]
        negs = [regions[row + 2 + j] for j in range(NEG)]
        diffs = [regions[row + 2 + NEG + j] for j in range(k)]
        row += 2 + NEG + k
        for neg in negs:
            # generation >= 1: the negative's region most similar to the query's global descriptor
            n = neg[int(torch.argmax(neg @ q))] if gen >= 1 else neg[0]
            sp, sn = float(q @ p) / tau0, float(n @ q) / tau0
            hard_terms.append(-(sp - math.log(math.exp(sp) + math.exp(sn))))
        if gen >= 1 and k:
            s = [float(q @ dpos[r]) / tau0 for dpos in diffs for r in range(9)]
            t = [float(teacher_sims[b][j][r]) / tau for j in range(k) for r in range(9)]
            zs = math.log(sum(math.exp(v) for v in s))
            zt = sum(math.exp(v) for v in t)
            soft_terms.append(-sum(math.exp(tv) / zt * (sv - zs) for sv, tv in zip(s, t)))
    hard = sum(hard_terms) / len(hard_terms)
    if gen == 0:
        return hard
    return hard + weight * sum(soft_terms) / len(soft_terms)


@pytest.mark.parametrize("gen", [0, 1])
def test_step_loss_equals_the_loss_written_out(gen):
    """Guards the slicing of a batch into query, positive, negatives and difficult positives, the
    hardest-region choice, the soft cross-entropy and ``hard + soft_weight * soft``: shifting a
    tuple's rows by one, taking region 0 of negatives in generation 1, or dropping the weight
    each made this fail."""
    regions = _regions()
    cfg = LossConfig(kind="sare_ind", soft_weight=0.5)
    k_max = max(DIFF)
    g = torch.Generator().manual_seed(1)
    teacher = torch.rand(len(DIFF), k_max, 9, generator=g)
    mask = torch.tensor([[j < k for j in range(k_max)] for k in DIFF])
    loss, parts = step_loss(regions, _tuples(), gen, cfg, tau0=0.07, tau=0.06, soft_targets=(teacher, mask))
    want = _reference_loss(regions.double(), teacher.double(), gen, 0.07, 0.06, 0.5)
    assert float(loss) == pytest.approx(want, rel=1e-4)
    if gen:
        assert float(loss) == pytest.approx(float(parts["loss_hard"]) + 0.5 * float(parts["loss_soft"]), rel=1e-6)
        # the teacher's labels matter: other labels, another loss
        other, _ = step_loss(regions, _tuples(), gen, cfg, 0.07, 0.06, (teacher.flip(-1), mask))
        assert abs(float(other) - float(loss)) > 1e-4
        with pytest.raises(ValueError, match="soft targets"):
            step_loss(regions, _tuples(), gen, cfg, 0.07, 0.06, None)


def test_online_soft_targets_are_the_teachers_similarities_on_the_same_tensors():
    """Guards which images the online teacher sees and which similarities it returns: each
    query's global descriptor against every region of its own difficult positives, from the
    batch tensors given (jittered ones included). Forwarding the negatives' rows instead of the
    difficult positives' made this fail."""
    torch.manual_seed(0)
    teacher = build_model("smallcnn", num_clusters=4).eval()
    n = sum(2 + NEG + k for k in DIFF)
    images = torch.randn(n, 3, 32, 32)
    soft, mask = online_soft_targets(teacher, images, _tuples())
    assert mask.tolist() == [[True, True, False], [False, False, False], [True, True, True]]
    row = 0
    with torch.no_grad():
        for b, k in enumerate(DIFF):
            if k:
                q = teacher(images[row:row + 1], regions=True)[0, 0]
                d = teacher(images[row + 2 + NEG:row + 2 + NEG + k], regions=True)
                torch.testing.assert_close(soft[b, :k], torch.einsum("d,krd->kr", q, d), atol=1e-5, rtol=1e-4)
            row += 2 + NEG + k
    assert not soft.requires_grad and float(soft[1].abs().sum()) == 0.0


def test_cached_soft_targets_are_cache_lookups():
    """Guards the padding and the order of the cached soft labels (query, then its difficult positives)."""
    nq, rng = 3, np.random.default_rng(0)
    pos = [np.asarray(t["difficult"], dtype=np.int64) for t in _tuples()]
    sims = [rng.random((len(p), 9)).astype(np.float32) for p in pos]
    indptr = np.concatenate([[0], np.cumsum([len(p) for p in pos])]).astype(np.int64)
    cache = TeacherCache(indptr, np.concatenate(pos), np.concatenate(sims), "test")
    soft, mask = cached_soft_targets(cache, _tuples())
    assert soft.shape == (nq, 3, 9)
    for b, k in enumerate(DIFF):
        np.testing.assert_array_equal(soft[b, :k], sims[b])
        assert mask[b].tolist() == [j < k for j in range(3)]
        assert not soft[b, k:].any()


def test_a_few_steps_on_a_fixed_batch_lower_the_loss_and_move_only_trainable_weights():
    """Guards that training learns: the optimiser steps the trainable weights (a zeroed lr, an
    optimiser built over no parameters, or a loss detached from the network each made this fail),
    and leaves the frozen layers alone."""
    torch.manual_seed(0)
    net = build_model("smallcnn", num_clusters=4, trainable=2)  # the first two blocks frozen
    frozen = {k: v.clone() for k, v in net.named_parameters() if not v.requires_grad}
    trainable = {k: v.clone() for k, v in net.named_parameters() if v.requires_grad}
    assert frozen and trainable
    engine = build_engine("ddp", net, torch.device("cpu"), lr=1.0, momentum=0.9, weight_decay=0.0,
                          precision="fp32")
    n = sum(2 + NEG + k for k in DIFF)
    images = torch.randn(n, 3, 32, 32) * 60
    cfg = LossConfig()
    engine.train(True)
    losses = []
    for _ in range(8):
        loss, _ = step_loss(engine.forward(images, regions=True), _tuples(), 0, cfg, 0.07, 0.07)
        engine.backward_step(loss)
        losses.append(float(loss.detach()))
    assert all(b < a for a, b in zip(losses, losses[1:])), losses  # every step lowers it
    assert losses[-1] < losses[0] - 0.02, losses
    after = dict(net.named_parameters())
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    assert any(not torch.equal(after[k], v) for k, v in trainable.items())
