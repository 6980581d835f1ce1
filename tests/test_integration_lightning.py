"""The Lightning integration: a tiny model on CPU learns a clean source over a random-label
one from a clean held-out reference, with accumulate_grad_batches=2; the batch GAR rewards
is the batch trained (checked by content); a run resumed from its own checkpoint ends
exactly where an uninterrupted one does."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import adaptive_data as ad
from adaptive_data.integrations.lightning import CHECKPOINT_KEY, GARCallback
from tests.mixtures import assert_fd_follows_exact
from tests.multiprocess import run as run_ranks

DIM, CLASSES, BATCH = 8, 4, 16


def make_data(seed: int = 0, n: int = 96):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(DIM, CLASSES, generator=g)

    def clean(n):
        x = torch.randn(n, DIM, generator=g)
        return TensorDataset(x, (x @ w).argmax(1))

    x = torch.randn(n, DIM, generator=g)
    noisy = TensorDataset(x, torch.randint(0, CLASSES, (n,), generator=g))
    return {"clean": clean(n), "noisy": noisy}, clean(64)


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


class ImageModule(Module):
    """``Module`` over the flattened tiny images of ``tests.test_gar.Images`` (12 values, 5
    classes)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5))


def test_lightning_learns_an_augmentation_policy_with_every_default(tmp_path):
    """The next-batch mode as the how-to shows it: one source through a learning
    GARTransform, GARCallback(sampler) with every default (budget="auto": 0.02 here),
    accumulation of 2, for 60 optimizer steps: its exact phase, then the budget's sparse,
    weighted updates; every update reaches the policy."""
    from tests.test_gar import Images

    torch.manual_seed(0)
    tf = ad.GARTransform(["Identity", "Invert", "Rotate"], learn_ops=True)
    sampler = ad.GARSampler(Images(tf), batch_size=8, seed=0, transform=tf)
    callback = GARCallback(sampler)
    loader = callback.track(DataLoader(sampler.dataset, batch_sampler=sampler))
    fit = trainer(tmp_path, 60, [callback], enable_checkpointing=False)
    fit.fit(ImageModule(), loader)
    gar = callback.gar
    assert gar is not None
    m = gar.metrics()
    assert m["budget"] == 0.02
    assert m["budget/exact_phase"] == 0.0
    assert m["batches_rewarded"] > 16
    assert tf.policy.metrics()["updates"] == m["batches_rewarded"]
    assert tf.policy.op_weights != pytest.approx(
        {"Identity": 1 / 3, "Invert": 1 / 3, "Rotate": 1 / 3}
    )


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


# ------------------------------------------------------------------ DDP, two processes


class Held(Module):
    """Records, at every training_step, the keys of the batch the sampler says the loop holds
    and whether they are the batch's content."""

    def __init__(self, sampler: ad.GARSampler) -> None:
        super().__init__()
        self.sampler = sampler
        self.held: list[int] = []
        self.keys: list[list[int]] = []
        self.matches: list[bool] = []
        self.epochs: list[int] = []

    def training_step(self, batch, batch_idx):
        bid = self.sampler.last_batch
        keys = self.sampler._records[bid].keys
        x = torch.stack([self.sampler.dataset[k][0] for k in keys])
        self.held.append(bid)
        self.keys.append(list(keys))
        self.matches.append(torch.equal(x, batch[0]))
        self.epochs.append(self.current_epoch)
        return super().training_step(batch, batch_idx)


DDP_EPOCHS, DDP_BATCHES = 3, 6  # 6 batches of 16 a rank per epoch: 3 steps


def ddp_run(root: str, *, module: str = "net", tracked: bool = True, ckpt=None, **trainer_kw):
    """One fit under Lightning's DDP, in a process of a group that exists already (so the
    GARSampler was built for its rank); returns what the test compares across ranks."""
    torch.manual_seed(0)
    sources, val = make_data(n=192)  # a rank's shard of a source (96) outlasts epoch 0 (96)
    sampler = ad.GARSampler(sources, batch_size=BATCH, seed=0, num_batches=DDP_BATCHES)
    model = Held(sampler)
    reference = ad.ReferenceBatches(val, BATCH, seed=0)
    if module == "gar":  # a GAR the user built over the LightningModule
        gar = ad.GAR(model, sampler, reference=reference, loss_fn=per_example_loss)
        callback = GARCallback(sampler, gar=gar)
    else:
        callback = GARCallback(
            sampler,
            reference=reference,
            loss_fn=per_example_loss,
            budget=None,  # every batch: the pairing
            module=model.net if module == "net" else None,
        )
    plain = DataLoader(sampler.dataset, batch_sampler=sampler)
    loader = callback.track(plain) if tracked else plain
    fit = pl.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=2,
        max_epochs=DDP_EPOCHS,
        accumulate_grad_batches=2,
        gradient_clip_val=1.0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=[callback, *trainer_kw.pop("callbacks", [])],
        **trainer_kw,
    )
    group = torch.distributed.group.WORLD
    try:
        fit.fit(model, loader, ckpt_path=ckpt)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}", "notes": getattr(e, "__notes__", [])}
    return {
        "environment": type(fit.strategy.cluster_environment).__name__,
        "group_kept": torch.distributed.group.WORLD is group,
        "loader_kept": fit.train_dataloader is loader,
        "num_training_batches": fit.num_training_batches,
        "len": len(sampler),
        "epochs": model.epochs,
        "held": model.held,
        "keys": model.keys,
        "matches": model.matches,
        "rewarded": [h["batch"] for h in sampler.history[1:]],
        "weights": sampler.weights,
        "params": params(model).tolist(),
        "gar": callback.gar.metrics() if callback.gar is not None else None,
    }


def scenario_lightning_ddp(rank: int, world: int, root: str) -> dict:
    # What torchrun sets: Lightning finds an external launcher and starts no processes.
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        GROUP_RANK="0",
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        TORCHELASTIC_RUN_ID="test",
        MASTER_ADDR="127.0.0.1",  # unused: Lightning keeps the group that exists
    )
    warnings.filterwarnings("ignore")  # Lightning's advice, 2 ranks x 5 fits
    every = pl.callbacks.ModelCheckpoint(
        dirpath=Path(root, "ckpt"), every_n_train_steps=4, save_top_k=-1, filename="{step}"
    )
    full = ddp_run(root, callbacks=[every])
    # step 4 of 3 a epoch: in the middle of epoch 1 (its 3rd batch is next)
    resumed = ddp_run(root, ckpt=Path(root, "ckpt", "step=4.ckpt"), enable_checkpointing=False)
    return {
        "full": full,
        "resumed": resumed,
        "lightning_module": ddp_run(root, module="default", enable_checkpointing=False),
        "gar_over_lightning_module": ddp_run(root, module="gar", enable_checkpointing=False),
        "dataloader": ddp_run(root, tracked=False, enable_checkpointing=False),
        "dataloader_unsharded": ddp_run(
            root, tracked=False, enable_checkpointing=False, use_distributed_sampler=False
        ),
    }


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """Each rank of 2 runs Lightning's Trainer(strategy="ddp", devices=2) in a gloo group
    created before the GARSampler, as under torchrun."""
    root = tmp_path_factory.mktemp("ddp")
    return run_ranks(root, 2, scenario_lightning_ddp, str(root))


def test_lightning_ddp_keeps_one_mixture_and_one_model_over_the_ranks_own_batches(ddp):
    runs = [r["full"] for r in ddp]
    for rank, run in enumerate(runs):
        assert "error" not in run, f"rank {rank}: {run.get('error')}"
        assert run["environment"] == "TorchElasticEnvironment"  # launched outside Lightning
        assert run["group_kept"]  # Lightning used the process group that existed
        # Lightning did not replace or re-shard the tracked loader (use_distributed_sampler
        # is on by default): every epoch holds the len(sampler) batches of the rank's sampler
        assert run["loader_kept"]
        assert run["num_training_batches"] == run["len"] == DDP_BATCHES
        assert run["epochs"] == [e for e in range(DDP_EPOCHS) for _ in range(DDP_BATCHES)]
        # every training_step held the batch the sampler recorded, and its reward went to it
        assert all(run["matches"])
        assert run["rewarded"] == run["held"] == list(range(DDP_EPOCHS * DDP_BATCHES))
    a, b = runs
    assert a["weights"] == b["weights"]  # bit-identical: the updates are all-reduced
    assert a["params"] == b["params"]
    assert a["weights"]["clean"] > 0.8, a["weights"]
    # epoch 0: each rank drew its own examples, none twice and none the other rank drew
    first = [{k for keys in run["keys"][:DDP_BATCHES] for k in keys} for run in runs]
    assert len(first[0]) == len(first[1]) == DDP_BATCHES * BATCH
    assert not first[0] & first[1]


def test_lightning_ddp_resumes_every_rank_from_a_checkpoint_in_the_middle_of_an_epoch(ddp):
    for rank, r in enumerate(ddp):
        full, resumed = r["full"], r["resumed"]
        assert "error" not in resumed, f"rank {rank}: {resumed.get('error')}"
        assert resumed["keys"] == full["keys"][8:]  # the batches after step 4, 2 per step
        assert resumed["epochs"] == full["epochs"][8:]
        assert all(resumed["matches"])
        assert resumed["weights"] == full["weights"]
        assert resumed["params"] == full["params"]
        assert json.dumps(resumed["gar"]) == json.dumps(full["gar"])  # NaN where unset


def test_lightning_ddp_watches_the_lightning_module_by_default(ddp):
    """Under DDP Lightning calls the LightningModule through the wrapper with training_step's
    arguments (its forward rerouted); GAR lets that call pass and rewards the self(x) inside,
    as it does watching the submodule."""
    for rank, r in enumerate(ddp):
        default, net = r["lightning_module"], r["full"]
        assert "error" not in default, f"rank {rank}: {default.get('error')}"
        assert all(default["matches"])
        assert default["rewarded"] == default["held"] == net["held"]
        assert default["weights"] == pytest.approx(net["weights"], abs=1e-9)
        given = r["gar_over_lightning_module"]  # a GAR the user built over it, its defaults
        assert "error" not in given, f"rank {rank}: {given.get('error')}"
        assert given["gar"]["batches_rewarded"] >= 16
        assert given["gar"]["batches_dropped"] == 0
    assert ddp[0]["lightning_module"]["weights"] == ddp[1]["lightning_module"]["weights"]


def test_lightning_ddp_refuses_a_plain_dataloader_and_names_the_fix(ddp):
    for r in ddp:
        # Lightning's own error first (it cannot put a DistributedSampler in the GARSampler),
        # which the callback's note completes
        plain = r["dataloader"]
        assert plain["error"].startswith("TypeError:")
        assert "use_distributed_sampler" in plain["error"]
        assert any("pass the tracked loader, gar.track(" in n for n in plain["notes"])
        unsharded = r["dataloader_unsharded"]["error"]
        assert "should get the tracked loader over GARCallback's sampler" in unsharded
