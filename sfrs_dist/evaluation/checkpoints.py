"""Loading a network to evaluate: our checkpoints (final or per-subset) or an OpenIBL one."""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint_io import load_checkpoint
from ..config import Config
from ..models import SFRSNet, build_model, config_freeze_batchnorm, config_input_norm
from ..models.openibl import build_model_from_openibl


class NoNetworkError(ValueError):
    """One of our training checkpoints that holds no network (written at the start of a generation)."""


def load_for_eval(cfg: Config, path: Path, device: torch.device) -> SFRSNet:
    """Our checkpoint (a dict with ``model``) with ``cfg.model``'s architecture, else OpenIBL.

    Raises :class:`NoNetworkError` (a ValueError) for our training checkpoints without a
    ``model`` (a dict with ``state``, saved when a generation starts).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    raw = load_checkpoint(path)
    if isinstance(raw, dict) and "model" in raw and isinstance(raw["model"], dict):
        m = cfg.model
        net = build_model(m.backbone, weights=None, num_clusters=m.num_clusters, trainable=m.trainable, layer=m.layer,
                          input_norm=config_input_norm(m, raw.get("config")),
                          freeze_batchnorm=config_freeze_batchnorm(m, raw.get("config")))
        try:
            net.load_state_dict(raw["model"])
        except RuntimeError as exc:
            raise ValueError(f"checkpoint {path} does not match model config {m}: {exc}") from None
    elif isinstance(raw, dict) and "state" in raw:
        raise NoNetworkError(f"checkpoint {path} holds training state but no network ('model' key): "
                             "it was saved at the start of a generation; evaluate a later checkpoint")
    else:
        net = build_model_from_openibl(str(path), trainable="none")
    return net.requires_grad_(False).to(device).eval()
