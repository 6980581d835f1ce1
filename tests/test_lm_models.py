"""GAR on the language models users train, with the defaults, in a loop: a stock
``nn.TransformerEncoder`` whose causal mask is a buffer (sliced in each forward, with
``is_causal`` and dropout), exact against the oracle and learning a mixture."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import adaptive_data as ad
from adaptive_data.gar._budget import MIN_ROWS
from tests.models import SEQ, VOCAB, StockLM, lm_loss, loop_rewards

# GAR over one source as a harness for its rewards (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_source_rewards")


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def test_a_buffered_mask_is_probed_exactly() -> None:
    """The mask's slice is an input of every attention call: the reference pass and the
    layout runs must not count as editing it (they restore only the buffers they wrote)."""
    torch.manual_seed(0)
    model = StockLM().eval()  # the oracle's examples one by one: no dropout to replay
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, VOCAB, (5, SEQ), generator=g)
    y = torch.randint(0, VOCAB, (5, SEQ), generator=g)
    ref = (
        torch.randint(0, VOCAB, (4, SEQ), generator=g),
        torch.randint(0, VOCAB, (4, SEQ), generator=g),
    )
    probe = ad.GradientProbe(model, lm_loss, reward="cosine")
    params = dict(model.named_parameters())
    loss = lm_loss(model(ref[0]), ref[1]).mean()
    d = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
    got = probe(x, y, reference=ref)
    assert _relative(got, loop_rewards(model, lm_loss, x, y, d)[1]) < 1e-4


def _content_data(n: int, seed: int, predictable: bool) -> TensorDataset:
    """Sequences whose next token is the current one plus 1 (predictable) or random."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    y = (x + 1) % VOCAB if predictable else torch.randint(0, VOCAB, (n, SEQ), generator=g)
    return TensorDataset(x, y)


def _default_gar_on_the_stock_encoder(
    batch: int, per_source: int, references: int
) -> tuple[ad.GARSampler, ad.GAR, list[torch.Tensor | None]]:
    """Two epochs of a loop with every default over a predictable and a random source,
    rewarded against held-out predictable text: the sampler, GAR and each step's rewards."""
    torch.manual_seed(0)
    model = StockLM()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sampler = ad.GARSampler(
        {
            "good": _content_data(per_source, 1, True),
            "noise": _content_data(per_source, 2, False),
        },
        batch_size=batch,
        seed=0,
    )
    reference = ad.ReferenceBatches(_content_data(references, 3, True), batch)
    gar = ad.GAR(model, sampler, optimizer=opt, reference=reference, loss_fn=lm_loss)
    loader = sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler))
    rewards = []
    for x, y in itertools.chain(loader, loader):
        opt.zero_grad()
        lm_loss(model(x), y).mean().backward()
        rewards.append(gar.step())
        opt.step()
    return sampler, gar, rewards


def test_the_default_gar_learns_a_mixture_on_the_stock_encoder() -> None:
    """Defaults only (held-out reference, cosine, ghost, the budget), dropout on, the
    buffered mask: the first batches are rewarded exactly, then a share within the budget,
    every reward finite, and the mixture moves to the source the reference agrees with."""
    sampler, gar, rewards = _default_gar_on_the_stock_encoder(8, 96, 32)
    rewarded = [r is not None for r in rewards]
    assert all(torch.isfinite(r).all() for r in rewards if r is not None)
    assert rewarded[0]
    assert rewarded[1]
    assert 2 < gar.metrics()["batches_rewarded"] == sum(rewarded) < 2 * len(sampler)
    assert sampler.weights["good"] > 0.7


# ---------------------------------------------------------------- Hugging Face models, Trainer

HF_VOCAB, HF_SEQ = 32, 12


class TokenExamples(torch.utils.data.Dataset):
    """Dict examples as a tokenised dataset gives them: ``input_ids`` and ``labels``."""

    def __init__(self, ids: torch.Tensor, labels: torch.Tensor) -> None:
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def hf_data(kind: str, n: int, seed: int, predictable: bool) -> TokenExamples:
    """Sequences of counting tokens (predictable) or random ones; for the masked LM a third of
    the positions masked (token 0) with their token as the label, the others -100."""
    g = torch.Generator().manual_seed(seed)
    if predictable:
        start = torch.randint(1, HF_VOCAB, (n, 1), generator=g)
        ids = (start + torch.arange(HF_SEQ)) % (HF_VOCAB - 1) + 1
    else:
        ids = torch.randint(1, HF_VOCAB, (n, HF_SEQ), generator=g)
    if kind != "bert":
        return TokenExamples(ids, ids.clone())
    masked = torch.rand(n, HF_SEQ, generator=g) < 1 / 3
    return TokenExamples(ids.masked_fill(masked, 0), ids.masked_fill(~masked, -100))


def hf_model(kind: str) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    small = {"vocab_size": HF_VOCAB, "hidden_size": 16, "num_hidden_layers": 2}
    small |= {"num_attention_heads": 2, "intermediate_size": 32}
    if kind == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=HF_VOCAB, n_positions=HF_SEQ, n_embd=16, n_layer=2, n_head=2
        )
        return transformers.GPT2LMHeadModel(config)
    if kind == "llama":
        config = transformers.LlamaConfig(
            **small, num_key_value_heads=1, max_position_embeddings=HF_SEQ
        )
        return transformers.LlamaForCausalLM(config)
    if kind == "gemma":  # its RMSNorm scales by 1 + weight, epsilon in `eps`
        config = transformers.GemmaConfig(
            **small, num_key_value_heads=1, head_dim=8, max_position_embeddings=HF_SEQ
        )
        return transformers.GemmaForCausalLM(config)
    if kind == "olmo2":  # its RMSNorm casts after the weight, q and k normalised too
        config = transformers.Olmo2Config(**small, max_position_embeddings=HF_SEQ)
        return transformers.Olmo2ForCausalLM(config)
    config = transformers.BertConfig(**small, max_position_embeddings=HF_SEQ)
    return transformers.BertForMaskedLM(config)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
def test_the_trainer_runs_stock_models_with_their_own_loss(kind: str, tmp_path) -> None:
    """GARTrainer with the model's own loss and no gar_loss_fn: the reference gradient comes
    from the per-example form of the model's loss (default_loss_fn), every micro-batch is
    rewarded, the rewards are finite and the mixture moves."""
    import transformers

    from adaptive_data.integrations.transformers import GARTrainer

    sampler = ad.GARSampler(
        {"counting": hf_data(kind, 48, 1, True), "random": hf_data(kind, 48, 2, False)},
        batch_size=4,
        seed=0,
    )
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=6,
        learning_rate=1e-3,
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        save_strategy="no",
    )
    trainer = GARTrainer(
        model=hf_model(kind),
        args=args,
        gar_sampler=sampler,
        gar_reference=hf_data(kind, 16, 3, True),
    )
    trainer.train()
    metrics = trainer.gar.metrics()
    assert 2 <= metrics["batches_rewarded"] <= 12  # the exact phase, then the budget's share
    assert metrics["batches_dropped"] == 0
    assert math.isfinite(metrics["reward_mean"])
    assert sampler.weights != {"counting": 0.5, "random": 0.5}


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
def test_the_default_loss_is_the_models_own_per_example(kind: str) -> None:
    """Weighted by each example's labelled tokens, the per-example losses average to the
    model's own loss (which averages over every labelled token of the batch)."""
    from adaptive_data.integrations.transformers import default_loss_fn

    model = hf_model(kind).eval()
    data = hf_data(kind, 6, 4, False)
    ids, labels = data.ids, data.labels
    own = model(input_ids=ids, labels=labels).loss
    per_example = default_loss_fn(model)(model(input_ids=ids), labels)
    assert per_example.shape == (6,)
    counted = labels[:, 1:] if kind != "bert" else labels
    tokens = (counted != -100).sum(1).float()
    torch.testing.assert_close((per_example * tokens).sum() / tokens.sum(), own)


def test_the_default_loss_names_a_model_it_does_not_know() -> None:
    from adaptive_data.integrations.transformers import default_loss_fn

    with pytest.raises(ValueError, match=r"StockLM is not a model whose loss .* pass gar_loss_fn"):
        default_loss_fn(StockLM())


# ---------------------------------------------------------------- no silent slow path


class Gain(nn.Module):
    """A bare parameter in a module no rule covers: the generic path's."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


def _loop(model: nn.Module, steps: int = 3, **options) -> ad.GAR:
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sampler = ad.GARSampler(
        {"good": _content_data(48, 1, True), "noise": _content_data(48, 2, False)},
        batch_size=8,
        seed=0,
    )
    reference = ad.ReferenceBatches(_content_data(16, 3, True), 8)
    gar = ad.GAR(model, sampler, optimizer=opt, reference=reference, loss_fn=lm_loss, **options)
    loader = sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler))
    for x, y in itertools.islice(loader, steps):
        opt.zero_grad()
        lm_loss(model(x), y).mean().backward()
        gar.step()
        opt.step()
    return gar


class GainLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, 8)
        self.gain = Gain(8)
        self.head = nn.Linear(8, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gain(self.tok(x)))


def test_the_generic_path_is_named_once_with_its_cost() -> None:
    with pytest.warns(
        UserWarning, match=r"module 'gain' \(Gain\) by its generic path \(no rule"
    ) as seen:
        gar = _loop(GainLM(), budget=None)
    assert sum("generic path" in str(w.message) for w in seen) == 1  # once, not per step
    assert "ms of gar.step()'s" in str(seen[0].message)
    assert gar.metrics()["generic_calls"] == 3
    timing = gar.timing()
    assert 0 < timing["time_share"] < 1
    assert 0 < timing["seconds_in_step"] < timing["seconds"]


def test_fallback_raise_refuses_the_generic_path() -> None:
    with pytest.raises(
        ValueError, match=r"no rule for the trainable parameters of \['gain \(Gain\)'\]"
    ):
        _loop(GainLM(), fallback="raise")
    with pytest.raises(
        ValueError, match=r"fallback should be 'jvp' or 'raise', but got fallback='no'"
    ):
        _loop(GainLM(), fallback="no")


def test_the_stock_encoder_and_hugging_face_lms_take_no_generic_path() -> None:
    """The defaults on the stock encoder (buffered mask, is_causal, dropout 0.1, learned
    positions), stock GPT-2 (Conv1D, wpe, dropout), Llama (its RMSNorm, rotary, GQA), Gemma
    (a ``1 + weight`` RMSNorm) and OLMo-2 (an RMSNorm cast after the weight, on q and k):
    every share from a rule."""
    import warnings

    for model in (StockLM(), *(Logits(k) for k in ("gpt2", "llama", "gemma", "olmo2"))):
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*generic path.*")
            gar = _loop(model, fallback="raise")
        assert gar.metrics()["generic_calls"] == 0


# ---------------------------------------------------------------- the probe, exact on each model


class Logits(nn.Module):
    """A Hugging Face model's logits, dropout off (the oracle's examples run one by one)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.model = hf_model(kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=x).logits


def _hf_lm_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out.transpose(1, 2), y, reduction="none").mean(1)


@pytest.mark.parametrize("kind", ["stock", "gpt2", "llama", "gemma", "olmo2", "bert"])
@pytest.mark.parametrize("reward", ["dot", "cosine"])
def test_the_probe_is_exact_on_each_language_model(kind: str, reward: str) -> None:
    """Against one backward per example: the stock encoder (buffered mask, learned
    positions), GPT-2 (Conv1D, wpe), Llama (RMSNorm, rotary, GQA), Gemma and OLMo-2 (their
    RMSNorms), BERT (positions added in place, a padding row tied to the output layer, the
    head's bias registered twice)."""
    torch.manual_seed(0)
    model = (StockLM() if kind == "stock" else Logits(kind)).eval()
    vocab, seq = (VOCAB, SEQ) if kind == "stock" else (HF_VOCAB, HF_SEQ)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab, (5, seq), generator=g)
    y = torch.randint(0, vocab, (5, seq), generator=g)
    d = {k: torch.randn(p.shape, generator=g) for k, p in model.named_parameters()}
    if kind == "olmo2":  # an untied padding row, which the probe leaves out of D (docs/probe.md)
        d["model.model.embed_tokens.weight"][model.model.config.pad_token_id] = 0.0
    got = ad.GradientProbe(model, _hf_lm_loss, reward=reward)(x, y, direction=d)
    want = loop_rewards(model, _hf_lm_loss, x, y, d)[0 if reward == "dot" else 1]
    assert _relative(got, want) < 1e-4


def test_forward_mode_estimators_say_a_tied_padding_row_makes_them_approximate() -> None:
    model = Logits("bert")
    with pytest.warns(UserWarning, match=r"padding row of Embedding\(s\) \['model.bert"):
        ad.GradientProbe(model, _hf_lm_loss, "jvp")
    with pytest.warns(UserWarning, match=r"estimator='fd' differentiates the forward"):
        ad.GradientProbe(model, _hf_lm_loss, "fd")


def test_the_default_budget_cuts_rows_on_the_stock_encoder_in_a_loop() -> None:
    """Every default on batches of 48: after the exact phase the budget rewards 32 rows of a
    kept batch (the attention with dropout, the positions at their sum, the buffered mask all
    cut to those rows), every reward finite, and the mixture still moves to the good source."""
    sampler, gar, rewards = _default_gar_on_the_stock_encoder(48, 480, 96)  # 40 steps
    sizes = [r.numel() for r in rewards if r is not None]
    assert all(torch.isfinite(r).all() for r in rewards if r is not None)
    m = gar.metrics()
    assert m["budget/exact_phase"] == 0.0
    assert m["budget/rows"] == MIN_ROWS == 32  # a quarter of 48 is fewer
    assert sizes[:16] == [48] * 16  # the exact phase: every row of every batch
    assert len(sizes) > 16
    assert set(sizes[16:]) == {MIN_ROWS}
    assert sampler.weights["good"] > 0.6
