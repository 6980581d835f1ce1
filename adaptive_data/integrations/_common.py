"""What the framework integrations share: a GAR built when the trainer's optimizer exists,
the state saved beside the trainer's checkpoints, and the metrics for its loggers."""

from __future__ import annotations

import fnmatch
import inspect
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..gar._arguments import check_arguments
from ..gar._gar import GAR
from ..sampling._sampler import GARSampler

__all__: list[str] = []

STATE_VERSION = 1

# GAR's own defaults: an option set otherwise beside a GAR the user built would be ignored.
_GAR_DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(GAR.__init__).parameters.items()
    if p.default is not inspect.Parameter.empty
}
_OPTIONS = ("budget", "every", "reward", "reference_refresh", "rows", "estimator", "fallback")

DEFAULT_METRICS = (
    "mixture/weight/*",
    "mixture/reward_mean/*",
    "mixture/reward_age/*",
    "gar/budget/cost_per_step",
)
"""What the integrations log by default: each source's weight, its running mean reward and
that mean's age in updates (a stale mean is not read as current), and the rewards' estimated
cost per training step. ``"all"`` logs every key of the sampler's and GAR's metrics."""

_PREFIXES = ("mixture/", "gar/")


def metric_patterns(select: Any, name: str) -> tuple[str, ...] | None:
    """The key patterns (``fnmatch``) a ``log_metrics``-style argument selects: ``"default"``
    (:data:`DEFAULT_METRICS`), ``"all"`` (``None``: every key), or a sequence of patterns
    such as ``["mixture/weight/*", "gar/batches_rewarded"]``. Raises naming ``name``."""
    if select == "default":
        return DEFAULT_METRICS
    if select == "all":
        return None
    if isinstance(select, str) or not isinstance(select, Sequence):
        raise ValueError(
            f"{name} should be 'default', 'all' or a list of metric names or patterns such as "
            f"'mixture/weight/*', but got {select!r}"
        )
    for pattern in select:
        if not isinstance(pattern, str) or not pattern.startswith(_PREFIXES):
            raise ValueError(
                f"{name} holds {pattern!r}, which names no metric: the names start with "
                "'mixture/' (the sampler's metrics) or 'gar/' (GAR's); e.g. 'mixture/weight/*'"
            )
    return tuple(select)


class Wiring:
    """A :class:`GARSampler`, its :class:`GAR` (given, or built by :meth:`build` from the
    trainer's model and optimizer), and a GAR state loaded before the GAR exists.

    ``prefix`` names the integration's arguments in messages, e.g. ``"gar_"`` for the
    Trainer's ``gar_reference=`` or ``""`` for the Lightning callback's ``reference=``.
    """

    def __init__(
        self,
        sampler: GARSampler,
        gar: GAR | None,
        reference: Iterable[Any] | None,
        loss_fn: Any,
        prefix: str,
        **options: Any,
    ) -> None:
        """``options``: GAR's other keyword arguments (``budget``, ``every``, ``reward``,
        ``reference_refresh``, ``rows``, ``estimator``, ``fallback``), as the integration
        received them."""
        p = prefix
        if not isinstance(sampler, GARSampler):
            raise TypeError(f"{p}sampler should be a GARSampler, but got {type(sampler).__name__}")
        if gar is not None:
            if not isinstance(gar, GAR):
                raise TypeError(f"{p}gar should be a GAR, but got {type(gar).__name__}")
            if gar.sampler is not sampler:
                raise ValueError(
                    f"{p}gar was built over another GARSampler than {p}sampler; build it over "
                    f"the same one"
                )
            given = [
                n
                for n, v in {"reference": reference, "loss_fn": loss_fn, **options}.items()
                if v != _GAR_DEFAULTS[n]
            ]
            if given:
                raise ValueError(
                    f"{p}gar is already built, so {', '.join(p + n for n in given)} would be "
                    "ignored; pass them to GAR(...) or leave gar out"
                )
        else:
            o = {**{k: _GAR_DEFAULTS[k] for k in _OPTIONS}, **options}
            check_arguments(
                sampler,
                o["every"],
                o["reward"],
                reference,
                loss_fn,
                o["reference_refresh"],
                o["rows"],
                prefix=p,
                estimator=o["estimator"],
                fallback=o["fallback"],
                budget=o["budget"],
            )
        self.sampler = sampler
        self.gar = gar
        self.reference = reference
        self.loss_fn = loss_fn
        self.options: dict[str, Any] = dict(options)  # GAR's other arguments (checked above)
        self._built = False  # whether self.gar is ours (built by build())
        self._accumulation_noted = False  # expect_accumulation() told the sampler
        self._pending_gar: Mapping[str, Any] | None = None

    @property
    def given(self) -> bool:
        """Whether the GAR was built by the user (not by :meth:`build`)."""
        return self.gar is not None and not self._built

    def build(self, model: nn.Module, optimizer: Any) -> GAR:
        """The GAR, built over ``model`` and ``optimizer`` unless one was given or built for
        that optimizer already; a GAR state loaded earlier is applied to it."""
        if self.gar is not None and self._built and self.gar.optimizer is not optimizer:
            self.gar.close()  # a new train() with a new optimizer: a new GAR
            self.gar = None
        if self.gar is None:
            self.gar = GAR(
                model,
                self.sampler,
                optimizer=optimizer,
                reference=self.reference,
                loss_fn=self.loss_fn,
                **self.options,
            )
            self._built = True
        if self._pending_gar is not None:
            self.gar.load_state_dict(self._pending_gar)
            self._pending_gar = None
        return self.gar

    def expect_accumulation(self, steps: int) -> None:
        """The trainer steps every ``steps`` micro-batches, and GAR rewards them all at the
        step: the first one's rewards come ``steps - 1`` deliveries later than GAR alone says,
        so the sampler hears of it and refuses, at its first batch, a loader too deep for its
        lag. Counted once per sampler."""
        s = self.sampler
        if steps > 1 and not self._accumulation_noted and s.reward_delay is not None:
            s.reward_delay = s.reward_delay + steps - 1
            self._accumulation_noted = True

    def step(self) -> None:
        if self.gar is None:
            raise RuntimeError("GAR.step() before the GAR was built: training has not begun")
        self.gar.step()

    def state_dict(self) -> dict[str, Any]:
        """``{"version", "sampler", "gar"}``: the sampler's and GAR's states (call between
        optimizer steps). Before the GAR exists, a GAR state loaded into it is kept."""
        gar = self.gar.state_dict() if self.gar is not None else self._pending_gar
        return {"version": STATE_VERSION, "sampler": self.sampler.state_dict(), "gar": gar}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load a :meth:`state_dict`: the sampler's at once (it applies to its next pass),
        GAR's at once or when the GAR is built. GAR's is checked before the sampler's is
        applied, so a refused one changes neither (a GAR not built yet checks it when it is
        built)."""
        if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
            found = (
                f"version={state.get('version')!r}"
                if isinstance(state, Mapping)
                else type(state).__name__
            )
            raise ValueError(
                f"state should be an adaptive_data integration state of version {STATE_VERSION}, "
                f"but got {found}"
            )
        gar = state["gar"]
        if gar is not None and self.gar is not None:
            self.gar.check_state(gar)  # before the sampler's is applied: no half-load
        self.sampler.load_state_dict(state["sampler"])
        if gar is None:
            return
        if self.gar is not None:
            self.gar.load_state_dict(gar)
        else:
            self._pending_gar = gar

    def metrics(self, patterns: tuple[str, ...] | None = None) -> dict[str, float]:
        """The sampler's metrics under ``mixture/`` and GAR's under ``gar/``, those matching
        one of ``patterns`` (:func:`metric_patterns`; ``None``: all); entries that are not
        finite (a mean before any reward) are left out, as loggers plot them badly."""
        out = {f"mixture/{k}": float(v) for k, v in self.sampler.metrics().items()}
        if self.gar is not None:
            out.update({f"gar/{k}": float(v) for k, v in self.gar.metrics().items()})
        return {
            k: v
            for k, v in out.items()
            if math.isfinite(v)
            and (patterns is None or any(fnmatch.fnmatchcase(k, p) for p in patterns))
        }


def save(state: Mapping[str, Any], path: str) -> None:
    torch.save(dict(state), path)


def load(path: str) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)
