"""Mixed precision with GAR: steps a GradScaler skips, autocast forwards, sharded models."""

from __future__ import annotations

import math
import sys
import tempfile
import types

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

import adaptive_data as ad
from adaptive_data.probe._precondition import precondition
from tests.test_gar import LOSS, cnn, data, mlp, snapshot

# GAR over one source as a harness for its rewards (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_source_rewards")


def _oracle(old: nn.Module, x, y, d, reward: str) -> torch.Tensor:
    """Batch (x, y)'s rewards at the weights it was trained at, by one gradient per example."""
    r = ad.GradientProbe(old, LOSS, estimator="per_sample", reward=reward)(x, y, direction=d)
    return r / len(x) if reward == "dot" else r  # the kept gradients are of the mean loss


@pytest.mark.parametrize("reward", ["dot", "cosine"])
def test_a_step_with_nonfinite_grad_is_skipped_and_the_kept_batch_waits(reward: str) -> None:
    """Steps 2 and 5 overflow (as a GradScaler sees it: .grad holds inf or NaN, the optimizer
    step is skipped). GAR skips them: no error, the overflowing batch is never rewarded, and
    the batch kept before it is rewarded at the next finite step against that step's gradient
    (the weights did not move in between)."""
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sampler = ad.GARSampler(data(), batch_size=6, seed=0)  # 10 batches
    gar = ad.GAR(model, sampler, optimizer=opt, reward=reward, budget=None)
    overflow = {2: math.inf, 5: math.nan}
    pending = None  # (weights, x, y) of the batch waiting for its reward
    checked = 0
    for step, (x, y) in enumerate(
        sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler))
    ):
        opt.zero_grad()
        LOSS(model(x), y).mean().backward()
        if step in overflow:
            model[3].bias.grad[1] = overflow[step]
            assert gar.step() is None
            continue  # the scaler skips opt.step()
        params = dict(model.named_parameters())
        d = precondition({n: p.grad.clone() for n, p in params.items()}, params, opt)
        r = gar.step()
        if pending is None:
            assert r is None
        else:
            torch.testing.assert_close(r, _oracle(*pending, d, reward), rtol=2e-4, atol=1e-6)
            checked += 1
        pending = (snapshot(mlp, model), x, y)
        opt.step()
    assert checked == 7  # 8 finite steps; the first has no earlier batch
    m = gar.metrics()
    assert m["steps"] == 10
    assert m["steps_skipped_nonfinite"] == 2
    assert m["batches_rewarded"] == 7  # the last batch waits for a step that never comes
    assert m["batches_dropped"] == 2
    assert sampler.metrics()["nonfinite_rewards"] == 0


def test_held_out_mode_skips_the_overflowing_step_without_a_reference_pass() -> None:
    torch.manual_seed(0)
    model = mlp()
    sampler = ad.GARSampler(data(), batch_size=6, seed=0)
    drawn = []

    def references():
        while True:
            drawn.append(1)
            yield data(8, seed=1).tensors

    gar = ad.GAR(model, sampler, reference=references(), loss_fn=LOSS, budget=None)
    for step, (x, y) in enumerate(
        sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler))
    ):
        model.zero_grad()
        LOSS(model(x), y).mean().backward()
        if step == 3:
            model[0].weight.grad[0, 0] = -math.inf
            assert gar.step() is None
        else:
            assert gar.step() is not None
    assert len(drawn) == 9  # no reference batch drawn for the skipped step
    m = gar.metrics()
    assert (m["steps_skipped_nonfinite"], m["batches_rewarded"], m["batches_dropped"]) == (1, 9, 1)


def test_a_nonfinite_held_out_reference_gradient_is_still_an_error() -> None:
    model = mlp()
    sampler = ad.GARSampler(data(), batch_size=6, seed=0)
    x_ref, y_ref = data(8, seed=1).tensors
    x_ref = x_ref.clone()
    x_ref[0, 0] = math.nan
    gar = ad.GAR(model, sampler, reference=iter([(x_ref, y_ref)]), loss_fn=LOSS, budget=None)
    x, y = next(iter(sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler))))
    LOSS(model(x), y).mean().backward()
    with pytest.raises(ValueError, match=r"the reference gradient of '0.weight' contains NaN"):
        gar.step()


def test_with_a_real_grad_scaler_gar_skips_exactly_the_steps_the_scaler_skips() -> None:
    """A GradScaler whose initial scale overflows float32 skips the first steps, cutting its
    scale by 2**-80 each time, until the scaled gradients are finite. GAR, called after
    ``scaler.unscale_``, skips the same steps and never hands a non-finite reward on."""
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-80)
    sampler = ad.GARSampler(data(120), batch_size=6, seed=0)  # 20 batches
    gar = ad.GAR(model, sampler, optimizer=opt, budget=None)
    for x, y in sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler)):
        opt.zero_grad()
        scaler.scale(LOSS(model(x), y).sum()).backward()
        scaler.unscale_(opt)
        gar.step()
        scaler.step(opt)
        scaler.update()
    skipped = round(math.log2(2.0**127 / scaler.get_scale()) / 80)
    assert skipped >= 1  # the test can fail: the scaler did skip steps
    m = gar.metrics()
    assert m["steps_skipped_nonfinite"] == skipped
    assert m["batches_rewarded"] == 20 - skipped - 1
    assert sampler.metrics()["nonfinite_rewards"] == 0


@pytest.mark.parametrize("factory", [mlp, cnn])
@pytest.mark.parametrize("reward", ["dot", "cosine"])
def test_bf16_autocast_forward_rewards_match_the_float32_oracle(factory, reward: str) -> None:
    """The kept inputs and output gradients are bf16 under autocast; the rewards are those of
    the per-example float32 gradients to bf16 precision."""
    torch.manual_seed(0)
    model = factory()
    # (SGD: Adam's P after a few steps is up to 1/eps where a gradient was ~0, which
    # magnifies the bf16 rounding of those coordinates far beyond the rewards' scale.)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sampler = ad.GARSampler(data(30), batch_size=6, seed=0)
    gar = ad.GAR(model, sampler, optimizer=opt, reward=reward, budget=None)
    previous = None
    checked = 0
    for x, y in sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler)):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        assert out.dtype == torch.bfloat16
        LOSS(out.float(), y).mean().backward()
        params = dict(model.named_parameters())
        d = precondition({n: p.grad.clone() for n, p in params.items()}, params, opt)
        r = gar.step()
        if previous is not None:
            oracle = _oracle(*previous, d, reward)
            assert r.dtype == torch.float32
            # bf16 keeps 8 bits: the rewards agree to a few percent of their scale
            torch.testing.assert_close(r, oracle, rtol=0, atol=0.06 * float(oracle.abs().max()))
            assert torch.corrcoef(torch.stack([r, oracle]))[0, 1] > 0.99
            checked += 1
        previous = (snapshot(factory, model), x, y)
        opt.step()
    assert checked == 4


def test_probe_under_bf16_autocast_matches_float32() -> None:
    torch.manual_seed(0)
    model = cnn()
    x, y = data(8).tensors
    d = {n: torch.randn(p.shape) for n, p in model.named_parameters()}
    probe = ad.GradientProbe(model, LOSS, estimator="ghost", reward="cosine")
    exact = probe(x, y, direction=d)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = probe(x, y, direction=d)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, exact, rtol=0, atol=0.06 * float(exact.abs().max()))


@pytest.fixture
def one_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with tempfile.NamedTemporaryFile() as f:
        dist.init_process_group("gloo", store=dist.FileStore(f.name, 1), rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`")
def test_fsdp1_tensor_parallel_and_non_fd_fsdp2_models_are_refused(one_process_group) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    sampler = ad.GARSampler(data(), batch_size=6, seed=0)
    wrapped = FullyShardedDataParallel(mlp(), device_id=torch.device("cpu"))
    with pytest.raises(TypeError, match=r"sharded by FSDP1 \(FullyShardedDataParallel\).*FSDP2"):
        ad.GAR(wrapped, sampler, budget=None, estimator="fd", reward="dot")
    with pytest.raises(TypeError, match=r"model is sharded by FSDP1"):
        ad.GradientProbe(wrapped, LOSS, "fd")
    inner = nn.Sequential(nn.Linear(12, 5), mlp())  # only a submodule sharded
    fully_shard(inner[1], mesh=init_device_mesh("cpu", (1,)))
    with pytest.raises(ValueError, match=r"GAR\(estimator='ghost'\).*FSDP2.*estimator='fd'"):
        ad.GAR(inner, sampler, budget=None)
    with pytest.raises(ValueError, match=r"GradientProbe\(estimator='jvp'\).*FSDP2"):
        ad.GradientProbe(inner, LOSS, "jvp")
    ad.GradientProbe(inner, LOSS, "fd")  # taken
    from torch.distributed.tensor import Replicate, distribute_tensor

    parallel = mlp()  # tensor parallelism: DTensor parameters without FSDP
    weight = parallel[0].weight.detach()
    parallel[0].weight = nn.Parameter(
        distribute_tensor(weight, init_device_mesh("cpu", (1,)), [Replicate()])
    )
    with pytest.raises(TypeError, match=r"DTensor parameters outside FSDP2"):
        ad.GradientProbe(parallel, LOSS, "fd")


def test_deepspeed_models_are_refused(monkeypatch) -> None:
    """DeepSpeed is not installed here: a stand-in module of that name carries its engine
    type, as an imported ``deepspeed`` does; ZeRO-3 marks its partitioned parameters with
    ``ds_id``."""

    class DeepSpeedEngine(nn.Module):
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    monkeypatch.setitem(
        sys.modules, "deepspeed", types.SimpleNamespace(DeepSpeedEngine=DeepSpeedEngine)
    )
    sampler = ad.GARSampler(data(), batch_size=6, seed=0)
    with pytest.raises(TypeError, match=r"sharded by DeepSpeed \(DeepSpeedEngine\).*FSDP2"):
        ad.GAR(DeepSpeedEngine(mlp()), sampler, budget=None)
    model = mlp()
    model[0].weight.ds_id = 0
    with pytest.raises(TypeError, match=r"DeepSpeed ZeRO-3 partitioned parameters"):
        ad.GradientProbe(model, LOSS)
    ad.GAR(mlp(), sampler, budget=None)  # a plain model is fine with deepspeed imported
