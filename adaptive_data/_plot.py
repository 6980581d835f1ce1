"""Pictures of a learned mixture: the weights and the per-source rewards over the updates.

matplotlib is an optional extra (``pip install 'adaptive-data[plot]'``), imported on the first
call; nothing here draws a random number.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ._extras import missing_extra

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["draw_history", "history_of", "plot_history"]

MOMENTUM = 0.9  # of the drawn running mean reward: the one sampler.metrics() reports


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no window, no display needed
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise missing_extra(e, "plot", "adaptive_data.plot_history") from None
    return plt


def history_of(source: Any) -> list[dict[str, Any]]:
    """The history entries ``{"batch", "weights", "rewards"?}`` of ``source``: a
    :class:`GARSampler`, its ``history``, a list of ``{source: weight}`` dicts, a sampler's
    ``state_dict()`` (its weights and each update's rewards), a checkpoint
    that holds one (the Trainer's and Lightning's integration states, any dict with a
    sampler state among its values), or the path of a file ``torch.save`` wrote of any of
    these (loaded with ``weights_only=True``)."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no such file to plot: {str(path)!r}")
        source = torch.load(path, map_location="cpu", weights_only=True)
    history = getattr(source, "history", None)
    if isinstance(history, list):  # a GARSampler
        source = history
    if isinstance(source, Mapping):
        state = _find_state(source)
        if state is None:
            raise ValueError(
                "cannot find a sampler's history in a dict with keys "
                f"{sorted(map(str, source))[:8]}: give a GARSampler, sampler.history, or a "
                "GARSampler.state_dict() (alone or inside a checkpoint dict)"
            )
        return _entries_of_state(state)
    if not isinstance(source, Sequence) or isinstance(source, str) or not source:
        raise ValueError(
            f"history should be a non-empty list of sampler.history entries or of {{source: "
            f"weight}} dicts, but got {type(source).__name__}"
            + (" (empty)" if isinstance(source, Sequence) and not source else "")
        )
    entries = []
    for i, e in enumerate(source):
        if isinstance(e, Mapping) and isinstance(e.get("weights"), Mapping):
            entries.append(dict(e))
        elif isinstance(e, Mapping) and all(isinstance(v, (int, float)) for v in e.values()):
            entries.append({"batch": None, "weights": dict(e)})
        else:
            raise ValueError(
                f"history entry {i} should be a sampler.history entry or a {{source: weight}} "
                f"dict, but got {e!r:.80}"
            )
    return entries


def _find_state(d: Mapping[str, Any], depth: int = 0) -> Mapping[str, Any] | None:
    """A sampler state in ``d`` or in the dicts and lists inside it (breadth first)."""
    if "names" in d and "history" in d:
        return d
    if depth > 4:
        return None
    for v in d.values():
        inner = v if isinstance(v, (list, tuple)) else [v]
        for item in inner:
            if isinstance(item, Mapping) and (found := _find_state(item, depth + 1)):
                return found
    return None


def _entries_of_state(state: Mapping[str, Any]) -> list[dict[str, Any]]:
    names = [str(n) for n in state["names"]]
    blocks = [torch.as_tensor(t, dtype=torch.float64) for t in state["history"]]
    rows = torch.cat(blocks).reshape(-1, 1 + len(names)) if blocks else torch.empty(0)
    entries: list[dict[str, Any]] = [
        {"batch": int(r[0]), "weights": dict(zip(names, r[1:], strict=True))} for r in rows.tolist()
    ]
    saved = state.get("rewards")  # each update's mean reward per source (absent before it was)
    if saved is not None:
        blocks = [torch.as_tensor(t, dtype=torch.float64) for t in saved]
        rewards = torch.cat(blocks).reshape(-1, len(names)).tolist() if blocks else []
        if len(rewards) == len(entries):
            for entry, r in zip(entries, rewards, strict=True):
                entry["rewards"] = dict(zip(names, r, strict=True))
    if not entries:
        raise ValueError("the sampler state holds no update yet: nothing to plot")
    return entries


def _running_means(values: Sequence[float]) -> list[float]:
    """The running mean of the finite values, momentum :data:`MOMENTUM`, NaN before any."""
    out, mean = [], math.nan
    for v in values:
        if math.isfinite(v):
            mean = v if math.isnan(mean) else MOMENTUM * mean + (1 - MOMENTUM) * v
        out.append(mean)
    return out


def draw_history(
    source: Any,
    weights_ax: Axes,
    rewards_ax: Axes | None = None,
    *,
    stride: int = 1,
    first: int = 0,
    legend: bool = True,
) -> bool:
    """Draw a history (anything :func:`plot_history` takes) on matplotlib axes: each source's
    weight over the updates on ``weights_ax`` and, on ``rewards_ax``, each update's mean
    reward per source (dots) with its running mean (line, momentum 0.9). Entry ``i`` is
    drawn at update ``first + i * stride`` (a history kept every ``stride``-th update).
    Returns whether any reward was drawn (a saved state holds none)."""
    entries = history_of(source)
    names = list(entries[0]["weights"])
    xs = [first + i * stride for i in range(len(entries))]
    for name in names:
        weights_ax.plot(xs, [e["weights"][name] for e in entries], label=name)
    weights_ax.set_ylabel("mixture weight")
    weights_ax.set_ylim(0, 1)
    if legend:
        weights_ax.legend(fontsize=8)
    if rewards_ax is None:
        return False
    drew = False
    for j, name in enumerate(names):
        values = [float(e.get("rewards", {}).get(name, math.nan)) for e in entries]
        if not any(math.isfinite(v) for v in values):
            continue
        drew = True
        color = f"C{j}"
        finite = [(x, v) for x, v in zip(xs, values, strict=True) if math.isfinite(v)]
        rewards_ax.scatter(
            [x for x, _ in finite], [v for _, v in finite], s=6, alpha=0.35, color=color
        )
        rewards_ax.plot(xs, _running_means(values), color=color, label=name)
    rewards_ax.axhline(0, color="grey", lw=0.8, ls=":")
    rewards_ax.set_ylabel("mean reward")
    if drew and legend:
        rewards_ax.legend(fontsize=8)
    return drew


def plot_history(
    source: Any, path: str | os.PathLike[str], *, title: str | None = None, stride: int = 1
) -> Path:
    """Write a PNG of a learned mixture: each source's weight over the updates and, where the
    history holds them, each update's mean reward per source with its running mean.

    ``source``: a :class:`GARSampler`, its ``history``, a list of ``{source: weight}`` dicts,
    a ``GARSampler.state_dict()`` (weights only: a state does not keep the per-update
    rewards), a checkpoint dict holding one (the Trainer's ``adaptive_data_rank0.pt``, a
    Lightning checkpoint), or a file ``torch.save`` wrote of any of these. ``stride``: the
    updates between two entries. Returns the path written. Needs matplotlib
    (``pip install 'adaptive-data[plot]'``); on the command line: ``adaptive-data plot
    STATE.pt``."""
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride should be a positive integer, but got stride={stride!r}")
    entries = history_of(source)
    rewarded = any(math.isfinite(float(v)) for e in entries for v in e.get("rewards", {}).values())
    plt = _pyplot()
    rows = 2 if rewarded else 1
    fig, axes = plt.subplots(rows, 1, figsize=(6.4, 2.2 + 2.0 * rows), sharex=True, squeeze=False)
    try:
        draw_history(entries, axes[0][0], axes[1][0] if rewarded else None, stride=stride)
        axes[-1][0].set_xlabel("update")
        axes[0][0].set_title(title or "learned mixture weights" + (" and rewards" * rewarded))
        fig.tight_layout()
        out = Path(path)
        fig.savefig(out, dpi=110, format="png")
    finally:
        plt.close(fig)
    return out
