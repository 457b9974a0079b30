"""Early stopping of K stacked replicates, each on its own validation loss.

The rule, once: a replicate improves when its validation loss is strictly lower than its
best so far (a NaN, a diverged run, counts as lower than any number: ``torch.argmin``'s
rule, which also picks the best epoch); it stops after ``patience`` epochs in a row
without improvement, so its last epoch is its best epoch plus ``patience``. A stopped
replicate stays in the vmap stack and keeps being stepped with the others (its own RNG
and its own Adam state, so the rest are untouched), but what it does after its last
epoch is discarded: its weights are put back as they were at that epoch and its record
ends there. That gives exactly the replicate trained alone for that many epochs, at the
cost of stepping it until the whole group has stopped. docs/decisions.md, *Epochs and
early stopping*, says how the patience and maximum epochs were chosen.
"""
from __future__ import annotations

import torch


def improved(loss: torch.Tensor, best: torch.Tensor | None) -> torch.Tensor:
    """Per replicate: is ``loss`` a new best (strictly lower, or the first NaN)?"""
    if best is None:
        return torch.ones_like(loss, dtype=torch.bool)
    return (loss < best) | (loss.isnan() & ~best.isnan())


class EarlyStopping:
    """Which replicates of a stack still train, and their weights at their last epoch."""

    def __init__(self, stack, patience: int | None):
        self.stack, self.patience = stack, patience
        k = next(iter(stack.params.values())).shape[0]
        device = next(iter(stack.params.values())).device
        self.running = torch.ones(k, dtype=torch.bool, device=device)
        self.last = torch.zeros(k, dtype=torch.long, device=device)  # 0-based last epoch
        self.best_loss = None
        self.best_epoch = torch.zeros(k, dtype=torch.long, device=device)
        self.frozen = None  # weights of stopped replicates, as at their last epoch
        self.trained = self.running.clone()  # which replicates the last counted epoch was theirs

    def update(self, epoch: int, val_loss: torch.Tensor) -> None:
        """Count epoch ``epoch`` (0-based) for the replicates still running; stop some."""
        trained = self.trained = self.running.clone()
        self.last = torch.where(trained, torch.full_like(self.last, epoch), self.last)
        if self.patience is None:
            return
        better = improved(val_loss, self.best_loss) & trained
        self.best_loss = val_loss.clone() if self.best_loss is None else torch.where(
            better, val_loss, self.best_loss)
        self.best_epoch = torch.where(better, torch.full_like(self.best_epoch, epoch),
                                      self.best_epoch)
        stopping = trained & (epoch - self.best_epoch >= self.patience)
        if bool(stopping.any()):
            self._freeze(stopping)
            self.running &= ~stopping

    def all_stopped(self) -> bool:
        return not bool(self.running.any())

    def _freeze(self, mask: torch.Tensor) -> None:
        current = {**self.stack.params, **self.stack.buffers}
        if self.frozen is None:
            self.frozen = {name: t.detach().clone() for name, t in current.items()}
            return
        for name, t in current.items():
            self.frozen[name] = torch.where(mask.view(-1, *[1] * (t.dim() - 1)), t.detach(),
                                            self.frozen[name])

    @torch.no_grad()
    def restore(self) -> None:
        """Put every stopped replicate's weights back as they were at its last epoch."""
        if self.frozen is None:
            return
        stopped = ~self.running
        for name, t in {**self.stack.params, **self.stack.buffers}.items():
            t.copy_(torch.where(stopped.view(-1, *[1] * (t.dim() - 1)), self.frozen[name], t))
