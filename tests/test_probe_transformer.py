"""Stock transformer parts against one autograd.grad per example: attention's per-example
norms, modules whose output holds no batch (a position embedding of arange(T)), bare Parameters
used by broadcasting, tied weights; batch size equal to the sequence length and another."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adaptive_data as ad
from adaptive_data.probe import _layout, _plan
from adaptive_data.probe.rules import attention, generic
from tests import models
from tests.models import SEQ, CausalLM, lm_batch, lm_loss, loop_rewards
from tests.test_probe_attention import CALLS, CONFIGS, _inputs

# GAR over one source as a harness for its rewards (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_source_rewards")

LM_MODELS = {
    "causal_lm": lambda: CausalLM(),
    "causal_lm_tied": lambda: CausalLM(tied=True),
    "gpt": lambda: models.GPT(),
}


def _setup(kind: str, n: int):
    torch.manual_seed(0)
    model = LM_MODELS[kind]().eval()
    g = torch.Generator().manual_seed(n)
    x, y = lm_batch(n, g)
    d = {name: torch.randn(p.shape, generator=g) for name, p in model.named_parameters()}
    return model, x, y, d


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("kind", list(LM_MODELS))
@pytest.mark.parametrize("n", [SEQ, 5])  # batch size = sequence length, and another
def test_language_models_match_the_loop_oracle(kind: str, n: int) -> None:
    model, x, y, d = _setup(kind, n)
    dot, cosine = loop_rewards(model, lm_loss, x, y, d)
    cases = [("ghost", "dot", dot), ("jvp", "dot", dot), ("ghost", "cosine", cosine)]
    for method, reward, want in cases:
        got = ad.GradientProbe(model, lm_loss, estimator=method, reward=reward)(x, y, direction=d)
        assert _relative(got, want) < 1e-4, (method, reward, _relative(got, want))


@pytest.mark.parametrize("kind", ["causal_lm", "gpt"])
def test_ghost_without_the_whole_model_jvp_matches_the_loop_oracle(kind, monkeypatch) -> None:
    """With examples coupled elsewhere (BatchNorm in train mode), the dot reward does not switch
    to one whole-model JVP: the parameters of modules whose output holds no batch are covered
    by a JVP of the root restricted to them, the others by their rules. Forced here."""
    monkeypatch.setattr(_plan, "couples_examples", lambda model: True)
    model, x, y, d = _setup(kind, SEQ)
    dot, _ = loop_rewards(model, lm_loss, x, y, d)
    got = ad.GradientProbe(model, lm_loss)(x, y, direction=d)  # verifies the sum on this call
    assert _relative(got, dot) < 1e-4


def test_the_layout_puts_the_position_embedding_at_the_root() -> None:
    """pos's output holds no batch; tok's and every layer's hold it in dim 0; tok and head
    share a weight, so its per-example gradients are summed over both before the norm."""
    model, x, _, _ = _setup("causal_lm_tied", SEQ)
    params = dict(model.named_parameters())
    entries = _plan.plan(model, params, "jvp")
    layout = _layout.detect_layout(model, entries, (x,), {}, SEQ, "test")
    assert [e.name for e in layout.rehomed] == ["pos"]
    assert set(layout.root_params) == {"pos.weight"}
    assert layout.shared == {"tok.weight"}
    by_name = {e.name: e for e in entries}
    assert layout.calls[id(by_name["pos"])][0].outputs == (None,)
    assert layout.calls[id(by_name["tok"])][0].outputs == (0,)


def test_fallback_raise_refuses_a_module_whose_output_holds_no_batch_by_name() -> None:
    model, x, y, d = _setup("causal_lm", 5)
    probe = ad.GradientProbe(model, lm_loss, fallback="raise")
    with pytest.raises(ValueError, match=r"\['pos \(Embedding\)'\].*do not hold the batch"):
        probe(x, y, direction=d)


def test_the_layout_runs_are_cached_per_input_signature() -> None:
    model, x, y, d = _setup("causal_lm", 5)
    probe = ad.GradientProbe(model, lm_loss, reward="cosine")
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        probe(x, y, direction=d)
        probe(x[:4], y[:4], direction=d)  # another batch size: same signature
        probe(x[:, :4], y[:, :4], direction=d)  # another length: a new layout
    finally:
        handle.remove()
    layout_runs = [s for s in calls if s in (2, 3)]
    assert layout_runs == [2, 3, 2, 3]


# ---------------------------------------------------------------- attention's per-example norms


def _per_example_oracle(mha, args, kwargs, grads, d):
    """One autograd.grad per example of sum over outputs of <B restricted to i, output>."""
    outs = [o for o in mha(*args, **kwargs) if o is not None]
    dims = [0 if (j == 1 or mha.batch_first) else 1 for j in range(len(outs))]
    names = [n for n, _ in mha.named_parameters()]
    n = args[0].shape[0 if mha.batch_first else 1]
    sq, dot = [], []
    for i in range(n):
        total = 0
        for j, (o, b) in enumerate(zip(outs, grads, strict=True)):
            total = total + (o.select(dims[j], i) * b.select(dims[j], i)).sum()
        gs = torch.autograd.grad(total, list(mha.parameters()), retain_graph=True)
        sq.append(sum(g.pow(2).sum() for g in gs))
        dot.append(sum((g * d[nm]).sum() for nm, g in zip(names, gs, strict=True)))
    return torch.stack(sq), torch.stack(dot)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("call", [*CALLS, "causal_hint"])
def test_attention_norms_match_per_example_gradients(config: str, call: str) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, **CONFIGS[config]).eval()
    g = torch.Generator().manual_seed(1)
    spec = (
        dict(need_weights=False, attn_mask="bool2d", is_causal=True)
        if call == "causal_hint"
        else CALLS[call]
    )
    args, kwargs = _inputs(mha, spec, g, n=4)
    if call == "causal_hint":  # the hint makes MHA use the true causal mask, not attn_mask
        kwargs["attn_mask"] = torch.ones(4, 5, dtype=torch.bool).triu(1)
    outs = [o for o in mha(*args, **kwargs) if o is not None]
    grads = [torch.randn(o.shape, generator=g) for o in outs]
    d = {name: torch.randn(p.shape, generator=g) for name, p in mha.named_parameters()}
    names = [n for n, _ in mha.named_parameters()]
    pieces = attention.attention_pieces(mha, args, kwargs, dict(enumerate(grads)), names, d, [])
    if pieces is None:  # bias_k/bias_v, add_zero_attn: the generic rule
        dims = [0 if (j == 1 or mha.batch_first) else 1 for j in range(len(grads))]
        pieces = generic.generic_pieces(
            mha, args, kwargs, None, dict(enumerate(grads)), dims, names, d, []
        )
    sq, dot, _ = pieces
    want_sq, want_dot = _per_example_oracle(mha, args, kwargs, grads, d)
    torch.testing.assert_close(sq, want_sq, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dot, want_dot, rtol=1e-4, atol=1e-5)


def test_attention_norms_keep_the_per_example_gradients_of_shared_weights() -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    g = torch.Generator().manual_seed(2)
    args, kwargs = _inputs(mha, CALLS["plain"], g, n=3)
    (out,) = [o for o in mha(*args, **kwargs) if o is not None]
    b = torch.randn(out.shape, generator=g)
    names = [n for n, _ in mha.named_parameters()]
    sq, _, kept = attention.attention_pieces(mha, args, kwargs, {0: b}, names, None, names)
    assert torch.equal(sq, torch.zeros(3))
    for i in range(3):
        gs = torch.autograd.grad((out[i] * b[i]).sum(), list(mha.parameters()), retain_graph=True)
        for name, gr in zip(names, gs, strict=True):
            torch.testing.assert_close(kept[name][i], gr.reshape(-1), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- GAR on a language model


@pytest.mark.parametrize("reward", ["dot", "cosine"])
def test_gar_held_out_reference_on_the_language_model_equals_the_probe(reward: str) -> None:
    import itertools

    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = CausalLM(tied=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(3)
    data = TensorDataset(*lm_batch(24, g))
    ref = lm_batch(6, g)
    sampler = ad.GARSampler(data, batch_size=SEQ, seed=0)
    gar = ad.GAR(
        model,
        sampler,
        optimizer=opt,
        reward=reward,
        reference=itertools.repeat(ref),
        loss_fn=lm_loss,
        budget=None,
    )
    checked = 0
    for x, y in sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler)):
        copy = CausalLM(tied=True)
        copy.load_state_dict(model.state_dict())
        oracle = ad.GradientProbe(copy, lm_loss, reward=reward)(x, y, reference=ref)
        opt.zero_grad()
        lm_loss(model(x), y).mean().backward()
        r = gar.step()
        if reward == "dot":
            oracle = oracle / len(x)  # the kept gradients are those of the mean loss
        torch.testing.assert_close(r, oracle, rtol=2e-4, atol=1e-6)
        checked += 1
        opt.step()
    assert checked == 3
    gar.close()
