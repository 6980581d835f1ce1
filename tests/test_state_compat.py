"""States saved by an earlier version load and continue the run as that version continued
it: ``tests/data/resume_states_v1.pt`` was written by the version of commit a0fdd82 (before
the reward engine moved into ``probe/`` and GAR into ``gar/``), with the script beside it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch.utils.data import DataLoader

DATA = Path(__file__).with_name("data")


def _script():
    spec = importlib.util.spec_from_file_location(
        "make_resume_states", DATA / "make_resume_states.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_states_of_the_previous_version_resume_the_same_run() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the script ran: the same order of every float reduction
    try:
        _resume_and_compare()
    finally:
        torch.set_num_threads(threads)


def _resume_and_compare() -> None:
    script = _script()
    saved = torch.load(DATA / "resume_states_v1.pt", weights_only=False)
    sampler, _tf, model, opt, gar, loss_fn = script.setup()
    sampler.load_state_dict(saved["sampler"])
    gar.load_state_dict(saved["gar"])
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    batches = iter(sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler)))
    got = script.steps(batches, sampler, model, opt, gar, loss_fn, script.MORE)
    assert len(got) == len(saved["next"]) == script.MORE
    for mine, theirs in zip(got, saved["next"], strict=True):
        assert mine["batch"] == theirs["batch"]
        assert mine["targets"] == theirs["targets"]
        assert mine["input_sum"] == theirs["input_sum"]  # the same augmentation decisions
        assert (mine["rewards"] is None) == (theirs["rewards"] is None)
        if mine["rewards"] is not None:
            torch.testing.assert_close(mine["rewards"], theirs["rewards"])
        assert mine["weights"] == theirs["weights"]
        assert mine["op_weights"] == theirs["op_weights"]
