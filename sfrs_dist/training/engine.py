"""Training engines with one interface: DDP (default) and DeepSpeed.

Both wrap a module whose ``forward(images)`` returns region descriptors, own the SGD
optimiser, and expose the same ``backward_step`` / ``set_lr`` / state-dict calls, so the
training loop does not know which one it drives.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any, Dict, Iterable

import torch
from torch import nn

from .. import distributed as du

log = logging.getLogger(__name__)


def autocast_context(precision: str, device: torch.device):
    """Autocast for bf16/fp16 where the device has it; a no-op context for fp32."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if device.type == "cpu" and dtype == torch.float16:
        raise ValueError("train.precision fp16 needs CUDA; use bf16 or fp32 on CPU")
    return torch.autocast(device_type=device.type, dtype=dtype)


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


class DDPEngine(_Engine):
    """``DistributedDataParallel`` when a process group is up, the bare module otherwise."""

    name = "ddp"

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 precision: str = "fp32") -> None:
        self.module = module.to(device)
        self.device = device
        self.precision = precision
        self.optimizer = optimizer
        if du.is_distributed() and du.get_world_size() > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.module, device_ids=ids)
        else:
            self.model = self.module

    def forward(self, images: torch.Tensor, **kwargs) -> torch.Tensor:
        with autocast_context(self.precision, self.device):
            return self.model(images, **kwargs).float()

    def backward_step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


class DeepSpeedEngine(_Engine):
    """A DeepSpeed engine (ZeRO stage, bf16/fp16 from the config) with the DDP interface."""

    name = "deepspeed"

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 precision: str = "fp32", zero_stage: int = 0, micro_batch: int = 1) -> None:
        import deepspeed

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
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=module.to(device), optimizer=optimizer, config=config
        )
        self.module = self.model.module
        self.sharded_optimizer = zero_stage > 0

    def forward(self, images: torch.Tensor, **kwargs) -> torch.Tensor:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        return self.model(images.to(dtype) if dtype else images, **kwargs).float()

    def backward_step(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)
        self.model.step()


def build_engine(engine: str, module: nn.Module, device: torch.device, lr: float, momentum: float,
                 weight_decay: float, precision: str = "fp32", zero_stage: int = 0, micro_batch: int = 1):
    optimizer = make_sgd(module.parameters(), lr, momentum, weight_decay)
    if engine == "deepspeed":
        return DeepSpeedEngine(module, optimizer, device, precision, zero_stage, micro_batch)
    return DDPEngine(module, optimizer, device, precision)
