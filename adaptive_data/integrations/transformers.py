"""Learned mixtures (and augmentation) in the Hugging Face ``Trainer``.

::

    from adaptive_data.integrations.transformers import GARTrainer

    trainer = GARTrainer(model=model, args=args, gar_sampler=sampler,
                         gar_reference=val_set, gar_loss_fn=per_example_loss)
    trainer.train()                          # or train(resume_from_checkpoint=True)

``pip install 'adaptive-data[transformers]'``; importing ``adaptive_data`` alone never imports
transformers. How-to: docs/howto-transformers.md.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .._extras import missing_extra

try:
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_utils import (
        PREFIX_CHECKPOINT_DIR,
        RemoveColumnsCollator,
        get_last_checkpoint,
        seed_worker,
    )
except ImportError as e:  # the [transformers] extra is not installed: say so
    raise missing_extra(e, "transformers", __name__) from e

from ..gar._budget import AUTO
from ..gar._gar import GAR
from ..sampling._reference import ReferenceBatches
from ..sampling._sampler import GARSampler
from ._common import Wiring, load, metric_patterns, save

__all__ = ["STATE_FILE", "GARCallback", "GARTrainer", "GARTrainerMixin", "default_loss_fn"]

# The file beside the Trainer's own in each checkpoint folder, one per process (rank).
STATE_FILE = "adaptive_data_rank{rank}.pt"


_IGNORE = -100  # the label Hugging Face's losses leave out


def _per_token_mean(losses: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[N, ...]`` token losses -> ``[N]``: each example's mean over its labelled tokens (the
    ones not ``-100``); 0 for an example without one."""
    valid = (labels != _IGNORE).flatten(1)
    total = (losses.flatten(1) * valid).sum(1)
    return total / valid.sum(1).clamp_min(1)


def _causal_lm_loss(output: Any, labels: torch.Tensor) -> torch.Tensor:
    logits = output["logits"][:, :-1].float()  # position t predicts token t + 1
    target = labels[:, 1:]
    losses = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=_IGNORE, reduction="none")
    return _per_token_mean(losses, target)


def _token_loss(output: Any, labels: torch.Tensor) -> torch.Tensor:
    logits = output["logits"].float()
    losses = F.cross_entropy(
        logits.transpose(1, -1), labels, ignore_index=_IGNORE, reduction="none"
    )
    return _per_token_mean(losses, labels)


def _sequence_loss(output: Any, labels: torch.Tensor) -> torch.Tensor:
    logits = output["logits"].float()
    if logits.shape[-1] == 1 or labels.is_floating_point():  # regression
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype), reduction="none")
    return F.cross_entropy(logits, labels, reduction="none")


# The model's task (the end of its class name, or its loss_type) -> its per-example loss.
_TASK_LOSSES = {
    "ForCausalLM": _causal_lm_loss,
    "LMHeadModel": _causal_lm_loss,
    "ForMaskedLM": _token_loss,
    "ForTokenClassification": _token_loss,
    "ForSequenceClassification": _sequence_loss,
}


def default_loss_fn(model: Any) -> Callable[[Any, torch.Tensor], torch.Tensor]:
    """The per-example form of a Hugging Face model's own loss: ``loss_fn(output, labels) ->
    [N]``, each example's mean over its labelled tokens (``-100`` left out). Causal language
    models (``...ForCausalLM``, ``...LMHeadModel``: the labels shifted one position, as the
    model shifts them), masked language models and token classification (no shift),
    sequence classification (cross-entropy, or squared error for one output). Raises for
    another model, naming it: pass ``gar_loss_fn``."""
    name = type(model).__name__
    for task, loss in _TASK_LOSSES.items():
        if name.endswith(task) or getattr(model, "loss_type", None) == task:
            return loss
    raise ValueError(
        f"gar_reference needs gar_loss_fn (per-example losses [N] of the model's output) for "
        f"the reference gradient, and {name} is not a model whose loss adaptive_data knows "
        f"({', '.join(_TASK_LOSSES)}): pass gar_loss_fn"
    )


class GARCallback(TrainerCallback):
    """The Trainer's events that GAR needs; :class:`GARTrainerMixin` adds it by itself.

    * ``on_train_begin``: builds the :class:`GAR` over the Trainer's model and (prepared)
      optimizer, unless one was given, and applies a GAR state loaded on resume.
    * ``on_pre_optimizer_step``: ``gar.step()``. The Trainer calls it once per optimizer step,
      after the ``gradient_accumulation_steps`` micro-batches' backwards and after
      ``max_grad_norm`` clipping, before ``optimizer.step()``; the rewards go to each of the
      step's micro-batches.
    * ``on_save``: writes the sampler's and GAR's state (:data:`STATE_FILE`) into the
      checkpoint folder the Trainer just wrote.
    """

    def __init__(self, wiring: Wiring) -> None:
        self.wiring = wiring

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
        if model is None:
            raise RuntimeError("the Trainer passed no model to on_train_begin")
        self.wiring.build(model, optimizer)
        self.wiring.expect_accumulation(args.gradient_accumulation_steps)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.wiring.step()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(folder):
            raise RuntimeError(
                f"the Trainer's checkpoint folder {folder} does not exist; GARTrainer saves its "
                "state beside the checkpoints of args.output_dir (hyperparameter-search runs, "
                "which save elsewhere, are not supported)"
            )
        rank = self.wiring.sampler.rank
        save(self.wiring.state_dict(), os.path.join(folder, STATE_FILE.format(rank=rank)))


# Type checkers see the mixin as the Trainer it is mixed into (its attributes, its methods).
_TrainerBase = Trainer if TYPE_CHECKING else object


class GARTrainerMixin(_TrainerBase):  # type: ignore[misc,valid-type]
    """Turns a ``Trainer`` (or a subclass such as TRL's) into one that learns its mixture.

    ``class MyTrainer(GARTrainerMixin, SFTTrainer): ...``; :class:`GARTrainer` is the mixin
    over the plain ``Trainer``. What it changes:

    * the training loader is ``DataLoader(sampler.dataset, batch_sampler=sampler,
      collate_fn=data_collator)`` with the Trainer's worker settings, prepared by the
      Trainer's accelerator and wrapped in ``sampler.track()`` (the loop iterates it
      directly); ``train_dataset`` defaults to ``sampler.dataset``. With
      ``args.remove_unused_columns`` (the default) the keys of dict examples that the
      model's ``forward`` does not take are dropped before collation, as the Trainer does
      for datasets that are not a ``datasets.Dataset``;
    * a :class:`GARCallback` steps GAR at every optimizer step and saves the sampler's and
      GAR's state into every checkpoint; ``train(resume_from_checkpoint=...)`` loads them;
    * ``args.ignore_data_skip`` is set: on resume the sampler's state continues the epoch
      exactly where the checkpoint left it, so the Trainer must not skip batches as well;
    * every training log (``loss`` in it) gains a short set of the sampler's metrics
      (under ``mixture/``) and GAR's (under ``gar/``), so TensorBoard, W&B and
      ``state.log_history`` get them: by default each source's weight, running mean reward
      and that mean's age, and the rewards' cost per step (``gar_log_metrics``).

    Args:
        gar_sampler: the :class:`GARSampler` to train from (keyword arguments, beside the
            Trainer's own).
        gar_reference: held-out data the user trusts: a map-style dataset (batched by
            :class:`ReferenceBatches` with ``per_device_train_batch_size`` examples, the
            Trainer's collator and device, seeded by ``args.seed``) or an iterator of
            collated batches. Required for a mixture of several sources; ``None``: the
            next-batch reference (augmentation over one source with a ``GARTransform``).
        gar_loss_fn: ``loss_fn(output, labels) -> [N]`` per-example losses of the model's
            output (e.g. ``F.cross_entropy(output["logits"], labels, reduction="none")``),
            for the reference gradient; default: :func:`default_loss_fn` of the model, the
            per-example form of its own loss (causal and masked language models, sequence
            and token classification).
        gar_budget: GAR's ``budget``: the rewards' estimated share of a training step
            (``"auto"``, the default: 0.1 with ``gar_reference``, 0.02 without; ``None``:
            every batch, exact).
        gar_every: GAR's ``every``: reward the batches of every ``every``-th step.
        gar_reward: GAR's ``reward``, ``"cosine"`` or ``"dot"``.
        gar_reference_refresh: GAR's ``reference_refresh``: reuse the reference gradient for
            that many steps (with ``gar_reference``).
        gar_rows: GAR's ``rows``: reward at most that many rows of each batch.
        gar_estimator: GAR's ``estimator``, ``"ghost"`` or ``"fd"`` (forward-only, with
            ``gar_reward="dot"``).
        gar_fallback: GAR's ``fallback``: ``"jvp"`` (a module no rule covers takes the
            generic path) or ``"raise"`` (refuse such a model when the GAR is built).
        gar: a :class:`GAR` built by the user instead (over ``gar_sampler``, with the
            optimizer the Trainer gets through ``optimizers=``).
        gar_log_metrics: which metrics the training logs gain: ``"default"``
            (``mixture/weight/<source>``, ``mixture/reward_mean/<source>``,
            ``mixture/reward_age/<source>``, ``gar/budget/cost_per_step``), ``"all"`` (every
            key of ``sampler.metrics()`` and ``gar.metrics()``, docs/api.md "Metrics"), or a
            list of names and ``fnmatch`` patterns, e.g. ``["mixture/weight/*",
            "gar/batches_rewarded"]``; ``[]`` adds none.
    """

    def __init__(
        self,
        *args: Any,
        gar_sampler: GARSampler,
        gar_reference: Any = None,
        gar_loss_fn: Any = None,
        gar_budget: float | str | None = AUTO,
        gar_every: int | None = None,
        gar_reward: str = "cosine",
        gar_reference_refresh: int | None = None,
        gar_rows: int | None = None,
        gar_estimator: str = "ghost",
        gar_fallback: str = "jvp",
        gar: GAR | None = None,
        gar_log_metrics: str | Sequence[str] = "default",
        **kwargs: Any,
    ) -> None:
        self._gar_log = metric_patterns(gar_log_metrics, "gar_log_metrics")
        if not isinstance(gar_sampler, GARSampler):
            raise TypeError(
                f"gar_sampler should be a GARSampler, but got {type(gar_sampler).__name__}"
            )
        dataset = kwargs.get("train_dataset")
        if dataset is not None and dataset is not gar_sampler.dataset:
            raise ValueError(
                "train_dataset should be left out (or be gar_sampler.dataset): the training "
                "data are the sampler's sources"
            )
        kwargs["train_dataset"] = gar_sampler.dataset
        if gar_loss_fn is None and gar_reference is not None and gar is None:
            model = kwargs.get("model", args[0] if args else None)
            gar_loss_fn = default_loss_fn(model)
        reference_data = None
        if gar_reference is not None and not hasattr(gar_reference, "__next__"):
            if not (hasattr(gar_reference, "__getitem__") and hasattr(gar_reference, "__len__")):
                raise TypeError(
                    "gar_reference should be a map-style dataset or an iterator of batches, but "
                    f"got {type(gar_reference).__name__}"
                )
            reference_data, gar_reference = gar_reference, _Later()
        self._gar_wiring = Wiring(
            gar_sampler,
            gar,
            gar_reference,
            gar_loss_fn,
            "gar_",
            budget=gar_budget,
            every=gar_every,
            reward=gar_reward,
            reference_refresh=gar_reference_refresh,
            rows=gar_rows,
            estimator=gar_estimator,
            fallback=gar_fallback,
        )
        super().__init__(*args, **kwargs)
        self.args.ignore_data_skip = True
        self.add_callback(GARCallback(self._gar_wiring))
        if reference_data is not None:
            self._gar_wiring.reference = ReferenceBatches(
                reference_data,
                self.args.per_device_train_batch_size,
                seed=self.args.seed,
                collate_fn=self._gar_collator(),
                device=self.args.device,
            )

    # ------------------------------------------------------------------ reading

    @property
    def gar_sampler(self) -> GARSampler:
        """The :class:`GARSampler` the Trainer trains from."""
        return self._gar_wiring.sampler

    @property
    def gar(self) -> GAR | None:
        """The :class:`GAR` (``None`` until ``train()`` built it, unless one was given)."""
        return self._gar_wiring.gar

    def gar_metrics(self) -> dict[str, float]:
        """What the logs gain: the sampler's metrics under ``mixture/`` and GAR's under
        ``gar/`` that ``gar_log_metrics`` selects (finite ones only)."""
        return self._gar_wiring.metrics(self._gar_log)

    # ------------------------------------------------------------------ the Trainer's hooks

    def _gar_collator(self) -> Any:
        """The Trainer's collator, dropping the keys the model's forward does not take (with
        ``args.remove_unused_columns``), as the Trainer does for other datasets."""
        collator = self.data_collator
        if not self.args.remove_unused_columns:
            return collator
        columns = list(inspect.signature(self.model.forward).parameters)
        columns += ["label", "label_ids", *(self.label_names or [])]
        return RemoveColumnsCollator(
            collator, columns, model_name=type(self.model).__name__, description="training"
        )

    def get_train_dataloader(self) -> DataLoader:
        """``sampler.track(accelerator.prepare(DataLoader(sampler.dataset,
        batch_sampler=sampler, ...)))``, with the Trainer's worker settings."""
        sampler = self._gar_wiring.sampler
        args = self.args
        params: dict[str, Any] = {
            "batch_sampler": sampler,
            "collate_fn": self._gar_collator(),
            "num_workers": args.dataloader_num_workers,
            "pin_memory": args.dataloader_pin_memory,
            "persistent_workers": args.dataloader_persistent_workers,
            "multiprocessing_context": args.dataloader_multiprocessing_context,
            "prefetch_factor": args.dataloader_prefetch_factor,
            "worker_init_fn": partial(
                seed_worker, num_workers=args.dataloader_num_workers, rank=args.process_index
            ),
            # The workers' base seed comes from here, not from the global generator: a new
            # epoch's iter() then leaves the global RNG (dropout) as it was, so the RNG state
            # a checkpoint restores is the one the next step draws from.
            "generator": torch.Generator().manual_seed(args.seed),
        }
        if hasattr(args, "dataloader_in_order"):  # transformers >= 4.53 (torch >= 2.6)
            params["in_order"] = args.dataloader_in_order
        loader = self.accelerator.prepare(DataLoader(sampler.dataset, **params))
        # The tracked loader stands in for the DataLoader: the Trainer iterates it and reads
        # its len() and attributes, which it passes through.
        return cast(DataLoader, sampler.track(loader))

    def train(
        self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any
    ) -> Any:
        """The Trainer's ``train``; with ``resume_from_checkpoint`` (a folder, or ``True``
        for the last one in ``args.output_dir``) it also loads the sampler's and GAR's state
        saved there, so the run continues exactly."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(
                    f"No valid checkpoint found in output directory ({self.args.output_dir})"
                )
        if resume_from_checkpoint:
            self._gar_load(str(resume_from_checkpoint))
        return super().train(resume_from_checkpoint or None, *args, **kwargs)

    def _gar_load(self, folder: str) -> None:
        wiring = self._gar_wiring
        path = os.path.join(folder, STATE_FILE.format(rank=wiring.sampler.rank))
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"checkpoint {folder} holds no adaptive_data state ({os.path.basename(path)}); "
                "resume from a checkpoint that a GARTrainer saved"
            )
        state = load(path)
        wiring.load_state_dict(state)
        sampler_state = state["sampler"]
        position, n = int(sampler_state["position"]), sampler_state["num_batches"]
        ga = self.args.gradient_accumulation_steps
        if sampler_state["epoch"] is not None and 0 < position < n and n % ga:
            warnings.warn(
                f"resuming in the middle of an epoch of num_batches={n}, which "
                f"gradient_accumulation_steps={ga} does not divide: the Trainer counts the "
                "resumed epoch from its first step, so it does not step on the epoch's last "
                f"{n % ga} batch(es) and their gradient joins the next epoch's first step. Give "
                f"the GARSampler a num_batches that {ga} divides for an exact resume",
                stacklevel=3,
            )

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The Trainer's ``log``; training logs gain :meth:`gar_metrics`."""
        if "loss" in logs:
            logs.update(self.gar_metrics())
        super().log(logs, *args, **kwargs)


class GARTrainer(GARTrainerMixin, Trainer):
    """A ``transformers.Trainer`` that learns its data mixture; see :class:`GARTrainerMixin`."""


class _Later(Iterable[Any]):
    """Placeholder reference until the Trainer's collator and device are known."""

    def __iter__(self) -> _Later:
        return self

    def __next__(self) -> Any:
        raise RuntimeError("the reference batches are built when the Trainer is constructed")
