"""GAR(estimator="fd"): forward-only rewards ``<B_i, J_i D>``. They must agree with the exact
ghost rewards of the same rows (float64 to the ghost's own float32 rounding, float32 to a
stated tolerance), keep nothing but the rewarded rows' inputs and output gradients, leave the
model's parameters, buffers and RNG as a run without GAR leaves them, and refuse what they
cannot attribute."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import adaptive_data as ad
from adaptive_data.gar._gar import check_arguments
from adaptive_data.integrations._common import Wiring
from tests import models
from tests.models import CausalLM, cnn_bn_eval, lm_batch, lm_loss

# GAR over one source as a harness for its rewards (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_source_rewards")

N = 12  # batch size
M = 5  # rows rewarded


def dropout_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 3))


class DictOutput(nn.Module):
    """What a Hugging Face model returns: ``{"loss", "logits"}``, the loss a scalar computed
    inside from the logits (the loop backprops it)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.net(x)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


def lm_data(n: int, seed: int) -> TensorDataset:
    return TensorDataset(*lm_batch(n, torch.Generator().manual_seed(seed)))


def class_data(kind: str):
    return lambda n, s: TensorDataset(*models.batch(kind, n, torch.Generator().manual_seed(s)))


# name -> (model factory, dataset factory (n, seed), per-example loss, float32 tolerance as a
# fraction of the batch's largest |reward|: measured 3e-5 to 1e-4 (MLPs), 2e-3 (LM), 3e-2 (the
# CNN, whose ReLUs and pooling put kinks within eps of some examples), with a margin)
CASES = {
    "mlp": (lambda: models.build("mlp"), class_data("mlp"), models.loss_fn, 1e-3),
    "dropout": (dropout_mlp, class_data("mlp"), models.loss_fn, 1e-3),
    "cnn_bn_eval": (cnn_bn_eval, class_data("cnn"), models.loss_fn, 8e-2),
    "lm": (CausalLM, lm_data, lm_loss, 1e-2),
    "dict_output": (DictOutput, class_data("mlp"), None, 1e-3),
}
# Cases outside the agreement test: BatchNorm in train mode (fd and ghost agree in the sum).
EXTRA = {"cnn_bn_train": (lambda: models.build("cnn"), class_data("cnn"), models.loss_fn, 0.0)}


def train(
    case: str,
    estimator: str | None,
    rows: int | None,
    held_out: bool,
    dtype: torch.dtype,
    lr: float = 0.05,
    steps: int = 4,
    model: nn.Module | None = None,
):
    """Train ``steps`` steps (SGD with momentum) with a GAR whose sampler records (rewards,
    batch, rows) instead of learning, so that every run draws the same batches; ``estimator``
    None: no GAR. Returns the records, the GAR and the model."""
    make_model, make_data, loss, _ = {**CASES, **EXTRA}[case]
    torch.manual_seed(0)
    model = (make_model() if model is None else model).to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    def data(n: int, seed: int) -> TensorDataset:
        ts = make_data(n, seed).tensors
        return TensorDataset(*(t.to(dtype) if t.is_floating_point() else t for t in ts))

    if held_out:
        sources = {"a": data(3 * N, 1), "b": data(3 * N, 2)}
        reference = itertools.repeat(tuple(data(8, 3).tensors))
    else:
        sources, reference = data(6 * N, 1), None
    sampler = ad.GARSampler(sources, batch_size=N, seed=0, num_batches=steps + 1)
    records: list = []
    sampler.update = lambda r, batch=None, rows=None: records.append((r, batch, rows))  # type: ignore[method-assign]
    ref_loss = loss
    if loss is None:  # the dict model: the loss is its own, the reference's per example

        def ref_loss(out, y):
            return nn.functional.cross_entropy(out["logits"], y, reduction="none")

    gar = None
    if estimator is not None:
        gar = ad.GAR(
            model,
            sampler,
            optimizer=opt,
            reward="dot",
            reference=reference,
            loss_fn=ref_loss if held_out else None,
            rows=rows,
            estimator=estimator,
            budget=None,
        )
    torch.manual_seed(1)  # the dropout masks
    for x, y in sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler)):
        opt.zero_grad()
        if loss is None:
            model(x, labels=y)["loss"].backward()
        else:
            loss(model(x), y).mean().backward()
        if gar is not None:
            gar.step()
        opt.step()
    return records, gar, model


def assert_agree(ghost: list, fd: list, tol: float) -> None:
    assert len(fd) == len(ghost) >= 3
    for (r_g, b_g, rows_g), (r_f, b_f, rows_f) in zip(ghost, fd, strict=True):
        assert b_g == b_f
        assert (rows_g is None) == (rows_f is None)
        if rows_g is not None:
            assert rows_g.tolist() == rows_f.tolist()
        scale = float(r_g.abs().max())
        assert scale > 0
        err = float((r_f.double() - r_g.double()).abs().max())
        assert err <= tol * scale, (err / scale, r_f, r_g)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("held_out", "rows"), [(True, M), (True, None), (False, M)])
def test_fd_rewards_agree_with_the_ghost_rewards_of_the_same_rows(case, dtype, held_out, rows):
    """float64: to 1e-6 of the largest reward (the ghost rewards are float32); float32: to
    the case's stated tolerance. The next-batch mode learns at lr=1e-6 here: its forwards run
    at the weights after the step, the ghost's inputs are those before it (the difference
    that comes with a real learning rate is measured in docs/howto-gar.md)."""
    lr = 0.05 if held_out else 1e-9
    ghost, _, _ = train(case, "ghost", rows, held_out, dtype, lr)
    fd, gar, _ = train(case, "fd", rows, held_out, dtype, lr)
    tol = 1e-6 if dtype == torch.float64 else CASES[case][3]
    assert_agree(ghost, fd, tol)
    if rows is not None:
        for _, batch, chosen in fd:
            assert chosen.tolist() == gar.choose_rows(batch, N).tolist()
    if dtype == torch.float64:
        assert all(r.dtype == torch.float64 for r, _, _ in fd)


def test_a_wrong_step_or_a_missing_rng_replay_breaks_the_agreement(monkeypatch):
    """The agreement test can fail: a relative step of 0.15 (1e7 times too large), or dropout
    masks drawn afresh instead of the training forward's, put the rewards far off the
    ghost's."""
    from adaptive_data.probe import _fd

    ghost, _, _ = train("dropout", "ghost", M, True, torch.float64)
    monkeypatch.setattr(_fd, "relative_step", lambda dtype: 0.15)
    fd, _, _ = train("dropout", "fd", M, True, torch.float64)
    with pytest.raises(AssertionError):
        assert_agree(ghost, fd, 1e-3)
    monkeypatch.undo()
    monkeypatch.setattr(_fd, "rng_changed", lambda before: False)  # no replay of the masks
    fd, _, _ = train("dropout", "fd", M, True, torch.float64)
    with pytest.raises(AssertionError):
        assert_agree(ghost, fd, 1e-3)


def jvp_oracle(model, x, y, d):
    """``<B_i, (J D)_i>`` of the whole batch by forward-mode AD (BatchNorm's batch statistics
    included in J): the definition estimator="fd" estimates when examples mix."""
    import torch.autograd.forward_ad as fwad

    buffers = {k: b.clone() for k, b in model.named_buffers()}
    with torch.no_grad(), fwad.dual_level():
        duals = {k: fwad.make_dual(p.detach(), d[k]) for k, p in model.named_parameters()}
        out, tangent = fwad.unpack_dual(
            torch.func.functional_call(model, {**duals, **buffers}, (x,))
        )
    out = out.detach().requires_grad_()
    (b,) = torch.autograd.grad(models.loss_fn(out, y).mean(), out)
    return (b * tangent).sum(1)


def test_batch_statistics_forward_the_whole_batch_row_by_row():
    """BatchNorm in train mode: the rows are forwarded with the whole batch, and each row's
    reward is its output's move along D, batch statistics included (forward-mode AD's
    oracle)."""
    torch.manual_seed(0)
    model = models.build("cnn").double()

    def as64(pair):
        return tuple(t.double() if t.is_floating_point() else t for t in pair)

    x, y = as64(models.batch("cnn", N, torch.Generator().manual_seed(1)))
    xr, yr = as64(models.batch("cnn", 8, torch.Generator().manual_seed(2)))
    sampler = ad.GARSampler(
        {"a": TensorDataset(x, y), "b": TensorDataset(x, y)}, batch_size=N, seed=0, num_batches=1
    )
    got: list = []
    sampler.update = lambda r, batch=None, rows=None: got.append((r, rows))  # type: ignore[method-assign]
    gar = ad.GAR(
        model,
        sampler,
        reward="dot",
        reference=itertools.repeat((xr, yr)),
        loss_fn=models.loss_fn,
        rows=M,
        estimator="fd",
        budget=None,
    )
    ((xb, yb),) = list(sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler)))
    models.loss_fn(model(xb), yb).mean().backward()
    assert gar._schedule.pending[-1].fd.whole  # the rows mix through the batch statistics
    gar.step()
    ((r, rows),) = got
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    out = torch.func.functional_call(model, buffers, (xr,))
    grads = torch.autograd.grad(models.loss_fn(out, yr).mean(), list(model.parameters()))
    d = dict(zip([k for k, _ in model.named_parameters()], grads, strict=True))
    torch.testing.assert_close(r, jvp_oracle(model, xb, yb, d)[rows], rtol=1e-6, atol=1e-9)
    gar.close()


def test_batch_statistics_sum_to_the_ghost_total():
    """Over the whole batch, both estimators give <grad L_B, D>: the ghost rewards' sum (each
    example's share of the batch gradient) equals the fd rewards' sum (each row's output
    moving along D), though the rows differ."""
    ghost, _, _ = train("cnn_bn_train", "ghost", None, True, torch.float64)
    fd, _, _ = train("cnn_bn_train", "fd", None, True, torch.float64)
    for (r_g, _, _), (r_f, _, _) in zip(ghost, fd, strict=True):
        torch.testing.assert_close(r_f.sum(), r_g.double().sum(), rtol=1e-6, atol=1e-9)
    assert any(
        not torch.allclose(r_f, r_g.double(), rtol=1e-3)
        for (r_g, _, _), (r_f, _, _) in zip(ghost, fd, strict=True)
    )


def test_the_parameters_buffers_and_rng_are_those_of_a_run_without_gar():
    for case, rows in (("dropout", M), ("mlp", M), ("cnn_bn_eval", None)):
        _, _, plain = train(case, None, rows, True, torch.float32)
        after_plain = torch.get_rng_state()
        _, gar, with_fd = train(case, "fd", rows, True, torch.float32)
        assert torch.equal(torch.get_rng_state(), after_plain)
        assert gar.metrics()["batches_rewarded"] >= 3
        for (k, a), (_, b) in zip(
            plain.state_dict().items(), with_fd.state_dict().items(), strict=True
        ):
            assert torch.equal(a, b), k


def test_bn_buffers_are_untouched_by_the_differences():
    torch.manual_seed(0)
    model = models.build("cnn")
    plain = models.build("cnn")
    plain.load_state_dict(model.state_dict())
    x, y = models.batch("cnn", N, torch.Generator().manual_seed(1))
    sampler = ad.GARSampler(
        {"a": TensorDataset(x, y), "b": TensorDataset(x, y)}, batch_size=N, seed=0, num_batches=2
    )
    sampler.update = lambda r, batch=None, rows=None: None  # type: ignore[method-assign]
    gar = ad.GAR(
        model,
        sampler,
        reward="dot",
        reference=itertools.repeat((x[:4], y[:4])),
        loss_fn=models.loss_fn,
        estimator="fd",
        budget=None,
    )
    for xb, yb in sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler)):
        for net in (model, plain):
            net.zero_grad()
            models.loss_fn(net(xb), yb).mean().backward()
        gar.step()
    for (k, a), (_, b) in zip(model.state_dict().items(), plain.state_dict().items(), strict=True):
        assert torch.equal(a, b), k  # running statistics and num_batches_tracked included
    for a, b in zip(model.parameters(), plain.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)


def kept_after_backward(case: str, rows: int | None = M):
    make_model, make_data, loss, _ = CASES[case]
    torch.manual_seed(0)
    model = make_model()
    sampler = ad.GARSampler(make_data(2 * N, 1), batch_size=N, seed=0)
    gar = ad.GAR(model, sampler, reward="dot", rows=rows, estimator="fd", budget=None)
    x, y = next(iter(sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler))))
    loss(model(x), y).mean().backward()
    group = gar._schedule.pending[-1]
    return gar, model, group


@pytest.mark.parametrize(
    ("case", "inputs"), [("mlp", M), ("lm", M), ("cnn_bn_eval", M), ("dropout", N)]
)
def test_only_the_chosen_rows_are_kept(case, inputs):
    """The root's inputs are cut to the rows (whole where the forward draws random numbers),
    the output gradients always; the inner layers have no hook and keep nothing."""
    gar, model, group = kept_after_backward(case)
    assert group.calls == []
    assert all(
        not m._forward_hooks and not m._forward_pre_hooks for m in model.modules() if m is not model
    )
    kept = group.fd
    assert kept.whole == (inputs == N)
    assert kept.args[0].shape[0] == inputs
    assert kept.grads
    assert all(g.shape[dim] == M for g, dim in kept.grads.values())
    assert group.rows.tolist() == gar.choose_rows(group.batch, N).tolist()
    assert (kept.rng is not None) == (case == "dropout")
    gar.close()
    assert not model._forward_hooks
    assert not model._forward_pre_hooks


def test_a_model_the_ghost_rules_do_not_cover_is_rewarded():
    class Bare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 3))

        def forward(self, x):
            return torch.tanh(x @ self.w)

    sampler = ad.GARSampler(class_data("mlp")(2 * N, 1), batch_size=N, seed=0)
    with pytest.raises(ValueError, match="found no layer it covers"):
        ad.GAR(Bare(), sampler, budget=None)
    ad.GAR(Bare(), sampler, reward="dot", estimator="fd", budget=None).close()


class AuxOutput(nn.Module):
    """Logits and a scalar penalty of the weights themselves: not the batch's."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(6, 3)

    def forward(self, x):
        return self.net(x), self.net.weight.square().sum()


class NestedOutput(nn.Module):
    """Features and the logits computed from them, both returned."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.body(x)
        return h, self.head(h)


@pytest.mark.parametrize(
    ("model", "use", "match"),
    [
        (
            AuxOutput,
            lambda out, y: models.loss_fn(out[0], y).mean() + out[1],
            "does not hold the batch",
        ),
        (
            NestedOutput,
            lambda out, y: models.loss_fn(out[1], y).mean() + out[0].mean(),
            "counted twice|count it twice",
        ),
    ],
)
def test_outputs_that_cannot_be_attributed_raise(model, use, match):
    sampler = ad.GARSampler(class_data("mlp")(2 * N, 1), batch_size=N, seed=0)
    gar = ad.GAR(model(), sampler, reward="dot", rows=M, estimator="fd", budget=None)
    x, y = next(iter(sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler))))
    with pytest.raises(ValueError, match=match):
        use(gar.model(x), y).backward()
    gar.close()


def test_outputs_the_loss_does_not_read_are_not_a_problem():
    sampler = ad.GARSampler(class_data("mlp")(2 * N, 1), batch_size=N, seed=0)
    gar = ad.GAR(AuxOutput(), sampler, reward="dot", estimator="fd", budget=None)
    x, y = next(iter(sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler))))
    models.loss_fn(gar.model(x)[0], y).mean().backward()  # the penalty unused
    assert gar._schedule.pending[-1].fd.grads
    gar.close()


def test_bad_arguments_raise_with_the_bad_value():
    sampler = ad.GARSampler(class_data("mlp")(2 * N, 1), batch_size=N, seed=0)
    model = models.build("mlp")
    with pytest.raises(
        ValueError, match=r"estimator should be one of ghost, fd, but got estimator='exact'"
    ):
        ad.GAR(model, sampler, estimator="exact", budget=None)
    with pytest.raises(
        ValueError,
        match=r"estimator='fd' .*needs reward='dot'.*got estimator='fd' with reward='cosine'",
    ):
        ad.GAR(model, sampler, estimator="fd", budget=None)
    with pytest.raises(ValueError, match=r"gar_estimator should be .*gar_estimator=None"):
        check_arguments(sampler, 1, "dot", None, None, 1, None, prefix="gar_", estimator=None)
    with pytest.raises(ValueError, match=r"gar_reward='dot'.*gar_reward='cosine'"):
        check_arguments(sampler, 1, "cosine", None, None, 1, None, prefix="gar_", estimator="fd")


def test_the_integrations_pass_the_estimator_on():
    sampler = ad.GARSampler(class_data("mlp")(2 * N, 1), batch_size=N, seed=0)
    model = models.build("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opts = {"every": 1, "reference_refresh": 1, "budget": None}
    wiring = Wiring(sampler, None, None, None, "gar_", reward="dot", estimator="fd", **opts)
    gar = wiring.build(model, opt)
    assert gar.estimator == "fd"
    assert "estimator='fd'" in repr(gar)
    with pytest.raises(ValueError, match=r"gar_estimator would be ignored"):
        Wiring(sampler, gar, None, None, "gar_", estimator="fd")
    with pytest.raises(ValueError, match=r"gar_estimator should be one of"):
        Wiring(sampler, None, None, None, "gar_", reward="dot", estimator="jvp")
    gar.close()


def test_state_round_trip_carries_the_estimator():
    _, gar, _ = train("mlp", "fd", M, True, torch.float32)
    state = gar.state_dict()
    assert state["estimator"] == "fd"
    sampler = gar.sampler
    ref = itertools.repeat(tuple(class_data("mlp")(8, 3).tensors))
    kw = {"reference": ref, "loss_fn": models.loss_fn, "rows": M, "reward": "dot"}
    again = ad.GAR(models.build("mlp"), sampler, estimator="fd", budget=None, **kw)
    again.load_state_dict(state)
    assert again.metrics() == gar.metrics()
    ghost = ad.GAR(models.build("mlp"), sampler, budget=None, **kw)
    with pytest.raises(
        ValueError, match=r"state has estimator='fd', but this GAR has estimator='ghost'"
    ):
        ghost.load_state_dict(state)
    old = {k: v for k, v in ghost.state_dict().items() if k != "estimator"}  # saved before it
    ghost.load_state_dict(old)
    with pytest.raises(
        ValueError, match=r"state has estimator='ghost', but this GAR has estimator='fd'"
    ):
        again.load_state_dict(old)
    for g in (gar, again, ghost):
        g.close()
