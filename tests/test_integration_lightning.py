"""The Lightning integration: a tiny model on CPU learns a clean source over a random-label
one from a clean held-out reference, with accumulate_grad_batches=2; the batch GAR rewards
is the batch trained (checked by content); a run resumed from its own checkpoint ends
exactly where an uninterrupted one does."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import adaptive_data as ad
from adaptive_data.integrations.lightning import CHECKPOINT_KEY, GARCallback
from tests.mixtures import assert_fd_follows_exact

DIM, CLASSES, BATCH = 8, 4, 16


def make_data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(DIM, CLASSES, generator=g)

    def clean(n):
        x = torch.randn(n, DIM, generator=g)
        return TensorDataset(x, (x @ w).argmax(1))

    x = torch.randn(96, DIM, generator=g)
    noisy = TensorDataset(x, torch.randint(0, CLASSES, (96,), generator=g))
    return {"clean": clean(96), "noisy": noisy}, clean(64)


class Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(DIM, 32), nn.Tanh(), nn.Linear(32, CLASSES))
        self.seen: list[torch.Tensor] = []  # the inputs of every training_step

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append(x.clone())
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def per_example_loss(output, y):
    return F.cross_entropy(output, y, reduction="none")


def build(max_steps: int, workers: int = 0, **gar_options):
    torch.manual_seed(0)
    sources, val = make_data()
    sampler = ad.GARSampler(sources, batch_size=BATCH, seed=0)
    callback = GARCallback(
        sampler,
        reference=ad.ReferenceBatches(val, BATCH, seed=0),
        loss_fn=per_example_loss,
        **gar_options,
    )
    loader = callback.track(DataLoader(sampler.dataset, batch_sampler=sampler, num_workers=workers))
    return sampler, callback, loader, Module()


def trainer(tmp_path, max_steps: int, callbacks=(), **kw):
    return pl.Trainer(
        max_steps=max_steps,
        accumulate_grad_batches=2,
        gradient_clip_val=1.0,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=list(callbacks),
        **kw,
    )


def test_lightning_learns_the_clean_source_and_rewards_the_batch_it_trains(tmp_path):
    sampler, callback, loader, module = build(12, budget=None)  # every batch: the pairing
    fit = trainer(tmp_path, 12, [callback], enable_checkpointing=False)
    fit.fit(module, loader)
    assert sampler.weights["clean"] > 0.9, sampler.weights
    rewarded = [h["batch"] for h in sampler.history[1:]]
    assert len(rewarded) == len(module.seen) == 24  # 12 steps x 2 micro-batches
    # held-out reference (0) plus the step's second micro-batch: the first waits one delivery
    assert sampler.reward_delay == 1
    for bid, x in zip(rewarded, module.seen, strict=True):
        keys = sampler._records[bid].keys
        assert torch.equal(torch.stack([sampler.dataset[k][0] for k in keys]), x)
    logged = fit.callback_metrics
    assert float(logged["mixture/weight/clean"]) == pytest.approx(sampler.weights["clean"])
    # The short default set: weights, mean rewards and their ages (2 sources), the cost.
    names = sampler.names
    assert set(logged) == {
        *(f"mixture/{m}/{n}" for m in ("weight", "reward_mean", "reward_age") for n in names),
        "gar/budget/cost_per_step",
    }
    assert float(logged["mixture/reward_age/clean"]) == 0


@pytest.mark.parametrize(
    "log_metrics", ["all", ["gar/batches_rewarded", "mixture/weight/*"], False]
)
def test_lightning_logs_the_metrics_it_is_asked_for(tmp_path, log_metrics):
    sampler, callback, loader, module = build(4, budget=None, log_metrics=log_metrics)
    fit = trainer(tmp_path, 4, [callback], enable_checkpointing=False)
    fit.fit(module, loader)
    logged = set(fit.callback_metrics)
    everything = {f"mixture/{k}" for k in sampler.metrics()}
    everything |= {f"gar/{k}" for k in callback.gar.metrics()}
    if log_metrics == "all":  # every finite key
        assert {"gar/batches_rewarded", "mixture/entropy", "mixture/reward_count/clean"} <= logged
        assert logged <= everything
        assert len(logged) > 20
    elif log_metrics is False:
        assert logged == set()
    else:
        assert logged == {"gar/batches_rewarded", *(f"mixture/weight/{n}" for n in sampler.names)}
        assert float(fit.callback_metrics["gar/batches_rewarded"]) == 8


@pytest.mark.parametrize(
    ("log_metrics", "message"),
    [
        ("everything", r"log_metrics should be 'default', 'all' or a list .* got 'everything'"),
        (["weight/*"], r"log_metrics holds 'weight/\*', which names no metric: .*'mixture/'"),
        (3, r"log_metrics should be 'default', 'all' or a list .* got 3"),
    ],
)
def test_lightning_refuses_a_metric_selection_that_names_nothing(log_metrics, message):
    sampler = ad.GARSampler({"a": TensorDataset(torch.zeros(4))}, batch_size=2)
    with pytest.raises(ValueError, match=message):
        GARCallback(sampler, log_metrics=log_metrics)


def test_lightning_with_rows_and_forward_only_rewards_learns_what_the_exact_rewards_learn(
    tmp_path,
):
    """rows= and estimator="fd" through Lightning's loop (accumulation 2, gradient clipping):
    the forward-only rewards of 4 rows of 16 move the mixture as the exact dot rewards of the
    same rows do, batch for batch."""
    runs = {}
    for estimator in ("ghost", "fd"):
        sampler, callback, loader, module = build(
            12, estimator=estimator, reward="dot", rows=4, budget=None
        )
        fit = trainer(tmp_path / estimator, 12, [callback], enable_checkpointing=False)
        fit.fit(module, loader)
        runs[estimator] = (sampler, callback.gar)
    (exact, _), (fd, gar_fd) = runs["ghost"], runs["fd"]
    assert_fd_follows_exact(fd, exact, gar_fd)


def test_lightning_with_dataloader_workers_learns_what_it_learns_without(tmp_path):
    """The policy lag through Lightning's loop (which reads a batch ahead): 2 workers reward
    the same batches, see the same inputs and end with the same weights as none."""
    runs = []
    for workers in (0, 2):
        sampler, callback, loader, module = build(8, workers=workers)
        fit = trainer(tmp_path / str(workers), 8, [callback], enable_checkpointing=False)
        fit.fit(module, loader)
        runs.append(([h["batch"] for h in sampler.history[1:]], sampler.weights, module.seen))
    assert len(runs[0][0]) == 16
    assert runs[0][0] == runs[1][0]
    assert runs[0][1] == runs[1][1]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][2], runs[1][2], strict=True))


def params(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def test_lightning_resumes_from_its_checkpoint_to_the_same_weights(tmp_path):
    sampler, callback, loader, module = build(16)
    every = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path, every_n_train_steps=5, save_top_k=-1, filename="{step}"
    )
    trainer(tmp_path, 16, [callback, every]).fit(module, loader)
    # 12 batches per epoch, 6 steps: the checkpoint at step 10 is in the middle of epoch 1.
    ckpt = tmp_path / "step=10.ckpt"
    assert CHECKPOINT_KEY in torch.load(ckpt, weights_only=False)
    sampler2, callback2, loader2, module2 = build(16)
    trainer(tmp_path / "b", 16, [callback2], enable_checkpointing=False).fit(
        module2, loader2, ckpt_path=ckpt
    )
    assert sampler2.weights == sampler.weights
    assert torch.equal(params(module2), params(module))
    assert callback2.gar.metrics() == callback.gar.metrics()


def test_lightning_refuses_an_untracked_loader(tmp_path):
    sampler, callback, _, module = build(2)
    plain = DataLoader(sampler.dataset, batch_sampler=sampler)
    with pytest.raises(ValueError, match=r"should get the tracked loader over GARCallback"):
        trainer(tmp_path, 2, [callback], enable_checkpointing=False).fit(module, plain)


def test_lightning_refuses_a_checkpoint_without_its_state(tmp_path):
    _, _, loader, module = build(2)
    plain = trainer(tmp_path, 2, enable_checkpointing=False)
    plain.fit(module, loader)
    plain.save_checkpoint(tmp_path / "plain.ckpt")
    _, callback, loader, module = build(4)
    with pytest.raises(ValueError, match=r"holds no 'adaptive_data' entry"):
        trainer(tmp_path, 4, [callback], enable_checkpointing=False).fit(
            module, loader, ckpt_path=tmp_path / "plain.ckpt"
        )


def test_lightning_refuses_a_sampler_built_for_another_world_size(tmp_path):
    """Under DDP the sampler must be built after the process group exists (its rank and
    world size); one built for another world size is refused before training."""
    sources, val = make_data()
    sampler = ad.GARSampler(sources, batch_size=BATCH, seed=0, rank=0, world_size=2)
    callback = GARCallback(sampler, reference=ad.ReferenceBatches(val, BATCH), loss_fn=F.mse_loss)
    loader = callback.track(DataLoader(sampler.dataset, batch_sampler=sampler))
    with pytest.raises(ValueError, match=r"built for world_size=2. Under DDP, launch with"):
        trainer(tmp_path, 2, [callback], enable_checkpointing=False).fit(Module(), loader)


def test_callback_arguments_are_checked():
    sources, val = make_data()
    sampler = ad.GARSampler(sources, batch_size=BATCH, seed=0)
    ref = ad.ReferenceBatches(val, BATCH)
    with pytest.raises(ValueError, match=r"a mixture of 2 sources needs reference= batches"):
        GARCallback(sampler)
    with pytest.raises(ValueError, match=r"reference= needs loss_fn"):
        GARCallback(sampler, reference=ref)
    with pytest.raises(ValueError, match=r"reward should be one of .* but got reward='l2'"):
        GARCallback(sampler, reference=ref, loss_fn=per_example_loss, reward="l2")
    with pytest.raises(TypeError, match=r"sampler should be a GARSampler, but got dict"):
        GARCallback(sources)
    gar = ad.GAR(Module(), sampler, reference=ref, loss_fn=per_example_loss)
    with pytest.raises(ValueError, match=r"gar is already built, so reference would be ignored"):
        GARCallback(sampler, gar=gar, reference=ref)
    other = ad.GARSampler(sources, batch_size=BATCH, seed=1)
    with pytest.raises(ValueError, match=r"gar was built over another GARSampler"):
        GARCallback(other, gar=gar)
    with pytest.raises(ValueError, match=r"gar is already built, so rows would be ignored"):
        GARCallback(sampler, gar=gar, rows=4)
    with pytest.raises(ValueError, match=r"gar is already built, so every, reward would be"):
        GARCallback(sampler, gar=gar, every=2, reward="dot")
    with pytest.raises(ValueError, match=r"rows should be a positive integer value.*rows=0"):
        GARCallback(sampler, reference=ref, loss_fn=per_example_loss, rows=0)
    with pytest.raises(ValueError, match=r"reference_refresh reuses a held-out reference"):
        GARCallback(sampler, gar=None, reward="dot", reference_refresh=2, reference=None)
    with pytest.raises(
        ValueError, match=r"fallback should be 'jvp' or 'raise', but got fallback='no'"
    ):
        GARCallback(sampler, reference=ref, loss_fn=per_example_loss, fallback="no")
    with pytest.raises(ValueError, match=r"gar is already built, so fallback would be ignored"):
        GARCallback(sampler, gar=gar, fallback="raise")


def test_the_callback_builds_gar_with_every_option_given():
    sources, val = make_data()
    sampler = ad.GARSampler(sources, batch_size=BATCH, seed=0)
    ref = ad.ReferenceBatches(val, BATCH)
    callback = GARCallback(
        sampler, reference=ref, loss_fn=per_example_loss, every=2, reference_refresh=3, rows=5
    )
    module = Module()
    gar = callback.wiring.build(module, torch.optim.SGD(module.parameters(), lr=0.1))
    assert (gar.every, gar.reference_refresh, gar.rows, gar.reward) == (2, 3, 5, "cosine")
    assert gar.fallback == "jvp"


class Gained(Module):
    """A bare parameter outside any layer: no rule covers it (the generic path's)."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(CLASSES))

    def forward(self, x):
        return self.net(x) * self.gain


def test_the_callbacks_fallback_reaches_gar():
    """fallback="raise": the GAR the callback builds refuses a parameter no rule covers."""
    sources, val = make_data()
    sampler = ad.GARSampler(sources, batch_size=BATCH, seed=0)
    ref = ad.ReferenceBatches(val, BATCH)
    callback = GARCallback(sampler, reference=ref, loss_fn=per_example_loss, fallback="raise")
    module = Module()
    assert callback.wiring.build(module, torch.optim.SGD(module.parameters())).fallback == "raise"
    callback = GARCallback(sampler, reference=ref, loss_fn=per_example_loss, fallback="raise")
    gained = Gained()
    with pytest.raises(ValueError, match=r"no rule for the trainable parameters of \['<root>"):
        callback.wiring.build(gained, torch.optim.SGD(gained.parameters()))
