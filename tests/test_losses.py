"""Losses against brute-force python-loop computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sfrs_dist.losses import (
    sare_ind_loss,
    sare_joint_loss,
    select_hardest_regions,
    sfrs_hard_loss,
    sfrs_soft_loss,
    triplet_loss,
    tuple_loss,
)

torch.set_num_threads(1)

B, N, L = 3, 4, 6


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1).float()


def dot(a, b):
    return sum(float(x) * float(y) for x, y in zip(a.detach(), b.detach()))


def dist(a, b):
    return math.sqrt(sum((float(x) - float(y)) ** 2 for x, y in zip(a, b)))


def loop_triplet(q, p, negs, margin):
    terms = [max(0.0, dist(q[b], p[b]) - dist(q[b], negs[b, i]) + margin) for b in range(len(q)) for i in range(negs.shape[1])]
    return sum(terms) / len(terms)


def loop_sare_ind(q, p, negs, temp):
    terms = []
    for b in range(len(q)):
        sp = dot(q[b], p[b]) / temp
        for i in range(negs.shape[1]):
            sn = dot(q[b], negs[b, i]) / temp
            terms.append(-math.log(math.exp(sp) / (math.exp(sp) + math.exp(sn))))
    return sum(terms) / len(terms)


def loop_sare_joint(q, p, negs, temp):
    terms = []
    for b in range(len(q)):
        sp = math.exp(dot(q[b], p[b]) / temp)
        sn = sum(math.exp(dot(q[b], negs[b, i]) / temp) for i in range(negs.shape[1]))
        terms.append(-math.log(sp / (sp + sn)))
    return sum(terms) / len(terms)


@pytest.fixture()
def tuple_data():
    return unit(B, L, seed=1), unit(B, L, seed=2), unit(B, N, L, seed=3)


def test_triplet_matches_loop_and_torch(tuple_data):
    q, p, negs = tuple_data
    for margin in (0.1, 0.5, 2.0):
        got = float(triplet_loss(q, p, negs, margin=margin))
        assert got == pytest.approx(loop_triplet(q, p, negs, margin), rel=1e-5, abs=1e-6)
    ref = F.triplet_margin_loss(
        q.unsqueeze(1).expand_as(negs).reshape(-1, L), p.unsqueeze(1).expand_as(negs).reshape(-1, L),
        negs.reshape(-1, L), margin=0.5)
    assert float(triplet_loss(q, p, negs, margin=0.5)) == pytest.approx(float(ref), abs=1e-4)


def test_sare_ind_matches_loop(tuple_data):
    q, p, negs = tuple_data
    for temp in (0.07, 0.5):
        assert float(sare_ind_loss(q, p, negs, temp=temp)) == pytest.approx(loop_sare_ind(q, p, negs, temp), rel=1e-5)


def test_sare_joint_matches_loop(tuple_data):
    q, p, negs = tuple_data
    for temp in (0.07, 0.5):
        assert float(sare_joint_loss(q, p, negs, temp=temp)) == pytest.approx(loop_sare_joint(q, p, negs, temp), rel=1e-5)


def test_tuple_loss_dispatch_and_errors(tuple_data):
    q, p, negs = tuple_data
    assert float(tuple_loss(q, p, negs, "sare_joint", temp=0.1)) == pytest.approx(float(sare_joint_loss(q, p, negs, 0.1)))
    with pytest.raises(ValueError, match="unknown loss kind 'hinge'"):
        tuple_loss(q, p, negs, "hinge")
    with pytest.raises(ValueError, match="negs"):
        sare_ind_loss(q, p, negs[:2])
    with pytest.raises(ValueError, match="temp"):
        sare_ind_loss(q, p, negs, temp=0.0)


def test_sfrs_hard_loss_uses_region_most_similar_to_query():
    q, p = unit(B, L, seed=4), unit(B, L, seed=5)
    regions = unit(B, N, 9, L, seed=6).requires_grad_(True)
    chosen = torch.empty(B, N, L)
    for b in range(B):
        for i in range(N):
            sims = [dot(q[b], regions[b, i, r]) for r in range(9)]
            chosen[b, i] = regions[b, i, max(range(9), key=lambda r: sims[r])].detach()
    torch.testing.assert_close(select_hardest_regions(q, regions).detach(), chosen)
    for kind, ref in (("sare_ind", loop_sare_ind), ("sare_joint", loop_sare_joint)):
        got = sfrs_hard_loss(q, p, regions, temp=0.07, kind=kind)
        assert float(got.detach()) == pytest.approx(ref(q, p, chosen, 0.07), rel=1e-5)
    got = sfrs_hard_loss(q, p, regions, kind="triplet", margin=0.3)
    assert float(got.detach()) == pytest.approx(loop_triplet(q, p, chosen, 0.3), rel=1e-5, abs=1e-6)
    # gradient flows only into the selected regions
    sfrs_hard_loss(q, p, regions, temp=0.07).backward()
    touched = regions.grad.abs().sum(-1) > 0  # (B, N, 9)
    assert touched.sum(-1).eq(1).all()


def loop_soft(student, teacher, mask, tau0, tau_g):
    student, teacher = student.detach(), teacher.detach()
    losses = []
    for b in range(student.shape[0]):
        s = [float(student[b, k, r]) / tau0 for k in range(student.shape[1]) if mask[b, k] for r in range(9)]
        t = [float(teacher[b, k, r]) / tau_g for k in range(student.shape[1]) if mask[b, k] for r in range(9)]
        if not s:
            continue
        zs = math.log(sum(math.exp(v) for v in s))
        zt = sum(math.exp(v) for v in t)
        losses.append(-sum(math.exp(tv) / zt * (sv - zs) for sv, tv in zip(s, t)))
    return sum(losses) / len(losses)


def soft_data(seed=7):
    g = torch.Generator().manual_seed(seed)
    student = (torch.rand(4, 5, 9, generator=g) * 2 - 1).requires_grad_(True)
    teacher = (torch.rand(4, 5, 9, generator=g) * 2 - 1).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    return student, teacher, mask


def test_sfrs_soft_loss_matches_loop_with_variable_k():
    student, teacher, mask = soft_data()
    for tau0, tau_g in ((0.07, 0.07), (0.07, 0.05), (0.5, 0.06)):
        got = sfrs_soft_loss(student, teacher, mask, tau0=tau0, tau_g=tau_g).detach()
        assert float(got) == pytest.approx(loop_soft(student, teacher, mask, tau0, tau_g), rel=1e-5)


def test_sfrs_soft_loss_ignores_padding_and_empty_queries():
    student, teacher, mask = soft_data()
    base = sfrs_soft_loss(student, teacher, mask).item()
    s2, t2 = student.detach().clone(), teacher.detach().clone()
    s2[~mask] = 5.0
    t2[~mask] = -5.0
    assert float(sfrs_soft_loss(s2, t2, mask)) == pytest.approx(base, rel=1e-6)
    # equal to the mean over the queries that have positives, each computed alone
    alone = [sfrs_soft_loss(student[i:i + 1], teacher[i:i + 1], mask[i:i + 1]).item() for i in (0, 1, 3)]
    assert base == pytest.approx(sum(alone) / 3, rel=1e-6)
    none = sfrs_soft_loss(student, teacher, torch.zeros_like(mask))
    assert none.item() == 0.0
    none.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_sfrs_soft_loss_gradients_reach_student_only():
    student, teacher, mask = soft_data()
    loss = sfrs_soft_loss(student, teacher, mask, tau0=0.07, tau_g=0.06)
    loss.backward()
    assert teacher.grad is None
    assert torch.isfinite(student.grad).all()
    assert (student.grad[mask].abs().sum(-1) > 0).all()
    assert torch.equal(student.grad[~mask], torch.zeros_like(student.grad[~mask]))
    # gradient of the cross-entropy: (softmax(s/tau0) - softmax(t/tau_g)) / tau0 / n_queries, for query 1
    s = student.detach()[1, :2].reshape(-1) / 0.07
    t = teacher.detach()[1, :2].reshape(-1) / 0.06
    expected = (torch.softmax(s, 0) - torch.softmax(t, 0)) / 0.07 / 3
    torch.testing.assert_close(student.grad[1, :2].reshape(-1), expected, atol=1e-5, rtol=1e-4)


def test_losses_under_bfloat16_autocast_compute_in_float32(tuple_data):
    q, p, negs = (t.bfloat16() for t in tuple_data)
    student, teacher, mask = soft_data()
    regions = unit(B, N, 9, L, seed=8).bfloat16()
    ref = [
        sare_ind_loss(q.float(), p.float(), negs.float()),
        sare_joint_loss(q.float(), p.float(), negs.float()),
        sfrs_hard_loss(q.float(), p.float(), regions.float()),
        sfrs_soft_loss(student.bfloat16().float(), teacher.bfloat16().float(), mask).detach(),
    ]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = [
            sare_ind_loss(q, p, negs),
            sare_joint_loss(q, p, negs),
            sfrs_hard_loss(q, p, regions),
            sfrs_soft_loss(student.bfloat16(), teacher.bfloat16(), mask).detach(),
        ]
    for g, r in zip(got, ref):
        assert g.dtype == torch.float32
        assert g.item() == pytest.approx(r.item(), rel=1e-6)
