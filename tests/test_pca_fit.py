"""PCA fitted from sharded descriptors: the sampled rows only, to rank 0, fitted there.

In 2 real gloo processes holding interleaved, uneven shares, ``fit_pca_sharded`` must give
exactly the PCA that ``PCAWhitening.fit`` gives on the whole matrix in one process (same
sample, same float64 fit), on every rank; rank 1 gets no rows back. The float64 torch fit
(the GPU path) must agree with the numpy one.
"""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from gloo import gloo_group

from sfrs_dist.evaluation.pca import PCAWhitening, fit_pca
from sfrs_dist.evaluation.pca_fit import fit_pca_sharded, fit_pca_torch, gather_sample, pca_sample

N, DIM, DIMS, SAMPLES = 150, 96, 16, 60


def data() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, DIM)).astype(np.float32) * np.linspace(3, 0.1, DIM, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def owner() -> np.ndarray:
    return np.random.default_rng(1).choice(2, N, p=[0.3, 0.7])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str) -> None:
    with gloo_group(rank, 2, port=port):
        x, own = data(), owner()
        mine = np.flatnonzero(own == rank)[::-1]  # unsorted positions
        got = gather_sample(mine, x[mine], pca_sample(N, SAMPLES, 5))
        pca = fit_pca_sharded(mine, x[mine], N, DIMS, SAMPLES, 5, torch.device("cpu"))
        np.savez(f"{out}/rank{rank}.npz", U=pca.U, lams=pca.lams, mu=pca.mu,
                 got=np.zeros(0) if got is None else got.numpy(), got_none=got is None)


def test_sharded_fit_equals_the_whole_matrix_fit(tmp_path):
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    ref = PCAWhitening(DIMS).fit(data(), max_samples=SAMPLES, seed=5)
    r0, r1 = (np.load(tmp_path / f"rank{r}.npz") for r in range(2))
    for r in (r0, r1):
        for k in ("U", "lams", "mu"):
            np.testing.assert_array_equal(r[k], getattr(ref, k))
    np.testing.assert_array_equal(r0["got"], data()[pca_sample(N, SAMPLES, 5)])
    assert not r0["got_none"] and r1["got_none"]  # only rank 0 receives rows


def test_sample_is_what_fit_draws():
    assert np.array_equal(pca_sample(10, 20, 0), np.arange(10))
    s = pca_sample(1000, 100, 3)
    assert len(s) == 100 and np.all(np.diff(s) > 0)
    x = np.random.default_rng(0).standard_normal((1000, 8)).astype(np.float32)
    a = PCAWhitening(4).fit(x, max_samples=100, seed=3)
    b = PCAWhitening(4).fit(x[s], max_samples=100, seed=99)  # no further sampling
    np.testing.assert_array_equal(a.U, b.U)


def test_single_process_gather_checks_coverage():
    x = data()
    with pytest.raises(ValueError, match="hold 10 of the 12 sampled rows"):
        gather_sample(np.arange(10), x[:10], np.arange(12))


@pytest.mark.parametrize("n, dim", [(40, 96), (200, 32)])  # dual (Gram) and primal (covariance)
def test_torch_fit_equals_numpy_fit(n, dim):
    scale = np.linspace(3, 0.1, dim, dtype=np.float32)  # well-separated variances
    x = np.random.default_rng(2).standard_normal((n, dim)).astype(np.float32) * scale
    u_np, l_np, mu_np = fit_pca(x, DIMS)
    u_t, l_t, mu_t = fit_pca_torch(torch.from_numpy(x), DIMS, block=40)
    np.testing.assert_allclose(l_t, l_np, rtol=1e-9)
    np.testing.assert_allclose(mu_t, mu_np, rtol=1e-12, atol=1e-15)
    signs = np.sign((u_t * u_np).sum(0))
    assert np.all(np.abs(signs) == 1)
    np.testing.assert_allclose(u_t * signs, u_np, atol=1e-8)
