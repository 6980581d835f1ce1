"""Preconditioning by each optimizer's state, against the optimizer's own step.

The oracle: from a warm optimizer state, ``optimizer.step()`` on copies with ``.grad = +h u``
and ``.grad = -h u`` gives the step's derivative along ``u`` by a central difference, exact to
O(h^2) (the statistics the step updates are even in h). The state that step leaves (the copy
stepped with a zero gradient) is what the library reads. ``precondition`` must predict the
derivative up to one positive factor for the whole model: ``J u = -s D`` with ``D = P u``.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import adaptive_data as ad
from adaptive_data.probe._precondition import _RULES, precondition
from tests.models import loss_fn

# GAR over one source as a harness for its rewards (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_source_rewards")

optim = torch.optim


def _groups(model: nn.Module, lr: float, second: dict | None = None) -> list[dict]:
    """Two parameter groups: the first layer at ``lr``, the rest at ``lr / 7`` (plus
    ``second``'s options): the relative scale of the groups is part of what is checked."""
    return [
        {"params": list(model[0].parameters())},
        {"params": list(model[2].parameters()), "lr": lr / 7, **(second or {})},
    ]


# name -> (factory(model) -> optimizer, warm-up steps)
CASES = {
    "SGD": (lambda m: optim.SGD(_groups(m, 0.05), lr=0.05), 8),
    "SGD-momentum-dampening": (
        lambda m: optim.SGD(
            _groups(m, 0.05, {"dampening": 0.0}), lr=0.05, momentum=0.9, dampening=0.5
        ),
        8,
    ),
    "SGD-nesterov-foreach": (
        lambda m: optim.SGD(_groups(m, 0.05), lr=0.05, momentum=0.9, nesterov=True, foreach=True),
        8,
    ),
    "SGD-fused": (lambda m: optim.SGD(_groups(m, 0.05), lr=0.05, momentum=0.5, fused=True), 8),
    "Adam": (lambda m: optim.Adam(_groups(m, 1e-2, {"betas": (0.8, 0.99)}), lr=1e-2), 12),
    "Adam-amsgrad-foreach": (
        lambda m: optim.Adam(_groups(m, 1e-2), lr=1e-2, amsgrad=True, foreach=True),
        12,
    ),
    "AdamW-fused": (
        lambda m: optim.AdamW(_groups(m, 1e-2), lr=1e-2, weight_decay=0.1, fused=True),
        12,
    ),
    "RMSprop": (lambda m: optim.RMSprop(_groups(m, 1e-3), lr=1e-3), 12),
    "RMSprop-centered-momentum": (
        lambda m: optim.RMSprop(_groups(m, 1e-3), lr=1e-3, centered=True, momentum=0.9),
        12,
    ),
    "RMSprop-foreach-maximize": (
        lambda m: optim.RMSprop(_groups(m, 1e-3), lr=1e-3, foreach=True, maximize=True),
        12,
    ),
    "Adagrad": (
        lambda m: optim.Adagrad(_groups(m, 0.05, {"lr_decay": 0.0}), lr=0.05, lr_decay=0.05),
        12,
    ),
    "Adagrad-fused": (lambda m: optim.Adagrad(_groups(m, 0.05), lr=0.05, fused=True), 12),
    "NAdam": (lambda m: optim.NAdam(_groups(m, 1e-2), lr=1e-2), 12),
    "NAdam-decoupled-foreach": (
        lambda m: optim.NAdam(
            _groups(m, 1e-2),
            lr=1e-2,
            weight_decay=0.1,
            decoupled_weight_decay=True,
            foreach=True,
        ),
        12,
    ),
    # beta2 = 0.999: the rectification is off for steps 1-5 and on from step 6
    "RAdam-rectified": (lambda m: optim.RAdam(_groups(m, 1e-2), lr=1e-2), 12),
    "RAdam-unrectified": (lambda m: optim.RAdam(_groups(m, 1e-2), lr=1e-2), 3),
    "RAdam-foreach": (lambda m: optim.RAdam(_groups(m, 1e-2), lr=1e-2, foreach=True), 12),
    "Adamax": (lambda m: optim.Adamax(_groups(m, 1e-2), lr=1e-2), 12),
    "Adamax-foreach": (lambda m: optim.Adamax(_groups(m, 1e-2), lr=1e-2, foreach=True), 12),
    "ASGD": (lambda m: optim.ASGD(_groups(m, 1e-2), lr=1e-2, lambd=1e-2), 12),
    "Adafactor": (lambda m: optim.Adafactor(_groups(m, 1e-2), lr=1e-2), 12),
    "Adafactor-foreach": (
        lambda m: optim.Adafactor(_groups(m, 1e-2), lr=1e-2, foreach=True),
        12,
    ),
}


def _warm(factory, steps: int, seed: int = 0):
    """A float64 MLP whose input features differ in scale by 100x, after ``steps`` steps."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 1, 6, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    opt = factory(model)
    for _ in range(steps):
        x = torch.randn(32, 6, generator=g, dtype=torch.float64) * scales
        y = torch.randint(0, 3, (32,), generator=g)
        opt.zero_grad()
        loss_fn(model(x), y).mean().backward()
        opt.step()
    return model, opt


def _step(model: nn.Module, opt, grads: list[torch.Tensor]):
    """The parameter change of ``opt.step()`` with ``.grad = grads``, on copies; and the copies."""
    m, o = copy.deepcopy((model, opt))
    before = [p.detach().clone() for p in m.parameters()]
    for p, g in zip(m.parameters(), grads, strict=True):
        p.grad = g.clone()
    o.step()
    return [p.detach() - b for p, b in zip(m.parameters(), before, strict=True)], m, o


def _check(model: nn.Module, opt) -> tuple[float, float]:
    """Relative error of ``precondition``'s prediction of the step's derivative, and that of
    the plain direction (P = I), each with its best positive factor."""
    g = torch.Generator().manual_seed(1)
    u = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in model.parameters()]
    h = 1e-6
    plus, _, _ = _step(model, opt, [h * t for t in u])
    minus, _, _ = _step(model, opt, [-h * t for t in u])
    ju = torch.cat([(a - b).flatten() / (2 * h) for a, b in zip(plus, minus, strict=True)])
    # The state this step leaves, as the library reads it.
    _, m0, o0 = _step(model, opt, [torch.zeros_like(t) for t in u])
    params = dict(m0.named_parameters())
    direction = dict(zip(params, u, strict=True))
    d = torch.cat([t.flatten() for t in precondition(direction, params, o0).values()])
    plain = torch.cat([t.flatten() for t in u])

    def error(pred: torch.Tensor) -> float:
        s = -(ju @ pred) / (pred @ pred)  # the best common factor
        assert s > 0, "the predicted step points the wrong way"
        return float((ju + s * pred).abs().max() / ju.abs().max())

    return error(d), error(plain) if plain @ ju < 0 else float("inf")


@pytest.mark.parametrize("name", list(CASES))
def test_preconditioned_direction_predicts_the_optimizer_step(name: str) -> None:
    factory, steps = CASES[name]
    model, opt = _warm(factory, steps)
    err, err_plain = _check(model, opt)
    assert err < 1e-6, f"{name}: {err}"
    # The check can fail: the plain gradient (for SGD-like rules, without the groups' relative
    # scale) is far off.
    assert err_plain > 0.3


def test_every_optimizer_with_a_rule_is_checked() -> None:
    model = nn.Sequential(nn.Linear(1, 1), nn.Tanh(), nn.Linear(1, 1))
    assert set(_RULES) <= {type(factory(model)) for factory, _ in CASES.values()}


# ------------------------------------------------------------------ wrappers, other optimizers


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    d = {n: torch.randn(p.shape) for n, p in model.named_parameters()}
    return model, x, y, d


def _trained(opt, model, x, y, steps: int = 3):
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(x), y).mean().backward()
        opt.step()
    opt.zero_grad()
    return opt


def _sampler():
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(30, 6, generator=g), torch.randint(0, 3, (30,), generator=g)
    )
    return ad.GARSampler(data, batch_size=5, seed=0)


def test_an_optimizer_without_a_rule_warns_once_and_uses_the_plain_gradient() -> None:
    model, x, y, d = _setup()
    rprop = _trained(optim.Rprop(model.parameters(), lr=1e-2), model, x, y)
    probe = ad.GradientProbe(model, loss_fn)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = probe(x, y, direction=d, optimizer=rprop)
        probe(x, y, direction=d, optimizer=rprop)  # the same optimizer: no second warning
        gar = ad.GAR(model, _sampler(), optimizer=rprop, budget=None)
        gar.close()
    assert [str(w.message).split(" ")[0] for w in caught] == ["Rprop"]
    assert "plain gradient" in str(caught[0].message)
    torch.testing.assert_close(r, probe(x, y, direction=d))
    other = optim.Rprop(model.parameters())
    with pytest.warns(UserWarning, match=r"^Rprop has no diagonal preconditioner"):
        ad.GAR(model, _sampler(), optimizer=other, budget=None).close()


class _Wrapper:
    """A wrapper that exposes the real optimizer as ``.optimizer`` (as accelerate's does)."""

    def __init__(self, optimizer) -> None:
        self.optimizer = optimizer


def test_wrappers_exposing_optimizer_are_unwrapped() -> None:
    model, x, y, d = _setup()
    adam = _trained(optim.Adam(model.parameters(), lr=1e-2), model, x, y)
    probe = ad.GradientProbe(model, loss_fn)
    expected = probe(x, y, direction=d, optimizer=adam)
    assert not torch.allclose(expected, probe(x, y, direction=d))
    for wrapped in (_Wrapper(adam), _Wrapper(_Wrapper(adam))):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            torch.testing.assert_close(probe(x, y, direction=d, optimizer=wrapped), expected)
            ad.GAR(model, _sampler(), optimizer=wrapped, budget=None).close()
    loop = _Wrapper(None)
    loop.optimizer = loop
    with pytest.raises(TypeError, match=r"optimizer should be a torch.optim.Optimizer .*_Wrapper"):
        probe(x, y, direction=d, optimizer=loop)


def test_accelerate_prepared_optimizer_is_accepted_as_it_is() -> None:
    import accelerate

    model, x, y, d = _setup()
    accelerator = accelerate.Accelerator(cpu=True)
    model, opt = accelerator.prepare(model, optim.RMSprop(model.parameters(), lr=1e-2))
    assert isinstance(opt, accelerate.optimizer.AcceleratedOptimizer)
    _trained(opt, model, x, y)
    params = dict(model.named_parameters())
    torch.testing.assert_close(precondition(d, params, opt), precondition(d, params, opt.optimizer))
    probe = ad.GradientProbe(model, loss_fn)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = probe(x, y, direction=d, optimizer=opt)
        gar = ad.GAR(model, _sampler(), optimizer=opt, budget=None)
    torch.testing.assert_close(r, probe(x, y, direction=d, optimizer=opt.optimizer))
    assert not torch.allclose(r, probe(x, y, direction=d))
    # GAR's rewards use the wrapped optimizer's state.
    loader = gar.sampler.track(
        torch.utils.data.DataLoader(gar.sampler.dataset, batch_sampler=gar.sampler)
    )
    for i, (bx, by) in enumerate(loader):
        opt.zero_grad()
        loss_fn(model(bx), by).mean().backward()
        r = gar.step()
        opt.step()
        if i == 2:
            break
    assert r is not None
    assert gar.metrics()["batches_rewarded"] == 2


def test_radam_uses_its_preconditioner_only_once_rectified() -> None:
    """With beta2 = 0.999, rho_t <= 5 for t <= 5: those steps are momentum SGD (P = I)."""
    model, x, y, d = _setup()
    radam = optim.RAdam(model.parameters(), lr=1e-2)
    params = dict(model.named_parameters())
    for steps, rectified in ((5, False), (1, True)):
        _trained(radam, model, x, y, steps)
        out = precondition(d, params, radam)
        assert all(torch.equal(out[n], d[n]) for n in d) is not rectified
