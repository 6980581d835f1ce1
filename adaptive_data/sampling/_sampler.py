"""GARSampler: a batch sampler over several sources whose mixture is learned from rewards.

The sampler composes parts that each do one job and keep their own state:

* ``MixtureDataset`` (``_mixture_dataset``): the sources behind one key space;
* ``Drawer`` (``_drawing``): the choice generator, the per-rank shard positions
  (``ShardOrder``) and the drawing policies of the policy lag (``LaggedPolicies``);
* ``Passes`` (``_passes``): the iterations, the epoch counters and what tracked loaders
  delivered to the loop (``TrackedLoader`` in ``_tracking``);
* ``RewardWindow`` (``_records``): the last batches drawn, for ``update(batch=)``;
* ``Learner`` (``_learning``): the live policies, their update from rewards (all-reduced)
  and history;
* ``_checkpoint``: the state's keys and checks, and the loaded states waiting for a pass.

What is left here is the public surface and the seams between the parts: which state a new
pass resumes from, rewinding batches a loader prefetched but never delivered, and matching an
``update()`` to its batch.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor
from torch.utils.data import Sampler, default_collate

from .._check import check_int, check_number, is_int
from .._distributed import Group, current_group
from ..policy._categorical import CategoricalPolicy, check_rewards
from . import _checkpoint as ckpt
from ._arguments import (
    check_arguments,
    check_batch_id,
    check_rows,
    check_stream_arguments,
    check_sync_and_streams,
    source_policy,
)
from ._drawing import Drawer
from ._iteration import Iterations
from ._lag import LaggedPolicies
from ._learning import Learner
from ._mixture_dataset import (
    MixtureDataset,
    StreamingMixtureDataset,
    resolve_sources,
)
from ._passes import Passes, SamplerIterator
from ._records import Record, RewardWindow
from ._shards import ShardOrder
from ._streams import StreamReaders, is_stream
from ._tracking import TrackedLoader

if TYPE_CHECKING:
    from ..augment._transform import GARTransform


__all__ = ["GARSampler", "MixtureDataset"]


# ---------------------------------------------------------------------- the sampler


class GARSampler(Sampler[list[int]]):
    """A batch sampler that learns the mixture of its sources from per-example rewards.

    Pass it as ``batch_sampler`` with ``dataset=sampler.dataset``::

        sampler = GARSampler({"clean": a, "web": b}, batch_size=64, seed=0)
        loader = sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler, num_workers=2))
        for x, y in loader:
            ...                        # the user's own step; r = probe(x, y, reference=...)
            sampler.update(r)          # rewards [B] of the batch just received

    Each batch is drawn lazily from the current policy (``batch_size`` source choices, then
    each source's next examples in its shuffled order), with all randomness in generators of
    the main process; :meth:`track` tells it which batch the loop holds, :meth:`update` learns
    from that batch's rewards. Cost: O(batch_size + K) per batch. Drawing, attribution and
    the policy lag: docs/howto-mixture.md; resume: docs/howto-resume.md; DDP:
    docs/howto-ddp.md.

    Args:
        sources: ``{name: dataset}``, a list (names ``"0"``, ``"1"``, ...), a Hugging Face
            ``DatasetDict`` or ``IterableDatasetDict``. Map-style (non-empty) or streams: a
            Hugging Face ``IterableDataset`` or a torch ``IterableDataset``, each DataLoader
            worker and rank reading its own shard (docs/howto-mixture.md, "Streaming
            sources").
        batch_size: examples per batch (>= 1).
        seed: seeds every generator.
        names: use only these sources (e.g. splits of a DatasetDict), in this order.
        num_batches: batches per epoch; default ``total examples // batch_size`` (at least 1).
            Required with a stream source.
        policy: the :class:`CategoricalPolicy` over the sources to learn (one choice per
            source, named as the sources); default: one made from ``policy_options``.
        **policy_options: the options of the policy the sampler makes (``weights``,
            ``floor``, ``lr``, ``rule``, ``normalize``, ``momentum``, ``max_step``: see
            :class:`CategoricalPolicy`); ``weights="proportional"`` follows the sources'
            sizes (not with streams) and ``floor`` defaults to ``0.01 / K`` here (the sources
            at the floor take 1% of the batch between them).
        reward_window: how many recent batches stay matchable for ``update``, at least; it
            grows to hold every batch a tracked loader has drawn and not yet rewarded.
        transform: a :class:`GARTransform` that sits in every source's pipeline. The sampler
            then draws an augmentation decision per example (and a seed for the pipeline's
            other random transforms), the keys carry them to the workers, and ``update``
            trains the transform's policies too. Examples are then fetched one by one.
        reference_every: with a transform, every ``reference_every``-th batch of an epoch
            (positions ``reference_every``, ``2 * reference_every``, ...) is drawn
            un-augmented, a reference batch (:meth:`is_reference`); its rewards update the
            mixture but not the transform. ``"auto"`` (default): 2 with a transform (every
            other batch, the GAR authors' scheme; docs/howto-augment.md has its measurement),
            none without. ``None``: every batch is augmented.
        rank: this process's rank; default: that of the initialised ``torch.distributed``
            process group (else 0). Give both ``rank`` and ``world_size`` only to simulate
            ranks in one process (no collectives then).
        world_size: the number of ranks; default: that of the process group (else 1).
        sync_timeout_s: how long a distributed ``update()`` waits for the other ranks before
            it raises (instead of hanging).
        on_stream_end: what a process does when its shard of a stream ends: ``"restart"``
            (default: read the shard again, a new pass) or ``"raise"`` (a ``RuntimeError``
            naming the stream).
        lag: batch ``t`` is drawn from the policy with the updates of batches ``<= t - lag``.
            ``None`` (default): fitted to the loader, 8 or what the deepest loader so far needs
            (its ``num_workers * prefetch_factor``, one wrapper's read-ahead and the reward
            delay), raised when a tracked pass starts; any loader works, and the same loader
            settings draw the same batches. An int (>= 1): the same seed draws the same batches
            whatever ``num_workers`` and ``prefetch_factor`` (map-style sources); the rewards
            of batch ``t`` must reach ``update()`` before batch ``t + lag`` is drawn, and a
            loader that reads further ahead is refused when its pass starts
            (docs/howto-mixture.md, "The policy lag").
        history_limit: at most this many entries of :attr:`history` after the initial one
            (an int >= 2), evenly spread over the run: when it is full every other entry is
            dropped, and from then on only every 2nd (4th, ...) update is recorded. Memory: at
            most ``history_limit * (K + 1) * 8`` bytes (8 MB for 1,000 sources at the default
            1024, 49 KB for 5), in :attr:`history` and in every state. ``None``: every update
            (``O(updates * K)`` memory, about 8 KB per update with 1,000 sources).

    A state loaded with :meth:`load_state_dict` must have been saved by a sampler built with
    the same arguments: one with other settings is refused, naming both values
    (docs/howto-resume.md).

    Under ``torch.distributed`` each rank draws from its own shard of every source and
    ``update()`` is a collective that keeps the ranks' weights identical (docs/howto-ddp.md).
    """

    def __init__(
        self,
        sources: Any,
        batch_size: int,
        *,
        seed: int = 0,
        names: Sequence[str] | None = None,
        num_batches: int | None = None,
        reward_window: int = 256,
        transform: GARTransform | None = None,
        reference_every: int | str | None = "auto",
        rank: int | None = None,
        world_size: int | None = None,
        sync_timeout_s: float = 60.0,
        on_stream_end: str = "restart",
        lag: int | None = None,
        history_limit: int | None = 1024,
        policy: CategoricalPolicy | None = None,
        **policy_options: Any,
    ) -> None:
        reference_every = check_arguments(
            batch_size, lag, seed, reward_window, transform, reference_every
        )
        check_int("history_limit", history_limit, minimum=2, none_ok=True)
        src_names, srcs = resolve_sources(sources, names)
        check_sync_and_streams(sync_timeout_s, on_stream_end)
        stream = [is_stream(src) for src in srcs]
        if any(stream):
            check_stream_arguments(
                [n for n, st in zip(src_names, stream, strict=True) if st],
                num_batches,
                transform,
                policy_options.get("weights"),
            )
        self._group = current_group(rank, world_size)
        self._group.timeout_s = float(sync_timeout_s)
        self.rank, self.world_size = self._group.rank, self._group.world_size
        small = [
            n
            for n, src, st in zip(src_names, srcs, stream, strict=True)
            if not st and len(src) < self.world_size
        ]
        if small:
            raise ValueError(
                f"source(s) {small} hold fewer examples than the {self.world_size} ranks; each "
                "rank needs its own shard of every source"
            )
        self.transform = transform
        self.reference_every: int | None = reference_every
        self.on_stream_end = on_stream_end
        self._stream_ids = [s for s, st in enumerate(stream) if st]
        self._readers: StreamReaders | None = None
        if self._stream_ids:
            self._readers = StreamReaders(
                src_names,
                [src if st else None for src, st in zip(srcs, stream, strict=True)],
                self.rank,
                self.world_size,
                on_stream_end,
            )
            self.dataset: MixtureDataset = StreamingMixtureDataset(srcs, src_names, self._readers)
        else:
            self.dataset = MixtureDataset(srcs, src_names, transform)
        self.names = src_names
        self.sizes = self.dataset.sizes
        self.batch_size = batch_size
        if num_batches is None:
            num_batches = max(1, len(self.dataset) // (batch_size * self.world_size))
        check_int("num_batches", num_batches, minimum=1)
        self.num_batches = num_batches
        self.seed = seed
        self._policy = source_policy(
            policy,
            policy_options,
            src_names,
            None if self._stream_ids else [int(cast(int, s)) for s in self.sizes],
        )
        lagged = LaggedPolicies(lag, self._policy, None if transform is None else transform.policy)
        self._drawer = Drawer(
            ShardOrder(self.sizes, self.dataset.offsets[:-1], seed, self.rank, self.world_size),
            lagged,
            batch_size,
            reference_every,
            seed,
            self.rank,
            self.world_size,
        )
        self._reward_window_setting = reward_window
        self._records = RewardWindow(reward_window)
        self._passes = Passes(lagged, self._records)  # iterations, epochs, deliveries
        self._loaded = ckpt.LoadedStates()  # states loaded, not yet resumed from
        self._learner = Learner(self._policy, transform, self._group, history_limit)
        self._iterations = Iterations(
            self._passes,
            self._drawer,
            self._records,
            self._loaded,
            num_batches,
            (self._policy, None if transform is None else transform.policy),
            self._apply,
            stream,
            self._readers,
        )
        self._group.check_same(self._fingerprint(), "the sources and sampler settings")

    def _fingerprint(self) -> tuple[Any, ...]:
        tf = self.transform
        table = None if tf is None else [(n, tf.policy.table[n]) for n in tf.policy.op_names]
        return (
            list(self.names),
            list(self.sizes),
            self.batch_size,
            self.num_batches,
            self.seed,
            self.reference_every,
            table,
            self._drawer.lagged.setting,
        )

    # ------------------------------------------------------------------ Sampler protocol

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> SamplerIterator:
        return SamplerIterator(self._passes, self._iterations.next_batch)

    def track(self, loader: Any) -> TrackedLoader:
        """Wrap the iterable the training loop consumes, so rewards find their batch.

        ``loader`` is the *outermost* iterable the loop iterates: the DataLoader over this
        sampler, or what wraps it (accelerate's prepared loader, torchdata's
        StatefulDataLoader). The k-th batch it hands to the loop in one pass is the k-th
        batch the sampler yielded in that pass, whatever prefetching or read-ahead happens
        below. ``update(r)``, :attr:`last_batch`, :meth:`state_dict` and :class:`GAR` need
        it. Raises (at ``iter()``) for a loader whose batches cannot be matched: another
        batch sampler wrapping this one, ``in_order=False``. Limits and the stacks it was
        tested in: docs/howto-mixture.md, "Which batch the loop holds".
        """
        if self._stream_ids:
            workers = getattr(loader, "num_workers", 0)
            if (
                is_int(workers)
                and workers > 0
                and getattr(loader, "persistent_workers", True) is False
            ):
                raise ValueError(
                    f"stream sources {[self.names[s] for s in self._stream_ids]} need the "
                    f"DataLoader's workers for the whole run, but got num_workers={workers} and "
                    "persistent_workers=False: each worker keeps its place in its shard of every "
                    "stream, and the new workers of every epoch would read the streams from "
                    "their start again. Pass persistent_workers=True"
                )
        if getattr(loader, "collate_fn", None) is default_collate:
            # torch's collate stacks each field: the dataset checks the shapes first, so a
            # source that cannot be stacked with another is named.
            self.dataset.default_collate = True
        return TrackedLoader(self, loader, self._passes)

    @property
    def deliveries(self) -> int:
        """How many batches tracked loaders have handed to the training loop, in total (this
        process, since construction)."""
        return self._passes.deliveries.count

    @property
    def sync_group(self) -> Group:
        """The ranks this sampler synchronises with (rank, world size, ``sync_timeout_s``):
        :class:`GAR` averages its reference gradient over the same ones."""
        return self._group

    @property
    def reward_window(self) -> int:
        """How many recent batches stay matchable for ``update`` (``reward_window=``, grown to
        fit the deepest tracked loader so far)."""
        return self._records.size

    @property
    def lag(self) -> int:
        """Batch ``t`` is drawn from the updates of batches ``<= t - lag`` (see ``lag=``; with
        ``lag=None``, the lag fitted to the present pass's loader)."""
        return self._drawer.lagged.lag

    @property
    def reward_delay(self) -> int | None:
        """How many batches after a batch the loop delivers before that batch's rewards reach
        :meth:`update` (0: while the loop holds it), if known: :class:`GAR` sets it. With it,
        a loader that reads too far ahead for :attr:`lag` is refused at its first batch;
        without it (``None``), at the first late :meth:`update`."""
        return self._passes.reward_delay

    @reward_delay.setter
    def reward_delay(self, value: int | None) -> None:
        if value is not None:
            check_int("reward_delay", value, minimum=0, what="None or an int >= 0")
        self._passes.reward_delay = value

    def expect_reward_delay(self, delay: int) -> None:
        """Raise :attr:`reward_delay` to at least ``delay`` (a rewarder, such as :class:`GAR`,
        tells when its rewards come; the largest delay announced counts)."""
        check_int("delay", delay, minimum=0)
        current = self._passes.reward_delay
        if current is None or current < delay:
            self._passes.reward_delay = delay

    def delivery(self, i: int) -> int:
        """Id of the ``i``-th batch (0-based, in :attr:`deliveries`' count) handed to the loop;
        the last ``reward_window`` deliveries are kept."""
        return self._passes.deliveries[i]

    def set_epoch(self, epoch: int) -> None:
        """Number the next epoch ``epoch`` (its generator is seeded from ``(seed, epoch)``).

        Without calls, epochs count 0, 1, 2, ... by themselves.
        """
        check_int("epoch", epoch, minimum=0)
        self._passes.set_next_epoch(epoch)
        self._refresh_pending()

    # ------------------------------------------------------------------ attribution

    def _received(self) -> Record:
        bid = self._passes.last_delivered()
        rec = self._records.get(bid)
        if rec is None:
            raise RuntimeError(
                f"batch {bid} is older than the last reward_window={self.reward_window} "
                "batches; its keys are gone"
            )
        return rec

    def is_reference(self, batch: int) -> bool:
        """Whether batch ``batch`` (an id from :attr:`last_batch`) is an un-augmented reference
        batch (see ``reference_every``)."""
        return self._record(batch).reference

    def batch_sources(self, batch: int) -> list[int]:
        """The source index (into :attr:`names`) of each row of batch ``batch`` (an id from
        :attr:`last_batch`, among the last ``reward_window`` drawn), in the batch's order."""
        return list(self._record(batch).sources)

    def batch_augmentations(self, batch: int) -> list[int] | None:
        """The augmentation op (an index into the transform's ``op_names``; -1: none, as in a
        reference batch) drawn for each row of batch ``batch``, in the batch's order; ``None``
        for a sampler without a transform."""
        aug = self._record(batch).aug
        return None if aug is None else list(aug.ops)

    def _record(self, batch: int) -> Record:
        """The record of batch ``batch``, one of the last ``reward_window`` drawn."""
        check_batch_id(batch)
        rec = self._records.get(batch)
        if rec is None:
            raise ValueError(
                f"batch={batch} is not among the last reward_window={self.reward_window} batches "
                "drawn"
            )
        return rec

    @property
    def last_batch(self) -> int:
        """Id of the batch the training loop received most recently (for ``update(batch=)``)."""
        return self._received().id

    def _lookup(self, batch: int) -> Record:
        check_batch_id(batch)
        if batch < 0 or batch >= self._drawer.next_id:
            raise ValueError(
                f"batch={batch} has not been drawn; ids so far are 0..{self._drawer.next_id - 1}"
            )
        rec = self._records.get(batch)
        if rec is None:
            raise ValueError(
                f"batch={batch} is older than the last reward_window={self.reward_window} batches "
                "(or was drawn before the checkpoint and already rewarded); its keys are gone"
            )
        self._passes.check_delivered(batch, rec.lost)
        return rec

    def update(
        self,
        rewards: Tensor,
        batch: int | None = None,
        rows: Sequence[int] | Tensor | None = None,
        weight: float = 1.0,
    ) -> None:
        """Learn from the rewards of one batch, or of some of its rows.

        Args:
            rewards: floating Tensor ``[batch_size]`` (any device; copied to the CPU), one per
                example, in the order of the batch (with ``rows``: ``[len(rows)]``, one per
                row given). NaN/inf entries are dropped and counted
                (``metrics()["nonfinite_rewards"]``).
            batch: the batch they belong to, an id from :attr:`last_batch`; default: the
                batch the training loop received most recently.
            rows: the positions in the batch that ``rewards`` belong to (distinct, in
                ``[0, batch_size)``); default: every row. The update then learns from those
                rows alone, as from a batch of ``len(rows)`` examples: rows chosen uniformly
                at random give the full update in expectation (the per-choice statistics are
                means over the rows given), though ``normalize="batch"`` then standardises by
                the rows' own mean and spread.
            weight: how many updates this one stands for (a finite number > 0): the policy's
                step is ``lr * weight``, each logit's change still capped at ``max_step``.
                :class:`GAR` passes the steps since its previous rewarded batch when its
                budget rewards one batch in several, so that the mixture moves as fast as
                when every batch is rewarded.

        Raises if the batch cannot be matched (none received yet, not delivered, too old,
        already rewarded) or the rewards have the wrong type, dtype, shape or device.
        Cost: O(batch_size + K), one device-to-host copy.

        Under ``torch.distributed`` the update is collective: every rank calls it once per
        update, with its own batch's rewards; the per-choice reward statistics are summed over
        the ranks (one all-reduce of ``O(K)`` floats) and every rank makes the same step, so
        the weights stay bit-identical. Ranks that reward different batches get an error (and
        a rank whose update no other rank joins, a timeout error after ``sync_timeout_s``), not
        a hang.
        """
        rec = self._received() if batch is None else self._lookup(batch)
        if rec.rewarded:
            raise ValueError(
                f"batch {rec.id} already received its rewards; each batch is updated at most once"
            )
        check_number("weight", weight, positive=True, what="a finite number > 0")
        picked = None if rows is None else check_rows(rows, len(rec.keys))
        check_rewards(rewards, len(rec.keys) if picked is None else len(picked))
        self._drawer.lagged.check_on_time(rec.id, self._drawer.next_id)
        r = rewards.detach().to("cpu", torch.float64).tolist()  # one device-to-host copy
        update = self._learner.learn(rec, r, picked, float(weight))
        self._drawer.lagged.queue(rec.id, update)
        rec.rewarded = True
        self._refresh_pending()

    # ------------------------------------------------------------------ reading

    @property
    def policy(self) -> CategoricalPolicy:
        """The :class:`CategoricalPolicy` over sources (read it; update through the sampler)."""
        return self._policy

    @property
    def weights(self) -> dict[str, float]:
        """``{source name: probability}`` of the live policy, with every update received so
        far; sums to 1. Batches are drawn from :attr:`drawing_weights` (the policy lag)."""
        return self._policy.weights

    @property
    def drawing_weights(self) -> dict[str, float]:
        """``{source name: probability}`` the next batch will be drawn from: the updates of
        batches up to ``lag`` before it (:attr:`weights` holds every update received)."""
        probs = self._drawer.lagged.peek(self._drawer.next_id)
        return dict(zip(self.names, probs, strict=True))

    @property
    def history(self) -> list[dict[str, Any]]:
        """One entry per update recorded: ``{"batch": id, "weights": {name: probability},
        "rewards": {name: mean raw reward}}`` (NaN for a source absent from the update),
        oldest first; the first entry (``batch=None``) holds the initial weights. At most
        ``history_limit`` entries after it, evenly spread over the run (see ``history_limit=``;
        ``None``: every update, O(updates * K) memory)."""
        return self._learner.history_entries(self.names)

    def metrics(self) -> dict[str, float]:
        """A flat ``{name: number}`` dict, ready for TensorBoard or any logger.

        The policy's counters (``updates``, ``rewards_applied``, ``nonfinite_rewards``,
        ``skipped_updates``, ``entropy``), ``epoch`` (-1 before the first), ``batches_drawn``,
        ``batches_rewarded``, ``batches_dropped_unrewarded`` (left the reward window without
        rewards), ``weight/<source>``, ``reward_mean/<source>`` (running mean of the raw
        finite rewards, momentum 0.9 per update that carries one; NaN before any), and, so a
        mean that a rarely drawn source has not moved for a while is not read as current,
        ``reward_age/<source>`` (updates since the source's last finite reward, 0 when the
        latest carried one) and ``reward_count/<source>`` (its finite rewards); these two
        count from when the sampler was built or its state loaded (NaN and 0 before). With a
        transform, its :meth:`GARTransform.metrics` under ``augment/``. Every key:
        docs/api.md, "Metrics".
        """
        policy = self._policy.metrics()
        m: dict[str, float] = {k: v for k, v in policy.items() if k != "weights"}
        m.update(
            {
                "epoch": -1 if self._passes.epoch is None else self._passes.epoch,
                "batches_drawn": self._drawer.drawn,
                "batches_rewarded": self._learner.rewarded,
                "batches_dropped_unrewarded": self._records.dropped_unrewarded,
            }
        )
        for name, w in policy["weights"].items():
            m[f"weight/{name}"] = w
        for name, v in zip(self.names, self._learner.reward_means, strict=True):
            m[f"reward_mean/{name}"] = v
        for name, age in zip(self.names, self._learner.reward_ages(), strict=True):
            m[f"reward_age/{name}"] = age
        for name, count in zip(self.names, self._learner.reward_counts, strict=True):
            m[f"reward_count/{name}"] = count
        if self.transform is not None:
            for k, v in self.transform.policy.metrics().items():
                m[f"augment/{k}"] = v
        return m

    def decode(self, keys: Sequence[int] | Tensor) -> tuple[Tensor, Tensor]:
        """Source ids and in-source indices of keys (see :meth:`MixtureDataset.decode`)."""
        return self.dataset.decode(keys)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The state to resume from the batch after the last one the training loop received.

        Holds the policy, generator state, per-source positions, the batches already drawn
        but not yet delivered (they are re-yielded first on resume, exactly as drawn) and the
        delivered batches still waiting for rewards. Torch tensors and Python scalars only.
        """
        if self._loaded.live is not None:  # loaded, not yet resumed: it, with any update
            return copy.deepcopy(self._loaded.live)
        return self._state()

    def _state(self, yielded: int | None = None) -> dict[str, Any]:
        position, cut = self._passes.checkpoint_position(self._drawer.next_id)
        window, unrewarded, spent = ckpt.window_state(self._records, cut, self._passes.lost_ids())
        return {
            ckpt.VERSION: ckpt.STATE_VERSION,
            **self._settings(),
            ckpt.POLICY: self._policy.state_dict(),
            ckpt.NEXT_EPOCH: self._passes.next_epoch,
            ckpt.EPOCH: self._passes.epoch,
            ckpt.POSITION: position,
            ckpt.YIELDED: self._passes.pos if yielded is None else yielded,
            **self._drawer.state_dict(),
            ckpt.WINDOW: window,
            ckpt.UNREWARDED: unrewarded,
            ckpt.SPENT: spent,
            ckpt.HISTORY: self._learner.history.state(),
            ckpt.HISTORY_EVERY: self._learner.history.every,
            ckpt.HISTORY_LIMIT: self._learner.history.limit,
            ckpt.REWARD_WINDOW: self._reward_window_setting,
            ckpt.REWARD_MEANS: list(self._learner.reward_means),
            ckpt.REWARDS: self._learner.rewards.state(),
            ckpt.REWARD_COUNTS: list(self._learner.reward_counts),
            ckpt.REWARD_LAST: list(self._learner.reward_last),
            ckpt.COUNTERS: [
                self._drawer.drawn,
                self._learner.rewarded,
                self._records.dropped_unrewarded,
            ],
            ckpt.TRANSFORM: None if self.transform is None else self.transform.state_dict(),
            ckpt.RANK: self.rank,
            ckpt.WORLD_SIZE: self.world_size,
            ckpt.STREAM_FIRST: list(self._iterations.stream_first),
        }

    def _settings(self) -> dict[str, Any]:
        """What a state must share with this sampler to resume it."""
        return {
            ckpt.NAMES: list(self.names),
            ckpt.SIZES: list(self.sizes),
            ckpt.BATCH_SIZE: self.batch_size,
            ckpt.NUM_BATCHES: self.num_batches,
            ckpt.SEED: self.seed,
            ckpt.REFERENCE_EVERY: self.reference_every,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load a :meth:`state_dict`; the next epoch iteration resumes from it exactly.

        The weights are restored at once; the position applies to the next ``iter()``. The
        whole state is checked first, so a refused one leaves the sampler as it was: it
        raises ``ValueError`` naming the field if the state belongs to other sources, sizes,
        batch size, seed, lag, rank or world size, was saved with other settings
        (``reward_window``, ``history_limit``, the policy's ``lr``, ``rule``, ``floor``, ...,
        the transform's; both values named), or has a field of the wrong type, shape or
        range, or one inconsistent with the others (docs/howto-resume.md).
        """
        ckpt.check_state(state, self)
        loaded = copy.deepcopy(dict(state))
        self._apply(loaded)
        self._loaded.add(loaded)
        self._passes.deactivate()

    def _refresh_pending(self) -> None:
        """Between ``load_state_dict()`` and the first batch, a change to the sampler (a
        delayed ``update()`` of a batch from before the checkpoint, ``set_epoch()``) replaces
        the loaded state it holds (:class:`LoadedStates`)."""
        live = self._loaded.live
        if live is not None:
            self._loaded.replace_live(self._state(yielded=int(live[ckpt.YIELDED])))

    def _apply(self, state: Mapping[str, Any]) -> None:
        self._policy.load_state_dict(state[ckpt.POLICY])
        self._passes.set_next_epoch(int(state[ckpt.NEXT_EPOCH]))
        self._passes.resume(state[ckpt.EPOCH], int(state[ckpt.POSITION]), ckpt.undelivered(state))
        drawn, rewarded, dropped = (int(v) for v in state[ckpt.COUNTERS])
        self._learner.load(
            state[ckpt.HISTORY],
            state.get(ckpt.HISTORY_EVERY),
            state[ckpt.REWARD_MEANS],
            rewarded,
            state.get(ckpt.REWARDS),
            state.get(ckpt.REWARD_COUNTS),
            state.get(ckpt.REWARD_LAST),
        )
        # The reward window as it was, oldest first: the batches that can still be rewarded
        # with their keys, the rewarded and lost ones as placeholders (same eviction order).
        self._records.restore(ckpt.window_records(state), dropped)
        tf = self.transform
        if tf is not None:
            tf.load_state_dict(state[ckpt.TRANSFORM])
        self._drawer.load_state_dict(state, drawn, self._policy, None if tf is None else tf.policy)
        self._passes.forget_iterations()
        # The streams read by batches the loop received before the checkpoint.
        window = state[ckpt.WINDOW]
        cut = int(window[0]["id"]) if window else int(state[ckpt.NEXT_ID])
        self._iterations.load_stream_first(state.get(ckpt.STREAM_FIRST), cut)
