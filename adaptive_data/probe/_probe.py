"""GradientProbe: r_i = <grad_theta l_i(theta), D> for every example of a batch."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .._batch import Inputs, batch_size, call_args, check_same_batch, split_batch
from .._check import check_int, check_number
from .._distributed import current_group
from ._direction import Direction, DirectionSource, check_direction, cosine_rewards
from ._estimators import ESTIMATORS as _TABLE
from ._estimators import Job, Options
from ._model_state import preserved
from ._precondition import check_optimizer
from ._sharding import check_sharding

__all__ = ["ESTIMATORS", "REWARDS", "GradientProbe"]

LossFn = Callable[[Any, Any], Tensor]

ESTIMATORS = ("ghost", "jvp", "per_sample", "fd", "head")
"""The estimators ``GradientProbe`` takes (``estimator=``); ``GAR`` takes ``ghost`` and ``fd``."""
REWARDS = ("dot", "cosine")
# The former spelling (method=, "finite_difference"): accepted with a FutureWarning.
_OLD_NAMES = {"finite_difference": "fd"}


def _resolve(estimator: Any, method: Any) -> Any:
    """The estimator asked for, from ``estimator=`` or the deprecated ``method=``."""
    if method is not None:
        warnings.warn(
            "GradientProbe(method=...) is deprecated: pass estimator=... (the name GAR uses)",
            FutureWarning,
            stacklevel=3,
        )
        if estimator != "ghost":
            raise ValueError(
                f"pass estimator= or method=, not both: got estimator={estimator!r} and "
                f"method={method!r}"
            )
        estimator = method
    if isinstance(estimator, str) and estimator in _OLD_NAMES:
        new = _OLD_NAMES[estimator]
        warnings.warn(
            f"estimator={estimator!r} is deprecated: it is spelled {new!r}",
            FutureWarning,
            stacklevel=3,
        )
        estimator = new
    return estimator


class GradientProbe:
    """Per-example gradient-alignment rewards ``r_i = <grad_theta l_i(theta), D>``.

    ``probe(x, y, reference=(x_ref, y_ref))`` (or ``direction={name: tensor}``) returns a float32
    Tensor ``[N]``: example i's own loss gradient dotted with the reference direction ``D``,
    preconditioned by ``optimizer=`` if given. Dict batches: ``probe(batch,
    reference=ref_batch)`` (:func:`split_batch`). The probe never edits the model (parameters,
    buffers, ``.grad``, hooks, mode, RNG). Cost with the default ``estimator="ghost"``: about
    one training step. The estimators, their exactness and costs: [docs/probe.md](probe.md);
    the maths: [docs/concepts.md](concepts.md).

    Args:
        model: the ``nn.Module`` (``DistributedDataParallel`` is unwrapped).
        loss_fn: ``loss_fn(output, target) -> Tensor [N]`` of per-example losses.
        estimator: ``"ghost"``, ``"jvp"``, ``"per_sample"``, ``"fd"`` or ``"head"``
            (``method=`` and ``"finite_difference"`` are deprecated spellings).
        fallback: ``"jvp"`` or ``"raise"`` for modules ``ghost`` has no rule for.
        verify: ``ghost``'s sum check: ``"first"``, ``"always"`` or ``"never"``.
        rel_eps: ``fd``'s relative step.
        chunk_size: examples per ``vmap`` chunk for ``per_sample`` (None: all at once).
        reward: ``"dot"`` or ``"cosine"``.

    Example:
        >>> probe = GradientProbe(model, nn.CrossEntropyLoss(reduction="none"))
        >>> r = probe(x, y, reference=(x_ref, y_ref))  # Tensor [N]
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        estimator: str = "ghost",
        *,
        fallback: str = "jvp",
        verify: str = "first",
        rel_eps: float = 1e-3,
        chunk_size: int | None = None,
        reward: str = "dot",
        method: str | None = None,
    ) -> None:
        estimator = _resolve(estimator, method)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model should be an nn.Module, but got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn should be callable, but got {type(loss_fn).__name__}")
        if estimator not in _TABLE:
            raise ValueError(
                f"estimator should be one of {', '.join(ESTIMATORS)}, but got "
                f"estimator={estimator!r}"
            )
        if fallback not in ("jvp", "raise"):
            raise ValueError(f"fallback should be 'jvp' or 'raise', but got fallback={fallback!r}")
        check_number("rel_eps", rel_eps, positive=True)
        if reward not in REWARDS:
            raise ValueError(
                f"reward should be one of {', '.join(REWARDS)}, but got reward={reward!r}"
            )
        if reward == "cosine" and not _TABLE[estimator].norms:
            with_norms = " and ".join(f"estimator={k!r}" for k, v in _TABLE.items() if v.norms)
            raise ValueError(
                f"reward='cosine' needs per-example gradient norms, which {with_norms} "
                f"compute, but got estimator={estimator!r}"
            )
        if verify not in ("first", "always", "never"):
            raise ValueError(
                f"verify should be 'first', 'always' or 'never', but got verify={verify!r}"
            )
        check_int("chunk_size", chunk_size, minimum=1, none_ok=True)
        if isinstance(model, nn.parallel.DistributedDataParallel):
            # Probe the wrapped module: its forward and backward then never enter DDP's
            # gradient synchronisation, and .grad stays as the training step left it.
            model = model.module
        self.model = model
        self.loss_fn = loss_fn
        self.estimator = estimator
        self.fallback, self.verify, self.reward = fallback, verify, reward
        self.rel_eps, self.chunk_size = float(rel_eps), chunk_size
        sync = None
        if check_sharding(model, estimator, "GradientProbe"):
            # FSDP's backward averages the shards' reference gradient over the ranks; the
            # parameters it leaves whole are averaged too, so D is one global direction.
            group = current_group(None, None)
            sync = functools.partial(group.all_reduce_mean, what="GradientProbe's reference")
        self._source = DirectionSource(model, loss_fn=loss_fn, sync=sync)
        options = Options(fallback, verify, self.rel_eps, chunk_size)
        self._estimator = _TABLE[estimator](model, loss_fn, options)

    @property
    def method(self) -> str:
        """Deprecated: :attr:`estimator`."""
        return self.estimator

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(model={type(self.model).__name__}, "
            f"estimator={self.estimator!r})"
        )

    # ------------------------------------------------------------------ public API

    def __call__(
        self,
        x: Inputs,
        y: Any = None,
        *,
        reference: Any = None,
        direction: Mapping[str, Tensor] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> Tensor:
        """Rewards of the batch ``(x, y)``: a float32 Tensor ``[N]``.

        Exactly one of ``reference`` (a batch ``(x_ref, y_ref)``; ``d`` is the gradient of
        ``loss_fn(model(x_ref), y_ref).mean()``) or ``direction`` (``{parameter name: tensor}``
        keyed like ``model.named_parameters()``, trainable ones only) must be given. With
        ``optimizer`` (a torch optimizer, or a wrapper exposing one as ``.optimizer`` such as
        accelerate's) ``d`` is preconditioned to the step it really takes (docs/concepts.md
        lists the optimizers; others get one warning and the plain gradient).

        Dict batches: ``probe(batch, reference=ref_batch)``, with ``y`` left out, splits a
        dict batch the Hugging Face way (:func:`split_batch`: the target under ``"labels"``,
        the other keys passed as ``model(**inputs)``); ``reference`` may be such a dict too.
        For other key names, split with ``split_batch(batch, target_key=..., input_key=...)``.
        """
        if (reference is None) == (direction is None):
            raise ValueError(
                "pass exactly one of reference=(x_ref, y_ref) or direction={name: tensor}"
            )
        if y is None:
            if not isinstance(x, Mapping):
                raise TypeError(
                    "y should be the targets of the batch, but got y=None with x of type "
                    f"{type(x).__name__} (only a dict batch holds its own targets)"
                )
            x, y = split_batch(x)
        if isinstance(reference, Mapping):
            reference = split_batch(reference)
        args, kwargs = call_args(x)
        n = batch_size(x)
        check_same_batch(y, n)
        params = self._source.check_parameters()
        if optimizer is not None:  # before the reference pass, so a bad optimizer fails fast
            optimizer = check_optimizer(optimizer, params)
        if direction is not None:
            d = check_direction(direction, params)
        else:
            if not (isinstance(reference, tuple | list) and len(reference) == 2):
                raise TypeError(
                    "reference should be a pair (x_ref, y_ref) or a dict batch, but got "
                    f"{type(reference).__name__}"
                    + (
                        f" of length {len(reference)}"
                        if isinstance(reference, tuple | list)
                        else ""
                    )
                )
            d = self.reference_direction(*reference)
        d = self._source.direction(d, optimizer)
        with preserved(self.model):
            job = Job(args, kwargs, y, n, d, params, norms=self.reward == "cosine")
            r, sq_norms = self._estimator(job)
        if sq_norms is not None:
            r = cosine_rewards(r, sq_norms, d)
        return r

    def reference_direction(self, x_ref: Inputs, y_ref: Any) -> Direction:
        """``d = grad_theta loss_fn(model(x_ref), y_ref).mean()`` as ``{name: tensor}`` (with
        ``estimator="head"``, the head's share of it).

        Raises if it holds NaN or inf. Leaves the model untouched (``.grad`` included).
        """
        args, kwargs = call_args(x_ref)
        n = batch_size(x_ref, "x_ref")
        check_same_batch(y_ref, n)
        return self._estimator.reference(self._source, args, kwargs, y_ref, n)
