"""Pictures of retrieval results and of 9-region similarities (PIL only).

Retrieval strip (``render_retrievals``): the query, then its top-k retrievals, left to
right. Every image is letter-boxed into a ``tile`` (H, W) and surrounded by a frame of
``border`` pixels: blue for the query, green for a retrieval within the ground-truth radius,
red otherwise. Cell i (0 = query) occupies the box
``x0 = gap + i * (W + 2 * border + gap)``, ``y0 = gap + label_h``, of size
``(W + 2 * border, H + 2 * border)``; the image is ``(1 + k) * (W + 2 * border + gap) + gap``
wide and ``label_h + H + 2 * border + 2 * gap`` high.

Region similarity (``render_region_similarity``): a 9 x 9 grid of ``cell``-pixel squares, row
i / column j coloured by ``sim[i, j]`` through a colour map whose luminance increases with
the value, with the region names along both axes. The grid starts at
``(label_w, title_h + header_h)``.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

log = logging.getLogger(__name__)

ImageLike = Union[Image.Image, np.ndarray]

REGION_NAMES: Tuple[str, ...] = (
    "global", "top", "bottom", "left", "right", "top-left", "top-right", "bottom-left", "bottom-right",
)
REGION_SHORT: Tuple[str, ...] = ("G", "T", "B", "L", "R", "TL", "TR", "BL", "BR")

QUERY_COLOR = (40, 90, 220)
CORRECT_COLOR = (0, 200, 0)
WRONG_COLOR = (220, 0, 0)
BACKGROUND = (255, 255, 255)
LETTERBOX = (32, 32, 32)

# Anchors of a viridis-like map: luminance strictly increases from the first to the last.
_CMAP_ANCHORS = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64
)


def _font(size: int = 12) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def to_pil(img: ImageLike) -> Image.Image:
    """RGB PIL image from a PIL image or an (H, W[, 3]) array (uint8, or floats in [0, 1])."""
    if isinstance(img, Image.Image):
        return img.convert("RGB")
    arr = np.asarray(img)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[2] not in (1, 3):
        arr = np.transpose(arr, (1, 2, 0))
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise ValueError(f"image array must be (H, W), (H, W, 3) or (3, H, W), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.clip(np.asarray(arr, dtype=np.float64) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(arr).convert("RGB")


def letterbox(img: ImageLike, size: Tuple[int, int]) -> Image.Image:
    """Resize keeping the aspect ratio into an (H, W) tile, centred on a dark background."""
    h, w = size
    im = to_pil(img)
    scale = min(w / im.width, h / im.height)
    new = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    tile = Image.new("RGB", (w, h), LETTERBOX)
    tile.paste(im.resize(new, Image.BILINEAR), ((w - new[0]) // 2, (h - new[1]) // 2))
    return tile


def save_png(img: Image.Image, path: str) -> str:
    """Write a PNG through a temporary file and ``os.replace``; returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        img.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def draw_retrievals(query_img: ImageLike, retrieved_imgs: Sequence[ImageLike], correct_flags: Sequence[bool],
                    tile: Tuple[int, int] = (180, 240), border: int = 6, gap: int = 6,
                    label_h: int = 30, labels: Optional[Sequence[str]] = None) -> Image.Image:
    """The retrieval strip as a PIL image (layout in the module docstring)."""
    if len(retrieved_imgs) != len(correct_flags):
        raise ValueError(f"{len(retrieved_imgs)} retrieved images but {len(correct_flags)} flags")
    th, tw = tile
    cw, ch = tw + 2 * border, th + 2 * border
    n = 1 + len(retrieved_imgs)
    canvas = Image.new("RGB", (n * (cw + gap) + gap, label_h + ch + 2 * gap), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = _font(max(8, label_h - 6))
    if labels is None:
        labels = ["query"] + [f"#{i + 1}" for i in range(len(retrieved_imgs))]
    if len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} images")
    imgs = [query_img, *retrieved_imgs]
    colors = [QUERY_COLOR] + [CORRECT_COLOR if ok else WRONG_COLOR for ok in correct_flags]
    for i, (im, color, label) in enumerate(zip(imgs, colors, labels)):
        x0, y0 = gap + i * (cw + gap), gap + label_h
        draw.rectangle([x0, y0, x0 + cw - 1, y0 + ch - 1], fill=color)
        canvas.paste(letterbox(im, tile), (x0 + border, y0 + border))
        draw.text((x0, gap), str(label), fill=(0, 0, 0), font=font)
    return canvas


def render_retrievals(query_img: ImageLike, retrieved_imgs: Sequence[ImageLike],
                      correct_flags: Sequence[bool], path: str, **layout) -> str:
    """Write a PNG of the query beside its retrievals, framed green (correct) or red (wrong).

    ``layout`` keywords (``tile``, ``border``, ``gap``, ``label_h``, ``labels``) go to
    ``draw_retrievals``. Returns ``path``.
    """
    return save_png(draw_retrievals(query_img, retrieved_imgs, correct_flags, **layout), path)


def colormap(values: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """RGB uint8 colours (..., 3) for ``values``; luminance increases with the value."""
    v = np.asarray(values, dtype=np.float64)
    t = np.clip((v - vmin) / (vmax - vmin), 0.0, 1.0) if vmax > vmin else np.full(v.shape, 0.5)
    pos = t * (len(_CMAP_ANCHORS) - 1)
    lo = np.minimum(np.floor(pos).astype(int), len(_CMAP_ANCHORS) - 2)
    frac = (pos - lo)[..., None]
    rgb = _CMAP_ANCHORS[lo] * (1 - frac) + _CMAP_ANCHORS[lo + 1] * frac
    return np.round(rgb).astype(np.uint8)


def region_similarity(regions_a: np.ndarray, regions_b: np.ndarray) -> np.ndarray:
    """9 x 9 dot products between the region descriptors (9, D) of two images."""
    a, b = np.asarray(regions_a, dtype=np.float32), np.asarray(regions_b, dtype=np.float32)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != len(REGION_NAMES) or a.shape != b.shape:
        raise ValueError(f"region descriptors must both be (9, D), got {a.shape} and {b.shape}")
    return a @ b.T


def draw_region_similarity(sim: np.ndarray, title: str = "", cell: int = 40, label_w: int = 84,
                           header_h: int = 22, title_h: int = 22, vmin: Optional[float] = None,
                           vmax: Optional[float] = None, annotate: bool = True) -> Image.Image:
    """The 9 x 9 heat map as a PIL image (layout in the module docstring).

    Colours span [``vmin``, ``vmax``], by default the matrix minimum and maximum.
    """
    s = np.asarray(sim, dtype=np.float64)
    n = len(REGION_NAMES)
    if s.shape != (n, n):
        raise ValueError(f"region similarity must be {n}x{n}, got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("region similarity holds non-finite values")
    vmin = float(s.min()) if vmin is None else vmin
    vmax = float(s.max()) if vmax is None else vmax
    gx, gy = label_w, title_h + header_h
    canvas = Image.new("RGB", (gx + n * cell + 4, gy + n * cell + 4), BACKGROUND)
    grid = np.repeat(np.repeat(colormap(s, vmin, vmax), cell, axis=0), cell, axis=1)
    canvas.paste(Image.fromarray(grid), (gx, gy))
    draw = ImageDraw.Draw(canvas)
    font = _font(11)
    draw.text((4, 4), title, fill=(0, 0, 0), font=font)
    for i, (name, short) in enumerate(zip(REGION_NAMES, REGION_SHORT)):
        draw.text((4, gy + i * cell + cell // 2 - 6), name, fill=(0, 0, 0), font=font)
        draw.text((gx + i * cell + cell // 2 - 6, title_h + 4), short, fill=(0, 0, 0), font=font)
    if annotate:
        rgb = colormap(s, vmin, vmax).astype(np.float64)
        lum = rgb @ np.array([0.299, 0.587, 0.114])
        for i in range(n):
            for j in range(n):
                color = (0, 0, 0) if lum[i, j] > 128 else (255, 255, 255)
                draw.text((gx + j * cell + cell // 2 - 12, gy + i * cell + cell // 2 - 6),
                          f"{s[i, j]:.2f}", fill=color, font=_font(10))
    return canvas


def render_region_similarity(sim9x9: np.ndarray, path: str, title: str = "", **layout) -> str:
    """Write the 9 x 9 region-similarity heat map of two images as a PNG; returns ``path``."""
    return save_png(draw_region_similarity(sim9x9, title=title, **layout), path)


def _hstack(images: Sequence[Image.Image], gap: int = 6) -> Image.Image:
    w = sum(im.width for im in images) + gap * (len(images) + 1)
    h = max(im.height for im in images) + 2 * gap
    out = Image.new("RGB", (w, h), BACKGROUND)
    x = gap
    for im in images:
        out.paste(im, (x, gap))
        x += im.width + gap
    return out


def _vstack(images: Sequence[Image.Image]) -> Image.Image:
    out = Image.new("RGB", (max(im.width for im in images), sum(im.height for im in images)), BACKGROUND)
    y = 0
    for im in images:
        out.paste(im, (0, y))
        y += im.height
    return out


def render_query_positive_regions(query_img: ImageLike, positive_imgs: Sequence[ImageLike],
                                  sims: Sequence[np.ndarray], path: str,
                                  titles: Optional[Sequence[str]] = None,
                                  tile: Tuple[int, int] = (180, 240)) -> str:
    """One row per positive: query | positive | their 9 x 9 region similarity. Writes a PNG.

    All heat maps share one colour range (the minimum and maximum over ``sims``).
    """
    if len(positive_imgs) != len(sims) or not sims:
        raise ValueError(f"need one similarity matrix per positive, got {len(positive_imgs)} and {len(sims)}")
    titles = list(titles) if titles is not None else [f"positive {i + 1}" for i in range(len(sims))]
    vmin = float(min(np.min(s) for s in sims))
    vmax = float(max(np.max(s) for s in sims))
    q = letterbox(query_img, tile)
    rows = [
        _hstack([q, letterbox(p, tile), draw_region_similarity(s, title=t, vmin=vmin, vmax=vmax)])
        for p, s, t in zip(positive_imgs, sims, titles)
    ]
    return save_png(_vstack(rows), path)


IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp")


def load_shard_images(shards: Sequence[str], keys: Sequence[str]) -> Dict[str, Image.Image]:
    """Decode the images of ``keys`` from WebDataset tar shards (one sequential scan)."""
    import io

    import webdataset as wds

    wanted = set(keys)
    found: Dict[str, Image.Image] = {}
    if not wanted:
        return found
    for sample in wds.WebDataset(list(shards), shardshuffle=False, empty_check=False):
        key = sample["__key__"]
        if key not in wanted or key in found:
            continue
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None:
            raise KeyError(f"sample {key!r} in {sample.get('__url__')} has no image member {IMAGE_EXTENSIONS}")
        found[key] = Image.open(io.BytesIO(sample[ext])).convert("RGB")
        if len(found) == len(wanted):
            break
    return found


def visualize_queries(query_indices: Sequence[int], queries: Optional[np.ndarray], db: Optional[np.ndarray],
                      utm_q: np.ndarray, utm_db: np.ndarray, query_keys: Sequence[str],
                      db_keys: Sequence[str],
                      load_images: Callable[[Sequence[str]], Mapping[str, ImageLike]], out_dir: str,
                      k: int = 5, radius: float = 25.0,
                      regions: Optional[Mapping[str, np.ndarray]] = None,
                      topk: Optional[np.ndarray] = None) -> List[str]:
    """Retrieval strips (and region heat maps where ``regions`` has the descriptors) per query.

    Args:
        query_indices: rows of ``queries`` to draw.
        queries, db: (Q, D) and (G, D) L2-normalised descriptors, searched for the top ``k``
            of the drawn queries; unused (may be None) when ``topk`` is given.
        utm_q, utm_db: (Q, 2) and (G, 2) positions in metres; a retrieval within ``radius``
            of the query is correct.
        query_keys, db_keys: sample keys of the rows (used to load images and name files).
        load_images: keys -> {key: image}, called once with every key needed.
        out_dir: output folder.
        regions: key -> (9, D) region descriptors; heat maps are drawn for the query against
            its correct retrievals when both have region descriptors.
        topk: (len(query_indices), >= k) database indices already retrieved for the drawn
            queries, best first (-1: none), e.g. from a sharded search; replaces the search.

    Returns:
        The written PNG paths: ``<query key>_top<k>.png`` and ``<query key>_regions.png``.
    """
    from sfrs_dist.evaluation.search import search_topk

    qi = np.asarray(query_indices, dtype=np.int64).reshape(-1)
    if qi.size == 0:
        raise ValueError("no query selected")
    if qi.min() < 0 or qi.max() >= len(query_keys):
        raise ValueError(f"query index out of range [0, {len(query_keys)}): {qi.tolist()}")
    if topk is None:
        _, topk = search_topk(db, np.asarray(queries)[qi], k)
    else:
        topk = np.asarray(topk, dtype=np.int64)
        if topk.ndim != 2 or topk.shape[0] != qi.size or topk.shape[1] < k:
            raise ValueError(f"topk must be ({qi.size}, >= {k}), got shape {topk.shape}")
        topk = topk[:, :k]
    utm_q, utm_db = np.asarray(utm_q, dtype=np.float64), np.asarray(utm_db, dtype=np.float64)
    hits = [[int(j) for j in row if j >= 0] for row in topk]
    needed = [query_keys[q] for q in qi] + [db_keys[j] for row in hits for j in row]
    images = load_images(needed)
    absent = [key for key in dict.fromkeys(needed) if key not in images]
    if absent:
        raise KeyError(f"no image for {len(absent)} key(s): {absent[:5]}")
    written: List[str] = []
    for q, row in zip(qi, hits):
        dist = np.linalg.norm(utm_db[row] - utm_q[q], axis=1)
        correct = [bool(d <= radius) for d in dist]
        qkey = query_keys[q]
        written.append(render_retrievals(
            images[qkey], [images[db_keys[j]] for j in row], correct,
            os.path.join(out_dir, f"{qkey}_top{k}.png"),
            labels=["query"] + [f"#{r + 1} {d:.0f}m" for r, d in enumerate(dist)],
        ))
        if regions is None or qkey not in regions:
            continue
        pos = [j for j, ok in zip(row, correct) if ok and db_keys[j] in regions]
        if pos:
            sims = [region_similarity(regions[qkey], regions[db_keys[j]]) for j in pos]
            written.append(render_query_positive_regions(
                images[qkey], [images[db_keys[j]] for j in pos], sims,
                os.path.join(out_dir, f"{qkey}_regions.png"), titles=[db_keys[j] for j in pos],
            ))
    log.info("wrote %d images to %s", len(written), out_dir)
    return written
