"""``nn.Embedding``: a row lookup, ``y_t = W[idx_t]``.

The dot: the lookup of ``D``'s rows (the padding row gets no gradient; with
``scale_grad_by_freq`` each row's batch gradient is divided by its count in the batch, which
mixes the examples). The norms: rows hit by the same index add up, so example i's squared norm
is ``sum over positions t, s with idx_t = idx_s of <G_t, G_s>``.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._base import Direction, GhostRule, Pieces, Request, Sums, param_direction
from ._registry import register_ghost_rule

__all__ = ["EmbeddingRule"]


@register_ghost_rule(nn.Embedding)
class EmbeddingRule(GhostRule):
    """``nn.Embedding`` (``max_norm`` refused: it rewrites the weight during the forward)."""

    family = (nn.Embedding,)

    def check(self, name: str, module: nn.Module) -> None:
        max_norm = cast(nn.Embedding, module).max_norm
        if max_norm is not None:
            raise ValueError(
                f"module {name!r} is an Embedding with max_norm={max_norm}, which rewrites "
                "its weight in place during forward; the probe never edits the model"
            )

    def tangent(self, module: nn.Module, args: tuple, kwargs: dict, direction: Direction) -> Any:
        emb = cast(nn.Embedding, module)
        idx = args[0]
        out = F.embedding(idx, cast(Tensor, param_direction(emb, "weight", direction)))
        if emb.padding_idx is not None:
            # the padding row receives no gradient
            out = out.masked_fill((idx == emb.padding_idx).unsqueeze(-1), 0.0)
        if emb.scale_grad_by_freq:
            # the batch gradient of each row is divided by its count in the batch
            counts = torch.bincount(idx.reshape(-1), minlength=emb.num_embeddings)
            out = out / counts[idx].unsqueeze(-1).to(out.dtype)
        return out

    def moves_batch(self, module: nn.Module, dim: int, ndim: int) -> bool:
        return True  # a lookup acts on every position alike

    def batch_pieces(self, module: nn.Module, x: Tensor, b: Tensor, ask: Request) -> Pieces:
        emb = cast(nn.Embedding, module)
        n = b.shape[0]
        out = Sums(n, b.device, ask)
        if "weight" not in ask.names:
            return out.result()
        idx = x.reshape(n, -1)
        g = b.reshape(n, idx.shape[1], -1).float()
        if emb.padding_idx is not None:
            g = g.masked_fill((idx == emb.padding_idx).unsqueeze(-1), 0.0)
        if emb.scale_grad_by_freq:
            counts = torch.bincount(x.reshape(-1), minlength=emb.num_embeddings)
            g = g / counts[idx].unsqueeze(-1).float()
        if "weight" in ask.keep:  # the per-example gradient itself, [N, num_embeddings, dim]
            rows = torch.arange(n, device=idx.device).unsqueeze(1).expand_as(idx)
            full = g.new_zeros(n, emb.num_embeddings, g.shape[2])
            out.add("weight", full.index_put_((rows, idx), g, accumulate=True))
            return out.result()
        # rows hit by the same index add up: sum over positions t, s with idx_t == idx_s of
        # <g_t, g_s>
        same = (idx.unsqueeze(2) == idx.unsqueeze(1)).float()
        out.sq += (same * (g @ g.transpose(1, 2))).flatten(1).sum(1)
        if out.dot is not None:  # sum over positions t of <g_t, D[idx_t]>
            out.dot += (g * F.embedding(idx, out.d("weight"))).flatten(1).sum(1)
        return out.result()

    def rows_independent(self, module: nn.Module, args: tuple, kwargs: dict) -> bool:
        return not cast(nn.Embedding, module).scale_grad_by_freq

    def mixes_examples(self, module: nn.Module) -> bool:
        return bool(cast(nn.Embedding, module).scale_grad_by_freq)
