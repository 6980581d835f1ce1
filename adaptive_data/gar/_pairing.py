"""Which batch a training forward belongs to: the k-th training forward after a ``step()`` is
the k-th batch the tracked loader delivered after it (a Trainer may fetch all its accumulation
micro-batches first); a forward with no new delivery repeats the last batch."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..sampling import GARSampler

__all__: list[str] = []


class Pairing:
    """Pairs training forwards with the sampler's deliveries between two steps, and checks
    at each step that the pairing was unambiguous."""

    def __init__(self, sampler: GARSampler) -> None:
        self.sampler = sampler
        self.seen = sampler.deliveries  # deliveries paired with a training forward so far
        self.batches: list[int] = []  # batches received since the last step, in order
        self.forwards = 0  # training forwards since the last step
        self.last_batches: list[int] = []  # the batches of the last step
        self.eval_forwards = 0  # forwards in eval mode since the last step (for messages)
        self.no_grad_forwards = 0  # forwards with gradients off since the last step

    def skipped(self, eval_mode: bool) -> None:
        """A forward that is not a training forward ran (in eval mode, or under no_grad)."""
        if eval_mode:
            self.eval_forwards += 1
        else:
            self.no_grad_forwards += 1

    def pair(self) -> int | None:
        """A training forward starts: the batch it belongs to, or None (no batch received
        since the last step: a warm-up forward)."""
        self.forwards += 1
        if self.sampler.deliveries > self.seen:
            batch = self.sampler.delivery(self.seen)
            self.seen += 1
            self.batches.append(batch)
            return batch
        if self.batches:
            return self.batches[-1]  # a second forward of the same batch
        return None

    def check(self) -> None:
        """At a step: raise if this step's forwards cannot be told apart by batch; reset."""
        pending = self.sampler.deliveries - self.seen
        received, forwards = len(self.batches), self.forwards
        eval_forwards, no_grad = self.eval_forwards, self.no_grad_forwards
        self.last_batches, self.batches, self.forwards = self.batches, [], 0
        self.eval_forwards = self.no_grad_forwards = 0
        if pending > 0:
            why = ""
            if eval_forwards and not forwards:
                why = (
                    f" The model ran {eval_forwards} forward(s) in eval mode: GAR pairs only "
                    "forwards in training mode; call model.train() before the training forward"
                    " (model.eval() was left on)."
                )
            elif no_grad and not forwards:
                why = (
                    f" The model ran {no_grad} forward(s) with gradients off (torch.no_grad() "
                    "or inference_mode()): GAR pairs only forwards that can be backpropagated."
                )
            raise RuntimeError(
                f"{pending} batch(es) received from the tracked loader had no training forward "
                "before this step(): GAR pairs the k-th training forward after a step with the "
                "k-th batch received after it, so train on every batch the loop receives, in "
                "order (or track the iterable the loop itself consumes, not one that reads "
                f"ahead).{why}"
            )
        if received > 1 and forwards != received:
            raise RuntimeError(
                f"{forwards} training forwards ran on the {received} batches received since "
                "the last step(): which forward belongs to which batch is ambiguous. Run one "
                "forward per received batch between two step() calls"
            )
        if forwards and not received and self.sampler.metrics()["batches_drawn"]:
            raise RuntimeError(
                "the model ran a training forward, but no batch reached the loop through "
                "sampler.track(): wrap the iterable the loop consumes, loader = "
                "sampler.track(loader), so GAR knows which batch each forward belongs to"
            )

    def reset(self) -> None:
        """After a resume: pair from the sampler's present deliveries on."""
        self.seen = self.sampler.deliveries
        self.batches, self.last_batches, self.forwards = [], [], 0
        self.eval_forwards = self.no_grad_forwards = 0
