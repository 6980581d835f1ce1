"""GARSampler's checks of its arguments and of ``update()``'s, each raising at the call that
received the bad value and naming it."""

from __future__ import annotations

import inspect
from typing import Any

from .._check import check_int, check_number, int_list
from ..policy._categorical import CategoricalPolicy
from ._streams import ON_STREAM_END

__all__: list[str] = []


def is_gar_transform(obj: Any) -> bool:
    """Whether ``obj`` is a GARTransform; imports torchvision's v2 (slow) only when asked."""
    from ..augment._transform import GARTransform

    return isinstance(obj, GARTransform)


def check_arguments(
    batch_size: Any,
    lag: Any,
    seed: Any,
    reward_window: Any,
    transform: Any,
    reference_every: Any,
) -> int | None:
    """GARSampler's checks of its scalar arguments; returns ``reference_every`` resolved
    (``"auto"``: 2 with a transform, else ``None``)."""
    check_int("batch_size", batch_size, minimum=1)
    check_int("lag", lag, minimum=1, none_ok=True)
    check_int("seed", seed)
    check_int("reward_window", reward_window, minimum=2)
    if transform is not None and not is_gar_transform(transform):
        raise TypeError(
            f"transform should be a GARTransform, but got {type(transform).__name__}; "
            "other transforms belong in the sources' own pipelines"
        )
    if reference_every == "auto":
        reference_every = 2 if transform is not None else None
    if reference_every is not None:
        check_int(
            "reference_every",
            reference_every,
            minimum=2,
            what="'auto', None or an integer >= 2",
        )
        if transform is None:
            raise ValueError(
                "reference_every marks un-augmented batches, so it needs transform=; "
                "got transform=None"
            )
    return reference_every


def check_sync_and_streams(sync_timeout_s: Any, on_stream_end: Any) -> None:
    check_number("sync_timeout_s", sync_timeout_s, positive=True)
    if on_stream_end not in ON_STREAM_END:
        raise ValueError(
            f"on_stream_end should be one of {list(ON_STREAM_END)}, but got "
            f"on_stream_end={on_stream_end!r}"
        )


def check_stream_arguments(
    streams: list[str], num_batches: Any, transform: Any, weights: Any
) -> None:
    """Refuse the arguments a sampler with the stream sources ``streams`` cannot honour."""
    if num_batches is None:
        raise ValueError(
            f"num_batches is required when a source is a stream (source(s) {streams}): a stream "
            "has no length to count an epoch's batches from; num_batches sets len(sampler)"
        )
    if transform is not None:
        raise ValueError(
            f"transform= is not supported with stream sources (source(s) {streams}): its "
            "decisions are armed around each example's fetch, and a stream's pipeline may "
            "prepare examples ahead of the fetch that returns them. Apply augmentation in the "
            "stream's own pipeline, or use map-style sources"
        )
    if isinstance(weights, str) and weights == "proportional":
        raise ValueError(
            f"weights='proportional' needs the size of every source, but source(s) {streams} "
            "are streams; give the weights: {name: weight} or a sequence"
        )


def check_batch_id(batch: Any) -> None:
    check_int("batch", batch, what="an int id from sampler.last_batch")


def check_rows(rows: Any, n: int) -> list[int]:
    """``rows`` of ``update()`` as a list of distinct positions in ``[0, n)``."""
    picked = int_list("rows", rows)
    if not picked:
        raise ValueError("rows should name at least one position in the batch, but got none")
    bad = [i for i in picked if not 0 <= i < n]
    if bad:
        raise ValueError(f"rows should be positions in [0, {n}) of the batch, but got {bad}")
    if len(set(picked)) != len(picked):
        raise ValueError(f"rows should be distinct, but got {picked}")
    return picked


# The options of the CategoricalPolicy a GARSampler makes (all but what the sources give).
POLICY_OPTIONS = frozenset(inspect.signature(CategoricalPolicy).parameters) - {
    "num_choices",
    "names",
    "sizes",
}
# Total probability mass of the default exploration floor, shared equally by the sources.
DEFAULT_FLOOR = 0.01


def source_policy(
    policy: Any, options: dict[str, Any], names: list[str], sizes: list[int] | None
) -> CategoricalPolicy:
    """The policy over the sources: ``policy`` checked against them, or one made from the
    ``options`` (the floor defaulting to ``DEFAULT_FLOOR / K``)."""
    k = len(names)
    if policy is None:
        unknown = sorted(set(options) - POLICY_OPTIONS)
        if unknown:
            raise TypeError(
                f"GARSampler got unexpected keyword argument(s) {unknown}; the options of its "
                f"policy are {sorted(POLICY_OPTIONS)}"
            )
        if options.get("floor") is None:
            options = {**options, "floor": DEFAULT_FLOOR / k}
        return CategoricalPolicy(k, names=names, sizes=sizes, **options)
    if not isinstance(policy, CategoricalPolicy):
        raise TypeError(f"policy should be a CategoricalPolicy, but got {type(policy).__name__}")
    if options:
        raise ValueError(
            "pass either policy= or the options that configure one, but got policy= and "
            f"{', '.join(sorted(options))}"
        )
    if policy.num_choices != k or policy.names != names:
        raise ValueError(
            f"policy should have one choice per source, named as the sources {names}, but it "
            f"has {policy.num_choices} choices named {policy.names}; build it as "
            f"CategoricalPolicy({k}, names={names}, ...)"
        )
    return policy
