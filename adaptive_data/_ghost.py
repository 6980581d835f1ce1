"""Ghost rewards: per-example directional derivatives from one forward and one backward pass.

For every module that owns trainable parameters, a *rule* returns the directional derivative of
the module's output with respect to its own parameters along the direction ``D``, for the input
the module saw. For layers whose output is affine in their parameters (Linear, Conv, Embedding,
the affine part of the norms) that is the layer's own forward with ``D`` in place of its weights;
``nn.MultiheadAttention`` has a closed form; for anything else (modules holding bare
parameters) it is a forward-mode JVP of the module alone. With ``B`` the gradient of
``sum_i l_i`` at the module's output, the module's share of example i's reward is
``<B_i, tangent_i>`` (docs/concepts.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, cast

import torch
import torch.autograd.forward_ad as fwad
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from . import _norms
from ._norms import Pieces, norm_rule
from ._state import RngSnapshot, forward_ad_friendly, preserved

__all__ = ["GhostRule", "ghost_rules", "register_ghost_rule"]

# A rule: (module, args, kwargs, {local parameter name: direction}) -> tangent of the output,
# a pytree shaped like the module's output. Frozen parameters have no entry (direction 0).
TangentFn = Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Mapping[str, Tensor]], Any]


@dataclasses.dataclass(frozen=True)
class GhostRule:
    """How the ``ghost`` method covers one module type.

    Attributes:
        tangent: ``(module, args, kwargs, direction) -> tangent of the module's output``.
        recursive: the rule covers the parameters of the module's children too (as for
            ``nn.MultiheadAttention``, whose ``out_proj`` forward never runs).
        replays_forward: the rule runs the module's forward again; the RNG state of the
            original call is replayed so that dropout draws the same mask.

    Which dim of each output holds the batch is not the rule's to say: the probe finds it by
    running the model on two batch sizes (:func:`detect_layout`).
    """

    tangent: TangentFn
    recursive: bool = False
    replays_forward: bool = False


_RULES: dict[type[nn.Module], GhostRule] = {}


def ghost_rules() -> dict[type[nn.Module], GhostRule]:
    """A copy of the registry: module type -> the rule ``method='ghost'`` uses for it."""
    return dict(_RULES)


def register_ghost_rule(
    *module_types: type[nn.Module],
    recursive: bool = False,
    replays_forward: bool = False,
) -> Callable[[TangentFn], TangentFn]:
    """Decorator: use ``fn`` as the ghost rule for modules of exactly these types.

    Types match exactly (a subclass may override ``forward``; it falls back to the JVP rule).
    Registering a type twice raises instead of silently replacing the first rule.
    """

    def decorate(fn: TangentFn) -> TangentFn:
        for cls in module_types:
            if cls in _RULES:
                raise ValueError(f"a ghost rule for {cls.__name__} is already registered")
        rule = GhostRule(fn, recursive, replays_forward)
        for cls in module_types:
            _RULES[cls] = rule
        return fn

    return decorate


def _param_direction(
    module: nn.Module, name: str, direction: Mapping[str, Tensor]
) -> Tensor | None:
    """The direction for ``module.<name>``: given, zero if frozen, None if the module has none."""
    param = getattr(module, name)
    if param is None:
        return None
    d = direction.get(name)
    return torch.zeros_like(param) if d is None else d


def _weight_direction(module: nn.Module, direction: Mapping[str, Tensor]) -> Tensor:
    d = direction.get("weight")
    return torch.zeros_like(cast(Tensor, module.weight)) if d is None else d


@register_ghost_rule(nn.Linear)
def _linear(
    module: nn.Module, args: tuple, kwargs: dict, direction: Mapping[str, Tensor]
) -> Tensor:
    return F.linear(
        args[0],
        _weight_direction(module, direction),
        _param_direction(module, "bias", direction),
    )


@register_ghost_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv(module: nn.Module, args: tuple, kwargs: dict, direction: Mapping[str, Tensor]) -> Tensor:
    # _conv_forward is the layer's own forward for a given weight (it handles padding_mode).
    return module._conv_forward(  # type: ignore[operator]
        args[0],
        _param_direction(module, "weight", direction),
        _param_direction(module, "bias", direction),
    )


@register_ghost_rule(nn.Embedding)
def _embedding(
    module: nn.Module, args: tuple, kwargs: dict, direction: Mapping[str, Tensor]
) -> Tensor:
    module = cast(nn.Embedding, module)
    idx = args[0]
    out = F.embedding(idx, _weight_direction(module, direction))
    if module.padding_idx is not None:
        # the padding row receives no gradient
        out = out.masked_fill((idx == module.padding_idx).unsqueeze(-1), 0.0)
    if module.scale_grad_by_freq:
        # the batch gradient of each row is divided by its count in the batch
        counts = torch.bincount(idx.reshape(-1), minlength=module.num_embeddings)
        out = out / counts[idx].unsqueeze(-1).to(out.dtype)
    return out


def _uses_batch_stats(module: nn.modules.batchnorm._BatchNorm) -> bool:
    return module.training or (module.running_mean is None and module.running_var is None)


@register_ghost_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def _batch_norm(
    module: nn.Module, args: tuple, kwargs: dict, direction: Mapping[str, Tensor]
) -> Tensor:
    module = cast(nn.modules.batchnorm._BatchNorm, module)
    batch_stats = _uses_batch_stats(module)
    # With batch statistics the running buffers are not read: pass None so nothing is updated.
    return F.batch_norm(
        args[0],
        None if batch_stats else module.running_mean,
        None if batch_stats else module.running_var,
        _param_direction(module, "weight", direction),
        _param_direction(module, "bias", direction),
        training=batch_stats,
        momentum=0.0,
        eps=module.eps,
    )


@register_ghost_rule(nn.LayerNorm)
def _layer_norm(
    module: nn.Module, args: tuple, kwargs: dict, direction: Mapping[str, Tensor]
) -> Tensor:
    module = cast(nn.LayerNorm, module)
    return F.layer_norm(
        args[0],
        module.normalized_shape,
        _param_direction(module, "weight", direction),
        _param_direction(module, "bias", direction),
        module.eps,
    )


@register_ghost_rule(nn.GroupNorm)
def _group_norm(
    module: nn.Module, args: tuple, kwargs: dict, direction: Mapping[str, Tensor]
) -> Tensor:
    module = cast(nn.GroupNorm, module)
    return F.group_norm(
        args[0],
        module.num_groups,
        _param_direction(module, "weight", direction),
        _param_direction(module, "bias", direction),
        module.eps,
    )


if hasattr(nn, "RMSNorm"):

    @register_ghost_rule(nn.RMSNorm)
    def _rms_norm(
        module: nn.Module, args: tuple, kwargs: dict, direction: Mapping[str, Tensor]
    ) -> Tensor:
        return F.rms_norm(
            args[0],
            module.normalized_shape,  # type: ignore[arg-type]
            _param_direction(module, "weight", direction),
            module.eps,  # type: ignore[arg-type]
        )


def jvp_tangent(
    module: nn.Module, args: tuple, kwargs: dict, direction: Mapping[str, Tensor]
) -> Any:
    """Tangent of ``module(*args, **kwargs)`` along ``direction`` by forward-mode AD.

    Only the parameters named in ``direction`` (dotted names relative to ``module``) move;
    everything else, children included, keeps its value.
    """
    with torch.no_grad(), forward_ad_friendly(), fwad.dual_level():
        duals = {
            name: fwad.make_dual(module.get_parameter(name).detach(), d)
            for name, d in direction.items()
        }
        out = torch.func.functional_call(module, duals, args, kwargs)
        leaves, spec = tree_flatten(out)
        tangents = []
        for leaf in leaves:
            t = fwad.unpack_dual(leaf).tangent if isinstance(leaf, Tensor) else None
            if t is None and isinstance(leaf, Tensor):
                t = torch.zeros_like(leaf)
            tangents.append(t)
    return spec.unflatten(tangents)


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


def _attention_call(module: nn.Module, args: tuple, kwargs: dict) -> _Attention | None:
    """The call in batch-first form, or None for what the closed forms do not cover
    (``bias_k``/``bias_v``, ``add_zero_attn``, attention dropout in train mode, unbatched
    inputs): those use a forward-mode JVP (tangents) or the generic norm rule."""
    mha = cast(nn.MultiheadAttention, module)
    call = _MHA_SIGNATURE.bind(mha, *args, **kwargs)
    call.apply_defaults()
    a = call.arguments
    query, key, value = a["query"], a["key"], a["value"]
    if (
        mha.bias_k is not None
        or mha.add_zero_attn
        or (mha.training and mha.dropout > 0)
        or query.dim() != 3
    ):
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
    )


@register_ghost_rule(nn.MultiheadAttention, recursive=True, replays_forward=True)
def _multihead_attention(
    module: nn.Module, args: tuple, kwargs: dict, direction: Mapping[str, Tensor]
) -> Any:
    """Closed-form directional derivative of attention along the projections' directions.

    With ``q, k, v`` the projections, ``P = softmax(q k^T / sqrt(h) + mask)`` and
    ``O = P v``: ``S' = (q' k^T + q k'^T) / sqrt(h)``, ``P' = P * (S' - sum(P * S'))``,
    ``O' = P' v + P v'`` and ``out' = O D_out^T + d_out + O' W_out^T``. About three attention
    forwards. Configurations it does not cover (``bias_k``/``bias_v``, ``add_zero_attn``,
    attention dropout in train mode, unbatched inputs) use a forward-mode JVP of the module.
    """
    att = _attention_call(module, args, kwargs)
    if att is None:
        return jvp_tangent(module, args, kwargs, direction)
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
    out = att.merge_heads(p @ v)
    d_out = att.merge_heads(d_p @ v + p @ dv)
    out_proj = mha.out_proj
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
    att = _attention_call(module, args, kwargs)
    if att is None:
        return None
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
        attended = att.merge_heads(p @ v)
        out_proj = mha.out_proj
        bias = None if out_proj.bias is None else out_proj.bias.detach()
        outputs = [att.layout(F.linear(attended, out_proj.weight.detach(), bias))]
        if att.need_weights:
            outputs.append(p.mean(1) if att.average_attn_weights else p)
        pairs = [(outputs[i], g) for i, g in grads.items() if i < len(outputs)]
        got = torch.autograd.grad(
            [o for o, _ in pairs], projections, [g for _, g in pairs], allow_unused=True
        )
    got = [torch.zeros_like(t) if g is None else g for t, g in zip(projections, got, strict=True)]
    # out_proj: its input is the attention's output, its output gradient B (batch-first)
    b_out = grads[0] if 0 in grads else torch.zeros_like(attended)
    b_out = att.layout(b_out)
    n = att.query.shape[0]
    total = _norms._Sums(n, att.query.device, direction, keep)
    pieces: dict[str, list[Tensor]] = {}

    def add(sub: Mapping[str, str], x: Tensor, b: Tensor, dir_rows: Mapping[str, slice]) -> None:
        """The Linear rule for one projection: ``sub`` maps its local weight/bias names to the
        module's parameter names, ``dir_rows`` to the rows of those parameters that are its."""
        local = {k: v for k, v in sub.items() if v in names}
        d = None
        if direction is not None:
            d = {k: direction[v][dir_rows[k]] for k, v in local.items()}
        kept_local = [k for k, v in local.items() if v in keep]
        sq, dot, kept = _norms._linear(None, x.detach(), b, list(local), d, kept_local)  # type: ignore[arg-type]
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


FALLBACK_RULE = GhostRule(jvp_tangent, recursive=False, replays_forward=True)


@dataclasses.dataclass
class Entry:
    """One covered module: its rule and ``{local parameter name: global name}``.

    The model's root has an entry whenever it has no rule of its own, even without bare
    parameters: parameters of modules whose output does not hold the batch are covered there
    (see :class:`Layout`)."""

    name: str
    module: nn.Module
    rule: GhostRule
    params: dict[str, str]
    root: bool = False


def plan(model: nn.Module, trainable: Mapping[str, Tensor], fallback: str) -> list[Entry]:
    """Assign every trainable parameter to the modules whose rule covers it.

    Raises (naming the modules) if a parameter would be left uncovered with
    ``fallback='raise'``, or if a module cannot be probed without editing the model.
    """
    global_name = {id(p): n for n, p in trainable.items()}
    entries: list[Entry] = []
    covered_by_parent: set[str] = set()
    uncovered: list[str] = []
    seen: set[int] = set()
    for mod_name, module in model.named_modules(remove_duplicate=False):
        if id(module) in seen:  # one module under two names: its calls are hooked once
            continue
        seen.add(id(module))
        if isinstance(module, nn.Embedding) and module.max_norm is not None:
            raise ValueError(
                f"module {mod_name!r} is an Embedding with max_norm={module.max_norm}, which "
                "rewrites its weight in place during forward; the probe never edits the model"
            )
        if mod_name in covered_by_parent:
            continue
        rule = _RULES.get(type(module))
        if rule is not None and rule.recursive:
            named = module.named_parameters()
            covered_by_parent.update(
                f"{mod_name}.{c}" if mod_name else c for c, _ in module.named_modules()
            )
        else:
            named = module.named_parameters(recurse=False)
        local = {n: global_name[id(p)] for n, p in named if id(p) in global_name}
        is_root = module is model
        if not local and not (is_root and rule is None):
            continue
        if rule is None:
            if fallback == "raise" and local:
                uncovered.append(f"{mod_name or '<root>'} ({type(module).__name__})")
                continue
            rule = FALLBACK_RULE
        entries.append(Entry(mod_name or "<root>", module, rule, local, root=is_root))
    if uncovered:
        allowed = ", ".join(sorted(cls.__name__ for cls in _RULES))
        raise ValueError(
            f"method='ghost' has no rule for the trainable parameters of {uncovered}; "
            f"rules exist for {allowed}. Use fallback='jvp', method='jvp', freeze them, or "
            "register a rule with adaptive_data.register_ghost_rule"
        )
    return entries


def couples_examples(model: nn.Module) -> bool:
    """Whether a known module makes one example's loss depend on another's in this mode."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and _uses_batch_stats(module):
            return True
        if isinstance(module, nn.Embedding) and module.scale_grad_by_freq:
            return True
    return False


# ---------------------------------------------------------------------- where the batch is

UNKNOWN = -1  # a tensor whose size depends on the batch size, but not as one batch dim


@dataclasses.dataclass(frozen=True)
class CallLayout:
    """Where one call of a module holds the batch: for each leaf of ``(args, kwargs)`` and of
    its output (``tree_flatten`` order), the batch dim, None (no batch: not a tensor, or its
    shape does not depend on the batch size) or ``UNKNOWN``."""

    inputs: tuple[int | None, ...]
    outputs: tuple[int | None, ...]
    requires_grad: tuple[bool, ...]  # of each output leaf

    @property
    def attributable(self) -> bool:
        """Every output that carries a gradient holds the batch in one dim."""
        return all(
            d is not None and d >= 0
            for d, g in zip(self.outputs, self.requires_grad, strict=True)
            if g
        )


@dataclasses.dataclass
class Layout:
    """How the covered modules see the batch, for one input signature.

    Found by running the model on 2 and 3 examples of the batch and comparing the shapes of
    every covered call: the dim whose size follows the batch size is the batch dim; a tensor
    whose shape does not change does not hold the batch (a position embedding of
    ``arange(T)``), whatever its sizes. Modules with such an output (or a layout found no
    other way) cannot give each example its share from the gradient at their output: their
    parameters are covered at the model's root instead (``root_params``), by replaying the
    whole model (a JVP, or per-example gradients for the norms).
    """

    calls: dict[int, list[CallLayout]]  # id(entry) -> one layout per call
    rehomed: list[Entry]  # entries whose parameters the root covers
    root_params: dict[str, str]  # what the root entry covers, local (= global) name -> global
    shared: frozenset[str]  # global names used by more than one covered call

    def params(self, entry: Entry) -> dict[str, str]:
        """The parameters this entry's calls account for in this layout (empty: none)."""
        if entry.root:
            return self.root_params
        if any(e is entry for e in self.rehomed):
            return {}
        return entry.params


def _shapes(tree: Any) -> list[tuple[int, ...] | None]:
    return [tuple(t.shape) if isinstance(t, Tensor) else None for t in tree_flatten(tree)[0]]


def _batch_dim(
    a: tuple[int, ...] | None, b: tuple[int, ...] | None, ma: int, mb: int
) -> int | None:
    if a is None or b is None:
        return None
    if len(a) != len(b):
        return UNKNOWN
    changed = [k for k in range(len(a)) if a[k] != b[k]]
    if not changed:
        return None
    if len(changed) == 1 and a[changed[0]] == ma and b[changed[0]] == mb:
        return changed[0]
    return UNKNOWN


_SIZES = (2, 3)  # the batch sizes of the two layout runs


def _record(
    model: nn.Module, modules: list[nn.Module], args: tuple, kwargs: dict, n: int, m: int
) -> dict[int, list[tuple[list, list, list[bool]]]]:
    """Run the model on ``m`` examples of the batch (repeated if it has fewer) and record the
    shapes of every call of ``modules``."""
    records: dict[int, list[tuple[list, list, list[bool]]]] = {id(mod): [] for mod in modules}

    def hook(module: nn.Module, a: tuple, k: dict, out: Any) -> None:
        grads = [isinstance(t, Tensor) and t.requires_grad for t in tree_flatten(out)[0]]
        records[id(module)].append((_shapes((a, k)), _shapes(out), grads))

    def take(t: Any) -> Any:
        # Inputs that hold the batch (dim 0 of size n); others (an attention mask [T, T]) as
        # they are. With T == n such a mask is cut too, and the model then raises.
        if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == n:
            return t[torch.arange(m, device=t.device) % n]
        return t

    sub_args, sub_kwargs = tree_map(take, (args, kwargs))
    handles = [mod.register_forward_hook(hook, with_kwargs=True) for mod in modules]
    try:
        with preserved(model), torch.enable_grad():
            model(*sub_args, **sub_kwargs)
    finally:
        for h in handles:
            h.remove()
    return records


def detect_layout(
    model: nn.Module,
    entries: Sequence[Entry],
    args: tuple,
    kwargs: dict,
    n: int,
    who: str,
    fallback: str = "jvp",
) -> Layout:
    """The :class:`Layout` of ``model(*args, **kwargs)``, whose tensors hold ``n`` examples
    in dim 0. Costs two forwards of 2 and 3 examples. ``who`` names the caller in errors;
    ``fallback='raise'`` refuses modules that would be covered at the root."""
    modules = [e.module for e in entries]
    try:
        runs = [_record(model, modules, args, kwargs, n, m) for m in _SIZES]
    except Exception as exc:
        raise RuntimeError(
            f"{who} runs the model on {_SIZES[0]} and {_SIZES[1]} examples of the batch to find "
            f"which dim of each layer's input and output holds the batch, and the model raised "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    calls: dict[int, list[CallLayout]] = {}
    unstable: set[int] = set()
    for entry in entries:
        first, second = (run[id(entry.module)] for run in runs)
        if len(first) != len(second):  # the number of calls depends on the batch size
            unstable.add(id(entry))
            continue
        layouts = []
        for (in_a, out_a, _), (in_b, out_b, grads) in zip(first, second, strict=True):
            if len(in_a) != len(in_b) or len(out_a) != len(out_b):
                unstable.add(id(entry))
                break
            layouts.append(
                CallLayout(
                    tuple(_batch_dim(a, b, *_SIZES) for a, b in zip(in_a, in_b, strict=True)),
                    tuple(_batch_dim(a, b, *_SIZES) for a, b in zip(out_a, out_b, strict=True)),
                    tuple(grads),
                )
            )
        calls[id(entry)] = layouts
    rehomed = [
        e
        for e in entries
        if not e.root
        and e.params
        and (id(e) in unstable or not all(c.attributable for c in calls[id(e)]))
    ]
    root = next((e for e in entries if e.root), None)
    if rehomed and fallback == "raise":
        names = [f"{e.name} ({type(e.module).__name__})" for e in rehomed]
        raise ValueError(
            f"{who} cannot attribute the outputs of {names} to examples: they do not hold the "
            "batch in one dim (found by running the model on 2 and 3 examples), so their "
            "parameters need a replay of the whole model, which fallback='raise' refuses; use "
            "fallback='jvp' or method='jvp'"
        )
    if rehomed and root is None:
        names = [f"{e.name} ({type(e.module).__name__})" for e in rehomed]
        raise ValueError(
            f"{who} cannot attribute the outputs of {names} to examples (they do not hold the "
            f"batch in one dim), and the model's root ({type(model).__name__}) has a rule of "
            "its own, so they cannot be covered there; use method='jvp'"
        )
    root_params = dict(root.params) if root is not None else {}
    for e in rehomed:
        root_params.update({g: g for g in e.params.values()})
    uses: dict[str, int] = {}
    for e in entries:
        params = root_params if e.root else ({} if e in rehomed else e.params)
        count = 1 if e.root else len(calls.get(id(e), []))
        for g in params.values():
            uses[g] = uses.get(g, 0) + count
    shared = frozenset(g for g, k in uses.items() if k > 1)
    return Layout(calls, rehomed, root_params, shared)


def _signature(model: nn.Module, args: tuple, kwargs: dict) -> Any:
    leaves, spec = tree_flatten((args, kwargs))
    parts: list[Any] = []
    for t in leaves:
        if isinstance(t, Tensor):
            parts.append((tuple(t.shape[1:]), t.dtype, t.device))
        else:
            try:
                hash(t)
                parts.append(t)
            except TypeError:
                parts.append(type(t))
    return str(spec), tuple(parts), tuple(m.training for m in model.modules())


class Layouts:
    """A cache of :func:`detect_layout`, by input signature (structure, shapes but the batch
    size, dtypes, devices, and train/eval modes): the two extra forwards run once per
    signature."""

    _SIZE = 16

    def __init__(
        self, model: nn.Module, entries: Sequence[Entry], who: str, fallback: str = "jvp"
    ) -> None:
        self.model = model
        self.entries = list(entries)
        self.who = who
        self.fallback = fallback
        self._cache: dict[Any, Layout] = {}

    def get(self, args: tuple, kwargs: dict, n: int) -> Layout:
        key = _signature(self.model, args, kwargs)
        layout = self._cache.get(key)
        if layout is None:
            layout = detect_layout(
                self.model, self.entries, args, kwargs, n, self.who, self.fallback
            )
            if len(self._cache) >= self._SIZE:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = layout
        return layout


# ---------------------------------------------------------------------- per-example pieces

_COTANGENT_CHUNK = 8  # examples per batched backward of the generic norm rule


def generic_pieces(
    module: nn.Module,
    args: tuple,
    kwargs: dict,
    rng: RngSnapshot | None,
    grads: Mapping[int, Tensor],
    dims: Sequence[int | None],
    names: Sequence[str],
    direction: Mapping[str, Tensor] | None,
    keep: Collection[str],
) -> Pieces:
    """Per-example gradients of ``module``'s parameters ``names`` (dotted, relative to it), for
    any module: its forward is run again on the whole batch (the call's RNG state replayed, so
    dropout draws the same masks) and one backward per example, batched, takes the gradient at
    its outputs restricted to that example (``grads``: output index -> gradient, batch in
    ``dims[index]``). Exact for examples that are independent in the module (else each
    example's share, as ghost defines it); costs one forward and N backwards of the module."""
    params = {nm: cast(Tensor, module.get_parameter(nm)).detach().requires_grad_() for nm in names}
    replay = rng.replay() if rng is not None else contextlib.nullcontext()
    with torch.enable_grad(), replay:
        out = torch.func.functional_call(module, params, args, kwargs)
    leaves = tree_flatten(out)[0]
    used = [(leaves[i], g, cast(int, dims[i])) for i, g in sorted(grads.items())]
    first, first_dim = used[0][1], used[0][2]
    n = first.shape[first_dim]
    sums = _norms._Sums(n, first.device, direction, keep)
    for lo in range(0, n, _COTANGENT_CHUNK):
        c = min(_COTANGENT_CHUNK, n - lo)
        rows = torch.arange(lo, lo + c, device=first.device)
        cotangents = []
        for _, g, dim in used:
            g0 = g.movedim(dim, 0)
            z = g0.new_zeros(c, *g0.shape)
            z[torch.arange(c, device=g.device), rows] = g0[rows]
            cotangents.append(z.movedim(1, dim + 1))
        got = torch.autograd.grad(
            [o for o, _, _ in used],
            list(params.values()),
            cotangents,
            retain_graph=lo + c < n,
            allow_unused=True,
            is_grads_batched=True,
        )
        for (nm, p), g in zip(params.items(), got, strict=True):
            sums.add(nm, p.new_zeros(c, *p.shape) if g is None else g, rows=slice(lo, lo + c))
    return sums.result()


class Accumulator:
    """Sums each call's share into ``r`` (and, for the cosine, the squared norms ``sq``); the
    per-example gradients of shared parameters are summed over their calls before squaring."""

    def __init__(self, n: int, device: torch.device, norms: bool, per_module: bool = False):
        self.r = torch.zeros(n, dtype=torch.float32, device=device)
        self.sq = torch.zeros(n, dtype=torch.float32, device=device) if norms else None
        self.kept: dict[str, Tensor] = {}
        # each module's share of sum_i r_i, kept only for the sum check's diagnosis
        self.module_sums: dict[str, Tensor] | None = {} if per_module else None

    def add(
        self,
        name: str,
        dot: Tensor,
        sq: Tensor | None = None,
        kept: Mapping[str, Tensor] | None = None,
    ) -> None:
        self.r += dot
        if sq is not None and self.sq is not None:
            self.sq += sq
        for g, t in (kept or {}).items():
            self.kept[g] = self.kept[g] + t if g in self.kept else t
        if self.module_sums is not None:
            self.module_sums[name] = self.module_sums.get(name, 0) + dot.sum()

    def add_rows(self, name: str, other: Accumulator, rows: Tensor) -> None:
        """Add the rows ``rows`` of another accumulator's sums (one call, computed on the
        whole batch) to this one, whose rows are those."""
        sq = None if other.sq is None else other.sq[rows]
        kept = {g: t[rows] for g, t in other.kept.items()}
        self.add(name, other.r[rows], sq, kept)

    def result(self) -> tuple[Tensor, Tensor | None]:
        """``(r, sq)``; ``sq`` None without norms."""
        if self.sq is not None:
            for t in self.kept.values():
                self.sq += _norms._sq(t)
            self.kept = {}
        return self.r, self.sq


class Call:
    """One forward call of a covered module: its inputs (and RNG state, for rules that replay
    the forward), kept until its outputs' gradients arrive; :meth:`contribute` adds its share."""

    def __init__(
        self,
        entry: Entry,
        params: Mapping[str, str],
        layout: CallLayout,
        shared: Collection[str],
        args: tuple,
        kwargs: dict,
        rng: RngSnapshot | None,
    ) -> None:
        self.entry = entry
        self.params = dict(params)
        self.layout = layout
        self.shared = shared
        self.args: tuple | None = args
        self.kwargs: dict | None = kwargs
        self.rng = rng
        leaves = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        self.versions = [(t, t._version) for t in leaves]
        self.expected = 0  # output tensors whose gradient is awaited
        self.grads: dict[int, Tensor] = {}
        self._tangents: list[Any] | None = None

    def check_inputs(self) -> None:
        """Raise if an input was modified in place after the forward (it would be read stale)."""
        for t, version in self.versions:
            if t._version != version:
                raise RuntimeError(
                    f"an input of module {self.entry.name!r} was modified in place after its "
                    "forward, so its share of the rewards cannot be recomputed from it (a "
                    "GradientProbe with method='jvp' does not need it)"
                )

    def local(self, direction: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The module's part of ``direction``, by local parameter name."""
        return {n: direction[g] for n, g in self.params.items()}

    def _dtype(self, local: Mapping[str, Tensor] | None) -> torch.dtype | None:
        """The dtype the rule computes in: the direction's (the parameters'). Under autocast
        the kept inputs and output gradients may be in a lower precision (bf16, fp16): they
        are cast up to it, as the rule mixes them with the direction."""
        for t in (local or {}).values():
            return t.dtype
        params = [p for _, p in self.entry.module.named_parameters()]
        return params[0].dtype if params else None

    def tangents(self, direction: Mapping[str, Tensor]) -> list[Any]:
        if self._tangents is None:
            self.check_inputs()
            local = self.local(direction)
            dtype = self._dtype(local)
            module = self.entry.module
            args, kwargs = _as_dtype((self.args or (), self.kwargs or {}), dtype)
            rule = FALLBACK_RULE if self.entry.root else self.entry.rule
            if self.rng is None:
                out = rule.tangent(module, args, kwargs, local)
            else:
                with self.rng.replay():
                    out = rule.tangent(module, args, kwargs, local)
            self._tangents = tree_flatten(out)[0]
        return self._tangents

    def pieces(self, grads: Mapping[int, Tensor], direction: Mapping[str, Tensor] | None) -> Pieces:
        """The module's per-example squared gradient norms, its share of ``<g_i, D>`` (given
        ``direction``) and the per-example gradients of its shared parameters (by global
        name), from the gradients at its outputs (``grads``: output index -> gradient)."""
        self.check_inputs()
        module, args, kwargs = self.entry.module, self.args or (), self.kwargs or {}
        names = list(self.params)
        keep = [n for n, g in self.params.items() if g in self.shared]
        local = None if direction is None else self.local(direction)
        dtype = self._dtype(local)
        args, kwargs = _as_dtype((args, kwargs), dtype)
        grads = {i: _as_dtype(g, dtype) for i, g in grads.items()}
        out: Pieces | None = None
        rule = None if self.entry.root else norm_rule(module)
        inputs = tree_flatten((args, kwargs))[0]
        if rule is not None and len(grads) == 1 and len(inputs) == 1:
            ((i, grad),) = grads.items()
            din, dout = self.layout.inputs[0], self.layout.outputs[i]
            if isinstance(inputs[0], Tensor) and _norms.applies(module, din, dout, grad.dim()):
                x = inputs[0].movedim(cast(int, din), 0)
                out = rule(module, x, grad.movedim(cast(int, dout), 0), names, local, keep)
        if out is None and type(module) is nn.MultiheadAttention and not self.entry.root:
            out = attention_pieces(module, args, kwargs, grads, names, local, keep)
        if out is None:
            out = generic_pieces(
                module, args, kwargs, self.rng, grads, self.layout.outputs, names, local, keep
            )
        sq, dot, kept = out
        return sq, dot, {self.params[n]: t for n, t in kept.items()}

    def contribute(
        self,
        acc: Accumulator,
        grads: Mapping[int, Tensor],
        direction: Mapping[str, Tensor],
        norms: bool,
    ) -> None:
        """Add this call's share of ``<g_i, D>`` (and with ``norms`` its per-example squared
        gradient norms) to ``acc``, from the gradients at its outputs."""
        if not grads:
            return
        if norms:
            sq, dot, kept = self.pieces(grads, direction)
            if dot is None:  # a norm rule given a direction returns its share: a broken rule
                raise RuntimeError(
                    f"the gradient-norm rule of module {self.entry.name!r} "
                    f"({type(self.entry.module).__name__}) returned no share of the rewards "
                    "although it was given a direction"
                )
            acc.add(self.entry.name, dot, sq, kept)
            return
        tangents = self.tangents(direction)
        for i, grad in grads.items():
            acc.add(
                self.entry.name,
                per_example_dot(grad, tangents[i], cast(int, self.layout.outputs[i])),
            )

    def select_rows(self, rows: Tensor) -> None:
        """Keep only the examples ``rows`` (sorted indices into the batch) of the inputs:
        their shares are then exactly those of the whole batch's same rows, for a call that
        :func:`rows_independent` accepts. Inputs that do not hold the batch stay whole."""
        leaves, spec = tree_flatten((self.args or (), self.kwargs or {}))
        kept = [
            leaf.index_select(dim, rows.to(leaf.device))
            if isinstance(leaf, Tensor) and dim is not None and dim >= 0
            else leaf
            for leaf, dim in zip(leaves, self.layout.inputs, strict=True)
        ]
        self.args, self.kwargs = tree_unflatten(kept, spec)
        self.versions = []  # copies made at the forward: no later in-place edit reaches them

    def release(self) -> None:
        """Let go of the inputs and gradients (memory)."""
        self.args = self.kwargs = self._tangents = None
        self.grads = {}
        self.versions = []


def register_call_hooks(
    entries: Sequence[Entry], before: Callable[..., Any], after: Callable[..., Any]
) -> list[Any]:
    """On every covered module: ``before(entry, module, args)`` as a forward pre-hook (to
    snapshot the RNG for rules that replay the forward) and ``after(entry, module, args,
    kwargs, output)`` as a forward hook. Returns the handles."""
    handles: list[Any] = []
    for entry in entries:
        handles.append(entry.module.register_forward_pre_hook(functools.partial(before, entry)))
        handles.append(
            entry.module.register_forward_hook(functools.partial(after, entry), with_kwargs=True)
        )
    return handles


def _as_dtype(tree: Any, dtype: torch.dtype | None) -> Any:
    """``tree`` with its real floating tensors of another dtype cast to ``dtype``."""
    if dtype is None or not dtype.is_floating_point:
        return tree
    return tree_map(
        lambda t: (
            t.to(dtype)
            if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != dtype
            else t
        ),
        tree,
    )


def needs_rng(entry: Entry, norms: bool) -> bool:
    """Whether a call's RNG state is needed: the rule replays the forward, or (for the norms)
    the generic rule may."""
    return entry.rule.replays_forward or entry.root or norms


def per_example_dot(a: Tensor, b: Tensor, dim: int) -> Tensor:
    """``sum`` over every dim but ``dim`` of ``a * b``, as a float32 vector, without ``a * b``."""
    a = a.movedim(dim, 0).reshape(a.shape[dim], 1, -1)
    b = b.movedim(dim, 0).reshape(b.shape[dim], -1, 1)
    return torch.bmm(a.float(), b.float()).view(-1)


# Covered modules whose every example's share depends on that example's inputs and output
# gradient alone, so that a subset of the rows gives exactly those rows' shares. A module left
# out (a rule registered by the user included) is computed on the whole batch.
_ROW_INDEPENDENT: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.LayerNorm,
    nn.GroupNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def rows_independent(entry: Entry, layout: CallLayout, args: tuple, kwargs: dict) -> bool:
    """Whether this call's shares of a subset of the batch's rows can be computed from those
    rows alone: each input that holds the batch does so in one known dim, and the module does
    not mix examples (no batch statistics, no per-batch counts, no mask that folds the batch
    into another dim) nor replay randomness."""
    module = entry.module
    if entry.root or any(d is not None and d < 0 for d in layout.inputs):
        return False
    kind = type(module)
    if kind in _ROW_INDEPENDENT:
        return True
    if kind is nn.Embedding:
        return not cast(nn.Embedding, module).scale_grad_by_freq
    if kind in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        return not _uses_batch_stats(cast(nn.modules.batchnorm._BatchNorm, module))
    if kind is nn.MultiheadAttention:
        att = _attention_call(module, args, kwargs)
        # A 3-d attn_mask holds batch x heads in one dim: it cannot be cut by rows.
        return att is not None and (att.attn_mask is None or att.attn_mask.dim() == 2)
    return False


def unattributable(entry: Entry, shape: list[int], grad: Tensor) -> None:
    raise ValueError(
        f"the loss reads an output of module {entry.name!r} ({type(entry.module).__name__}) of "
        f"shape {shape} that does not hold the batch, so its gradient cannot be split into "
        "examples; loss_fn should use outputs that hold the batch"
    )


def check_outputs(
    entry: Entry, call_layout: CallLayout, leaves: Sequence[Any], n: int, who: str
) -> None:
    """Raise if an output leaf that requires grad does not hold the batch of ``n`` where the
    layout runs found it."""
    for i, leaf in enumerate(leaves):
        if not (isinstance(leaf, Tensor) and leaf.requires_grad):
            continue
        dim = call_layout.outputs[i] if i < len(call_layout.outputs) else None
        if dim is not None and dim >= 0 and (leaf.dim() <= dim or leaf.shape[dim] != n):
            raise ValueError(
                f"{who} cannot attribute module {entry.name!r} ({type(entry.module).__name__}) "
                f"to examples: its output of shape {list(leaf.shape)} does not hold the batch "
                f"(size {n}) in dim {dim}, where the runs on 2 and 3 examples found it"
            )


def open_call(
    entry: Entry,
    layout: Layout,
    index: int,
    args: tuple,
    kwargs: dict,
    output: Any,
    rng: RngSnapshot | None,
    n: int,
    who: str,
) -> tuple[Call | None, list[Any], Any]:
    """The :class:`Call` for the ``index``-th call of ``entry`` (None if it accounts for no
    parameter in this layout) and its output leaves with their spec; raises if the call does
    not match the layout."""
    leaves, spec = tree_flatten(output)
    params = layout.params(entry)
    if not params:
        return None, leaves, spec
    calls = layout.calls.get(id(entry), [])
    if index >= len(calls):
        raise RuntimeError(
            f"module {entry.name!r} ran {index + 1} times in this forward, but "
            f"{len(calls)} times in the runs that found where the batch is; {who} needs a "
            "forward whose calls do not depend on the batch"
        )
    call_layout = calls[index]
    check_outputs(entry, call_layout, leaves, n, who)
    return Call(entry, params, call_layout, layout.shared, args, kwargs, rng), leaves, spec


class CallCapture:
    """The capture path of the covered layers, shared by :class:`GhostRun` (a probe call)
    and :class:`GAR` (a training forward): the hooks that number each call of a covered
    module in the forward, snapshot the RNG before the calls whose rule may replay them,
    match each call to the layout (:func:`open_call`) and hand every output leaf that holds
    the batch to the owner's ``on_output(call, i, dim, leaf)``. A leaf that does not hold the
    batch gets a hook that raises if a gradient reaches it (it cannot be attributed).

    The owner says which forwards are captured: :meth:`start` with the layout and batch size
    before one, :meth:`stop` after; ``paused`` (set while a rule replays a forward, or a
    reference pass runs) captures nothing in between. ``on_call(call)`` returns the object
    the call's outputs belong to (or ``None`` to skip it). With ``anchor=True`` each watched
    leaf is replaced by ``leaf + anchor`` (a 0-dim zero leaf that requires grad) before it is
    handed over: see :class:`GhostRun`.
    """

    def __init__(
        self,
        entries: Sequence[Entry],
        who: str,
        devices: list[int],
        on_call: Callable[[Call], Any],
        on_output: Callable[[Any, int, int, Tensor], None],
        wants_rng: Callable[[Entry], bool],
        detach: bool = False,
        anchor: bool = False,
    ) -> None:
        self.who = who
        self.devices = devices
        self.on_call = on_call
        self.on_output = on_output
        self.wants_rng = wants_rng
        self.detach = detach  # keep detached inputs (held past the backward)
        self.anchors: dict[tuple[torch.dtype, torch.device], Tensor] | None = {} if anchor else None
        self.layout: Layout | None = None
        self.n = 0
        self.paused = False
        self._counts: dict[int, int] = {}
        self._rng: dict[int, RngSnapshot] = {}
        self.handles: list[Any] = register_call_hooks(entries, self._before, self._after)

    def start(self, layout: Layout, n: int) -> None:
        """Capture the calls of the forward that follows, of a batch of ``n`` examples."""
        self.layout, self.n, self._counts = layout, n, {}

    def stop(self) -> None:
        """Capture nothing until the next :meth:`start`."""
        self.layout = None
        self._rng.clear()

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.stop()

    def _anchor(self, like: Tensor) -> Tensor:
        anchors = cast(dict, self.anchors)
        key = (like.dtype, like.device)
        if key not in anchors:
            anchors[key] = torch.zeros((), dtype=like.dtype, device=like.device, requires_grad=True)
        return anchors[key]

    def _before(self, entry: Entry, module: nn.Module, args: tuple) -> None:
        if self.layout is not None and not self.paused and self.wants_rng(entry):
            self._rng[id(entry)] = RngSnapshot(self.devices)

    def _after(
        self, entry: Entry, module: nn.Module, args: tuple, kwargs: dict, output: Any
    ) -> Any:
        layout = self.layout
        if layout is None or self.paused:
            return None
        index = self._counts.get(id(entry), 0)
        self._counts[id(entry)] = index + 1
        if self.detach:  # detached views share the version counters: in-place edits are caught
            args, kwargs = detach_tree(args), detach_tree(kwargs)
        call, leaves, spec = open_call(
            entry,
            layout,
            index,
            args,
            kwargs,
            output,
            self._rng.pop(id(entry), None),
            self.n,
            self.who,
        )
        if call is None:
            return None
        owner = self.on_call(call)
        if owner is None:
            return None
        for i, leaf in enumerate(leaves):
            if not (isinstance(leaf, Tensor) and leaf.requires_grad):
                continue
            if self.anchors is not None:
                leaves[i] = leaf = leaf + self._anchor(leaf)
            dim = call.layout.outputs[i]
            if dim is None or dim < 0:  # the root's output that does not hold the batch
                leaf.register_hook(functools.partial(unattributable, entry, list(leaf.shape)))
                continue
            self.on_output(owner, i, dim, leaf)
        return spec.unflatten(leaves) if self.anchors is not None else None


def detach_tree(tree: Any) -> Any:
    """``tree`` with every tensor detached (views sharing the version counters)."""
    return tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, tree)


class GhostRun:
    """Hooks for one probe call: capture on forward, accumulate ``r`` as gradients arrive.

    Each covered module's output is replaced by ``output + anchor``, with ``anchor`` a 0-dim
    zero leaf that requires grad, and the gradient hook goes on that new tensor. A backward that
    asks only for the anchors' gradients then runs every covered module's output node (so the
    hooks fire) without computing any weight gradient, and the gradient each hook sees is that of
    the module's output as produced, even if a later op (``ReLU(inplace=True)``) overwrites it.
    """

    def __init__(
        self,
        entries: list[Entry],
        layout: Layout,
        direction: Mapping[str, Tensor],
        n: int,
        devices: list[int],
        device: torch.device,
        norms: bool = False,
        per_module: bool = False,
    ) -> None:
        self.layout = layout
        self.direction = direction
        self.n = n
        self.norms = norms
        self.acc = Accumulator(n, device, norms, per_module)
        self._waiting: list[Call] = []  # calls whose norms wait for all their gradients
        self._capture = CallCapture(
            entries,
            "method='ghost'",
            devices,
            on_call=lambda call: call,
            on_output=self._watch,
            wants_rng=lambda entry: needs_rng(entry, norms),
            anchor=True,
        )
        self._capture.start(layout, n)

    @property
    def anchors(self) -> dict[tuple[torch.dtype, torch.device], Tensor]:
        """The anchors the backward asks gradients of (one per dtype and device)."""
        return cast(dict, self._capture.anchors)

    def close(self) -> None:
        self._capture.close()

    def _watch(self, call: Call, i: int, dim: int, leaf: Tensor) -> None:
        call.expected += 1
        if self.norms and call.expected == 1:
            self._waiting.append(call)
        leaf.register_hook(functools.partial(self._on_grad, call, i))

    def _on_grad(self, call: Call, i: int, grad: Tensor) -> None:
        self._capture.paused = True  # a replayed forward must not be captured again
        try:
            if self.norms:  # the norms need every output's gradient at once
                call.grads[i] = grad
                if len(call.grads) == call.expected:
                    self._waiting.remove(call)
                    call.contribute(self.acc, call.grads, self.direction, True)
                    call.release()
            else:
                call.contribute(self.acc, {i: grad}, self.direction, False)
                call.expected -= 1
                if call.expected == 0:
                    call.release()
        finally:
            self._capture.paused = False

    def finish(self) -> tuple[Tensor, Tensor | None]:
        """After the backward: the calls some of whose outputs got no gradient (unused
        attention weights) contribute with the gradients they got; returns ``(r, sq)``."""
        self._capture.paused = True
        try:
            for call in self._waiting:
                call.contribute(self.acc, call.grads, self.direction, self.norms)
                call.release()
            self._waiting = []
        finally:
            self._capture.paused = False
        return self.acc.result()
