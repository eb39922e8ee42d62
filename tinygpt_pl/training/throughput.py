"""Training speed in TensorBoard: tokens/s per device and in all, model FLOPs utilization, peak GPU memory."""

import time

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput, get_available_flops
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

COMPUTE_DTYPES = {"bf16": torch.bfloat16, "16": torch.float16, "64": torch.float64}
# Lightning's table knows the H200 only by names CUDA does not give it ("NVIDIA H200" is the SXM part), with the
# datasheet's with-sparsity figures; its dense rates are the H100 SXM's
H200_DENSE = {torch.bfloat16: 989.4e12, torch.float16: 989.4e12, "tfloat32": 494.7e12, torch.float32: 66.9e12,
              torch.float64: 33.5e12}  # fmt: skip


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype the matmuls run in under a Lightning precision setting ("bf16-mixed", "32-true", ...)."""
    return COMPUTE_DTYPES.get(precision.split("-")[0], torch.float32)


def peak_flops(device: torch.device, precision: str) -> int | None:
    """The device's dense peak FLOP/s for that precision, from Lightning's table; None where unknown (CPUs)."""
    if device.type != "cuda":
        return None
    dtype = compute_dtype(precision)
    if "h200" not in torch.cuda.get_device_name(device).lower():
        return get_available_flops(device, dtype)
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return int(H200_DENSE["tfloat32"])  # as Lightning reads fp32 matmuls
    return int(H200_DENSE[dtype])


class ThroughputMonitor(Callback):
    """Logs throughput/tokens_per_sec (all devices), throughput/device/tokens_per_sec, throughput/device/mfu and
    memory/peak_allocated_gib on the steps that log, as rates over the last log_every_n_steps steps.

    It feeds Lightning's own meter (lightning.fabric's Throughput, which Lightning's ThroughputMonitor uses too) but
    reads the clock only on the steps that log: Lightning's callback calls torch.cuda.synchronize() after every
    micro-batch, which would stall the GPU once per step. MFU is the model's FLOPs (GPT.flops_per_token) per second
    over the device's dense peak for the run's precision. Time spent validating is left out.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        flops = peak_flops(trainer.strategy.root_device, trainer.precision)
        self.meter = Throughput(available_flops=flops, world_size=trainer.world_size, window_size=2)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.meter.reset()
        self.meter.update(time=0.0, batches=0, samples=0, lengths=0, flops=0)
        self.start, self.first_step, self.last_step = time.perf_counter(), trainer.global_step, trainer.global_step

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.validation_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self.start += time.perf_counter() - self.validation_start

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch: tuple[torch.Tensor, ...], batch_idx: int
    ) -> None:
        step, every = trainer.global_step, trainer.log_every_n_steps
        if step == self.last_step or every == 0 or step % every:  # only the last micro-batch of a logging step
            return
        device = trainer.strategy.root_device
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the clock must see the GPU's work done
        sequences = (step - self.first_step) * trainer.accumulate_grad_batches * batch[0].size(0)  # on this device
        new_tokens = (step - self.last_step) * trainer.accumulate_grad_batches * batch[0].numel()
        self.meter.update(
            time=time.perf_counter() - self.start,
            batches=step - self.first_step,
            samples=sequences,
            lengths=sequences * batch[0].size(1),
            flops=new_tokens * pl_module.model.flops_per_token(),
        )
        self.last_step = step
        rates = self.meter.compute()
        metrics = {
            "throughput/tokens_per_sec": rates["device/items_per_sec"] * trainer.world_size,
            "throughput/device/tokens_per_sec": rates["device/items_per_sec"],
            "throughput/device/flops_per_sec": rates["device/flops_per_sec"],
        }
        if "device/mfu" in rates:
            metrics["throughput/device/mfu"] = rates["device/mfu"]
        if device.type == "cuda":
            metrics["memory/peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step - 1)  # the 0-based step index, as Lightning logs train/loss
