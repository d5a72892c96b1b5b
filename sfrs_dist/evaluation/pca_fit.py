"""PCA-whitening fitted from descriptors sharded across ranks, on the fitting rank's device.

Each rank holds its share of the training descriptors (``extract_group_local``). The
sample (``pca_sample``: the rows ``PCAWhitening.fit`` would draw from the whole matrix) is
drawn before anything travels: each rank sends only its sampled rows, and only to rank 0
(``gather_sample``), which fits in float64 on its device (``fit_pca_torch`` on a GPU,
``fit_pca`` on the CPU) and broadcasts the result. At Pitts30k size (17,416 training images,
32,768-d) no rank holds the whole 2.3 GB matrix any more, the other ranks send their share
of the 10,000 sampled rows, and the Gram matrix and its eigendecomposition run on the GPU
while the other ranks wait in the broadcast.
"""

from __future__ import annotations

import logging
import time
from typing import Optional, Tuple

import numpy as np
import torch

from .. import distributed as du
from .pca import PCAWhitening, broadcast_pca, fit_pca

log = logging.getLogger(__name__)


def pca_sample(n: int, max_samples: int, seed: int) -> np.ndarray:
    """Sorted indices of the rows ``PCAWhitening.fit(x, max_samples, seed)`` fits on, for ``n`` rows."""
    if n <= max_samples:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, max_samples, replace=False)).astype(np.int64)


def gather_sample(positions: np.ndarray, rows: np.ndarray, sample: np.ndarray, dst: int = 0) -> Optional[torch.Tensor]:
    """The rows of ``sample`` (sorted global indices), in that order, on rank ``dst``; None elsewhere.

    ``positions``: the global indices of this rank's ``rows`` (every index on exactly one
    rank). Only sampled rows travel, only to ``dst``, as tensors on the collective device
    (``dst`` gets them there: on the GPU under NCCL). A collective: every rank calls it.
    """
    positions = np.asarray(positions, dtype=np.int64)
    take = np.isin(positions, sample)
    pos, mine = positions[take], np.ascontiguousarray(rows[take], dtype=np.float32)
    dim = rows.shape[1]
    device = du.collective_device()
    if not du.is_distributed():
        parts = [(pos, torch.from_numpy(mine))]
    else:
        counts = [int(c) for c in du.all_gather_object(len(pos))]
        most = max(counts)
        send_pos = torch.full((most,), -1, dtype=torch.int64, device=device)
        send_pos[:len(pos)] = torch.from_numpy(pos).to(device)
        send = torch.zeros((most, dim), dtype=torch.float32, device=device)
        send[:len(pos)] = torch.from_numpy(mine).to(device)
        recv_pos = du.gather_tensor(send_pos, dst)
        recv = du.gather_tensor(send, dst)
        del send
        if recv is None:
            return None
        parts = [(p[:c].cpu().numpy(), r[:c]) for p, r, c in zip(recv_pos, recv, counts)]
        del recv
    got = np.concatenate([p for p, _ in parts])
    if len(got) != len(sample) or not np.array_equal(np.sort(got), sample):
        raise ValueError(f"PCA sample: the ranks hold {len(got)} of the {len(sample)} sampled rows "
                         "(each sampled index must be on exactly one rank)")
    x = torch.empty((len(sample), dim), dtype=torch.float32, device=device)
    for i in range(len(parts)):  # each part into its rows of the sample, its buffer freed after
        p, r = parts[i]
        parts[i] = None
        x[torch.from_numpy(np.searchsorted(sample, p)).to(device)] = r.to(device)
        del r
    return x


def fit_pca_torch(x: torch.Tensor, dims: int, block: int = 2048,
                  rel_tol: float = 1e-10) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``fit_pca`` in float64 torch on ``x``'s device (the GPU of the fitting rank).

    The same method: the N x N Gram matrix of the centred rows when N < D (directions
    ``U = Xc^T V / sqrt((N-1) lams)``), the D x D covariance otherwise; ``dims`` clamped to
    the data rank. Returns float64 numpy arrays ``(U (D, d), lams (d,), mu (D,))``.
    """
    n, dim = x.shape
    if n < 2:
        raise ValueError(f"PCA needs at least 2 samples, got {n}")
    mu = x.double().mean(0)
    d = min(dims, n - 1, dim)
    if d < dims:
        log.warning("PCA: %d dims requested, data rank allows at most %d; using %d", dims, d, d)
    dual = dim > n
    with torch.no_grad():
        if dual:
            gram = torch.zeros((n, n), dtype=torch.float64, device=x.device)
            for c0 in range(0, dim, block):
                xc = x[:, c0:c0 + block].double() - mu[c0:c0 + block]
                gram.addmm_(xc, xc.T)
            del xc
        else:
            xc = x.double() - mu
            gram = xc.T @ xc
            del xc
        gram /= n - 1
        lams, vec = torch.linalg.eigh(gram)  # ascending
        del gram
        lams, vec = lams.flip(0)[:d], vec.flip(1)[:, :d]
        keep = lams > rel_tol * max(float(lams[0]), np.finfo(np.float64).tiny)
        if not bool(keep.all()):
            log.warning("PCA: dropping %d directions with ~zero variance", int((~keep).sum()))
            lams, vec = lams[keep], vec[:, keep]
        if dual:
            u = torch.empty((dim, lams.shape[0]), dtype=torch.float64, device=x.device)
            scale = 1.0 / torch.sqrt(lams * (n - 1))
            for c0 in range(0, dim, block):
                u[c0:c0 + block] = ((x[:, c0:c0 + block].double() - mu[c0:c0 + block]).T @ vec) * scale
            vec = u
    return vec.cpu().numpy(), lams.cpu().numpy(), mu.cpu().numpy()


def fit_pca_sharded(positions: np.ndarray, rows: np.ndarray, n: int, dims: int, max_samples: int, seed: int,
                    device: torch.device) -> PCAWhitening:
    """The PCA ``PCAWhitening(dims).fit(all rows, max_samples, seed)`` gives, from sharded rows; on every rank.

    Rank 0 fits on ``device`` (float64 torch on a GPU, ``fit_pca`` on the CPU) and
    broadcasts ``U``, ``lams`` and ``mu``. A collective: every rank calls it.
    """
    sample = pca_sample(n, max_samples, seed)
    x = gather_sample(positions, rows, sample, dst=0)
    pca = None
    if du.is_main_process():
        t0 = time.time()
        if torch.device(device).type == "cuda":
            U, lams, mu = fit_pca_torch(x.to(device), dims)
        else:
            U, lams, mu = fit_pca(x.cpu().numpy(), dims)
        del x
        pca = PCAWhitening(dims)
        pca._set(U, lams, mu)
        log.info("PCA fitted on %d of %d descriptors (%d-d) -> %d dims on %s in %.1f s", len(sample), n,
                 rows.shape[1], pca.out_dim, device, time.time() - t0)
    return broadcast_pca(pca)
