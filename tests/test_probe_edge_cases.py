"""GradientProbe and GAR on models that share layers, optimizers with several learning rates,
and non-finite gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adaptive_data as ad


def ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out, y, reduction="none")


def direction(model: nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters()
    }


def loop_oracle(model, x, y, d, cosine=False):
    """One autograd call per example: r_i = <g_i, D> (or the cosine)."""
    params = dict(model.named_parameters())
    dd = torch.cat([d[n].flatten() for n in params])
    out = []
    for i in range(len(x)):
        loss = ce(model(x[i : i + 1]), y[i : i + 1]).sum()
        g = torch.cat([t.flatten() for t in torch.autograd.grad(loss, list(params.values()))])
        out.append(torch.dot(g, dd) / (g.norm() * dd.norm()) if cosine else torch.dot(g, dd))
    return torch.stack(out)


class Aliased(nn.Module):
    """A module registered under two names, called once."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)
        self.alias = self.first

    def forward(self, x):
        return self.head(torch.tanh(self.first(x)))


def test_a_module_under_two_names_is_counted_once():
    torch.manual_seed(0)
    model = Aliased()
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    d = direction(model)
    for reward in ("dot", "cosine"):
        got = ad.GradientProbe(model, ce, reward=reward)(x, y, direction=d)
        torch.testing.assert_close(got, loop_oracle(model, x, y, d, reward == "cosine"))


def test_a_layer_called_twice_is_exact_for_both_rewards():
    """The cosine needs the norm of the summed per-example gradient of a layer run twice (cross
    terms between the calls): its per-example gradients are summed over the calls."""
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.Tanh(), shared, nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    d = direction(model)
    for reward in ("dot", "cosine"):
        torch.testing.assert_close(
            ad.GradientProbe(model, ce, reward=reward)(x, y, direction=d),
            loop_oracle(model, x, y, d, reward == "cosine"),
        )


def test_parameter_groups_with_other_learning_rates_scale_the_direction():
    """SGD moves each group by its own rate: D is scaled by each group's rate relative to the
    largest (one group: unchanged)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    d = direction(model)
    opt = torch.optim.SGD(
        [
            {"params": model[0].parameters(), "lr": 1e-2},
            {"params": model[2].parameters(), "lr": 1e-5},
        ]
    )
    got = ad.GradientProbe(model, ce, estimator="per_sample")(x, y, direction=d, optimizer=opt)
    scaled = {n: t * (1.0 if n.startswith("0.") else 1e-3) for n, t in d.items()}
    oracle = ad.GradientProbe(model, ce, estimator="per_sample")(x, y, direction=scaled)
    torch.testing.assert_close(got, oracle)
    one = torch.optim.SGD(model.parameters(), lr=0.3)
    plain = ad.GradientProbe(model, ce, estimator="per_sample")(x, y, direction=d)
    torch.testing.assert_close(
        ad.GradientProbe(model, ce, estimator="per_sample")(x, y, direction=d, optimizer=one), plain
    )


@pytest.mark.parametrize("method", ["ghost", "per_sample"])
def test_a_nonfinite_gradient_gives_a_nan_cosine_not_zero(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(4, 4), torch.randint(0, 3, (4,))
    x[1, 0] = float("nan")
    r = ad.GradientProbe(model, ce, estimator=method, reward="cosine", verify="never")(
        x, y, direction=direction(model)
    )
    assert torch.isnan(r[1])
    assert bool(torch.isfinite(r[[0, 2, 3]]).all())


JVP_SCRIPT = """
import warnings
import torch
from torch import nn
import adaptive_data as ad

class Scale(nn.Module):  # no ghost rule: ghost covers it with a forward-mode JVP
    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.s

model = nn.Sequential(nn.Linear(4, 3), Scale())
probe = ad.GradientProbe(model, nn.CrossEntropyLoss(reduction="none"), estimator={method!r})
x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    probe(x, y, reference=(x, y))
print("WARNINGS", sorted({{f"{{w.category.__name__}}: {{w.message}}" for w in caught}}))
"""


@pytest.mark.parametrize("method", ["jvp", "ghost"])
def test_forward_ad_leaks_no_future_warning(method: str) -> None:
    """torch's first make_dual of a process compiles decompositions with torch.jit.script,
    which warns that it is deprecated: that warning never reaches the user (a fresh process,
    since it comes once per process)."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", JVP_SCRIPT.format(method=method)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "WARNINGS []" in done.stdout, done.stdout
