"""Learned mixtures (and augmentation) in PyTorch Lightning.

::

    from adaptive_data.integrations.lightning import GARCallback

    gar = GARCallback(sampler, reference=ReferenceBatches(val_set, 128), loss_fn=per_example_loss)
    loader = gar.track(DataLoader(sampler.dataset, batch_sampler=sampler))
    trainer = L.Trainer(callbacks=[gar], accumulate_grad_batches=2)
    trainer.fit(module, loader)               # or fit(module, loader, ckpt_path=...)

``pip install 'adaptive-data[lightning]'``; importing ``adaptive_data`` alone never imports
Lightning. How-to: docs/howto-lightning.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .._extras import missing_extra

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError as e:  # the [lightning] extra is not installed: say so
    raise missing_extra(e, "lightning", __name__) from e

from ..gar._budget import AUTO
from ..gar._gar import GAR
from ..sampling._sampler import GARSampler
from ..sampling._tracking import TrackedLoader
from ._common import Wiring, metric_patterns

__all__ = ["CHECKPOINT_KEY", "GARCallback"]

# Where the callback keeps its state in Lightning's checkpoint dict: one entry per rank.
CHECKPOINT_KEY = "adaptive_data"


class GARCallback(Callback):
    """Steps :class:`GAR` in Lightning's loop, logs its metrics, and checkpoints its state.

    * ``on_fit_start``: builds the :class:`GAR` over ``module`` (default: the
      LightningModule; give the submodule whose ``forward`` your ``training_step`` calls if
      it does not call ``self(...)``) and the trainer's one optimizer, unless ``gar`` was
      given. Under a strategy that wraps the model (DDP), Lightning calls the LightningModule
      through the wrapper with ``training_step``'s arguments (its ``forward`` rerouted to
      ``training_step``); GAR lets that outer call pass and rewards the ``self(...)`` call
      inside it.
    * ``on_train_start``: checks that the loader Lightning iterates is ``gar.track(...)``
      of a loader over the sampler (pass it to ``fit``). Lightning replaces samplers of
      ``DataLoader`` objects only (``use_distributed_sampler``); the tracked loader is not one,
      so under DDP it is iterated as it is, and the sampler draws each rank's own batches.
      Under DDP a plain ``DataLoader`` over the sampler fails earlier, in Lightning (which
      cannot put a ``DistributedSampler`` into a ``GARSampler``); ``on_exception`` adds a
      note to that error naming the tracked loader.
    * ``on_before_optimizer_step``: ``gar.step()``, once per optimizer step, after the
      ``accumulate_grad_batches`` micro-batches' backwards and after AMP's unscaling, before
      Lightning's gradient clipping and ``optimizer.step()``.
    * ``on_train_batch_end``: ``pl_module.log_dict`` of a short set of the sampler's
      metrics (under ``mixture/``) and GAR's (under ``gar/``), on step (the loggers get
      them every ``log_every_n_steps``): by default each source's weight, running mean
      reward and that mean's age, and the rewards' cost per step (``log_metrics``).
    * ``on_save_checkpoint`` / ``on_load_checkpoint``: the sampler's and GAR's state in the
      checkpoint under :data:`CHECKPOINT_KEY`, every rank's (gathered under DDP), so
      ``fit(..., ckpt_path=...)`` continues exactly.

    Args:
        sampler: the :class:`GARSampler` the training loader draws from.
        reference: held-out batches from data you trust, e.g. ``ReferenceBatches(val, 128)``
            (on the model's device: its ``device=``). Required for a mixture of several
            sources; ``None``: the next-batch reference (augmentation over one source).
        loss_fn: ``loss_fn(output, target) -> [N]`` per-example losses; with ``reference``.
        budget: GAR's ``budget``: the rewards' estimated share of a training step
            (``"auto"``, the default: 0.1 with ``reference``, 0.02 without; ``None``: every
            batch, exact).
        every: GAR's ``every``: reward the batches of every ``every``-th step.
        reward: GAR's ``reward``, ``"cosine"`` or ``"dot"``.
        reference_refresh: GAR's ``reference_refresh``: reuse the reference gradient for
            that many steps (with ``reference``).
        rows: GAR's ``rows``: reward at most that many rows of each batch.
        estimator: GAR's ``estimator``, ``"ghost"`` or ``"fd"`` (forward-only, with
            ``reward="dot"``).
        fallback: GAR's ``fallback``: ``"jvp"`` (a module no rule covers takes the generic
            path) or ``"raise"`` (refuse such a model when the GAR is built).
        module: the module GAR watches (default: the LightningModule).
        gar: a :class:`GAR` built by the user instead (over ``sampler``).
        log_metrics: which metrics to log: ``"default"`` (``mixture/weight/<source>``,
            ``mixture/reward_mean/<source>``, ``mixture/reward_age/<source>``,
            ``gar/budget/cost_per_step``; ``True`` is the same), ``"all"`` (every key of
            ``sampler.metrics()`` and ``gar.metrics()``, docs/api.md "Metrics"), a list of
            names and ``fnmatch`` patterns, e.g. ``["mixture/weight/*",
            "gar/batches_rewarded"]``, or ``False`` (none).
    """

    def __init__(
        self,
        sampler: GARSampler,
        *,
        reference: Iterable[Any] | None = None,
        loss_fn: Any = None,
        budget: float | str | None = AUTO,
        every: int | None = None,
        reward: str = "cosine",
        reference_refresh: int | None = None,
        rows: int | None = None,
        estimator: str = "ghost",
        fallback: str = "jvp",
        module: nn.Module | None = None,
        gar: GAR | None = None,
        log_metrics: bool | str | Sequence[str] = "default",
    ) -> None:
        if log_metrics is True:
            log_metrics = "default"
        self._log: tuple[str, ...] | None = (
            () if log_metrics is False else metric_patterns(log_metrics, "log_metrics")
        )
        if module is not None and not isinstance(module, nn.Module):
            raise TypeError(f"module should be an nn.Module, but got {type(module).__name__}")
        if module is not None and gar is not None:
            raise ValueError("gar is already built over its model; leave module out")
        self.wiring = Wiring(
            sampler,
            gar,
            reference,
            loss_fn,
            "",
            budget=budget,
            every=every,
            reward=reward,
            reference_refresh=reference_refresh,
            rows=rows,
            estimator=estimator,
            fallback=fallback,
        )
        self.module = module

    @property
    def sampler(self) -> GARSampler:
        return self.wiring.sampler

    @property
    def gar(self) -> GAR | None:
        """The :class:`GAR` (``None`` until ``fit`` built it, unless one was given)."""
        return self.wiring.gar

    def track(self, loader: Any) -> TrackedLoader:
        """``sampler.track(loader)``: the loader to pass to ``trainer.fit``."""
        return self.wiring.sampler.track(loader)

    def metrics(self) -> dict[str, float]:
        """What is logged: the sampler's metrics under ``mixture/`` and GAR's under ``gar/``
        that ``log_metrics`` selects (finite ones only)."""
        return self.wiring.metrics(self._log)

    # ------------------------------------------------------------------ Lightning's hooks

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        sampler = self.wiring.sampler
        if stage == "fit" and trainer.world_size != sampler.world_size:
            raise ValueError(
                f"the trainer runs {trainer.world_size} process(es), but the GARSampler was "
                f"built for world_size={sampler.world_size}. Under DDP, launch with torchrun "
                "and call torch.distributed.init_process_group() before building the sampler "
                "(Lightning then uses that process group): each rank's sampler draws its own "
                "shard and the policy updates are all-reduced"
            )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.wiring.given:
            self.wiring.build(pl_module, None)  # applies a state loaded before fit
            self.wiring.expect_accumulation(trainer.accumulate_grad_batches)
            return
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise ValueError(
                "GARCallback needs exactly one optimizer (the one whose state preconditions "
                f"the reward), but configure_optimizers returned {len(optimizers)}; build "
                "GAR(...) yourself and pass gar="
            )
        self.wiring.build(self.module if self.module is not None else pl_module, optimizers[0])
        self.wiring.expect_accumulation(trainer.accumulate_grad_batches)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loader = trainer.train_dataloader
        if not (isinstance(loader, TrackedLoader) and loader.sampler is self.wiring.sampler):
            raise ValueError(
                "trainer.fit should get the tracked loader over GARCallback's sampler, "
                "gar.track(DataLoader(sampler.dataset, batch_sampler=sampler)), so GAR knows "
                f"which batch each training_step holds; but got {type(loader).__name__}"
            )

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        # Under DDP Lightning tries to put a DistributedSampler into a DataLoader before
        # on_train_start could refuse it, and its advice (use_distributed_sampler=False) does
        # not lead to the fix. Python 3.10 has no notes: the error is then Lightning's alone.
        add_note = getattr(exception, "add_note", None)
        message = str(exception)
        if add_note is not None and "inject a (distributed) sampler" in message:
            add_note(
                "GARCallback: if this is the DataLoader over the GARSampler, pass the tracked "
                "loader, gar.track(DataLoader(sampler.dataset, batch_sampler=sampler)), to "
                "trainer.fit instead: Lightning leaves that as it is, and each rank's GARSampler "
                "already draws that rank's own batches (use_distributed_sampler=False is not "
                "needed)"
            )

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self.wiring.step()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        logged = self.metrics()
        if logged:
            pl_module.log_dict(logged, on_step=True, on_epoch=False, batch_size=1)

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        state = self.wiring.state_dict()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every rank draws its own batches: keep every rank's state (Lightning writes the
            # checkpoint from rank 0 only; every rank builds it, so this collective is safe).
            states: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, state)
        else:
            states = [state]
        checkpoint[CHECKPOINT_KEY] = {"ranks": states}

    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is None:
            raise ValueError(
                f"the checkpoint holds no {CHECKPOINT_KEY!r} entry: it was not saved with a "
                "GARCallback, so the sampler and GAR cannot resume from it"
            )
        ranks = saved["ranks"]
        rank = self.wiring.sampler.rank
        if len(ranks) != self.wiring.sampler.world_size:
            raise ValueError(
                f"the checkpoint holds the state of {len(ranks)} rank(s), but this run has "
                f"{self.wiring.sampler.world_size}: resume with the same number of processes"
            )
        self.wiring.load_state_dict(ranks[rank])
