"""Learned positions: a covered module whose output holds no batch but is added to one that
does (an Embedding of ``arange(T)``) is rewarded from the gradient at the sum, as a call on
every example's positions, instead of a replay of the whole model at its root. The rewards
must equal the root's replay (the former path, exact), the generic path must not run, and
with ``rows=`` the rows' rewards must be the whole batch's of those rows."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import adaptive_data as ad
from adaptive_data.probe import _calls, _summands
from tests.models import SEQ, VOCAB, CausalLM, StockLM, lm_loss

N, M = 8, 3


class HFLogits(nn.Module):
    """A Hugging Face model's logits (GPT-2: ``wpe``; BERT: position embeddings added in
    place), dropout off so that the root's replay, the reference, is exact."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        import transformers

        torch.manual_seed(0)
        if kind == "gpt2":
            config = transformers.GPT2Config(
                vocab_size=VOCAB,
                n_positions=SEQ,
                n_embd=16,
                n_layer=2,
                n_head=2,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
            )
            self.model = transformers.GPT2LMHeadModel(config)
        else:
            config = transformers.BertConfig(
                vocab_size=VOCAB,
                hidden_size=16,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=32,
                max_position_embeddings=SEQ,
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
            )
            self.model = transformers.BertForMaskedLM(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=x).logits


MODELS = {
    "causal_lm": lambda: CausalLM(),
    "stock_dropout": lambda: StockLM(dropout=0.1),
    "gpt2": lambda: HFLogits("gpt2"),
    "bert": lambda: HFLogits("bert"),
}


def data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(
        torch.randint(0, VOCAB, (n, SEQ), generator=g),
        torch.randint(0, VOCAB, (n, SEQ), generator=g),
    )


def run(kind: str, reward: str, rows: int | None = None) -> list[tuple]:
    """Three steps of the default held-out GAR whose sampler records (rewards, rows)."""
    torch.manual_seed(0)
    model = MODELS[kind]()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sampler = ad.GARSampler({"a": data(3 * N, 1), "b": data(3 * N, 2)}, batch_size=N, seed=0)
    got: list[tuple] = []
    sampler.update = lambda r, batch=None, rows=None: got.append((r, rows))  # type: ignore[method-assign]
    reference = itertools.repeat(tuple(data(N, 3).tensors))
    gar = ad.GAR(
        model,
        sampler,
        optimizer=opt,
        reward=reward,
        reference=reference,
        loss_fn=lm_loss,
        rows=rows,
        budget=None,
    )
    loader = sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler))
    for x, y in itertools.islice(loader, 3):
        opt.zero_grad()
        lm_loss(model(x), y).mean().backward()
        gar.step()
        opt.step()
    gar.close()
    return got


def _refuse(*args, **kwargs):
    raise AssertionError("the generic path (one backward per example) ran")


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("reward", ["dot", "cosine"])
def test_positions_are_rewarded_at_their_sum(kind: str, reward: str, monkeypatch) -> None:
    with monkeypatch.context() as m:
        m.setattr(_summands, "find_sum", lambda loose, x: None)  # the root's replay
        replayed = run(kind, reward)
    resolved = []
    original = _summands.broadcast_call

    def counted(*args):
        found = original(*args)
        resolved.append(found is not None)
        return found

    with monkeypatch.context() as m:
        if kind != "bert":  # BERT's head holds a bare bias: the generic path is its rule
            m.setattr(_calls, "generic_pieces", _refuse)
        m.setattr(_summands, "broadcast_call", counted)
        summed = run(kind, reward)
    assert resolved.count(True) >= 3  # every kept forward's positions, at their sum
    assert len(summed) == len(replayed) == 3
    for (a, _), (b, _) in zip(summed, replayed, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["causal_lm", "gpt2"])
def test_the_rows_of_a_sum_are_the_whole_batchs_rows(kind: str) -> None:
    whole = run(kind, "cosine")
    part = run(kind, "cosine", rows=M)
    for (r, _), (r_rows, rows) in zip(whole, part, strict=True):
        assert len(rows) == M
        torch.testing.assert_close(r_rows, r[rows], rtol=1e-4, atol=1e-6)


def test_the_probe_rewards_positions_at_their_sum(monkeypatch) -> None:
    """GradientProbe's cosine on the stock encoder: exact against the loop oracle, without the
    generic path."""
    from tests.models import loop_rewards

    monkeypatch.setattr(_calls, "generic_pieces", _refuse)
    torch.manual_seed(0)
    model = StockLM().eval()
    x, y = data(5, 4).tensors
    g = torch.Generator().manual_seed(5)
    d = {k: torch.randn(p.shape, generator=g) for k, p in model.named_parameters()}
    got = ad.GradientProbe(model, lm_loss, reward="cosine")(x, y, direction=d)
    want = loop_rewards(model, lm_loss, x, y, d)[1]
    assert float((got - want).norm() / want.norm()) < 1e-4
