"""Writes ``resume_states_v1.pt``: the states a run saved after 5 steps (sampler with a
transform, GAR held-out with reused reference gradients and rows, model, optimizer) and what
the same run did in its next 3 steps. ``tests/test_state_compat.py`` loads them with the
present version and checks that it continues the same way.

Run with the version whose states are to be kept loadable on the path, e.g.
``PYTHONPATH=<checkout of that version> python tests/data/make_resume_states.py``; the file
in the repository was written by the version of commit a0fdd82.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import adaptive_data as ad

STEPS, MORE = 5, 3


def setup():
    """The run: two sources of 4-channel 6x6 images, a transform, an MLP, Adam."""
    g = torch.Generator().manual_seed(0)

    def images(n):
        return TensorDataset(
            torch.rand(n, 3, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)
        )

    sources = {"a": images(40), "b": images(40)}
    ref = tuple(images(8).tensors)
    tf = ad.GARTransform(["Identity", "Rotate", "Invert"], num_magnitude_bins=4, learn_ops=True)
    wrapped = {k: _Pipeline(v, tf) for k, v in sources.items()}
    sampler = ad.GARSampler(wrapped, batch_size=6, seed=3, transform=tf, lr=0.5)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(108, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    gar = ad.GAR(
        model,
        sampler,
        optimizer=opt,
        reference=itertools.repeat(ref),
        loss_fn=loss_fn,
        reference_refresh=2,
        rows=3,
        # budget= came after the fixture was written: its states are an exact GAR's
        **({"budget": None} if "budget" in inspect.signature(ad.GAR).parameters else {}),
    )
    return sampler, tf, model, opt, gar, loss_fn


class _Pipeline(torch.utils.data.Dataset):
    """A source whose images go through the transform."""

    def __init__(self, data, tf):
        self.data, self.tf = data, tf

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        x, y = self.data[i]
        return self.tf(x), y


def steps(batches, sampler, model, opt, gar, loss_fn, n):
    """``n`` training steps on the iterator ``batches``; returns per step the batch id, its
    targets, the sum of its (augmented) inputs, the rewards applied and the weights."""
    out = []
    for x, y in itertools.islice(batches, n):
        opt.zero_grad()
        loss_fn(model(x), y).mean().backward()
        r = gar.step()
        opt.step()
        out.append(
            {
                "batch": sampler.last_batch,
                "targets": y.tolist(),
                "input_sum": float(x.double().sum()),
                "rewards": None if r is None else r.clone(),
                "weights": dict(sampler.weights),
                "op_weights": dict(sampler.transform.policy.op_weights),
            }
        )
    return out


def main() -> None:
    torch.set_num_threads(1)  # the reductions' order, so the test can ask for equality
    sampler, _tf, model, opt, gar, loss_fn = setup()
    batches = iter(sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler)))
    steps(batches, sampler, model, opt, gar, loss_fn, STEPS)
    saved = copy.deepcopy(  # state_dict() holds the live tensors, which training moves
        {
            "sampler": sampler.state_dict(),
            "gar": gar.state_dict(),
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "library": ad.__file__,
        }
    )
    saved["next"] = steps(batches, sampler, model, opt, gar, loss_fn, MORE)
    out = Path(__file__).with_name("resume_states_v1.pt")
    torch.save(saved, out)
    print("wrote", out, "with", ad.__file__, file=sys.stderr)


if __name__ == "__main__":
    main()
