"""``nn.MultiheadAttention``, packed or separate projections, with its masks.

The dot has a closed form (about three attention forwards, below); the norms come from one
backward through the recomputed attention, which gives the gradients at the q, k, v
projections and at ``out_proj``'s input, each projection then a Linear layer. The rule covers
the children's parameters (``out_proj``'s forward never runs). Configurations the closed forms
do not cover (``bias_k``/``bias_v``, ``add_zero_attn``, attention dropout in train mode,
unbatched inputs) use a forward-mode JVP of the module and the generic norms.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Collection, Mapping
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._base import Direction, GhostRule, Pieces, Request, Site, Sums
from ._registry import register_ghost_rule
from .generic import jvp_tangent
from .linear import linear_pieces

__all__ = ["MultiheadAttentionRule", "attention_call", "attention_pieces", "attention_tangent"]


_MHA_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def _additive_mask(mask: Tensor | None, like: Tensor) -> Tensor | None:
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill_(
            mask, float("-inf")
        )
    return mask.to(like.dtype)


@dataclasses.dataclass
class _Attention:
    """One ``nn.MultiheadAttention`` call in batch-first form, for the closed-form rules."""

    mha: nn.MultiheadAttention
    query: Tensor  # [N, T, E]
    key: Tensor  # [N, S, kdim]
    value: Tensor  # [N, S, vdim]
    attn_mask: Tensor | None
    key_padding_mask: Tensor | None
    need_weights: bool
    average_attn_weights: bool
    dropout: float  # attention dropout of this call (0 in eval mode)
    call: tuple[tuple, dict]  # the module's own arguments, to run it again

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """``(N, T, S, heads, head_dim)``."""
        n, tgt, embed = self.query.shape
        heads = self.mha.num_heads
        return n, tgt, self.key.shape[1], heads, embed // heads

    def projection_names(self) -> tuple[tuple[str, slice], ...]:
        """For q, k, v: the parameter holding the weight and the rows of it that are theirs."""
        if self.mha._qkv_same_embed_dim:
            e = self.mha.embed_dim
            return tuple(("in_proj_weight", slice(j * e, (j + 1) * e)) for j in range(3))
        return tuple(
            (nm, slice(None)) for nm in ("q_proj_weight", "k_proj_weight", "v_proj_weight")
        )

    def probabilities(self, q: Tensor, k: Tensor) -> Tensor:
        """``softmax(q k^T / sqrt(h) + masks)``, ``[N, H, T, S]``, from heads-first q and k."""
        n, tgt, src, heads, head_dim = self.shape
        scores = (q @ k.transpose(-2, -1)) * head_dim**-0.5
        mask = _additive_mask(self.attn_mask, scores)
        if mask is not None:
            scores = scores + (mask.view(n, heads, tgt, src) if mask.dim() == 3 else mask)
        padding = _additive_mask(self.key_padding_mask, scores)
        if padding is not None:
            scores = scores + padding.view(n, 1, 1, src)
        return torch.softmax(scores, dim=-1)

    def heads_first(self, t: Tensor) -> Tensor:  # [N, L, E] -> [N, H, L, h]
        n, _, _, heads, head_dim = self.shape
        return t.view(n, t.shape[1], heads, head_dim).transpose(1, 2)

    def merge_heads(self, t: Tensor) -> Tensor:  # [N, H, T, h] -> [N, T, E]
        n, tgt = t.shape[0], t.shape[2]
        return t.transpose(1, 2).reshape(n, tgt, self.mha.embed_dim)

    def layout(self, out: Tensor) -> Tensor:
        """The attention output in the module's own layout."""
        return out if self.mha.batch_first else out.transpose(0, 1)

    def dropout_mask(self, p: Tensor) -> Tensor | None:
        """The attention dropout the call applied, ``keep / (1 - dropout)`` shaped like the
        probabilities ``p`` (None without dropout): drawn again from the global RNG, which
        the engine has set back to the call's state. It must be the first draw of the rule,
        as the dropout was the call's first."""
        if not self.dropout:
            return None
        keep = 1.0 - self.dropout
        return torch.empty_like(p).bernoulli_(keep).div_(keep)

    def own_output(self) -> Tensor | None:
        """The module's own output for this call, run again with the RNG state it started
        from (left as it was afterwards), where whether a redrawn dropout mask is the call's
        is not known yet for this kind of call; else None."""
        if not self.dropout or _REDRAWN.get(self._kind()) is not None:
            return None
        device = self.query.device
        devices = [device.index or 0] if device.type == "cuda" else []
        args, kwargs = self.call
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            return cast(Tensor, self.mha(*args, **kwargs)[0])

    def mask_is_the_calls(self, own: Tensor | None, out: Tensor) -> bool:
        """Whether the closed form with the redrawn mask gives the module's own output
        ``out`` (checked once per kind of call: the kernel, and so its draws, follow the
        device, dtype, shapes and masks)."""
        kind = self._kind()
        if own is not None:
            _REDRAWN[kind] = bool(torch.allclose(own, out, rtol=1e-4, atol=1e-5))
        return bool(_REDRAWN.get(kind, True))

    def _kind(self) -> tuple[Any, ...]:
        masks = (self.attn_mask is None, self.key_padding_mask is None)
        return (self.query.device.type, self.query.dtype, self.shape, self.need_weights, masks)


# Kinds of attention call with dropout -> whether the redrawn mask is the call's own.
_REDRAWN: dict[tuple[Any, ...], bool] = {}


def attention_call(module: nn.Module, args: tuple, kwargs: dict) -> _Attention | None:
    """The call in batch-first form, or None for what the closed forms do not cover
    (``bias_k``/``bias_v``, ``add_zero_attn``, unbatched inputs): those use a forward-mode JVP
    (tangents) or the generic norm rule."""
    mha = cast(nn.MultiheadAttention, module)
    call = _MHA_SIGNATURE.bind(mha, *args, **kwargs)
    call.apply_defaults()
    a = call.arguments
    query, key, value = a["query"], a["key"], a["value"]
    if mha.bias_k is not None or mha.add_zero_attn or query.dim() != 3:
        return None
    if not mha.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    mask = a["attn_mask"]
    if a["is_causal"] and a["key_padding_mask"] is None and not a["need_weights"]:
        # As F.multi_head_attention_forward does: the hint replaces attn_mask by SDPA's causal
        # mask (top-left aligned).
        tgt, src = query.shape[1], key.shape[1]
        mask = torch.ones(tgt, src, dtype=torch.bool, device=query.device).triu(1)
    return _Attention(
        mha,
        query,
        key,
        value,
        mask,
        a["key_padding_mask"],
        bool(a["need_weights"]),
        bool(a["average_attn_weights"]),
        float(mha.dropout) if mha.training else 0.0,
        (args, kwargs),
    )


def attention_tangent(
    module: nn.Module, args: tuple, kwargs: dict, direction: Mapping[str, Tensor]
) -> Any:
    """Closed-form directional derivative of attention along the projections' directions.

    With ``q, k, v`` the projections, ``P = softmax(q k^T / sqrt(h) + mask)`` and
    ``O = P v``: ``S' = (q' k^T + q k'^T) / sqrt(h)``, ``P' = P * (S' - sum(P * S'))``,
    ``O' = P' v + P v'`` and ``out' = O D_out^T + d_out + O' W_out^T``. About three attention
    forwards. With attention dropout, ``P`` is the dropped probabilities (the call's mask,
    drawn again). Configurations it does not cover (``bias_k``/``bias_v``, ``add_zero_attn``,
    unbatched inputs, a dropout mask that cannot be drawn again) use a forward-mode JVP of the
    module.
    """
    att = attention_call(module, args, kwargs)
    if att is None:
        return jvp_tangent(module, args, kwargs, direction)
    own = att.own_output()  # the RNG left at the call's state: the mask is drawn next
    mha = att.mha

    def tangent(name: str) -> Tensor:
        d = direction.get(name)
        return torch.zeros_like(cast(Tensor, mha.get_parameter(name))) if d is None else d

    biases: tuple[Tensor | None, ...] = (None, None, None)
    d_biases: tuple[Tensor | None, ...] = (None, None, None)
    if mha.in_proj_bias is not None:
        biases, d_biases = mha.in_proj_bias.chunk(3), tangent("in_proj_bias").chunk(3)
    proj, d_proj = [], []
    for x, (name, rows), b, db in zip(
        (att.query, att.key, att.value), att.projection_names(), biases, d_biases, strict=True
    ):
        w, dw = cast(Tensor, mha.get_parameter(name))[rows], tangent(name)[rows]
        proj.append(att.heads_first(F.linear(x, w, b)))
        d_proj.append(att.heads_first(F.linear(x, dw, db)))
    q, k, v = proj
    dq, dk, dv = d_proj
    p = att.probabilities(q, k)
    scale = att.shape[4] ** -0.5
    d_scores = (dq @ k.transpose(-2, -1) + q @ dk.transpose(-2, -1)) * scale
    d_p = p * (d_scores - (p * d_scores).sum(-1, keepdim=True))
    mask = att.dropout_mask(p)
    if mask is not None:
        p, d_p = p * mask, d_p * mask
    out = att.merge_heads(p @ v)
    out_proj = mha.out_proj
    if not att.mask_is_the_calls(own, att.layout(out_proj(out)) if own is not None else out):
        return jvp_tangent(module, args, kwargs, direction)
    d_out = att.merge_heads(d_p @ v + p @ dv)
    d_bias = None if out_proj.bias is None else tangent("out_proj.bias")
    result = F.linear(out, tangent("out_proj.weight"), d_bias) + F.linear(d_out, out_proj.weight)
    result = att.layout(result)
    if not att.need_weights:
        return (result, None)
    return (result, d_p.mean(1) if att.average_attn_weights else d_p)


def attention_pieces(
    module: nn.Module,
    args: tuple,
    kwargs: dict,
    grads: Mapping[int, Tensor],
    names: Collection[str],
    direction: Mapping[str, Tensor] | None,
    keep: Collection[str],
) -> Pieces | None:
    """Per-example squared gradient norms (and dots with ``direction``) of an
    ``nn.MultiheadAttention`` call, from the gradients at its outputs (``grads``: output index
    -> gradient). One backward through the recomputed attention gives the gradients at the
    q, k, v projections and at ``out_proj``'s input, all per example; each projection is then a
    Linear layer (its norm rule). None where the closed form does not apply."""
    att = attention_call(module, args, kwargs)
    if att is None:
        return None
    own = att.own_output()  # the RNG left at the call's state: the mask is drawn next
    mha = att.mha
    with torch.enable_grad():
        projections = []
        biases = (None, None, None) if mha.in_proj_bias is None else mha.in_proj_bias.chunk(3)
        for x, (name, rows), b in zip(
            (att.query, att.key, att.value), att.projection_names(), biases, strict=True
        ):
            w = cast(Tensor, mha.get_parameter(name))[rows]
            projections.append(F.linear(x, w.detach(), None if b is None else b.detach()))
        projections = [t.detach().requires_grad_() for t in projections]
        q, k, v = (att.heads_first(t) for t in projections)
        p = att.probabilities(q, k)
        mask = att.dropout_mask(p)
        if mask is not None:
            p = p * mask
        attended = att.merge_heads(p @ v)
        out_proj = mha.out_proj
        bias = None if out_proj.bias is None else out_proj.bias.detach()
        outputs = [att.layout(F.linear(attended, out_proj.weight.detach(), bias))]
        if not att.mask_is_the_calls(own, outputs[0].detach()):
            return None
        if att.need_weights:
            outputs.append(p.mean(1) if att.average_attn_weights else p)
        pairs = [(outputs[i], g) for i, g in grads.items() if i < len(outputs)]
        found = torch.autograd.grad(
            [o for o, _ in pairs], projections, [g for _, g in pairs], allow_unused=True
        )
    got = [torch.zeros_like(t) if g is None else g for t, g in zip(projections, found, strict=True)]
    # out_proj: its input is the attention's output, its output gradient B (batch-first)
    b_out = grads[0] if 0 in grads else torch.zeros_like(attended)
    b_out = att.layout(b_out)
    n = att.query.shape[0]
    total = Sums(n, att.query.device, Request(names, direction, keep))
    pieces: dict[str, list[Tensor]] = {}

    def add(sub: Mapping[str, str], x: Tensor, b: Tensor, dir_rows: Mapping[str, slice]) -> None:
        """The Linear rule for one projection: ``sub`` maps its local weight/bias names to the
        module's parameter names, ``dir_rows`` to the rows of those parameters that are its."""
        local = {k: v for k, v in sub.items() if v in names}
        d = None
        if direction is not None:
            d = {k: direction[v][dir_rows[k]] for k, v in local.items()}
        kept_local = [k for k, v in local.items() if v in keep]
        sq, dot, kept = linear_pieces(x.detach(), b, Request(list(local), d, kept_local))
        total.sq += sq
        if total.dot is not None and dot is not None:
            total.dot += dot
        for k, t in kept.items():
            pieces.setdefault(local[k], []).append(t)

    whole = slice(None)
    add(
        {"weight": "out_proj.weight", "bias": "out_proj.bias"},
        attended,
        b_out,
        {"weight": whole, "bias": whole},
    )
    e = mha.embed_dim
    for j, (x, (name, rows)) in enumerate(
        zip((att.query, att.key, att.value), att.projection_names(), strict=True)
    ):
        add(
            {"weight": name, "bias": "in_proj_bias"},
            x,
            got[j],
            {"weight": rows, "bias": slice(j * e, (j + 1) * e)},
        )
    # the q, k, v chunks of a kept in_proj parameter, in their rows' order
    total.kept = {name: torch.cat(parts, dim=1) for name, parts in pieces.items()}
    return total.result()


@register_ghost_rule(nn.MultiheadAttention)
class MultiheadAttentionRule(GhostRule):
    """``nn.MultiheadAttention``: the closed forms above, or a JVP and the generic norms."""

    recursive = True
    replays_forward = True

    def tangent(self, module: nn.Module, args: tuple, kwargs: dict, direction: Direction) -> Any:
        return attention_tangent(module, args, kwargs, direction)

    def pieces(self, site: Site, grads: Mapping[int, Tensor], ask: Request) -> Pieces | None:
        return attention_pieces(site.module, site.args, site.kwargs, grads, *ask)

    def rows_independent(self, module: nn.Module, args: tuple, kwargs: dict) -> bool:
        att = attention_call(module, args, kwargs)
        # A 3-d attn_mask holds batch x heads in one dim: it cannot be cut by rows; a dropout
        # mask is drawn for the whole batch.
        return (
            att is not None
            and not att.dropout
            and (att.attn_mask is None or att.attn_mask.dim() == 2)
        )
