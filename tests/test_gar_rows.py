"""GAR(rows=m): rewarding part of each batch. The rows' rewards must equal the whole batch's
rewards of the same rows (layers whose examples do not mix computed on the rows alone, others
on the whole batch and cut), the hooks must keep only those rows, the choice must be
reproducible and fair, and the sampler's update from some rows must be the full update in
expectation."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import adaptive_data as ad
from adaptive_data.probe._calls import rows_independent
from adaptive_data.probe._layout import UNKNOWN, CallLayout
from adaptive_data.probe._plan import Entry
from adaptive_data.probe.rules import ghost_rules
from tests import models
from tests.models import CausalLM, cnn_bn_eval, lm_batch, lm_loss

# GAR over one source as a harness for its rewards (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_source_rewards")

N = 12  # batch size
M = 5  # rows rewarded


class ExpandedLM(CausalLM):
    """The LM with positions ``[B, T]`` (its position embedding's output holds the batch)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape
        h = self.tok(x) + self.pos(torch.arange(t).expand(b, t))
        mask = nn.Transformer.generate_square_subsequent_mask(t)
        return self.head(self.body(h, mask=mask, is_causal=True))


def lm_data(n: int, seed: int) -> TensorDataset:
    return TensorDataset(*lm_batch(n, torch.Generator().manual_seed(seed)))


def class_data(kind: str, n: int, seed: int) -> TensorDataset:
    return TensorDataset(*models.batch(kind, n, torch.Generator().manual_seed(seed)))


# name -> (model factory, dataset factory (n, seed), per-example loss)
CASES = {
    "mlp": (lambda: models.build("mlp"), lambda n, s: class_data("mlp", n, s), models.loss_fn),
    "cnn_bn_train": (
        lambda: models.build("cnn"),
        lambda n, s: class_data("cnn", n, s),
        models.loss_fn,
    ),
    "cnn_bn_eval": (cnn_bn_eval, lambda n, s: class_data("cnn", n, s), models.loss_fn),
    "transformer": (
        models.transformer,
        lambda n, s: class_data("transformer", n, s),
        models.loss_fn,
    ),
    "lm_tied": (lambda: CausalLM(tied=True), lm_data, lm_loss),
    "lm_expanded": (ExpandedLM, lm_data, lm_loss),
    "gpt": (models.GPT, lm_data, lm_loss),
}


def recorded_run(case: str, rows: int | None, reward: str, held_out: bool):
    """Train 4 steps with a GAR whose sampler records (rewards, batch, rows) instead of
    learning (so both runs draw the same batches); returns the records and the GAR."""
    make_model, make_data, loss = CASES[case]
    torch.manual_seed(0)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    if held_out:
        sources = {"a": make_data(3 * N, 1), "b": make_data(3 * N, 2)}
        reference = itertools.repeat(tuple(make_data(8, 3).tensors))
    else:
        sources, reference = make_data(6 * N, 1), None
    sampler = ad.GARSampler(sources, batch_size=N, seed=0, num_batches=5)
    records = []
    sampler.update = lambda r, batch=None, rows=None: records.append((r, batch, rows))  # type: ignore[method-assign]
    gar = ad.GAR(
        model,
        sampler,
        optimizer=opt,
        reward=reward,
        reference=reference,
        loss_fn=loss if held_out else None,
        rows=rows,
        budget=None,
    )
    for x, y in sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler)):
        opt.zero_grad()
        loss(model(x), y).mean().backward()
        gar.step()
        opt.step()
    return records, gar


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("reward", ["dot", "cosine"])
def test_the_rows_rewards_equal_the_whole_batch_rewards_of_those_rows(case, reward):
    held_out = case in ("mlp", "lm_tied", "gpt")  # the other cases: next-batch references
    full, _ = recorded_run(case, None, reward, held_out)
    part, gar = recorded_run(case, M, reward, held_out)
    assert len(part) == len(full) >= 4
    for (r_full, b_full, rows_full), (r_part, b_part, rows) in zip(full, part, strict=True):
        assert b_full == b_part
        assert rows_full is None
        assert rows.tolist() == gar.choose_rows(b_part, N).tolist()
        assert len(rows) == M
        torch.testing.assert_close(r_part, r_full[rows], rtol=1e-4, atol=1e-6)


def kept_sizes(case: str) -> dict[str, set[int]]:
    """After one training forward and backward: the batch sizes of what the hooks kept, by
    module type."""
    make_model, make_data, loss = CASES[case]
    torch.manual_seed(0)
    model = make_model()
    sampler = ad.GARSampler(make_data(2 * N, 1), batch_size=N, seed=0)
    gar = ad.GAR(model, sampler, rows=M, budget=None)
    x, y = next(iter(sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler))))
    loss(model(x), y).mean().backward()
    sizes: dict[str, set[int]] = {}
    for kept in gar._schedule.pending[-1].calls:
        leaves = [
            leaf.shape[dim]
            for leaf, dim in zip(
                torch.utils._pytree.tree_flatten((kept.call.args, kept.call.kwargs))[0],
                kept.call.layout.inputs,
                strict=True,
            )
            if isinstance(leaf, torch.Tensor) and dim is not None and dim >= 0
        ]
        leaves += [g.shape[dim] for g, dim in kept.grads.values()]
        name = type(kept.call.entry.module).__name__
        sizes.setdefault(name, set()).update(leaves)
    gar.close()
    return sizes


def test_the_hooks_keep_only_the_chosen_rows():
    sizes = kept_sizes("cnn_bn_train")
    assert sizes["Conv2d"] == {M}
    assert sizes["Linear"] == {M}
    assert sizes["GroupNorm"] == {M}
    assert sizes["BatchNorm2d"] == {N}  # batch statistics mix the examples: kept whole
    sizes = kept_sizes("lm_expanded")
    assert sizes["MultiheadAttention"] == {M}
    assert sizes["Embedding"] == {M}


def test_rows_independent_says_which_calls_can_be_cut():
    rules = ghost_rules()
    layout = CallLayout((0,), (0,), (True,))
    x = (torch.randn(4, 3),)

    def cut(module: nn.Module, args: tuple = x, root: bool = False, lay=layout) -> bool:
        entry = Entry("m", module, rules[type(module)], {}, root=root)
        return rows_independent(entry, lay, args, {})

    assert cut(nn.Linear(3, 3))
    assert not cut(nn.Linear(3, 3), root=True)  # a replay of the whole model
    assert not cut(nn.Linear(3, 3), lay=CallLayout((UNKNOWN,), (0,), (True,)))
    assert not cut(nn.BatchNorm1d(3).train())  # batch statistics
    assert cut(nn.BatchNorm1d(3).eval())  # running statistics
    tokens = (torch.randint(0, 5, (4, 2)),)
    assert cut(nn.Embedding(5, 3), tokens)
    assert not cut(nn.Embedding(5, 3, scale_grad_by_freq=True), tokens)  # per-batch counts
    mha = nn.MultiheadAttention(4, 2, batch_first=True)
    q = torch.randn(3, 5, 4)
    three = CallLayout((0, 0, 0), (0, None), (True, False))
    assert cut(mha, (q, q, q), lay=three)
    mask3 = torch.zeros(3 * 2, 5, 5)  # batch x heads in one dim
    four = CallLayout((0, 0, 0, 0), (0, None), (True, False))
    assert not cut(mha, (q, q, q, None, False, mask3), lay=four)
    assert not cut(
        nn.MultiheadAttention(4, 2, dropout=0.1, batch_first=True).train(), (q, q, q), lay=three
    )


def test_the_row_choice_is_reproducible_and_fair():
    sampler = ad.GARSampler(class_data("mlp", 2 * N, 1), batch_size=N, seed=3)
    a = ad.GAR(models.build("mlp"), sampler, rows=M, budget=None)
    b = ad.GAR(models.build("mlp"), sampler, rows=M, budget=None)
    counts = torch.zeros(N)
    batches = 2000
    for batch in range(batches):
        rows = a.choose_rows(batch, N)
        assert rows.tolist() == b.choose_rows(batch, N).tolist()  # from (seed, batch) alone
        assert rows.tolist() == sorted(set(rows.tolist()))
        assert len(rows) == M
        counts[rows] += 1
    # each row is in a batch's subset with probability M / N: within 5 standard deviations
    p = M / N
    sd = (batches * p * (1 - p)) ** 0.5
    assert ((counts - batches * p).abs() < 5 * sd).all(), counts
    other = ad.GAR(
        models.build("mlp"),
        ad.GARSampler(class_data("mlp", 2 * N, 1), N, seed=4),
        rows=M,
        budget=None,
    )
    assert any(a.choose_rows(t, N).tolist() != other.choose_rows(t, N).tolist() for t in range(10))


def test_rows_at_least_the_batch_reward_every_row():
    full, _ = recorded_run("mlp", None, "cosine", True)
    same, _ = recorded_run("mlp", N, "cosine", True)
    for (r_full, _, _), (r_same, _, rows) in zip(full, same, strict=True):
        assert rows is None
        torch.testing.assert_close(r_same, r_full, rtol=0, atol=0)


def updated_logits(sources: dict, rewards: torch.Tensor, rows) -> torch.Tensor:
    """A sampler's logits after a fixed first update (batch 0: it fixes the running baseline)
    and an update of batch 1 from ``rows`` of ``rewards`` (all rows: None)."""
    s = ad.GARSampler(sources, batch_size=len(rewards), seed=0, normalize="none", lr=0.01)
    it = iter(s.track(DataLoader(s.dataset, batch_sampler=s)))
    next(it)
    s.update(torch.linspace(-0.3, 0.3, len(rewards)))
    next(it)
    picked = rewards if rows is None else rewards[list(rows)]
    s.update(picked, rows=rows)
    return s.policy.state_dict()["logits"]


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(3, 6),
    rewards=st.lists(st.floats(-1, 1), min_size=6, max_size=6),
    m=st.integers(1, 3),
    seed=st.integers(0, 3),
)
def test_an_update_from_random_rows_is_the_full_update_in_expectation(n, rewards, m, seed):
    """Over every subset of m rows of a batch, the mean exponentiated-gradient step
    (normalize="none", a baseline fixed by an earlier update) equals the whole batch's: the
    sampler reads the rows' sources and averages over the rows given."""
    m = min(m, n)
    sources = {
        name: TensorDataset(torch.arange(20).float()) for name in ("a", "b", "c")[: 2 + seed % 2]
    }
    r = torch.tensor(rewards[:n], dtype=torch.float64)
    full = updated_logits(sources, r, None)
    subsets = list(itertools.combinations(range(n), m))
    mean = torch.stack([updated_logits(sources, r, list(rows)) for rows in subsets]).mean(0)
    torch.testing.assert_close(mean - mean.mean(), full - full.mean(), rtol=1e-9, atol=1e-12)


def test_update_rows_is_checked():
    s = ad.GARSampler(class_data("mlp", 2 * N, 1), batch_size=N, seed=0)
    next(iter(s.track(DataLoader(s.dataset, batch_sampler=s))))
    r = torch.zeros(2)
    with pytest.raises(ValueError, match=r"rows should be positions in \[0, 12\).*\[12\]"):
        s.update(r, rows=[0, 12])
    with pytest.raises(ValueError, match=r"rows should be distinct, but got \[3, 3\]"):
        s.update(r, rows=[3, 3])
    with pytest.raises(ValueError, match=r"should have shape \(2,\)"):
        s.update(torch.zeros(3), rows=[0, 1])
    with pytest.raises(TypeError, match=r"rows should be a 1-D integer Tensor"):
        s.update(r, rows=torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match=r"rows should hold ints, but got True"):
        s.update(r, rows=[True, 1])
    with pytest.raises(ValueError, match=r"at least one position"):
        s.update(torch.zeros(0), rows=[])
    with pytest.raises(ValueError, match=r"rows should be .*got rows=0"):
        ad.GAR(models.build("mlp"), s, rows=0, budget=None)
    s.update(r, rows=torch.tensor([4, 1]))  # any order, a Tensor or a list
    assert s.metrics()["batches_rewarded"] == 1
