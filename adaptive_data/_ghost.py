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

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import torch
import torch.autograd.forward_ad as fwad
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from ._norms import NormFn, norm_rule
from ._state import RngSnapshot, forward_ad_friendly

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
        batch_dims: ``(module, number of output tensors) -> batch dim of each output tensor``.
    """

    tangent: TangentFn
    recursive: bool = False
    replays_forward: bool = False
    batch_dims: Callable[[nn.Module, int], Sequence[int]] = lambda module, n: [0] * n


_RULES: dict[type[nn.Module], GhostRule] = {}


def ghost_rules() -> dict[type[nn.Module], GhostRule]:
    """A copy of the registry: module type -> the rule ``method='ghost'`` uses for it."""
    return dict(_RULES)


def register_ghost_rule(
    *module_types: type[nn.Module],
    recursive: bool = False,
    replays_forward: bool = False,
    batch_dims: Callable[[nn.Module, int], Sequence[int]] | None = None,
) -> Callable[[TangentFn], TangentFn]:
    """Decorator: use ``fn`` as the ghost rule for modules of exactly these types.

    Types match exactly (a subclass may override ``forward``; it falls back to the JVP rule).
    Registering a type twice raises instead of silently replacing the first rule.
    """

    def decorate(fn: TangentFn) -> TangentFn:
        for cls in module_types:
            if cls in _RULES:
                raise ValueError(f"a ghost rule for {cls.__name__} is already registered")
        rule = GhostRule(fn, recursive, replays_forward, batch_dims or GhostRule.batch_dims)
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


def _mha_batch_dims(module: nn.Module, n: int) -> list[int]:
    # (attn_output, attn_weights): the weights are always batch-first
    first = 0 if getattr(module, "batch_first", False) else 1
    return [first, 0][:n]


_MHA_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def _additive_mask(mask: Tensor | None, like: Tensor) -> Tensor | None:
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill_(
            mask, float("-inf")
        )
    return mask.to(like.dtype)


@register_ghost_rule(
    nn.MultiheadAttention, recursive=True, replays_forward=True, batch_dims=_mha_batch_dims
)
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
        return jvp_tangent(module, args, kwargs, direction)
    if not mha.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    n, tgt, embed = query.shape
    src, heads = key.shape[1], mha.num_heads
    head_dim = embed // heads

    def zeros(name: str) -> Tensor:
        return torch.zeros_like(cast(Tensor, mha.get_parameter(name)))

    def tangent(name: str) -> Tensor:
        return direction[name] if name in direction else zeros(name)

    if mha._qkv_same_embed_dim:
        weights = cast(Tensor, mha.in_proj_weight).chunk(3)
        d_weights = tangent("in_proj_weight").chunk(3)
    else:
        names = ("q_proj_weight", "k_proj_weight", "v_proj_weight")
        weights = tuple(cast(Tensor, mha.get_parameter(nm)) for nm in names)
        d_weights = tuple(tangent(nm) for nm in names)
    if mha.in_proj_bias is not None:
        biases: tuple[Tensor | None, ...] = mha.in_proj_bias.chunk(3)
        d_biases: tuple[Tensor | None, ...] = tangent("in_proj_bias").chunk(3)
    else:
        biases = d_biases = (None, None, None)

    def heads_first(t: Tensor, length: int) -> Tensor:  # [N, L, E] -> [N, H, L, h]
        return t.view(n, length, heads, head_dim).transpose(1, 2)

    proj, d_proj = [], []
    for x, w, b, dw, db, length in zip(
        (query, key, value), weights, biases, d_weights, d_biases, (tgt, src, src), strict=True
    ):
        proj.append(heads_first(F.linear(x, w, b), length))
        d_proj.append(heads_first(F.linear(x, dw, db), length))
    q, k, v = proj
    dq, dk, dv = d_proj
    scale = head_dim**-0.5
    scores = (q @ k.transpose(-2, -1)) * scale
    mask = _additive_mask(a["attn_mask"], scores)
    if mask is not None:
        scores = scores + (mask.view(n, heads, tgt, src) if mask.dim() == 3 else mask)
    padding = _additive_mask(a["key_padding_mask"], scores)
    if padding is not None:
        scores = scores + padding.view(n, 1, 1, src)
    p = torch.softmax(scores, dim=-1)
    d_scores = (dq @ k.transpose(-2, -1) + q @ dk.transpose(-2, -1)) * scale
    d_p = p * (d_scores - (p * d_scores).sum(-1, keepdim=True))
    out = (p @ v).transpose(1, 2).reshape(n, tgt, embed)
    d_out = (d_p @ v + p @ dv).transpose(1, 2).reshape(n, tgt, embed)
    out_proj = mha.out_proj
    bias = out_proj.bias
    d_bias = None if bias is None else tangent("out_proj.bias")
    result = F.linear(out, tangent("out_proj.weight"), d_bias) + F.linear(d_out, out_proj.weight)
    if not mha.batch_first:
        result = result.transpose(0, 1)
    if not a["need_weights"]:
        return (result, None)
    return (result, d_p.mean(1) if a["average_attn_weights"] else d_p)


FALLBACK_RULE = GhostRule(jvp_tangent, recursive=False, replays_forward=True)


@dataclasses.dataclass
class Entry:
    """One covered module: its rule and ``{local parameter name: global name}``."""

    name: str
    module: nn.Module
    rule: GhostRule
    params: dict[str, str]
    norm: NormFn | None = None  # its per-example gradient-norm rule, if one exists


def refuse_repeated_call(entry: Entry, module: nn.Module) -> None:
    """The cosine reward's per-example norms are per call: a layer that runs twice in one
    forward gets a gradient whose norm has cross terms between the calls that the per-call
    norms miss, so the cosine would be wrong. Raise instead."""
    raise ValueError(
        f"reward='cosine' needs each covered layer to run once per forward, but module "
        f"{entry.name!r} ({type(module).__name__}) ran again in the same forward; use "
        "reward='dot' (exact for layers called several times)"
    )


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
        if not local:
            continue
        if rule is None:
            if fallback == "raise":
                uncovered.append(f"{mod_name or '<root>'} ({type(module).__name__})")
                continue
            rule = FALLBACK_RULE
        entries.append(Entry(mod_name or "<root>", module, rule, local, norm_rule(module)))
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


class Call:
    """One forward call of a covered module: its inputs (and RNG state, for rules that replay
    the forward), kept until its outputs' gradients arrive; :meth:`tangents` runs the rule."""

    def __init__(self, entry: Entry, args: tuple, kwargs: dict, rng: RngSnapshot | None) -> None:
        self.entry = entry
        self.args: tuple | None = args
        self.kwargs: dict | None = kwargs
        self.rng = rng
        leaves = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        self.versions = [(t, t._version) for t in leaves]
        self.pending = 0  # output tensors whose gradient has not arrived yet
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
        return {n: direction[g] for n, g in self.entry.params.items()}

    def norm_and_dot(
        self, grad: Tensor, direction: Mapping[str, Tensor] | None
    ) -> tuple[Tensor, Tensor | None]:
        """The module's per-example squared gradient norms and (given ``direction``) its share
        of ``<g_i, D>``, both from its norm rule's per-example pieces; ``grad`` is the gradient
        at its (single) output. Needs ``entry.norm``."""
        rule = self.entry.norm
        if rule is None:  # the probe and GAR refuse such models when they are built
            raise RuntimeError(f"no gradient-norm rule for module {self.entry.name!r}")
        self.check_inputs()
        # Modules with a norm rule take one input, passed by position or by name.
        inputs = [*(self.args or ()), *(self.kwargs or {}).values()]
        if len(inputs) != 1 or not isinstance(inputs[0], Tensor):
            raise RuntimeError(
                f"module {self.entry.name!r} was called with {len(inputs)} inputs; its "
                "gradient-norm rule needs exactly one input tensor"
            )
        local = None if direction is None else self.local(direction)
        return rule(self.entry.module, inputs[0], grad, self.entry.params.keys(), local)

    def share(
        self, i: int, dim: int, grad: Tensor, direction: Mapping[str, Tensor], norms: bool
    ) -> tuple[Tensor, Tensor | None]:
        """Output ``i``'s share of ``<g_i, D>`` (``grad``: the gradient at that output, batch in
        ``dim``) and, with ``norms``, the module's per-example squared gradient norms. With
        norms, both come from the norm rule's per-example pieces (single-output modules); else
        from the rule's tangent."""
        if norms:
            sq, dot = self.norm_and_dot(grad, direction)
            if dot is None:  # a norm rule given a direction returns its share: a broken rule
                raise RuntimeError(
                    f"the gradient-norm rule of module {self.entry.name!r} "
                    f"({type(self.entry.module).__name__}) returned no share of the rewards "
                    "although it was given a direction"
                )
            return dot, sq
        return per_example_dot(grad, self.tangents(direction)[i], dim), None

    def tangents(self, direction: Mapping[str, Tensor]) -> list[Any]:
        if self._tangents is None:
            self.check_inputs()
            local = self.local(direction)
            module, args, kwargs = self.entry.module, self.args, self.kwargs or {}
            if self.rng is None:
                out = self.entry.rule.tangent(module, args or (), kwargs, local)
            else:
                with self.rng.replay():
                    out = self.entry.rule.tangent(module, args or (), kwargs, local)
            self._tangents = tree_flatten(out)[0]
        return self._tangents

    def done_one(self) -> None:
        """One output's gradient was used; after the last, let go of the inputs (memory)."""
        self.pending -= 1
        if self.pending == 0:
            self.args = self.kwargs = self._tangents = None
            self.versions = []


def register_call_hooks(
    entries: Sequence[Entry], before: Callable[..., Any], after: Callable[..., Any]
) -> list[Any]:
    """On every covered module: ``after(entry, module, args, kwargs, output)`` as a forward
    hook, and ``before(entry, module, args)`` as a pre-hook where the rule replays the forward
    (to snapshot the RNG). Returns the handles."""
    handles: list[Any] = []
    for entry in entries:
        if entry.rule.replays_forward:
            handles.append(entry.module.register_forward_pre_hook(functools.partial(before, entry)))
        handles.append(
            entry.module.register_forward_hook(functools.partial(after, entry), with_kwargs=True)
        )
    return handles


def per_example_dot(a: Tensor, b: Tensor, dim: int) -> Tensor:
    """``sum`` over every dim but ``dim`` of ``a * b``, as a float32 vector, without ``a * b``."""
    a = a.movedim(dim, 0).reshape(a.shape[dim], 1, -1)
    b = b.movedim(dim, 0).reshape(b.shape[dim], -1, 1)
    return torch.bmm(a.float(), b.float()).view(-1)


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
        direction: Mapping[str, Tensor],
        n: int,
        devices: list[int],
        device: torch.device,
        norms: bool = False,
        per_module: bool = False,
    ) -> None:
        self.direction = direction
        self.n = n
        self.devices = devices
        self.r = torch.zeros(n, dtype=torch.float32, device=device)
        # squared per-example gradient norms, summed over modules (reward="cosine")
        self.sq: Tensor | None = (
            torch.zeros(n, dtype=torch.float32, device=device) if norms else None
        )
        # each module's share of sum_i r_i, kept only for the sum check's diagnosis
        self.module_sums: dict[str, Tensor] | None = {} if per_module else None
        self.anchors: dict[tuple[torch.dtype, torch.device], Tensor] = {}
        self.active = True
        self._rng: dict[int, RngSnapshot] = {}
        self._called: set[int] = set()  # entries already called (reward="cosine")
        self._handles: list[Any] = register_call_hooks(entries, self._before, self._after)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _anchor(self, like: Tensor) -> Tensor:
        key = (like.dtype, like.device)
        if key not in self.anchors:
            self.anchors[key] = torch.zeros(
                (), dtype=like.dtype, device=like.device, requires_grad=True
            )
        return self.anchors[key]

    def _before(self, entry: Entry, module: nn.Module, args: tuple) -> None:
        if self.active:
            self._rng[id(entry)] = RngSnapshot(self.devices)

    def _after(
        self, entry: Entry, module: nn.Module, args: tuple, kwargs: dict, output: Any
    ) -> Any:
        if not self.active:
            return None
        if self.sq is not None:
            if id(entry) in self._called:
                refuse_repeated_call(entry, module)
            self._called.add(id(entry))
        call = Call(entry, args, kwargs, self._rng.pop(id(entry), None))
        leaves, spec = tree_flatten(output)
        dims = entry.rule.batch_dims(module, len(leaves))
        for i, leaf in enumerate(leaves):
            if not (isinstance(leaf, Tensor) and leaf.requires_grad):
                continue
            dim = dims[i]
            if leaf.dim() <= dim or leaf.shape[dim] != self.n:
                raise ValueError(
                    f"method='ghost' cannot attribute module {entry.name!r} "
                    f"({type(module).__name__}) to examples: its output of shape "
                    f"{list(leaf.shape)} does not hold the batch (size {self.n}) in dim {dim}; "
                    "use method='jvp'"
                )
            leaves[i] = leaf = leaf + self._anchor(leaf)
            call.pending += 1
            leaf.register_hook(functools.partial(self._on_grad, call, i, dim))
        return spec.unflatten(leaves)

    def _on_grad(self, call: Call, i: int, dim: int, grad: Tensor) -> None:
        self.active = False  # a replayed forward must not be captured again
        try:
            contribution, sq = call.share(i, dim, grad, self.direction, self.sq is not None)
        finally:
            self.active = True
        if sq is not None and self.sq is not None:
            self.sq += sq
        call.done_one()
        self.r += contribution
        if self.module_sums is not None:
            name = call.entry.name
            self.module_sums[name] = self.module_sums.get(name, 0) + contribution.sum()
