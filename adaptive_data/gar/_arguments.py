"""GAR's argument checks, shared with the integrations (which check them when they are built,
before GAR is)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from .._check import check_int
from ..probe._keepers import KEEPERS
from ..probe._probe import ESTIMATORS, REWARDS
from ._budget import check_budget

if TYPE_CHECKING:
    from ..sampling import GARSampler

__all__: list[str] = []


def check_arguments(
    sampler: GARSampler,
    every: Any,
    reward: Any,
    reference: Any,
    loss_fn: Any,
    reference_refresh: Any = None,
    rows: Any = None,
    prefix: str = "",
    estimator: Any = "ghost",
    fallback: Any = "jvp",
    budget: Any = None,
) -> None:
    """GAR's checks of ``every``, ``reward``, the reference and its refresh, ``rows`` and
    ``estimator``, shared with the integrations (which check them when they are built, before
    GAR is); ``prefix`` names their arguments."""
    p = prefix
    if estimator not in KEEPERS:
        raise ValueError(
            f"{p}estimator should be one of {', '.join(KEEPERS)}, but got "
            f"{p}estimator={estimator!r}"
            + (
                " (it computes the rewards of a batch it runs itself: GradientProbe)"
                if estimator in ESTIMATORS
                else ""
            )
        )
    if fallback not in ("jvp", "raise"):
        raise ValueError(
            f"{p}fallback should be 'jvp' or 'raise', but got {p}fallback={fallback!r}"
        )
    check_budget(budget, p)
    check_int(f"{p}every", every, minimum=1, none_ok=True)
    check_int(f"{p}reference_refresh", reference_refresh, minimum=1, none_ok=True)
    check_int(f"{p}rows", rows, minimum=1, none_ok=True)
    if reference is None and reference_refresh not in (None, 1):
        raise ValueError(
            f"{p}reference_refresh reuses a held-out reference gradient: it needs "
            f"{p}reference=, but got {p}reference=None and "
            f"{p}reference_refresh={reference_refresh}"
        )
    if reward not in REWARDS:
        raise ValueError(
            f"{p}reward should be one of {', '.join(REWARDS)}, but got {p}reward={reward!r}"
        )
    if estimator == "fd" and reward != "dot":
        raise ValueError(
            f"{p}estimator='fd' estimates <g_i, D> only, so it needs {p}reward='dot' (the "
            "cosine needs each example's gradient norm, which only estimator='ghost' "
            f"computes), but got {p}estimator='fd' with {p}reward={reward!r}"
        )
    if isinstance(reference, torch.Tensor | Mapping) or (
        isinstance(reference, tuple | list)
        and len(reference) == 2
        and isinstance(reference[0], torch.Tensor | Mapping)
        and isinstance(reference[1], torch.Tensor)  # (x, y); a list of batches holds batches
    ):
        raise TypeError(
            f"{p}reference should be an iterator of reference batches, such as "
            f"{p}reference=ReferenceBatches(val_set, batch_size=128), but got one batch (a "
            f"{type(reference).__name__}); to reuse one fixed batch, pass "
            f"{p}reference=itertools.repeat(batch)"
        )
    if reference is not None and not hasattr(reference, "__iter__"):
        raise TypeError(
            f"{p}reference should be an iterator of reference batches, such as "
            f"ReferenceBatches(val_set, batch_size=128), but got {type(reference).__name__}"
        )
    if reference is not None and (loss_fn is None or not callable(loss_fn)):
        raise ValueError(
            f"{p}reference= needs {p}loss_fn (per-example losses [N]) to compute the reference "
            f"gradient, but got {p}loss_fn={loss_fn!r}"
        )
    if reference is None and len(sampler.names) > 1:
        raise ValueError(
            f"a mixture of {len(sampler.names)} sources needs {p}reference= batches from data "
            f"you trust (a target or validation split), e.g. ReferenceBatches(val_set, 128), "
            f"with {p}loss_fn: a reference drawn from the training mixture itself lets the "
            "mixture run away onto the sources it favours (docs/concepts.md, 'Which reference "
            "can tell good data from bad'). The next-batch reference (no reference) is for "
            "augmentation over one trusted source"
        )
