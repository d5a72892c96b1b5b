"""Training engines with one interface: DDP (default) and DeepSpeed.

Both wrap a module whose ``forward(images)`` returns region descriptors, own the SGD
optimiser, and expose the same ``backward_step`` / ``set_lr`` / checkpoint calls, so the
training loop does not know which one it drives.

Extraction passes (mining refresh, validation, test, PCA) and saved networks use float32
weights on both engines: ``eval_network()`` and ``fp32_state_dict()``. Under DeepSpeed
bf16/fp16 the module's parameters are cast to the reduced dtype; the float32 values are the
optimiser's master weights (``deepspeed.utils.safe_get_full_fp32_param``) and, for frozen
parameters the optimiser does not hold, a float32 copy taken before DeepSpeed cast them.
Both are collectives under DeepSpeed: every rank calls them.
"""

from __future__ import annotations

import copy
import logging
import secrets
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed as du
from .checkpoint import deepspeed_dir

log = logging.getLogger(__name__)


def autocast_context(precision: str, device: torch.device):
    """Autocast for bf16/fp16 where the device has it; a no-op context for fp32."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    check_precision(precision, device)
    return torch.autocast(device_type=device.type, dtype=dtype)


def check_precision(precision: str, device: torch.device) -> None:
    """Raise ``ValueError`` for a precision the device cannot train in (fp16 on CPU)."""
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be fp32, bf16 or fp16 (resolved), got {precision!r}")
    if device.type == "cpu" and precision == "fp16":
        raise ValueError("train.precision fp16 needs CUDA; use bf16 or fp32 on CPU")


def lr_at(epoch: int, base_lr: float, step: int, gamma: float) -> float:
    """Step decay: ``base_lr * gamma ** (epoch // step)``."""
    return base_lr * gamma ** (epoch // step)


def make_sgd(params: Iterable[nn.Parameter], lr: float, momentum: float, weight_decay: float):
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: check model.trainable")
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


class _Engine:
    """What both engines share: ``model`` (the wrapped module) and ``optimizer``."""

    model: nn.Module
    module: nn.Module
    optimizer: torch.optim.Optimizer
    sharded_optimizer = False

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def optimizer_state(self) -> Dict[str, Any]:
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: Dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)

    def fp32_state_dict(self) -> Dict[str, torch.Tensor]:
        """The module's state dict with float32 floating-point entries, on the CPU."""
        return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu()
                for k, v in self.module.state_dict().items()}

    def eval_network(self) -> nn.Module:
        """A network with the module's float32 weights, for extraction passes."""
        return self.module

    def checkpoint_state(self, path: Path) -> Dict[str, Any]:
        """What a training checkpoint at ``path`` holds for this engine (float32 ``model`` included)."""
        return {"model": self.fp32_state_dict(), "optimizer": self.optimizer_state()}

    def load_checkpoint_state(self, ckpt: Dict[str, Any], path: Path) -> None:
        """Restore what ``checkpoint_state`` returned, from the checkpoint ``path`` it was saved to."""
        self.module.load_state_dict(ckpt["model"])
        self.load_optimizer_state(ckpt["optimizer"])


class DDPEngine(_Engine):
    """``DistributedDataParallel`` when a process group is up, the bare module otherwise."""

    name = "ddp"

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 precision: str = "fp32") -> None:
        self.module = module.to(device)
        self.device = device
        self.precision = precision
        self.optimizer = optimizer
        # fp16 autocast needs loss scaling: small activation gradients underflow in fp16
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        if du.is_distributed() and du.get_world_size() > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.module, device_ids=ids)
        else:
            self.model = self.module

    def forward(self, images: torch.Tensor, **kwargs) -> torch.Tensor:
        with autocast_context(self.precision, self.device):
            return self.model(images, **kwargs).float()

    def eval_network(self) -> nn.Module:
        """The module, with rank 0's buffers on every rank (a collective under DDP).

        DDP sends rank 0's buffers at the start of each training forward, so after the last
        step every rank holds batch-norm statistics of its own batches; extraction passes use
        rank 0's, the ones checkpoints hold, so a resumed job extracts what an uninterrupted
        one does.
        """
        if self.model is not self.module:
            for b in self.module.buffers():
                du.broadcast_tensor(b.data)
        return self.module

    def backward_step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def checkpoint_state(self, path: Path) -> Dict[str, Any]:
        out = super().checkpoint_state(path)
        if self.scaler is not None:
            out["grad_scaler"] = self.scaler.state_dict()
        return out

    def load_checkpoint_state(self, ckpt: Dict[str, Any], path: Path) -> None:
        super().load_checkpoint_state(ckpt, path)
        if self.scaler is not None and "grad_scaler" in ckpt:
            self.scaler.load_state_dict(ckpt["grad_scaler"])


class _Fp32AffineBatchNorm:
    """Batch norm whose weight and bias enter the normalisation in float32.

    DeepSpeed bf16/fp16 casts the affine parameters to the reduced dtype but leaves the
    running statistics in float32, a mix ``F.batch_norm`` refuses; float32 parameters with
    reduced-precision activations is the mix it supports. ``forward`` follows
    ``torch.nn.modules.batchnorm._BatchNorm.forward``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        return F.batch_norm(x, self.running_mean if use_running else None, self.running_var if use_running else None,
                            None if self.weight is None else self.weight.float(),
                            None if self.bias is None else self.bias.float(), bn_training, momentum, self.eps)


_FP32_AFFINE = {cls: type(f"Fp32Affine{cls.__name__}", (_Fp32AffineBatchNorm, cls), {})
                for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)}


def fp32_affine_batchnorm(module: nn.Module) -> int:
    """Make the batch-norm layers of ``module`` normalise with float32 affine parameters (in place).

    Classes are swapped, attributes and state-dict keys stay. Returns how many were changed.
    """
    n = 0
    for m in module.modules():
        swap = _FP32_AFFINE.get(type(m))
        if swap is not None:
            m.__class__ = swap
            n += 1
    return n


class DeepSpeedEngine(_Engine):
    """A DeepSpeed engine (ZeRO stage, bf16/fp16 from the config) with the DDP interface.

    Its training state is saved with DeepSpeed's own ``save_checkpoint`` (every rank writes
    its ZeRO partition) under a fresh tag in ``<checkpoints>/deepspeed``; the tag is recorded
    in the atomically written main checkpoint, so a half-written tag is never resumed.
    """

    name = "deepspeed"

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 precision: str = "fp32", zero_stage: int = 0, micro_batch: int = 1) -> None:
        import deepspeed

        if zero_stage not in (0, 1, 2):
            # ZeRO-3 partitions the parameters themselves: the extraction passes (each rank a
            # different number of batches) would need every rank in lockstep to gather them.
            raise ValueError(f"train.zero_stage {zero_stage} is not supported with this trainer; use 0, 1 or 2")
        if not du.is_distributed():
            deepspeed.init_distributed(dist_backend=du.default_backend())
        config = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": zero_stage},
            "zero_allow_untested_optimizer": True,  # torch SGD: ZeRO partitions its state like any other
            "bf16": {"enabled": precision == "bf16"},
            "fp16": {"enabled": precision == "fp16"},
            "steps_per_print": 10 ** 9,
            "wall_clock_breakdown": False,
        }
        self.device = device
        self.precision = precision
        module = module.to(device)
        self._shadow = None
        self._frozen_fp32: Dict[str, torch.Tensor] = {}
        if precision != "fp32":
            # DeepSpeed casts every parameter to the reduced dtype; the optimiser holds float32
            # masters of the trained ones only, so frozen ones are kept here, and an untouched
            # float32 module runs the extraction passes.
            self._frozen_fp32 = {n: p.detach().float().cpu().clone()
                                 for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}
            self._shadow = copy.deepcopy(module).requires_grad_(False)
            fp32_affine_batchnorm(module)
        self.model, self.optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
        self.module = self.model.module
        self.sharded_optimizer = zero_stage > 0

    def forward(self, images: torch.Tensor, **kwargs) -> torch.Tensor:
        # Autocast as well as the parameter cast: buffers DeepSpeed leaves in float32 (frozen
        # batch norm, input normalisation) would otherwise promote activations to float32
        # before the next reduced-precision convolution.
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        with autocast_context(self.precision, self.device):
            return self.model(images.to(dtype) if dtype else images, **kwargs).float()

    def backward_step(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)
        self.model.step()

    def fp32_state_dict(self) -> Dict[str, torch.Tensor]:
        """Float32 masters of the parameters (gathered from the ZeRO partitions), float32 buffers."""
        from deepspeed.utils import safe_get_full_fp32_param

        self._sync_buffers()
        out = {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu()
               for k, v in self.module.state_dict().items()}
        for name, p in self.module.named_parameters(remove_duplicate=False):
            if name not in out:
                continue
            full = safe_get_full_fp32_param(p) if p.requires_grad else None  # a collective for trained ones
            if full is not None:
                out[name] = full.detach().float().cpu().reshape(p.shape)
            elif name in self._frozen_fp32:
                out[name] = self._frozen_fp32[name].clone()
        return out

    def _sync_buffers(self) -> None:
        """Rank 0's buffers (batch-norm running statistics) on every rank, as DDP keeps them.

        DeepSpeed leaves each rank with the statistics of its own batches; extraction passes
        and checkpoints use rank 0's on every rank.
        """
        for b in self.module.buffers():
            du.broadcast_tensor(b.data)

    def eval_network(self) -> nn.Module:
        if self._shadow is None:
            self._sync_buffers()
            return self.module
        self._shadow.load_state_dict(self.fp32_state_dict())
        self._shadow.train(self.module.training)
        return self._shadow

    def checkpoint_state(self, path: Path) -> Dict[str, Any]:
        path = Path(path)
        root = deepspeed_dir(path.parent)
        tag = du.broadcast_object(f"{path.stem}.{secrets.token_hex(4)}" if du.is_main_process() else None)
        self.model.save_checkpoint(str(root), tag=tag, save_latest=False)  # every rank; ends with a barrier
        return {"model": self.fp32_state_dict(), "deepspeed_tag": tag}

    def load_checkpoint_state(self, ckpt: Dict[str, Any], path: Path) -> None:
        tag = ckpt.get("deepspeed_tag")
        if tag is None:
            if self.sharded_optimizer or "optimizer" not in ckpt:
                raise RuntimeError(f"{path} holds no DeepSpeed checkpoint tag (written by an older version): its "
                                   "ZeRO optimiser state cannot be restored; resume with run.resume=none")
            super().load_checkpoint_state(ckpt, path)
            return
        root = deepspeed_dir(Path(path).parent)
        if not (root / tag).is_dir():
            raise FileNotFoundError(f"{path}: DeepSpeed checkpoint {root / tag} is missing")
        load_path, _ = self.model.load_checkpoint(str(root), tag=tag, load_module_strict=True,
                                                  load_optimizer_states=True, load_lr_scheduler_states=False)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {root / tag}")
        for name in self._frozen_fp32:  # DeepSpeed restored their reduced-precision casts only
            if name in ckpt.get("model", {}):
                self._frozen_fp32[name] = ckpt["model"][name].detach().float().cpu().clone()


def build_engine(engine: str, module: nn.Module, device: torch.device, lr: float, momentum: float,
                 weight_decay: float, precision: str = "fp32", zero_stage: int = 0, micro_batch: int = 1):
    check_precision(precision, torch.device(device))
    optimizer = make_sgd(module.parameters(), lr, momentum, weight_decay)
    if engine == "deepspeed":
        return DeepSpeedEngine(module, optimizer, device, precision, zero_stage, micro_batch)
    return DDPEngine(module, optimizer, device, precision)
