"""Dict batches (the Hugging Face convention): split_batch, the probe, ReferenceBatches, GAR."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import adaptive_data as ad

# GAR over one source as a harness for its rewards (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_source_rewards")

LOSS = nn.CrossEntropyLoss(reduction="none")


class Classifier(nn.Module):
    """Called the Hugging Face way: ``model(input_ids=..., attention_mask=...)``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids) * attention_mask.unsqueeze(-1)
        return self.head(h.sum(1) / attention_mask.sum(1, keepdim=True))


def examples(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 10, (n, 4), generator=g)
    mask = torch.ones(n, 4)
    mask[::2, -1] = 0  # every other sequence is one token shorter
    labels = torch.randint(0, 3, (n,), generator=g)
    return [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(n)]


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    return torch.utils.data.default_collate(rows)


def test_split_batch_follows_the_hugging_face_convention() -> None:
    batch = collate(examples(4, 0))
    inputs, target = ad.split_batch(batch)
    assert sorted(inputs) == ["attention_mask", "input_ids"]
    assert target is batch["labels"]
    x, y = ad.split_batch(
        {"pixels": batch["input_ids"], "y": batch["labels"]}, target_key="y", input_key="pixels"
    )
    assert x is batch["input_ids"]
    assert y is batch["labels"]
    pair = (batch["input_ids"], batch["labels"])
    for given in (pair, list(pair)):
        x, y = ad.split_batch(given)
        assert x is pair[0]
        assert y is pair[1]


def test_split_batch_refuses_a_dict_without_the_named_keys() -> None:
    batch = {"input_ids": torch.zeros(2, 3), "y": torch.zeros(2)}
    with pytest.raises(
        ValueError, match=r"target_key='labels', but its keys are \['input_ids', 'y'\]"
    ):
        ad.split_batch(batch)
    with pytest.raises(ValueError, match=r"input_key='x', but its keys are \['input_ids', 'y'\]"):
        ad.split_batch(batch, target_key="y", input_key="x")
    with pytest.raises(ValueError, match=r"nothing but its target 'y': keys \['y'\]"):
        ad.split_batch({"y": torch.zeros(2)}, target_key="y")
    with pytest.raises(TypeError, match=r"pair \(x, y\) or a dict.*got tuple of length 3"):
        ad.split_batch((1, 2, 3))


@pytest.mark.parametrize("method", ["ghost", "jvp", "per_sample"])
def test_the_probe_takes_dict_batches(method: str) -> None:
    torch.manual_seed(0)
    model = Classifier()
    batch, ref = collate(examples(6, 1)), collate(examples(5, 2))
    probe = ad.GradientProbe(model, LOSS, estimator=method)
    inputs, y = ad.split_batch(batch)
    ref_pair = ad.split_batch(ref)
    expected = probe(inputs, y, reference=ref_pair)
    torch.testing.assert_close(probe(batch, reference=ref), expected)
    # and against one backward per example
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(
        LOSS(model(**ref_pair[0]), ref_pair[1]).mean(), list(params.values())
    )
    oracle = []
    for i in range(6):
        one = {k: v[i : i + 1] for k, v in inputs.items()}
        gi = torch.autograd.grad(LOSS(model(**one), y[i : i + 1]).sum(), list(params.values()))
        oracle.append(sum((a * b).sum() for a, b in zip(gi, grads, strict=True)))
    torch.testing.assert_close(expected, torch.stack(oracle), rtol=1e-4, atol=1e-6)


def test_the_probe_refuses_a_missing_target_or_key() -> None:
    model = Classifier()
    batch = collate(examples(4, 0))
    probe = ad.GradientProbe(model, LOSS)
    with pytest.raises(TypeError, match=r"y should be the targets.*y=None with x of type Tensor"):
        probe(batch["input_ids"], reference=batch)
    bad = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with pytest.raises(ValueError, match=r"keys are \['input_ids', 'attention_mask'\]"):
        probe(bad, reference=batch)
    with pytest.raises(ValueError, match=r"keys are \['input_ids', 'attention_mask'\]"):
        probe(batch, reference=bad)


def test_reference_batches_over_dicts_collate_to_a_dict() -> None:
    ref = ad.ReferenceBatches(examples(7, 3), batch_size=3, seed=0)
    batch = next(ref)
    assert sorted(batch) == ["attention_mask", "input_ids", "labels"]
    assert batch["input_ids"].shape == (3, 4)
    torch.manual_seed(0)
    model = Classifier()
    r = ad.GradientProbe(model, LOSS)(collate(examples(4, 4)), reference=next(ref))
    assert r.shape == (4,)


def test_reference_batches_over_a_hugging_face_dataset() -> None:
    import datasets

    rows = examples(6, 5)
    table = datasets.Dataset.from_list([{k: v.tolist() for k, v in r.items()} for r in rows])
    ref = ad.ReferenceBatches(table.with_format("torch"), batch_size=4, seed=0)
    batch = next(ref)
    assert sorted(batch) == ["attention_mask", "input_ids", "labels"]
    assert batch["input_ids"].shape == (4, 4)


def test_gar_held_out_reference_of_dict_batches_equals_the_probe() -> None:
    torch.manual_seed(0)
    model = Classifier()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rows = examples(12, 6)
    data = TensorDataset(
        torch.stack([r["input_ids"] for r in rows]),
        torch.stack([r["attention_mask"] for r in rows]),
        torch.stack([r["labels"] for r in rows]),
    )
    ref = collate(examples(5, 7))
    sampler = ad.GARSampler(data, batch_size=4, seed=0)
    gar = ad.GAR(
        model,
        sampler,
        optimizer=opt,
        reward="dot",
        reference=itertools.repeat(ref),
        loss_fn=LOSS,
        budget=None,
    )
    for ids, mask, y in sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler)):
        copy = Classifier()
        copy.load_state_dict(model.state_dict())
        batch = {"input_ids": ids, "attention_mask": mask, "labels": y}
        oracle = ad.GradientProbe(copy, LOSS)(batch, reference=ref) / len(y)
        opt.zero_grad()
        LOSS(model(input_ids=ids, attention_mask=mask), y).mean().backward()
        torch.testing.assert_close(gar.step(), oracle, rtol=2e-4, atol=1e-6)
        opt.step()
    gar.close()
