"""Training losses of SFRS as pure functions on descriptor tensors.

Shapes: ``q`` (B, L) queries, ``p`` (B, L) their positives, ``negs`` (B, N, L) negatives,
``neg_regions`` (B, N, 9, L) region descriptors of the negatives. Descriptors are
L2-normalised; similarities are dot products. Everything is computed in float32 (inputs
in bfloat16/float16 under autocast are upcast) and every loss returns a float32 scalar.

- ``triplet_loss``: ``mean_{b,i} max(0, ||q-p|| - ||q-n_i|| + margin)`` with Euclidean
  distances, as in NetVLAD (margin 0.1 on unit vectors).
- ``sare_ind_loss``: per negative, softmax over ``[s(q,p), s(q,n_i)] / temp``; loss is
  ``-log`` of the positive's probability, averaged over all (query, negative) pairs.
- ``sare_joint_loss``: one softmax over ``[s(q,p), s(q,n_1), ..., s(q,n_N)] / temp``;
  ``-log`` of the positive's probability, averaged over queries.
- ``sfrs_hard_loss``: one of the above with each negative replaced by its region (of 9)
  most similar to the query's global descriptor.
- ``sfrs_soft_loss``: cross-entropy between the teacher's softmax (temperature tau_g) and
  the student's log-softmax (temperature tau_0) over the k*9 similarities between the
  query's global descriptor and every region of its k difficult positives.
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch
import torch.nn.functional as F

_F = TypeVar("_F", bound=Callable[..., torch.Tensor])

LOSS_KINDS = ("triplet", "sare_ind", "sare_joint")


def float32_compute(fn: _F) -> _F:
    """Run ``fn`` with autocast disabled (on the device of its first tensor argument).

    Similarities divided by small temperatures need float32 precision; without this,
    autocast would run the matmuls in bfloat16/float16.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        with torch.autocast(device_type=device, enabled=False):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _check_tuple(q: torch.Tensor, p: torch.Tensor, negs: torch.Tensor) -> None:
    if q.dim() != 2 or p.shape != q.shape or negs.dim() != 3 or negs.shape[0] != q.shape[0] or negs.shape[2] != q.shape[1]:
        raise ValueError(
            f"expected q (B, L), p (B, L), negs (B, N, L); got {tuple(q.shape)}, {tuple(p.shape)}, {tuple(negs.shape)}"
        )
    if negs.shape[1] == 0:
        raise ValueError("at least one negative per query is needed")


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be positive; got {value}")


def _tuple_similarities(q: torch.Tensor, p: torch.Tensor, negs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q, p, negs = q.float(), p.float(), negs.float()
    return (q * p).sum(-1), torch.einsum("bl,bnl->bn", q, negs)


@float32_compute
def triplet_loss(q: torch.Tensor, p: torch.Tensor, negs: torch.Tensor, margin: float = 0.1) -> torch.Tensor:
    """Triplet margin loss with Euclidean distances, averaged over the B*N triplets."""
    _check_tuple(q, p, negs)
    q, p, negs = q.float(), p.float(), negs.float()
    d_pos = torch.linalg.vector_norm(q - p, dim=-1)  # (B,)
    d_neg = torch.linalg.vector_norm(q.unsqueeze(1) - negs, dim=-1)  # (B, N)
    return F.relu(d_pos.unsqueeze(1) - d_neg + margin).mean()


@float32_compute
def sare_ind_loss(q: torch.Tensor, p: torch.Tensor, negs: torch.Tensor, temp: float = 0.07) -> torch.Tensor:
    """SARE-ind: a 2-way softmax per negative, averaged over the B*N pairs."""
    _check_tuple(q, p, negs)
    _check_positive("temp", temp)
    s_pos, s_neg = _tuple_similarities(q, p, negs)
    logits = torch.stack((s_pos.unsqueeze(1).expand_as(s_neg), s_neg), dim=-1) / temp  # (B, N, 2)
    return -F.log_softmax(logits, dim=-1)[..., 0].mean()


@float32_compute
def sare_joint_loss(q: torch.Tensor, p: torch.Tensor, negs: torch.Tensor, temp: float = 0.07) -> torch.Tensor:
    """SARE-joint: one softmax over the positive and all negatives, averaged over queries."""
    _check_tuple(q, p, negs)
    _check_positive("temp", temp)
    s_pos, s_neg = _tuple_similarities(q, p, negs)
    logits = torch.cat((s_pos.unsqueeze(1), s_neg), dim=1) / temp  # (B, 1+N)
    return -F.log_softmax(logits, dim=1)[:, 0].mean()


@float32_compute
def tuple_loss(
    q: torch.Tensor, p: torch.Tensor, negs: torch.Tensor, kind: str = "sare_ind", temp: float = 0.07, margin: float = 0.1
) -> torch.Tensor:
    """Dispatch to ``triplet_loss`` / ``sare_ind_loss`` / ``sare_joint_loss`` by ``kind``."""
    if kind == "triplet":
        return triplet_loss(q, p, negs, margin=margin)
    if kind == "sare_ind":
        return sare_ind_loss(q, p, negs, temp=temp)
    if kind == "sare_joint":
        return sare_joint_loss(q, p, negs, temp=temp)
    raise ValueError(f"unknown loss kind {kind!r}; choose one of {', '.join(LOSS_KINDS)}")


@float32_compute
def select_hardest_regions(q_global: torch.Tensor, neg_regions: torch.Tensor) -> torch.Tensor:
    """For each negative, its region most similar to the query's global descriptor.

    ``q_global`` (B, L), ``neg_regions`` (B, N, R, L) -> (B, N, L). The choice is not
    differentiated; gradients flow into the selected regions.
    """
    if neg_regions.dim() != 4 or q_global.dim() != 2 or neg_regions.shape[0] != q_global.shape[0] \
            or neg_regions.shape[-1] != q_global.shape[-1]:
        raise ValueError(
            f"expected q_global (B, L) and neg_regions (B, N, R, L); got {tuple(q_global.shape)}, {tuple(neg_regions.shape)}"
        )
    with torch.no_grad():
        sims = torch.einsum("bl,bnrl->bnr", q_global.float(), neg_regions.float())
        best = sims.argmax(dim=-1)  # (B, N)
    index = best[:, :, None, None].expand(-1, -1, 1, neg_regions.shape[-1])
    return torch.gather(neg_regions, 2, index).squeeze(2)


@float32_compute
def sfrs_hard_loss(
    q_global: torch.Tensor,
    p_global: torch.Tensor,
    neg_regions: torch.Tensor,
    temp: float = 0.07,
    kind: str = "sare_ind",
    margin: float = 0.1,
) -> torch.Tensor:
    """Hard loss of generations >= 1: ``kind`` loss against each negative's hardest region."""
    negs = select_hardest_regions(q_global, neg_regions)
    return tuple_loss(q_global, p_global, negs, kind=kind, temp=temp, margin=margin)


@float32_compute
def sfrs_soft_loss(
    student_sims: torch.Tensor,
    teacher_sims: torch.Tensor,
    mask: torch.Tensor,
    tau0: float = 0.07,
    tau_g: float = 0.07,
) -> torch.Tensor:
    """Soft loss: teacher-to-student cross-entropy over the valid k*9 region similarities.

    Args:
        student_sims: (B, k_max, R) similarities, from the student, between each query's
            global descriptor and every region of each of its difficult positives.
        teacher_sims: the teacher's same similarities, (B, k_max, R); no gradient reaches
            them.
        mask: (B, k_max) bool, True for real positives (padding is False). Queries without
            any real positive contribute nothing.
        tau0: student temperature; tau_g: teacher temperature of this generation.

    Returns the cross-entropy ``-sum softmax(t / tau_g) * log_softmax(s / tau0)`` over the
    valid entries, averaged over queries with at least one positive (0 if none has).
    """
    if student_sims.dim() != 3 or teacher_sims.shape != student_sims.shape or mask.shape != student_sims.shape[:2]:
        raise ValueError(
            "expected student_sims, teacher_sims (B, k_max, R) and mask (B, k_max); got "
            f"{tuple(student_sims.shape)}, {tuple(teacher_sims.shape)}, {tuple(mask.shape)}"
        )
    _check_positive("tau0", tau0)
    _check_positive("tau_g", tau_g)
    b, k_max, r = student_sims.shape
    mask = mask.to(device=student_sims.device, dtype=torch.bool)
    has_pos = mask.any(dim=1)  # (B,)
    # Rows without positives get an all-valid dummy mask (finite softmax) and zero weight.
    entry_mask = (mask | ~has_pos.unsqueeze(1)).unsqueeze(-1).expand(b, k_max, r).reshape(b, k_max * r)
    student = student_sims.float().reshape(b, k_max * r) / tau0
    teacher = teacher_sims.detach().float().reshape(b, k_max * r) / tau_g
    neg_inf = torch.tensor(float("-inf"), device=student.device)
    log_p = F.log_softmax(torch.where(entry_mask, student, neg_inf), dim=1)
    log_p = log_p.masked_fill(~entry_mask, 0.0)
    target = F.softmax(torch.where(entry_mask, teacher, neg_inf), dim=1)
    per_query = -(target * log_p).sum(dim=1)  # (B,)
    count = has_pos.sum()
    if int(count) == 0:
        return student.sum() * 0.0
    return (per_query * has_pos.float()).sum() / count.float()
