"""PCA with whitening for global descriptors, in the OpenIBL HDF5 file convention.

File layout (HDF5 datasets):

* ``U``    (D, d): principal directions as unit-norm columns, largest variance first;
* ``lams`` (d,):   variances along those directions (eigenvalues of the covariance with the
  ``1 / (N - 1)`` normalisation);
* ``mu``   (D,):   mean of the training descriptors;
* ``Utmu`` (d,):   ``U^T mu``.

(Files written by the reference store ``mu`` and ``Utmu`` as column vectors (D, 1) and
(d, 1); both shapes are accepted.) The transform keeps the first ``dims`` directions and
computes ``y = (U^T x - U^T mu) / sqrt(lams)`` (whitening), then L2-normalises ``y``. As in
the reference, the offset is recomputed from ``U`` and ``mu`` at load time; a stored ``Utmu``
that disagrees is reported in the log.
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Union

import h5py
import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F

from sfrs_dist import distributed as du

log = logging.getLogger(__name__)

ArrayLike = Union[np.ndarray, torch.Tensor]
DATASETS = ("U", "lams", "mu", "Utmu")


def _to_numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _centred_block(x: np.ndarray, mu: np.ndarray, c0: int, c1: int) -> np.ndarray:
    return x[:, c0:c1].astype(np.float64) - mu[c0:c1]


def _top_eig(sym: np.ndarray, d: int):
    """Largest ``d`` eigenpairs of a symmetric matrix, descending."""
    n = sym.shape[0]
    lam, vec = scipy.linalg.eigh(sym, subset_by_index=[n - d, n - 1], overwrite_a=True)
    return lam[::-1].copy(), vec[:, ::-1].copy()


def fit_pca(x: np.ndarray, dims: int, block: int = 2048, rel_tol: float = 1e-10):
    """Principal directions of the rows of ``x`` (N, D), computed in float64.

    When N < D the N x N Gram matrix of the centred data is decomposed instead of the D x D
    covariance (the same non-zero eigenvalues; directions ``U = Xc^T V / sqrt((N-1) lams)``).
    ``dims`` is clamped to the rank of the centred data (at most N - 1, dropping directions
    whose variance is below ``rel_tol`` times the largest).

    Returns:
        (U (D, d) float64, lams (d,) float64, mu (D,) float64).
    """
    n, dim = x.shape
    if n < 2:
        raise ValueError(f"PCA needs at least 2 samples, got {n}")
    mu = x.mean(axis=0, dtype=np.float64)
    d = min(dims, n - 1, dim)
    if d < dims:
        log.warning("PCA: %d dims requested, data rank allows at most %d; using %d", dims, d, d)
    dual = dim > n
    if dual:
        gram = np.zeros((n, n), dtype=np.float64)
        for c0 in range(0, dim, block):
            xc = _centred_block(x, mu, c0, min(c0 + block, dim))
            gram += xc @ xc.T
    else:
        xc = x.astype(np.float64) - mu
        gram = xc.T @ xc
        del xc
    gram /= n - 1
    lams, vec = _top_eig(gram, d)
    del gram
    keep = lams > rel_tol * max(lams[0], np.finfo(np.float64).tiny)
    if not keep.all():
        log.warning("PCA: dropping %d directions with ~zero variance", int((~keep).sum()))
        lams, vec = lams[keep], vec[:, keep]
    if not dual:
        return vec, lams, mu
    u = np.empty((dim, lams.shape[0]), dtype=np.float64)
    scale = 1.0 / np.sqrt(lams * (n - 1))
    for c0 in range(0, dim, block):
        c1 = min(c0 + block, dim)
        u[c0:c1] = (_centred_block(x, mu, c0, c1).T @ vec) * scale
    return u, lams, mu


class PCAWhitening:
    """PCA projection with optional whitening and L2 normalisation.

    Args:
        dims: output dimension (4096 by default; clamped to the data rank in ``fit`` and to
            the stored dimension in ``load``).
        whiten: divide each projected coordinate by the square root of its variance.
    """

    def __init__(self, dims: int = 4096, whiten: bool = True) -> None:
        if dims < 1:
            raise ValueError(f"dims must be >= 1, got {dims}")
        self.dims = dims
        self.whiten = whiten
        self.U: Optional[np.ndarray] = None
        self.lams: Optional[np.ndarray] = None
        self.mu: Optional[np.ndarray] = None
        self._weight: Optional[torch.Tensor] = None
        self._bias: Optional[torch.Tensor] = None

    @property
    def fitted(self) -> bool:
        return self.U is not None

    @property
    def in_dim(self) -> int:
        self._check_fitted()
        return int(self.U.shape[0])

    @property
    def out_dim(self) -> int:
        self._check_fitted()
        return int(self.U.shape[1])

    def _check_fitted(self) -> None:
        if self.U is None:
            raise RuntimeError("PCAWhitening is not fitted: call fit() or load() first")

    def _set(self, U: np.ndarray, lams: np.ndarray, mu: np.ndarray) -> None:
        if np.any(lams <= 0):
            raise ValueError(f"PCA variances must be positive, min is {float(lams.min())}")
        self.U = np.ascontiguousarray(U, dtype=np.float32)
        self.lams = np.ascontiguousarray(lams, dtype=np.float32)
        self.mu = np.ascontiguousarray(mu, dtype=np.float32)
        w = self.U.astype(np.float64)
        if self.whiten:
            w = w / np.sqrt(self.lams.astype(np.float64))
        w = w.astype(np.float32)
        self._weight = torch.from_numpy(w)
        self._bias = torch.from_numpy((w.astype(np.float64).T @ self.mu.astype(np.float64)).astype(np.float32))

    def _params_on(self, device: torch.device):
        if self._weight.device != device:
            self._weight, self._bias = self._weight.to(device), self._bias.to(device)
        return self._weight, self._bias

    @property
    def Utmu(self) -> np.ndarray:
        """``U^T mu`` (without whitening), as stored in the file."""
        self._check_fitted()
        return (self.U.astype(np.float64).T @ self.mu.astype(np.float64)).astype(np.float32)

    def fit(self, x: ArrayLike, max_samples: int = 10000, seed: int = 0) -> "PCAWhitening":
        """Fit on the rows of ``x`` (N, D); at most ``max_samples`` rows, drawn at random."""
        x = _to_numpy(x)
        if x.ndim != 2:
            raise ValueError(f"PCA input must be 2-D (N, D), got shape {x.shape}")
        if x.shape[0] > max_samples:
            rows = np.sort(np.random.default_rng(seed).choice(x.shape[0], max_samples, replace=False))
            x = x[rows]
        U, lams, mu = fit_pca(x, self.dims)
        self._set(U, lams, mu)
        log.info("PCA fitted on %d x %d descriptors -> %d dims", x.shape[0], x.shape[1], self.out_dim)
        return self

    def transform(self, x: ArrayLike, batch_size: int = 4096, normalize: bool = True) -> ArrayLike:
        """Project (and whiten, L2-normalise) the rows of ``x`` (N, D); batched over rows.

        Returns a tensor on ``x``'s device for tensor input, a float32 array otherwise.
        """
        self._check_fitted()
        is_tensor = isinstance(x, torch.Tensor)
        xt = x if is_tensor else torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        if xt.ndim != 2 or xt.shape[1] != self.in_dim:
            raise ValueError(f"PCA expects (N, {self.in_dim}) input, got shape {tuple(xt.shape)}")
        w, b = self._params_on(xt.device)
        out = torch.empty((xt.shape[0], self.out_dim), dtype=torch.float32, device=xt.device)
        with torch.no_grad():
            for r0 in range(0, xt.shape[0], batch_size):
                y = torch.addmm(-b, xt[r0:r0 + batch_size].float(), w)
                out[r0:r0 + batch_size] = F.normalize(y, p=2, dim=1) if normalize else y
        return out if is_tensor else out.numpy()

    __call__ = transform

    def save(self, path: str) -> None:
        """Write ``U``, ``lams``, ``mu``, ``Utmu`` to an HDF5 file (temporary name, then rename)."""
        self._check_fitted()
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            with h5py.File(tmp, "w") as f:
                f.create_dataset("U", data=self.U)
                f.create_dataset("lams", data=self.lams)
                f.create_dataset("mu", data=self.mu)
                f.create_dataset("Utmu", data=self.Utmu)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path: str, dims: Optional[int] = None, whiten: bool = True) -> "PCAWhitening":
        """Read an HDF5 PCA file (ours or the reference's); keep the first ``dims`` directions."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"PCA file not found: {path}")
        with h5py.File(path, "r") as f:
            missing = [name for name in DATASETS if name not in f]
            if missing:
                raise KeyError(f"PCA file {path} lacks dataset(s) {missing}; expected {list(DATASETS)}")
            U = np.asarray(f["U"][...])
            lams = np.asarray(f["lams"][...]).reshape(-1)
            mu = np.asarray(f["mu"][...]).reshape(-1)
            utmu = np.asarray(f["Utmu"][...]).reshape(-1)
        if U.ndim != 2:
            raise ValueError(f"PCA file {path}: 'U' must be 2-D (D, d), got shape {U.shape}")
        if mu.shape[0] != U.shape[0]:
            raise ValueError(f"PCA file {path}: 'mu' has {mu.shape[0]} entries, 'U' has {U.shape[0]} rows")
        if lams.shape[0] != U.shape[1]:
            raise ValueError(f"PCA file {path}: 'lams' has {lams.shape[0]} entries, 'U' has {U.shape[1]} columns")
        stored = U.shape[1]
        d = stored if dims is None else dims
        if d > stored:
            raise ValueError(f"PCA file {path} holds {stored} dims, {d} requested")
        pca = cls(dims=d, whiten=whiten)
        try:
            pca._set(U[:, :d], lams[:d], mu)
        except ValueError as e:
            raise ValueError(f"PCA file {path}: {e}") from e
        if utmu.shape[0] == stored and not np.allclose(utmu[:d], pca.Utmu, rtol=1e-3, atol=1e-4):
            log.warning("PCA file %s: stored Utmu differs from U^T mu; using U^T mu", path)
        return pca


def broadcast_pca(pca: Optional[PCAWhitening], src: int = 0) -> PCAWhitening:
    """Rank ``src``'s fitted PCA on every rank (the others pass anything, e.g. None).

    ``U``, ``lams`` and ``mu`` travel as arrays (``distributed.broadcast_array``), the
    receivers rebuild the same projection from them. Identity when not distributed. A
    collective: every rank calls it with the same ``src``.
    """
    mine = du.get_rank() == src
    if mine and (pca is None or not pca.fitted):
        raise ValueError(f"broadcast_pca: rank {src} has no fitted PCA to send")
    if not du.is_distributed():
        return pca
    whiten = du.broadcast_object(bool(pca.whiten) if mine else None, src)
    U = du.broadcast_array(pca.U if mine else None, src)
    lams = du.broadcast_array(pca.lams[None, :] if mine else None, src)
    mu = du.broadcast_array(pca.mu[None, :] if mine else None, src)
    if mine:
        return pca
    out = PCAWhitening(dims=U.shape[1], whiten=whiten)
    out._set(U, lams[0], mu[0])
    return out
