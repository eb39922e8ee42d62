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


def renumber_optimizer_state(state_dict: dict, saved: list[list[str]], current: list[list[str]]) -> None:
    """Renumber, in place, a torch optimizer's state_dict saved with its parameters (named, per group) in another
    order: torch numbers them by position and would give each the state of another."""
    if saved == current:
        return
    if [sorted(group) for group in saved] != [sorted(group) for group in current]:
        raise UsageError(
            "the checkpoint's optimizer state is for other parameters: resume with the model it was trained with"
        )
    position = {name: i for i, name in enumerate(name for group in saved for name in group)}
    names = [name for group in current for name in group]
    state = state_dict["state"]
    state_dict["state"] = {i: state[position[name]] for i, name in enumerate(names) if position[name] in state}


def orthogonalize(
    update: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float
) -> torch.Tensor:
    """torch.optim.Muon's quintic Newton-Schulz iteration (about U V^T of each update = U S V^T), in float32, for a
    stack of same-shaped matrices (G, m, n) at once."""
    a, b, c = coefficients
    tall = update.size(-2) > update.size(-1)
    x = update.float().mT if tall else update.float()
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


class Muon(torch.optim.Muon):
    """torch.optim.Muon, with its Newton-Schulz iteration in float32 for parameters on a CPU.

    torch iterates in bfloat16, which GPUs multiply fast; CPUs without bfloat16 units multiply it about 15x slower
    than float32 (0.59 s against 0.04 s a step for the 4 x 128 model on a 2-core EPYC), which made Muon's step cost
    more than the forward and backward passes. Same-shaped matrices (one per Block) are orthogonalised together as
    one stack (25 against 43 ms). On a GPU this is torch's own step; the state is the same either way, so a
    checkpoint moves between them.
    """

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        if not all(p.is_cpu for group in self.param_groups for p in group["params"]):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["adjust_lr_fn"] not in (None, "original"):
                raise ValueError("this Muon's CPU step adjusts the learning rate as the original Muon does only")
            momentum, lr = group["momentum"], group["lr"]
            params = [p for p in group["params"] if p.grad is not None]
            updates = []
            for p in params:
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                buf.lerp_(p.grad, 1 - momentum)
                updates.append(p.grad.lerp(buf, momentum) if group["nesterov"] else buf)
            for shape in dict.fromkeys(p.shape for p in params):
                same = [i for i, p in enumerate(params) if p.shape == shape]
                stack = torch.stack([updates[i] for i in same])
                ortho = orthogonalize(stack, group["ns_coefficients"], group["ns_steps"], group["eps"])
                for i, update in zip(same, ortho, strict=True):
                    params[i].mul_(1 - lr * group["weight_decay"])
                    params[i].add_(update.to(params[i].dtype), alpha=-lr * max(1, shape[0] / shape[1]) ** 0.5)
        return loss


class MuonWithAdamW(torch.optim.Optimizer):
    """Steps AdamW, then Muon, as one torch optimizer; AdamW's groups come first."""

    def __init__(self, adamw: torch.optim.AdamW, muon: Muon) -> None:
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
