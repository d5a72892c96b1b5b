"""NetVLAD aggregation layer, its k-means initialisation and the on-disk init cache.

The layer follows the NetVLAD convention used by OpenIBL checkpoints:

- local features ``x_n`` (D channels at every position n) are L2-normalised over channels;
- soft assignment ``a_k(n) = softmax_k(w_k . x_n)``, a 1x1 convolution without bias
  (``conv.weight``, K x D x 1 x 1);
- residual sums ``V_k = sum_n a_k(n) (x_n - c_k)`` with centroids ``centroids`` (K x D);
- descriptor: intra-normalise each ``V_k``, flatten, L2-normalise (K*D values).

Initialisation: k-means (k-means++ seeds, every sampled descriptor) on sampled L2-normalised
local descriptors gives centroids ``c_k``, or the NetVLAD authors' HDF5 file supplies them;
``conv.weight = alpha * c_k / ||c_k||`` with
``alpha = -log(0.01) / mean(top1 - top2 dot-product gap)`` between each descriptor and the
normalised centroids.

All arithmetic of this layer runs in float32, also under ``torch.autocast``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NetVLADInit:
    """Result of the k-means initialisation: centroids (K x D, float32) and alpha."""

    centroids: torch.Tensor
    alpha: float


def _no_autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device_type=device.type, enabled=False)


def normalize_vlad(vlad: torch.Tensor) -> torch.Tensor:
    """Intra-normalise (per cluster), flatten and L2-normalise residual sums.

    ``vlad``: (..., K, D) residual sums; returns (..., K*D) float32 descriptors.
    """
    vlad = vlad.float()
    vlad = F.normalize(vlad, p=2, dim=-1)
    vlad = vlad.flatten(-2)
    return F.normalize(vlad, p=2, dim=-1)


class NetVLAD(nn.Module):
    """NetVLAD with ``num_clusters`` clusters over ``dim``-dimensional local features.

    Parameters ``conv.weight`` (K x D x 1 x 1, no bias) and ``centroids`` (K x D) carry the
    names OpenIBL uses. ``alpha`` is a plain attribute (not part of the state dict).
    """

    def __init__(self, num_clusters: int = 64, dim: int = 512, alpha: float = 100.0) -> None:
        super().__init__()
        if num_clusters < 1 or dim < 1:
            raise ValueError(f"num_clusters and dim must be positive; got {num_clusters}, {dim}")
        self.num_clusters = num_clusters
        self.dim = dim
        self.alpha = float(alpha)
        self.conv = nn.Conv2d(dim, num_clusters, kernel_size=1, bias=False)
        self.centroids = nn.Parameter(torch.rand(num_clusters, dim))

    @property
    def output_dim(self) -> int:
        return self.num_clusters * self.dim

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.dim:
            raise ValueError(f"NetVLAD expects (B, {self.dim}, H, W) features; got shape {tuple(x.shape)}")

    def assign(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the channel-normalised features (B, D, H, W) and soft assignment (B, K, H, W)."""
        self._check_input(x)
        with _no_autocast(x.device):
            x = F.normalize(x.float(), p=2, dim=1)
            logits = F.conv2d(x, self.conv.weight.float())
            return x, F.softmax(logits, dim=1)

    def _residual(self, weighted: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
        # sum_n a_k(n) x_n - c_k sum_n a_k(n)
        return weighted - mass.unsqueeze(-1) * self.centroids.float()

    def residual_sums(self, x: torch.Tensor) -> torch.Tensor:
        """Unnormalised residual sums over the whole map: (B, D, H, W) -> (B, K, D)."""
        with _no_autocast(x.device):
            xn, a = self.assign(x)
            weighted = torch.einsum("bkhw,bdhw->bkd", a, xn)
            return self._residual(weighted, a.sum(dim=(2, 3)))

    def quarter_residual_sums(self, x: torch.Tensor) -> torch.Tensor:
        """Residual sums of the 2x2 quarters: (B, D, H, W) -> (B, 4, K, D).

        Quarter order: top-left, top-right, bottom-left, bottom-right. H and W must be even.
        """
        self._check_input(x)
        b, _, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"quarter split needs an even feature map; got {h}x{w}")
        with _no_autocast(x.device):
            xn, a = self.assign(x)
            a = a.reshape(b, self.num_clusters, 2, h // 2, 2, w // 2)
            xn = xn.reshape(b, self.dim, 2, h // 2, 2, w // 2)
            weighted = torch.einsum("bkiyjx,bdiyjx->bijkd", a, xn).reshape(b, 4, self.num_clusters, self.dim)
            mass = a.sum(dim=(3, 5)).permute(0, 2, 3, 1).reshape(b, 4, self.num_clusters)
            return self._residual(weighted, mass)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised NetVLAD descriptors: (B, D, H, W) -> (B, K*D) float32."""
        return normalize_vlad(self.residual_sums(x))

    @torch.no_grad()
    def apply_init(self, init: NetVLADInit) -> None:
        """Set centroids and soft-assignment weights from a k-means initialisation."""
        c = init.centroids.to(dtype=torch.float32, device=self.centroids.device)
        if tuple(c.shape) != (self.num_clusters, self.dim):
            raise ValueError(
                f"initial centroids have shape {tuple(c.shape)}; the layer needs ({self.num_clusters}, {self.dim})"
            )
        self.alpha = float(init.alpha)
        self.centroids.copy_(c)
        weight = self.alpha * F.normalize(c, p=2, dim=1)
        self.conv.weight.copy_(weight.view(self.num_clusters, self.dim, 1, 1).to(self.conv.weight.dtype))


@torch.no_grad()
def sample_local_descriptors(
    backbone: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    per_image: int,
    generator: Optional[torch.Generator] = None,
    image_seeds: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """Sample L2-normalised local descriptors from a batch of images.

    ``image_seeds`` (one per image) draws each image's positions from a generator of its own,
    so the sample does not depend on how images are batched or split across ranks; otherwise
    ``generator`` draws them in batch order.

    Runs ``backbone`` (any callable giving a (B, D, h, w) map; pass ``net.features`` of an
    ``SFRSNet`` so its input adapter converts the NetVLAD-convention images the way the
    weights expect) on ``images`` (B, 3, H, W) and draws ``per_image`` distinct positions
    of each image's feature map (all positions when the map has fewer). Returns
    (B * n, D) float32 descriptors, each of unit norm. The caller puts the backbone in the
    mode it wants (eval for initialisation) and gathers samples across ranks.
    """
    if per_image < 1:
        raise ValueError(f"per_image must be >= 1; got {per_image}")
    feats = backbone(images)
    with _no_autocast(feats.device):
        feats = F.normalize(feats.float(), p=2, dim=1)
    b, d, h, w = feats.shape
    n = min(per_image, h * w)
    if n < per_image:
        log.warning("feature map %dx%d has only %d positions; sampling %d per image instead of %d", h, w, h * w, n, per_image)
    flat = feats.reshape(b, d, h * w)
    out = []
    if image_seeds is not None and len(image_seeds) != b:
        raise ValueError(f"image_seeds has {len(image_seeds)} seeds for {b} images")
    for i in range(b):
        g = torch.Generator().manual_seed(int(image_seeds[i])) if image_seeds is not None else generator
        idx = torch.randperm(h * w, generator=g)[:n].to(flat.device)
        out.append(flat[i, :, idx].t())
    return torch.cat(out, dim=0).contiguous()


def kmeans_pp_seeds(x: np.ndarray, num_clusters: int, seed: int = 0) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii): the first centre drawn uniformly, each next
    one with probability proportional to the squared distance to the nearest centre so far.

    ``x`` (N x D) float32; returns (K x D) float32 rows of ``x``.
    """
    n = x.shape[0]
    rng = np.random.default_rng(seed)
    centres = np.empty((num_clusters, x.shape[1]), dtype=np.float32)
    centres[0] = x[int(rng.integers(n))]
    sq_norms = np.einsum("nd,nd->n", x, x)
    nearest = np.maximum(sq_norms - 2.0 * (x @ centres[0]) + float(centres[0] @ centres[0]), 0.0)
    for k in range(1, num_clusters):
        total = float(nearest.sum())
        idx = int(rng.choice(n, p=nearest / total)) if total > 0 else int(rng.integers(n))
        centres[k] = x[idx]
        d = np.maximum(sq_norms - 2.0 * (x @ centres[k]) + float(centres[k] @ centres[k]), 0.0)
        np.minimum(nearest, d, out=nearest)
    return centres


def kmeans_init(descs: torch.Tensor, num_clusters: int = 64, seed: int = 0, niter: int = 100) -> NetVLADInit:
    """k-means centroids of ``descs`` (N x D) and the NetVLAD alpha.

    As the reference (scikit-learn ``KMeans(max_iter=100)``): k-means++ seeds, then Lloyd
    iterations (faiss) over *every* descriptor (faiss would otherwise subsample to 256 per
    centroid).
    """
    if descs.dim() != 2:
        raise ValueError(f"descriptors must be an (N, D) matrix; got shape {tuple(descs.shape)}")
    n, d = descs.shape
    if n < num_clusters:
        raise ValueError(f"k-means with {num_clusters} clusters needs at least {num_clusters} descriptors; got {n}")
    x = np.ascontiguousarray(descs.detach().float().cpu().numpy())
    km = faiss.Kmeans(d, num_clusters, niter=niter, seed=seed, verbose=False, min_points_per_centroid=1,
                      max_points_per_centroid=int(math.ceil(n / num_clusters)) + 1)
    km.train(x, init_centroids=kmeans_pp_seeds(x, num_clusters, seed))
    centroids = torch.from_numpy(np.array(km.centroids, dtype=np.float32).reshape(num_clusters, d))
    alpha = alpha_from_centroids(descs.float().cpu(), centroids)
    return NetVLADInit(centroids=centroids, alpha=alpha)


def read_centroid_file(path: str, num_clusters: int, dim: int) -> NetVLADInit:
    """The NetVLAD authors' initialisation file (e.g. ``vgg16_pitts_64_desc_cen.hdf5``).

    HDF5 datasets ``centroids`` (K x D) and ``descriptors`` (N x D, the sampled local
    descriptors alpha is computed from), as the reference reads it. Raises ``ValueError``
    naming the file and the dataset when one is missing or has the wrong shape.
    """
    import h5py

    if not os.path.isfile(path):
        raise ValueError(f"model.netvlad_init: no such file: {path}")
    try:
        h5 = h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(f"model.netvlad_init: {path} is not a readable HDF5 file ({exc})") from None
    with h5:
        arrays = {}
        for name in ("centroids", "descriptors"):
            if name not in h5:
                raise ValueError(f"model.netvlad_init: {path} has no dataset '{name}' (it holds: "
                                 f"{', '.join(sorted(h5.keys())) or 'nothing'})")
            arrays[name] = np.asarray(h5[name][...], dtype=np.float32)
    cen, desc = arrays["centroids"], arrays["descriptors"]
    if cen.shape != (num_clusters, dim):
        raise ValueError(f"model.netvlad_init: {path} dataset 'centroids' has shape {cen.shape}; this network "
                         f"needs ({num_clusters}, {dim}) (model.num_clusters x the backbone's channels)")
    if desc.ndim != 2 or desc.shape[1] != dim or desc.shape[0] < 2:
        raise ValueError(f"model.netvlad_init: {path} dataset 'descriptors' has shape {desc.shape}; expected "
                         f"(N >= 2, {dim})")
    centroids = torch.from_numpy(cen)
    return NetVLADInit(centroids=centroids, alpha=alpha_from_centroids(torch.from_numpy(desc), centroids))


def alpha_from_centroids(descs: torch.Tensor, centroids: torch.Tensor) -> float:
    """``-log(0.01) / mean(top1 - top2)`` of dot products with the normalised centroids."""
    if centroids.shape[0] < 2:
        raise ValueError("alpha needs at least 2 centroids")
    dots = descs.float() @ F.normalize(centroids.float(), p=2, dim=1).t()
    top2 = dots.topk(2, dim=1).values
    gap = float((top2[:, 0] - top2[:, 1]).mean())
    if not gap > 0:
        raise ValueError(f"mean top1-top2 gap is {gap}; descriptors do not separate the centroids")
    return -math.log(0.01) / gap


def init_netvlad_from_descriptors(
    layer: NetVLAD, descs: torch.Tensor, seed: int = 0, niter: int = 100
) -> NetVLADInit:
    """Run k-means on ``descs`` (N x D, L2-normalised), initialise ``layer``, return the init."""
    if descs.shape[-1] != layer.dim:
        raise ValueError(f"descriptors have {descs.shape[-1]} dims; the NetVLAD layer expects {layer.dim}")
    init = kmeans_init(descs, layer.num_clusters, seed=seed, niter=niter)
    layer.apply_init(init)
    log.info("NetVLAD initialised: %d clusters from %d descriptors, alpha %.3f", layer.num_clusters, descs.shape[0], init.alpha)
    return init


def state_fingerprint(module: nn.Module, *extra: object) -> str:
    """SHA-256 over a module's state dict (names, shapes, values) and ``extra`` values.

    Use it (with the data description, K and seed as ``extra``) as the ``fingerprint`` of
    :func:`load_or_compute_init`.
    """
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    for value in extra:
        h.update(repr(value).encode())
    return h.hexdigest()


def load_or_compute_init(path: str, compute_fn: Callable[[], NetVLADInit], fingerprint: str) -> NetVLADInit:
    """Return the cached NetVLAD init at ``path`` if its fingerprint matches, else compute it.

    ``fingerprint`` identifies what the init depends on (backbone weights, data, K, seed).
    A computed init is written atomically (temporary file then ``os.replace``) as a ``.pt``
    holding ``centroids``, ``alpha`` and ``fingerprint``.
    """
    if os.path.isfile(path):
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # unreadable cache: recompute
            log.warning("NetVLAD init cache %s is unreadable (%s); recomputing", path, exc)
            saved = None
        if isinstance(saved, dict) and saved.get("fingerprint") == fingerprint:
            if not {"centroids", "alpha"} <= set(saved):
                raise ValueError(f"NetVLAD init cache {path} lacks 'centroids' or 'alpha'")
            log.info("reusing NetVLAD init from %s", path)
            return NetVLADInit(centroids=saved["centroids"].float(), alpha=float(saved["alpha"]))
        if saved is not None:
            log.info("NetVLAD init cache %s has another fingerprint; recomputing", path)
    init = compute_fn()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".netvlad_init.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        torch.save(
            {"centroids": init.centroids.detach().float().cpu(), "alpha": float(init.alpha), "fingerprint": fingerprint},
            tmp,
        )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return init
