"""FSDP through Lightning: each transformer Block its own shard unit, checkpoints as one full state dict.

On CUDA this is Lightning's FSDPStrategy as it is. On CPU processes (gloo: the tests, a GPU-less machine) torch's FSDP
works too, but Lightning 2.6 cannot drive it there; CPUFSDPStrategy mends the two places where it goes wrong.
"""

from contextlib import AbstractContextManager
from datetime import timedelta
from typing import Any

import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp import (
    FullOptimStateDictConfig,
    FullStateDictConfig,
    FullyShardedDataParallel,
    OptimStateKeyType,
    StateDictType,
)

from tinygpt_pl.model import Block


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy on CPU processes.

    1. Lightning wraps with device_id=root_device.index, which is None for a CPU, and torch's FSDP then looks for an
       accelerator ("FSDP needs a non-CPU accelerator device"): here the model is wrapped with device_id=cpu.
    2. Lightning takes the full state dicts with offload_to_cpu=True, which for tensors already on the CPU copies
       buffers after FSDP has freed or reused them: the model's segfaults in torch 2.13, and the optimizer's comes out
       with Adam's exp_avg_sq in place of exp_avg. Here both are taken without offloading.
    (Lightning also refuses accelerator="cpu" for FSDPStrategy itself, by exact type: a subclass passes.)
    """

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        model = FullyShardedDataParallel(
            model,
            device_id=self.root_device,
            sharding_strategy=self.sharding_strategy,
            mixed_precision=self.mixed_precision_config,
            **self.kwargs,
        )
        del self.kwargs["auto_wrap_policy"]  # applied: Lightning would warn that an already wrapped model ignores it
        return super()._setup_model(model)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        with self.full_state_dict_type():
            return self.model.state_dict()

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """As Lightning's: the full optimizer state, keyed by parameter index, on rank 0."""
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        with self.full_state_dict_type():
            state = FullyShardedDataParallel.optim_state_dict(self.model, optimizer)
            if self.global_rank == 0:
                state = FullyShardedDataParallel.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
            return state

    def full_state_dict_type(self) -> AbstractContextManager:
        return FullyShardedDataParallel.state_dict_type(
            self.model,
            StateDictType.FULL_STATE_DICT,
            FullStateDictConfig(offload_to_cpu=False, rank0_only=True),
            FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True),
        )


def fsdp_strategy(gpu: bool, timeout: timedelta | None = None) -> FSDPStrategy:
    """FSDP over Blocks with one consolidated checkpoint file, which loads without FSDP (sample.py, a plain GPT);
    timeout: for its collectives (None: torch's default)."""
    strategy = FSDPStrategy if gpu else CPUFSDPStrategy
    return strategy(auto_wrap_policy={Block}, state_dict_type="full", timeout=timeout)
