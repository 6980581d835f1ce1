"""The shared argument checks: bools are refused wherever an int or a number is asked for, with
the bad value in the message, at the call that received it."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import adaptive_data as ad
from adaptive_data._check import check_int, check_number
from adaptive_data._distributed import current_group


def _pairs(n: int = 8) -> TensorDataset:
    return TensorDataset(torch.randn(n, 3), torch.arange(n))


def _model() -> nn.Module:
    return nn.Linear(3, 2)


LOSS = nn.CrossEntropyLoss(reduction="none")

# (what is built, the argument, the message it must give); each gets value True.
BOOL_CASES = {
    "probe rel_eps": (lambda v: ad.GradientProbe(_model(), LOSS, rel_eps=v), "rel_eps"),
    "probe chunk_size": (lambda v: ad.GradientProbe(_model(), LOSS, chunk_size=v), "chunk_size"),
    "sampler batch_size": (lambda v: ad.GARSampler(_pairs(), batch_size=v), "batch_size"),
    "sampler seed": (lambda v: ad.GARSampler(_pairs(), batch_size=2, seed=v), "seed"),
    "sampler num_batches": (
        lambda v: ad.GARSampler(_pairs(), batch_size=2, num_batches=v),
        "num_batches",
    ),
    "sampler reward_window": (
        lambda v: ad.GARSampler(_pairs(), batch_size=2, reward_window=v),
        "reward_window",
    ),
    "sampler sync_timeout_s": (
        lambda v: ad.GARSampler(_pairs(), batch_size=2, sync_timeout_s=v),
        "sync_timeout_s",
    ),
    "sampler lr": (lambda v: ad.GARSampler(_pairs(), batch_size=2, lr=v), "lr"),
    "sampler floor": (lambda v: ad.GARSampler(_pairs(), batch_size=2, floor=v), "floor"),
    "sampler momentum": (lambda v: ad.GARSampler(_pairs(), batch_size=2, momentum=v), "momentum"),
    "sampler set_epoch": (lambda v: ad.GARSampler(_pairs(), batch_size=2).set_epoch(v), "epoch"),
    "sampler rank": (lambda v: ad.GARSampler(_pairs(), batch_size=2, rank=v, world_size=2), "rank"),
    "gar every": (
        lambda v: ad.GAR(_model(), ad.GARSampler(_pairs(), batch_size=2), every=v),
        "every",
    ),
    "reference batch_size": (lambda v: ad.ReferenceBatches(_pairs(), batch_size=v), "batch_size"),
    "reference seed": (lambda v: ad.ReferenceBatches(_pairs(), batch_size=2, seed=v), "seed"),
    "policy num_choices": (lambda v: ad.CategoricalPolicy(v), "num_choices"),
    "policy max_step": (lambda v: ad.CategoricalPolicy(3, max_step=v), "max_step"),
    "policy sample n": (
        lambda v: ad.CategoricalPolicy(3).sample(v, torch.Generator()),
        "n",
    ),
    "transform fill": (lambda v: ad.GARTransform(fill=v), "fill"),
    "table num_bins": (lambda v: ad.trivial_augment_wide_table(v), "num_bins"),
}


@pytest.mark.parametrize("case", sorted(BOOL_CASES))
def test_a_bool_is_not_a_number(case: str) -> None:
    build, name = BOOL_CASES[case]
    with pytest.raises((TypeError, ValueError), match=rf"{name} should be .*, but got {name}=True"):
        build(True)


def test_sampler_batch_id_refuses_a_bool() -> None:
    sampler = ad.GARSampler(_pairs(), batch_size=2)
    with pytest.raises(TypeError, match=r"batch should be an int id .*, but got batch=True"):
        sampler.update(torch.zeros(2), batch=True)


def test_rank_and_world_size_refuse_bools() -> None:
    with pytest.raises(TypeError, match=r"world_size should be an int, but got world_size=True"):
        current_group(0, True)


def test_check_int_messages() -> None:
    with pytest.raises(ValueError, match=r"^k should be a positive integer value, but got k=0$"):
        check_int("k", 0, minimum=1)
    with pytest.raises(
        ValueError, match=r"^k should be a non-negative integer value, but got k=-1$"
    ):
        check_int("k", -1, minimum=0)
    with pytest.raises(ValueError, match=r"^k should be an integer >= 2, but got k=1.5$"):
        check_int("k", 1.5, minimum=2)
    with pytest.raises(ValueError, match=r"^k should be a positive integer value or None, "):
        check_int("k", False, minimum=1, none_ok=True)
    with pytest.raises(TypeError, match=r"^k should be an int, but got k='3'$"):
        check_int("k", "3")
    check_int("k", None, minimum=1, none_ok=True)
    check_int("k", 2, minimum=2)
    check_int("k", -5)


def test_check_number_messages() -> None:
    for bad in (True, math.nan, math.inf, "1", None, torch.tensor(1.0)):
        with pytest.raises(ValueError, match=r"^x should be a positive finite number, but got x="):
            check_number("x", bad, positive=True)
    with pytest.raises(ValueError, match=r"^x should be a number in \[0, 1\), but got x=1$"):
        check_number("x", 1, low=0, high=1)
    with pytest.raises(ValueError, match=r"^x should be a finite number >= 2, but got x=1$"):
        check_number("x", 1, low=2)
    assert check_number("x", 3, positive=True) == 3.0
    assert isinstance(check_number("x", 0, low=0, high=1), float)
