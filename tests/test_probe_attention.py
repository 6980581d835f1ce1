"""ghost's closed-form rule for nn.MultiheadAttention against forward-mode AD and the oracle."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adaptive_data as ad
from adaptive_data.probe.rules import ghost_rules, jvp_tangent
from tests.models import loop_oracle, loss_fn, random_direction

CONFIGS = {
    "batch_first": dict(batch_first=True),
    "seq_first": dict(batch_first=False),
    "no_bias": dict(batch_first=True, bias=False),
    "kdim_vdim": dict(batch_first=True, kdim=5, vdim=3),
    "bias_kv_fallback": dict(batch_first=True, add_bias_kv=True),
    "zero_attn_fallback": dict(batch_first=True, add_zero_attn=True),
}
CALLS = {
    "plain": dict(need_weights=False),
    "weights_averaged": dict(need_weights=True),
    "weights_per_head": dict(need_weights=True, average_attn_weights=False),
    "bool_masks": dict(need_weights=False, attn_mask="bool2d", key_padding_mask="bool"),
    "float_masks": dict(need_weights=True, attn_mask="float3d", key_padding_mask="float"),
}


def _inputs(mha: nn.MultiheadAttention, call: dict, g: torch.Generator, n: int = 3):
    tgt, src = 4, 5
    kdim, vdim = mha.kdim, mha.vdim
    q = torch.randn(n, tgt, mha.embed_dim, generator=g)
    k = torch.randn(n, src, kdim, generator=g)
    v = torch.randn(n, src, vdim, generator=g)
    if not mha.batch_first:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    kwargs = dict(call)
    if kwargs.get("attn_mask") == "bool2d":
        kwargs["attn_mask"] = torch.triu(torch.ones(tgt, src, dtype=torch.bool), diagonal=2)
    elif kwargs.get("attn_mask") == "float3d":
        kwargs["attn_mask"] = torch.randn(n * mha.num_heads, tgt, src, generator=g)
    if kwargs.get("key_padding_mask") == "bool":
        pad = torch.zeros(n, src, dtype=torch.bool)
        pad[0, -2:] = True
        kwargs["key_padding_mask"] = pad
    elif kwargs.get("key_padding_mask") == "float":
        kwargs["key_padding_mask"] = torch.randn(n, src, generator=g)
    return (q, k, v), kwargs


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("call", list(CALLS))
def test_rule_equals_forward_mode_ad(config: str, call: str) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, **CONFIGS[config]).eval()
    g = torch.Generator().manual_seed(1)
    args, kwargs = _inputs(mha, CALLS[call], g)
    direction = {name: torch.randn(p.shape, generator=g) for name, p in mha.named_parameters()}
    rule = ghost_rules()[nn.MultiheadAttention].tangent
    got = rule(mha, args, kwargs, direction)
    expected = jvp_tangent(mha, args, kwargs, direction)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-4, atol=1e-5)
    if expected[1] is None:
        assert got[1] is None
    else:
        torch.testing.assert_close(got[1], expected[1], rtol=1e-4, atol=1e-5)


class AttentionModel(nn.Module):
    """Attention whose weights also feed the loss, with no bare parameter on the root."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.inp = nn.Linear(3, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first, dropout=0.3)
        self.head = nn.Linear(8 + 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = h if self.batch_first else h.transpose(0, 1)
        out, weights = self.attn(h, h, h)
        out = out if self.batch_first else out.transpose(0, 1)
        return self.head(torch.cat([out.mean(1), weights.mean(1)], dim=1))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("verify", ["first", "never"])
def test_attention_model_matches_oracle(batch_first: bool, verify: str) -> None:
    torch.manual_seed(0)
    model = AttentionModel(batch_first).eval()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(5, 4, 3, generator=g), torch.randint(0, 3, (5,), generator=g)
    d = random_direction(model, g)
    got = ad.GradientProbe(model, loss_fn, verify=verify)(x, y, direction=d)
    torch.testing.assert_close(got, loop_oracle(model, x, y, d), rtol=1e-4, atol=1e-5)


def test_attention_dropout_in_train_mode_replays_the_mask() -> None:
    """Train mode with attention dropout: the JVP path, replayed with the call's RNG state."""
    torch.manual_seed(0)
    model = AttentionModel(True).train()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(5, 4, 3, generator=g), torch.randint(0, 3, (5,), generator=g)
    d = random_direction(model, g)
    state = torch.get_rng_state()
    jvp = ad.GradientProbe(model, loss_fn, estimator="jvp")(x, y, direction=d)
    torch.set_rng_state(state)
    ghost = ad.GradientProbe(model, loss_fn, verify="never")(x, y, direction=d)
    torch.testing.assert_close(ghost, jvp, rtol=1e-4, atol=1e-5)


def _without_closed_form(monkeypatch) -> None:
    """Attention by the generic path: the module's forward again (the call's RNG replayed,
    so its own dropout masks) and one backward per example; JVP tangents."""
    from adaptive_data.probe.rules import attention

    monkeypatch.setattr(attention, "attention_call", lambda module, args, kwargs: None)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("reward", ["dot", "cosine"])
def test_attention_dropout_has_a_closed_form_equal_to_the_generic_path(
    batch_first: bool, reward: str, monkeypatch
) -> None:
    """Train mode with attention dropout 0.3: the closed forms draw the call's mask again and
    give what the generic path gives (the module's own forward replayed), weights returned
    (after dropout, averaged over heads) included."""
    from adaptive_data.probe.rules import attention

    torch.manual_seed(0)
    model = AttentionModel(batch_first).train()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, 4, 3, generator=g), torch.randint(0, 3, (6,), generator=g)
    d = random_direction(model, g)
    state = torch.get_rng_state()
    calls = []
    original = attention.attention_pieces if reward == "cosine" else attention.attention_tangent
    name = "attention_pieces" if reward == "cosine" else "attention_tangent"

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(attention, name, counted)
    closed = ad.GradientProbe(model, loss_fn, reward=reward, verify="never")(x, y, direction=d)
    assert calls  # the closed form ran
    monkeypatch.undo()
    _without_closed_form(monkeypatch)
    torch.set_rng_state(state)
    generic = ad.GradientProbe(model, loss_fn, reward=reward, verify="never")(x, y, direction=d)
    torch.testing.assert_close(closed, generic, rtol=1e-4, atol=1e-6)


def test_a_dropout_mask_that_cannot_be_drawn_again_takes_the_generic_path(monkeypatch) -> None:
    """Where the redrawn mask does not give the module's own output (another kernel's
    draws), the call is computed by the generic path: the rewards stay exact."""
    from adaptive_data.probe.rules import attention

    torch.manual_seed(0)
    model = AttentionModel(True).train()
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(6, 4, 3, generator=g), torch.randint(0, 3, (6,), generator=g)
    d = random_direction(model, g)
    state = torch.get_rng_state()
    monkeypatch.setattr(attention, "_REDRAWN", {})
    monkeypatch.setattr(  # a mask of other draws: the check against the module must see it
        attention._Attention,
        "dropout_mask",
        lambda self, p: torch.rand(p.shape).bernoulli_(0.5).div_(0.5) if self.dropout else None,
    )
    got = ad.GradientProbe(model, loss_fn, reward="cosine", verify="never")(x, y, direction=d)
    assert set(attention._REDRAWN.values()) == {False}
    monkeypatch.undo()
    _without_closed_form(monkeypatch)
    torch.set_rng_state(state)
    generic = ad.GradientProbe(model, loss_fn, reward="cosine", verify="never")(x, y, direction=d)
    torch.testing.assert_close(got, generic, rtol=1e-4, atol=1e-6)
