"""The Hugging Face Trainer integration: a tiny model on CPU learns a clean source over a
random-label one from a clean held-out reference, with gradient accumulation 2; the batch
GAR rewards is the batch trained (checked by content); a resumed run ends exactly where an
uninterrupted one does."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

import adaptive_data as ad
from adaptive_data.integrations.transformers import (
    STATE_FILE,
    GARTrainer,
)
from tests.mixtures import assert_fd_follows_exact

# GAR over one source as a harness for its rewards (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_source_rewards")

DIM, CLASSES, BATCH = 8, 4, 16


class Examples(torch.utils.data.Dataset):
    """Dict examples as a tokenised HF dataset gives them (plus a column the model does not
    take, which the Trainer drops)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "labels": self.y[i], "text": f"example {i}"}


def make_data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(DIM, CLASSES, generator=g)

    def clean(n):
        x = torch.randn(n, DIM, generator=g)
        return x, (x @ w).argmax(1)

    xc, yc = clean(96)
    xn = torch.randn(96, DIM, generator=g)
    yn = torch.randint(0, CLASSES, (96,), generator=g)
    xv, yv = clean(64)
    return {"clean": Examples(xc, yc), "noisy": Examples(xn, yn)}, Examples(xv, yv)


class TinyModel(nn.Module):
    """What a HF model looks like to the Trainer: keyword inputs, {"loss", "logits"} out."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(DIM, 32), nn.Tanh(), nn.Dropout(0.1), nn.Linear(32, CLASSES)
        )
        self.seen: list[torch.Tensor] = []  # inputs of the training forwards of a full batch

    def forward(self, x, labels=None):
        if self.training and labels is not None and len(x) == BATCH:  # GAR's own have none
            self.seen.append(x.detach().clone())
        logits = self.net(x)
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


def per_example_loss(output, labels):
    return F.cross_entropy(output["logits"], labels, reduction="none")


def build(tmp_path, max_steps: int, save_steps: int = 1000, workers: int = 0, **gar_options):
    torch.manual_seed(0)
    sources, val = make_data()
    sampler = ad.GARSampler(sources, batch_size=BATCH, seed=0)
    model = TinyModel()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=2,
        max_steps=max_steps,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        logging_steps=5,
        save_steps=save_steps,
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=workers,
    )
    trainer = GARTrainer(
        model=model,
        args=args,
        gar_sampler=sampler,
        gar_reference=val,
        gar_loss_fn=per_example_loss,
        **gar_options,
    )
    return trainer, sampler, model


def test_trainer_learns_the_clean_source_and_rewards_the_batch_it_trains(tmp_path):
    trainer, sampler, model = build(tmp_path, max_steps=12, gar_budget=None)  # every batch
    trainer.train()
    weights = sampler.weights
    assert weights["clean"] > 0.9, weights
    # Every training forward's batch is the batch GAR rewarded next, in order: the content
    # the model saw equals the content of the batch ids in the sampler's history.
    rewarded = [h["batch"] for h in sampler.history[1:]]
    assert len(rewarded) == len(model.seen) == 24  # 12 steps x 2 micro-batches
    # held-out reference (0) plus the step's second micro-batch: the first waits one delivery
    assert sampler.reward_delay == 1
    for bid, x in zip(rewarded, model.seen, strict=True):
        keys = sampler._records[bid].keys
        assert torch.equal(torch.stack([sampler.dataset[k]["x"] for k in keys]), x)
    # The logs carry the short default set: weights, mean rewards and their ages, the cost.
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged
    ours = {k for k in logged[-1] if k.startswith(("mixture/", "gar/"))}
    assert ours == {
        *(
            f"mixture/{m}/{n}"
            for m in ("weight", "reward_mean", "reward_age")
            for n in sampler.names
        ),
        "gar/budget/cost_per_step",
    }
    assert logged[-1]["mixture/reward_age/clean"] == 0


def test_trainer_logs_the_metrics_it_is_asked_for(tmp_path):
    trainer, sampler, _ = build(
        tmp_path, max_steps=10, gar_budget=None, gar_log_metrics=["gar/batches_*"]
    )
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h][-1]
    assert {k for k in logged if k.startswith(("mixture/", "gar/"))} == {
        "gar/batches_rewarded",
        "gar/batches_dropped",
        *(f"gar/batches_dropped/{why}" for why in ("no_backward", "nonfinite_grad")),
        *(f"gar/batches_dropped/{why}" for why in ("nonfinite_rewards", "stale", "closed")),
    }
    assert logged["gar/batches_rewarded"] == 20  # at step 10
    every, sampler, _ = build(tmp_path / "all", max_steps=10, gar_log_metrics="all")
    finite = {f"mixture/{k}" for k, v in sampler.metrics().items() if math.isfinite(v)}
    assert set(every.gar_metrics()) == finite  # no GAR before train(): the sampler's keys
    assert "mixture/batches_drawn" in finite


def test_trainer_refuses_a_metric_selection_that_names_nothing(tmp_path):
    with pytest.raises(ValueError, match=r"gar_log_metrics holds 'weight/\*', which names no"):
        build(tmp_path, max_steps=1, gar_log_metrics=["weight/*"])
    with pytest.raises(ValueError, match=r"gar_log_metrics should be 'default', 'all' or a"):
        build(tmp_path, max_steps=1, gar_log_metrics="some")


def test_trainer_with_rows_and_forward_only_rewards_learns_what_the_exact_rewards_learn(tmp_path):
    """rows= and estimator="fd" through the real stack (accumulation 2, dropout, the loss
    computed inside the model, a dict output): the forward-only rewards of 4 rows of 16 move
    the mixture as the exact dot rewards of the same rows do, batch for batch."""
    runs = {}
    for estimator in ("ghost", "fd"):
        trainer, sampler, _ = build(
            tmp_path / estimator,
            max_steps=12,
            gar_estimator=estimator,
            gar_reward="dot",
            gar_rows=4,
            gar_budget=None,
        )
        trainer.train()
        runs[estimator] = (sampler, trainer.gar)
    (exact, gar_exact), (fd, gar_fd) = runs["ghost"], runs["fd"]
    assert_fd_follows_exact(fd, exact, gar_fd)
    assert gar_fd.metrics()["reward_mean"] == pytest.approx(
        gar_exact.metrics()["reward_mean"], rel=1e-3
    )


def test_trainer_with_dataloader_workers_learns_what_it_learns_without(tmp_path):
    """The policy lag through the real stack: the Trainer's DataLoader with 2 workers behind
    accelerate's read-ahead rewards the same batches and ends with the same weights as with
    none."""
    runs = []
    for workers in (0, 2):
        trainer, sampler, model = build(tmp_path / str(workers), max_steps=8, workers=workers)
        trainer.train()
        runs.append(([h["batch"] for h in sampler.history[1:]], sampler.weights, model.seen))
    assert len(runs[0][0]) == 16
    assert runs[0][0] == runs[1][0]
    assert runs[0][1] == runs[1][1]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][2], runs[1][2], strict=True))


def params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_trainer_resumes_from_its_checkpoint_to_the_same_weights(tmp_path):
    trainer, sampler, model = build(tmp_path / "a", max_steps=16, save_steps=10)
    trainer.train()
    assert os.path.isfile(tmp_path / "a" / "checkpoint-10" / STATE_FILE.format(rank=0))
    # 12 batches per epoch, 6 steps: the checkpoint at step 10 is in the middle of epoch 1.
    trainer2, sampler2, model2 = build(tmp_path / "b", max_steps=16)
    trainer2.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-10"))
    assert sampler2.weights == sampler.weights
    assert torch.equal(params(model2), params(model))
    assert trainer2.gar.metrics() == trainer.gar.metrics()
    state = json.loads((tmp_path / "a" / "checkpoint-10" / "trainer_state.json").read_text())
    assert state["global_step"] == 10


def test_trainer_refuses_a_checkpoint_without_its_state(tmp_path):
    trainer, _, _ = build(tmp_path, max_steps=2)
    (tmp_path / "checkpoint-1").mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds no adaptive_data state"):
        trainer.train(resume_from_checkpoint=True)


def test_trainer_arguments_are_checked(tmp_path):
    sources, val = make_data()
    sampler = ad.GARSampler(sources, batch_size=BATCH, seed=0)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    kw = {"model": TinyModel(), "args": args, "gar_sampler": sampler}
    with pytest.raises(ValueError, match=r"a mixture of 2 sources needs gar_reference= batches"):
        GARTrainer(**kw)
    with pytest.raises(ValueError, match=r"train_dataset should be left out"):
        GARTrainer(**kw, train_dataset=val, gar_reference=val, gar_loss_fn=per_example_loss)
    with pytest.raises(TypeError, match=r"gar_reference should be a map-style dataset or an"):
        GARTrainer(**kw, gar_reference=3, gar_loss_fn=per_example_loss)
    with pytest.raises(TypeError, match=r"gar_sampler should be a GARSampler, but got dict"):
        GARTrainer(**{**kw, "gar_sampler": sources}, gar_reference=val)
    with pytest.raises(
        ValueError, match=r"gar_fallback should be 'jvp' or 'raise', but got gar_fallback='no'"
    ):
        GARTrainer(**kw, gar_reference=val, gar_loss_fn=per_example_loss, gar_fallback="no")
    trainer = GARTrainer(**kw, gar_reference=val, gar_loss_fn=per_example_loss)
    assert trainer.args.ignore_data_skip
    assert trainer.train_dataset is sampler.dataset
    batch = next(iter(trainer.get_train_dataloader()))
    assert sorted(batch) == ["labels", "x"]  # the "text" column the model does not take


class GainedModel(TinyModel):
    """A bare parameter outside any layer: no rule covers it (the generic path's)."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(CLASSES))

    def forward(self, x, labels=None):
        out = super().forward(x, labels)
        return {**out, "logits": out["logits"] * self.gain}


def test_trainer_fallback_reaches_gar(tmp_path):
    """gar_fallback="raise": the GAR the Trainer builds when it has its optimizer refuses a
    parameter no rule covers; over a covered model it holds the option."""
    sources, val = make_data()
    sampler = ad.GARSampler(sources, batch_size=BATCH, seed=0)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    for model in (TinyModel(), GainedModel()):
        trainer = GARTrainer(
            model=model,
            args=args,
            gar_sampler=sampler,
            gar_reference=val,
            gar_loss_fn=per_example_loss,
            gar_fallback="raise",
        )
        opt = torch.optim.SGD(model.parameters())
        if isinstance(model, GainedModel):
            with pytest.raises(
                ValueError, match=r"no rule for the trainable parameters of \['<root>"
            ):
                trainer._gar_wiring.build(model, opt)
        else:
            assert trainer._gar_wiring.build(model, opt).fallback == "raise"


def test_trainer_next_batch_mode_rewards_each_step_against_the_next(tmp_path):
    """One source without a reference (the augmentation mode): at each optimizer step GAR
    rewards the previous step's two micro-batches against this step's gradient."""
    sources, _ = make_data()
    sampler = ad.GARSampler({"clean": sources["clean"]}, batch_size=BATCH, seed=0)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=2,
        max_steps=4,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = GARTrainer(model=TinyModel(), args=args, gar_sampler=sampler)
    trainer.train()
    assert [h["batch"] for h in sampler.history[1:]] == [0, 1, 2, 3, 4, 5]
    assert trainer.gar.metrics()["batches_rewarded"] == 6
