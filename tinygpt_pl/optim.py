"""Muon for the hidden matrices and AdamW for the rest, as one optimizer.

Lightning's automatic optimization drives one optimizer: gradient accumulation, gradient clipping, the
on_before_optimizer_step hook, the learning-rate scheduler and checkpoints. MuonWithAdamW lets it drive both (the
modded-nanogpt speedruns' split: Muon orthogonalises the update of each Block's Linear weight, AdamW trains the
embeddings, the head, the norms and the biases): its param_groups are both optimizers' groups, which the scheduler sets,
and its state is theirs, so a checkpoint holds both and a resume continues both exactly.
"""

from collections.abc import Callable

import torch

from tinygpt_pl.errors import UsageError


def check_optimizer_strategy(optimizer: str, fsdp: bool) -> None:
    """Muon orthogonalises whole matrices; FSDP hands the optimizer flat shards of them."""
    if optimizer == "muon" and fsdp:
        raise UsageError(
            "--model.optimizer muon orthogonalises whole matrices, which FSDP shards: "
            "use --trainer.strategy ddp, or --model.optimizer adamw"
        )


class MuonWithAdamW(torch.optim.Optimizer):
    """Steps AdamW, then Muon, as one torch optimizer; AdamW's groups come first."""

    def __init__(self, adamw: torch.optim.AdamW, muon: torch.optim.Muon) -> None:
        self.optimizers = (adamw, muon)
        super().__init__([group for optimizer in self.optimizers for group in optimizer.param_groups], defaults={})
        self.share()

    def share(self) -> None:
        """Point both optimizers at this one's groups and state (load_state_dict replaces them)."""
        groups = iter(self.param_groups)
        for optimizer in self.optimizers:
            optimizer.param_groups = [next(groups) for _ in optimizer.param_groups]
            optimizer.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.share()

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.optimizers:
            optimizer.step()
        return loss
