"""MixtureDataset: the map-style dataset a GARSampler hands to the DataLoader.

Keys name (source, index) pairs in the layout of ``ConcatDataset``; with a GARTransform a key
is a :class:`Decision` that also carries the augmentation to apply. Holds no random state and
no policy: the sampler decides everything in the main process, the workers only fetch.
"""

from __future__ import annotations

import bisect
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..policy._categorical import check_unique_names
from ._streams import StreamReaders, is_stream
from ._structure import difference, leaf_shapes, structure

if TYPE_CHECKING:
    from ..augment._transform import GARTransform

__all__ = [
    "Decision",
    "KeyBatch",
    "MixtureDataset",
    "StreamingMixtureDataset",
    "resolve_sources",
]


class Decision(NamedTuple):
    """A key with the augmentation decision of its example: what a GARSampler with a
    transform hands the DataLoader, one per example (a tuple: it pickles as one)."""

    key: int  # the example's key in the MixtureDataset
    op: int  # op id in the transform's table, or NO_AUGMENTATION
    bin: int  # magnitude bin
    negate: bool  # the signed magnitude's sign
    seed: int  # for torch's default generator while the example is fetched


# ---------------------------------------------------------------------- sources


def resolve_sources(sources: Any, names: Sequence[str] | None) -> tuple[list[str], list[Any]]:
    if isinstance(sources, Mapping):  # includes datasets.DatasetDict (a dict subclass)
        check_unique_names(list(sources), "source names")  # {1: a, "1": b} would lose one
        items = [(str(k), v) for k, v in sources.items()]
    elif isinstance(sources, list | tuple):
        items = [(str(i), v) for i, v in enumerate(sources)]
    elif is_stream(sources) or (hasattr(sources, "__getitem__") and hasattr(sources, "__len__")):
        items = [("0", sources)]  # one dataset: a single source named "0"
    else:
        raise TypeError(
            "sources should be a map-style dataset, a dict name -> dataset, a list of datasets, "
            "a datasets.DatasetDict, a stream (an IterableDataset) or an IterableDatasetDict, "
            f"but got {type(sources).__name__}"
        )
    if not items:
        raise ValueError("sources should hold at least one dataset, but got none")
    if names is None and isinstance(sources, Mapping) and len(items) > 1:
        held_out = [n for n, _ in items if _looks_held_out(n)]
        if held_out:
            warnings.warn(
                f"the sources include the split(s) {held_out}, whose names say they are held "
                "out (validation, test or target data): without names= every split of the "
                "dict is a training source. Pass names=[...] with the training splits only "
                "(and give a held-out split to ReferenceBatches)",
                UserWarning,
                stacklevel=3,
            )
    if names is not None:
        if isinstance(names, str) or not isinstance(names, Sequence) or not names:
            raise ValueError(
                f"names should be a non-empty list of source names, but got names={names!r}"
            )
        available = dict(items)
        unknown = [n for n in names if str(n) not in available]
        if unknown:
            raise ValueError(f"unknown source name(s) {unknown}; the sources are {list(available)}")
        if len(set(map(str, names))) != len(names):
            raise ValueError(f"names should not repeat a source, but got names={list(names)}")
        items = [(str(n), available[str(n)]) for n in names]
    for name, src in items:
        if is_stream(src):
            continue  # a stream: read in the workers (its emptiness shows there)
        if not (hasattr(src, "__getitem__") and hasattr(src, "__len__")):
            raise TypeError(
                f"source {name!r} is not a map-style dataset: {type(src).__name__} lacks "
                "__getitem__ or __len__"
            )
        if len(src) == 0:
            raise ValueError(f"source {name!r} is empty (len 0)")
    return [n for n, _ in items], [s for _, s in items]


# Split names that say the data is held out (Hugging Face's and common spellings).
_HELD_OUT = ("validation", "valid", "val", "dev", "test", "eval", "target", "heldout", "holdout")


def _looks_held_out(name: str) -> bool:
    """Whether a split name reads as held out: one of :data:`_HELD_OUT`, alone or as a word
    of the name (``"test_clean"``, ``"en-validation"``)."""
    words = re.split(r"[^a-z]+", name.lower())
    return any(w in _HELD_OUT for w in words) or name.lower().replace("_", "") in _HELD_OUT


class MixtureDataset(Dataset):
    """The map-style dataset a :class:`GARSampler` hands to the DataLoader (``sampler.dataset``).

    Key ``k`` names example ``k - offsets[s]`` of source ``s``, where ``offsets`` are the
    cumulative source sizes (the layout of ``ConcatDataset``). Examples come back exactly as
    the source returns them. ``__getitems__`` groups a batch of keys by source and calls each
    source's own ``__getitems__`` where it has one (Hugging Face datasets, ``Subset``), so a
    batch costs one call per source present in it. Holds no random state: safe in workers.

    With a ``transform`` (a :class:`GARTransform`), the sampler's keys are decisions,
    ``(key, op, bin, negate, seed)`` tuples. For each, the dataset arms the transform with
    ``(op, bin, negate)``, seeds torch's default generator with ``seed`` (so the pipeline's
    other random transforms, crop and flip, draw the same numbers in any worker), fetches the
    example with ``source[index]`` (one at a time, so that each gets its own decision), checks
    that the transform was called, and restores the generator's state after the batch. Plain
    int keys fetch without a decision (the transform then samples by itself).

    The first example fetched from each source (in each process) is compared with the first
    one of the other sources: containers, keys, leaf types and tensor dtypes and dims must
    match, or a ``TypeError`` names the source and the place that differs (collate would
    fail there without naming a source, or promote a long label to float silently). Sizes are
    not compared (a padding ``collate_fn`` takes any). After every source was seen once, this
    costs one test per batch.

    A :class:`GARSampler` with stream sources hands out a subclass of this dataset: each stream
    holds one key, ``offsets[s]``, which means "the next example of stream ``s``" (its size in
    :attr:`sizes` is ``None``); see docs/howto-mixture.md, "Streaming sources".
    """

    def __init__(
        self,
        sources: Sequence[Any],
        names: Sequence[str],
        transform: GARTransform | None = None,
    ) -> None:
        self.sources = list(sources)
        self.names = list(names)
        self.transform = transform
        self.sizes: list[int | None] = [None if is_stream(s) else len(s) for s in self.sources]
        if type(self) is MixtureDataset and None in self.sizes:
            stream = self.names[self.sizes.index(None)]
            raise TypeError(
                f"source {stream!r} is a stream: a mixture with stream sources is built by "
                "GARSampler(..., num_batches=...), whose .dataset reads them"
            )
        self.offsets = [0]
        for n in self.sizes:  # a stream holds one key
            self.offsets.append(self.offsets[-1] + (1 if n is None else n))
        self._batched = [
            n is not None and bool(getattr(s, "__getitems__", None))
            for s, n in zip(self.sources, self.sizes, strict=True)
        ]
        self._any_batched = any(self._batched)
        self._unchecked = set(range(len(self.sources)))  # sources whose structure is unseen
        # Set by GARSampler.track when the loader collates with torch's default_collate:
        # each batch's shapes are then checked, naming the sources (collate would not).
        self.default_collate = False
        self._unsized = set(range(len(self.sources)))  # sources whose shapes are unchecked
        self._shapes: tuple[int, Any] | None = None  # (source, leaf shapes) of the first seen
        self._structure: tuple[int, Any] | None = None  # (source, structure) of the first seen

    def _check_structure(self, ids: Sequence[int], items: Sequence[Any]) -> None:
        """Compare the first example of each source not seen yet with the first source's."""
        for s, item in zip(ids, items, strict=True):
            if s not in self._unchecked:
                continue
            found = structure(item)
            if self._structure is None:
                self._structure = (s, found)
            else:
                ref, ref_structure = self._structure
                # the later source in the sampler's order is named as the one that differs
                pair = sorted([(ref, ref_structure), (s, found)], key=lambda p: p[0])
                diff = difference(pair[0][1], pair[1][1])
                if diff is not None:
                    where, theirs, ours = diff
                    first, later = self.names[pair[0][0]], self.names[pair[1][0]]
                    raise TypeError(
                        f"source {later!r} returns examples that cannot share a batch with "
                        f"source {first!r}'s: at {where} it has {theirs}, where source "
                        f"{first!r} has {ours}. Make every source return the same structure, "
                        "types and dtypes (collate would fail, or promote one source's labels "
                        "to the other's dtype silently)"
                    )
            self._unchecked.discard(s)
            if not self._unchecked:
                return

    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, key: int) -> tuple[int, int]:
        """``(source id, index in that source)`` of one key; raises if out of range."""
        if isinstance(key, bool) or not isinstance(key, int):
            key = int(key)
        if not 0 <= key < self.offsets[-1]:
            raise IndexError(f"key should lie in [0, {self.offsets[-1]}), but got key={key}")
        s = bisect.bisect_right(self.offsets, key) - 1
        return s, key - self.offsets[s]

    def decode(self, keys: Sequence[int] | Tensor) -> tuple[Tensor, Tensor]:
        """Source ids and in-source indices of a batch of keys: two int64 Tensors ``[N]``.

        Decision keys ``(key, op, bin, negate, seed)`` (a sampler with a transform) decode by
        their key."""
        if len(keys) and isinstance(keys[0], tuple):
            keys = [k[0] for k in keys]
        k = torch.as_tensor(keys, dtype=torch.long).flatten()
        if k.numel() and (int(k.min()) < 0 or int(k.max()) >= self.offsets[-1]):
            raise IndexError(
                f"keys should lie in [0, {self.offsets[-1]}), but got values in "
                f"[{int(k.min())}, {int(k.max())}]"
            )
        offsets = torch.tensor(self.offsets, dtype=torch.long)
        s = torch.searchsorted(offsets, k, right=True) - 1
        return s, k - offsets[s]

    def __getitem__(self, key: int) -> Any:
        if isinstance(key, tuple):
            return self._fetch_decided([key])[0]
        s, i = self.locate(key)
        item = self.sources[s][i]
        if self._unchecked:
            self._check_structure((s,), (item,))
        return item

    def _fetch_decided(self, keys: Sequence[Any]) -> list[Any]:
        """Fetch examples whose keys carry augmentation decisions (see the class docstring)."""
        tf = self.transform
        if tf is None:
            raise TypeError(
                "decision keys (key, op, bin, negate, seed) need a dataset with a transform, "
                "but this MixtureDataset has none"
            )
        out, ids = [], []
        rng = torch.get_rng_state()
        try:
            for k in keys:
                if not (isinstance(k, tuple) and len(k) == 5):
                    raise TypeError(
                        f"keys should all be decisions (key, op, bin, negate, seed), but got {k!r}"
                    )
                key, op, bin, negate, seed = k  # a Decision, or a plain tuple of its fields
                s, i = self.locate(key)
                torch.default_generator.manual_seed(seed)
                tf.arm(op, bin, negate)
                item = self.sources[s][i]
                tf.disarm(f"example {i} of source {self.names[s]!r}")
                out.append(item)
                ids.append(s)
        finally:
            tf.disarm()
            torch.set_rng_state(rng)
        if self._unchecked:
            self._check_structure(ids, out)
        return out

    def __getitems__(self, keys: Sequence[int]) -> list[Any]:
        out = self._getitems(keys)
        if self.default_collate and self._unsized and out:
            self._check_collatable(keys, out)
        return out

    def _check_collatable(self, keys: Sequence[Any], out: list[Any]) -> None:
        """With torch's default collate: the first example of each source not seen yet has
        the first source's tensor shapes and no Python list of numbers (collated position by
        position), or a ``TypeError`` names the sources, the place and the shapes (torch's
        collate names no source). Once every source was seen, nothing is checked."""
        sources = MixtureDataset.decode(self, keys)[0].tolist()
        for s, item in zip(sources, out, strict=True):
            if s not in self._unsized:
                continue
            shapes = leaf_shapes(item)
            lists = [where for where, shape in shapes if shape is None]
            if lists:
                raise TypeError(
                    f"source {self.names[s]!r} gives {lists[0]} as a Python list, which the "
                    "DataLoader's default collate batches position by position (a list of "
                    "tensors, one per position), not into one tensor: a Hugging Face split "
                    "needs .with_format('torch', columns=[...]), or give the DataLoader a "
                    "collate_fn"
                )
            if self._shapes is None:
                self._shapes = (s, shapes)
            elif shapes != self._shapes[1]:
                first, ref = self._shapes
                where, a, b = next(
                    (
                        (w, sa, sb)
                        for (w, sa), (_, sb) in zip(ref, shapes, strict=False)
                        if sa != sb
                    ),
                    ("its tensors", len(ref), len(shapes)),
                )
                raise TypeError(
                    f"source {self.names[s]!r} gives {where} of shape {b} where source "
                    f"{self.names[first]!r} gives {a}: the DataLoader's default collate stacks "
                    "them and fails. Pad or cut them to one length in each source, or give "
                    "the DataLoader a padding collate_fn"
                )
            self._unsized.discard(s)

    def _getitems(self, keys: Sequence[int]) -> list[Any]:
        if not keys:
            return []
        if isinstance(keys[0], tuple):
            return self._fetch_decided(keys)
        offsets, total, sources = self.offsets, self.offsets[-1], self.sources
        lo, hi = min(keys), max(keys)
        if lo < 0 or hi >= total:
            bad = lo if lo < 0 else hi
            raise IndexError(f"key should lie in [0, {total}), but got key={bad}")
        ids = getattr(keys, "sources", None)  # a KeyBatch from the sampler knows them
        if ids is None or len(ids) != len(keys):
            bisect_right = bisect.bisect_right
            ids = [bisect_right(offsets, key) - 1 for key in keys]
        if not self._any_batched:  # the common in-memory case: one comprehension
            out = [sources[s][key - offsets[s]] for s, key in zip(ids, keys, strict=True)]
            if self._unchecked:
                self._check_structure(ids, out)
            return out
        return self._fetch_grouped(ids, keys)

    def _fetch_grouped(
        self,
        ids: Sequence[int],
        keys: Sequence[int],
        read: Callable[[int], Any] | None = None,
        streams: Sequence[bool] = (),
    ) -> list[Any]:
        """Fetch keys of the sources ``ids``: one ``__getitems__`` call per source that has one,
        ``read(s)`` (the next example) for the sources flagged in ``streams``, in slot order."""
        offsets, sources = self.offsets, self.sources
        out: list[Any] = [None] * len(keys)
        grouped: dict[int, tuple[list[int], list[int]]] = {}
        for pos, (s, key) in enumerate(zip(ids, keys, strict=True)):
            if read is not None and streams[s]:
                out[pos] = read(s)
            elif self._batched[s]:
                group = grouped.setdefault(s, ([], []))
                group[0].append(pos)
                group[1].append(key - offsets[s])
            else:
                out[pos] = sources[s][key - offsets[s]]
        for s, (positions, idx) in grouped.items():
            items = sources[s].__getitems__(idx)
            if len(items) != len(idx):
                raise RuntimeError(
                    f"source {self.names[s]!r}.__getitems__ returned {len(items)} examples for "
                    f"{len(idx)} indices"
                )
            for pos, item in zip(positions, items, strict=True):
                out[pos] = item
        if self._unchecked:
            self._check_structure(ids, out)
        return out


class StreamingMixtureDataset(MixtureDataset):
    """The :class:`MixtureDataset` of a sampler with stream sources.

    A stream's key (``offsets[s]``, its only one) means "the next example of stream ``s``":
    the process that fetches the batch reads it from its own shard (see ``_streams``), the
    slots of one stream in slot order. Follows torchdata's ``Stateful`` protocol: its state is
    this process's place in every stream, which ``StatefulDataLoader`` collects from each
    worker and restores into it.
    """

    def __init__(self, sources: Sequence[Any], names: Sequence[str], readers: StreamReaders):
        super().__init__(sources, names, None)
        self.streams = readers
        self._stream = [n is None for n in self.sizes]

    def locate(self, key: int) -> tuple[int, int]:
        """``(source id, index in that source)``; the index of a stream's key is -1."""
        s, i = super().locate(key)
        return (s, -1) if self._stream[s] else (s, i)

    def decode(self, keys: Sequence[int] | Tensor) -> tuple[Tensor, Tensor]:
        """Source ids and in-source indices (-1 for a stream's slots, whose example only the
        process that reads it knows)."""
        s, i = super().decode(keys)
        return s, torch.where(torch.tensor(self._stream, dtype=torch.bool)[s], -1, i)

    def __getitem__(self, key: int) -> Any:
        if isinstance(key, tuple):
            return self._fetch_decided([key])  # raises: no transform with streams
        s, i = self.locate(key)
        item = self.streams.next(s) if self._stream[s] else self.sources[s][i]
        if self._unchecked:
            self._check_structure((s,), (item,))
        return item

    def _getitems(self, keys: Sequence[int]) -> list[Any]:
        if not keys:
            return []
        if isinstance(keys[0], tuple):
            return self._fetch_decided(keys)  # raises: no transform with streams
        ids = getattr(keys, "sources", None)
        if ids is None or len(ids) != len(keys):
            ids, _ = MixtureDataset.decode(self, keys)  # checks the range
            ids = ids.tolist()
        return self._fetch_grouped(ids, keys, self.streams.next, self._stream)

    def state_dict(self) -> dict[str, Any]:
        """This process's place in every stream (torchdata's ``Stateful`` protocol)."""
        return self.streams.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore this process's place in the streams, from :meth:`state_dict`."""
        self.streams.load_state_dict(state)


# ---------------------------------------------------------------------- batches and iterators


class KeyBatch(list):
    """A batch of keys as the DataLoader receives it from the sampler: a list of ints that
    also carries each key's source id, so that ``MixtureDataset.__getitems__`` need not search
    the offsets for it (it does for any other list). Pickles as itself into workers."""

    def __init__(self, keys: Sequence[int], sources: list[int]) -> None:
        super().__init__(keys)
        self.sources = sources  # the record's own list, never modified: no copy per batch
