"""GAR's reference batches as users write them: a Hugging Face split of dict rows with no
collate of its own in a plain loop, and errors that name the reference."""

from __future__ import annotations

import re

import datasets
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import adaptive_data as ad
from tests.test_lm_models import hf_data, hf_model

LOSS = nn.CrossEntropyLoss(reduction="none")


def lm_loss(out, labels: torch.Tensor) -> torch.Tensor:
    """Per-sequence next-token loss of a model's logits or its Hugging Face output."""
    logits = getattr(out, "logits", out)
    return nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none"
    ).mean(1)


def splits() -> datasets.DatasetDict:
    """Two training domains (counting tokens, random tokens) and a held-out target, as a
    tokenised DatasetDict gives them."""

    def split(n: int, seed: int, predictable: bool) -> datasets.Dataset:
        rows = hf_data("gpt2", n, seed, predictable)
        return datasets.Dataset.from_dict(
            {"input_ids": rows.ids.tolist(), "labels": rows.labels.tolist()}
        )

    return datasets.DatasetDict(
        {"count": split(24, 0, True), "noise": split(24, 1, False), "target": split(16, 2, True)}
    )


def run(positional: bool, collate_fn=None) -> list[dict]:
    """Six steps of a plain loop over GPT-2; the loop calls ``model(input_ids=...)`` or, with
    ``positional``, a model that takes the token ids positionally. Returns the history."""
    dd = splits().with_format("torch", columns=["input_ids", "labels"])
    torch.manual_seed(0)
    gpt2 = hf_model("gpt2")
    model = Positional(gpt2) if positional else gpt2
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sampler = ad.GARSampler(dd, batch_size=4, seed=0, names=["count", "noise"])
    loader = sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler))
    ref = ad.ReferenceBatches(dd["target"], batch_size=4, seed=0, collate_fn=collate_fn)
    with ad.GAR(model, sampler, optimizer=opt, reference=ref, loss_fn=lm_loss) as gar:
        for batch in loader:
            opt.zero_grad()
            ids = batch["input_ids"]
            out = model(ids) if positional else model(input_ids=ids)
            lm_loss(out, batch["labels"]).mean().backward()
            gar.step()
            opt.step()
    assert gar.metrics()["batches_rewarded"] == 12
    return [h["weights"] for h in sampler.history]


class Positional(nn.Module):
    """A language model called as ``model(ids)`` that returns logits (a user's own LM)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits


def pair(examples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """The collate users wrote before: the reference batches as ``(input_ids, labels)``."""
    return (
        torch.stack([e["input_ids"] for e in examples]),
        torch.stack([e["labels"] for e in examples]),
    )


@pytest.fixture(scope="module")
def glued() -> list[dict]:
    return run(positional=True, collate_fn=pair)


@pytest.mark.parametrize("positional", [False, True], ids=["keyword", "positional"])
def test_a_split_of_dict_rows_is_a_reference_with_no_collate_of_its_own(positional, glued):
    """``ReferenceBatches(dd["target"], 4)``: its dict batches are passed as the loop passes
    its training batches (by keyword, or the one input positionally) and give, update for
    update, the mixture a hand-written ``(input_ids, labels)`` collate gives."""
    assert run(positional) == glued
    assert len(glued) == 13


def test_a_split_without_torch_format_is_named():
    with pytest.raises(TypeError, match=r"'input_ids' is a Python list.*with_format\('torch'"):
        ad.ReferenceBatches(splits()["target"], batch_size=4)


def loop_with_reference(reference, steps: int = 1, features: int = 12):
    """A short held-out loop over vectors with ``reference`` as the reference batches."""
    torch.manual_seed(0)
    sources = {
        "a": TensorDataset(torch.randn(8, features), torch.randint(0, 5, (8,))),
        "b": TensorDataset(torch.randn(8, features), torch.randint(0, 5, (8,))),
    }
    model = nn.Sequential(nn.Linear(features, 5))
    sampler = ad.GARSampler(sources, batch_size=4, seed=0)
    gar = ad.GAR(model, sampler, reference=reference, loss_fn=LOSS)
    for i, (x, y) in enumerate(sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler))):
        model.zero_grad()
        LOSS(model(x), y).mean().backward()
        gar.step()
        if i + 1 == steps:
            break


@pytest.mark.parametrize(
    ("x_ref", "y_ref", "match"),
    [
        (torch.randn(4, 10), torch.zeros(4, dtype=torch.long), r"mat1 and mat2 shapes"),
        (torch.randn(4, 12), torch.full((4,), 7), r"Target 7 is out of bounds"),
    ],
    ids=["shape", "labels"],
)
def test_a_reference_batch_that_fails_in_the_model_or_loss_is_named(x_ref, y_ref, match):
    with pytest.raises(RuntimeError, match=r"GAR's reference batch failed") as info:
        loop_with_reference(iter([(x_ref, y_ref)]))
    message = str(info.value)
    assert "The reference batch calls model(Tensor[4, " in message
    assert "the loop's training forward calls model(Tensor[4, 12] float32)" in message
    assert isinstance(info.value.__cause__, RuntimeError | IndexError)
    assert re.search(match, message)


def test_a_reference_batch_of_another_kind_is_refused_naming_both_calls():
    ref = {
        "x": torch.randn(4, 12),
        "extra": torch.randn(4, 12),
        "labels": torch.zeros(4, dtype=torch.long),
    }
    with pytest.raises(ValueError, match=r"reference batches do not match the training"):
        loop_with_reference(iter([ref]))
    ints = (torch.zeros(4, 12, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"calls model\(Tensor\[4, 12\] int64\), but the loop"):
        loop_with_reference(iter([ints]))


@pytest.mark.parametrize("batch", ["pair", "dict", "tensor"])
def test_one_batch_passed_as_reference_is_refused_naming_reference_batches(batch):
    x, y = torch.randn(4, 12), torch.zeros(4, dtype=torch.long)
    reference = {"pair": (x, y), "dict": {"x": x, "labels": y}, "tensor": x}[batch]
    with pytest.raises(TypeError, match=r"reference=ReferenceBatches\(val_set.*got one batch"):
        loop_with_reference(reference)
