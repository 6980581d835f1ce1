"""GAR's cost budget: its estimated cost stays within the budget, its choices follow the
evidence, an explicit setting wins, and its choices are the same across worker counts and a
resume (they depend on counted work and the rewards only)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import adaptive_data as ad
from adaptive_data.gar._budget import (
    DEFAULT_BUDGET,
    KEEP_COSTS,
    MAX_REFRESH,
    MAX_WEIGHT,
    MIN_ROWS,
    NEXT_BATCH_BUDGET,
    WARMUP,
    Budget,
    per_row_contrast,
)

LOSS = nn.CrossEntropyLoss(reduction="none")


def budget(value=0.1, b=64, costs=(0.25, 0.75), **fixed) -> Budget:
    args = {"every": None, "rows": None, "refresh": None, **fixed}
    return Budget(value, b, costs, **args)


def past_warmup(bud: Budget) -> Budget:
    """End the exact phase as WARMUP rewarded batches without evidence do."""
    for _ in range(WARMUP):
        assert bud.wants(0)
        bud.charge_keep(bud.batch_size)
        bud.observe_contrast(None, bud.batch_size)
        bud.tick()
    assert not bud.warm
    return bud


# ---------------------------------------------------------------- the bucket on cost profiles


@settings(max_examples=60, deadline=None)
@given(
    value=st.floats(0.01, 2.0),
    b=st.integers(1, 256),
    keep=st.floats(0.0, 2.0),
    rows_cost=st.floats(0.0, 4.0),
    ref_rows=st.integers(1, 512),
    contrasts=st.lists(st.one_of(st.none(), st.floats(0.0, 10.0)), min_size=1, max_size=8),
    steps=st.integers(1, 400),
)
def test_the_estimated_cost_stays_within_the_budget(
    value, b, keep, rows_cost, ref_rows, contrasts, steps
):
    """On simulated cost profiles (any cost split, reference size, batch size and evidence),
    what the second phase charges is at most ``budget`` per step, plus the one batch (and its
    fresh reference) charged ahead of its credit; the first phase ends by WARMUP."""
    bud = budget(value, b, (keep, rows_cost))
    worst = keep + rows_cost + ref_rows / b  # one kept batch, all rows, a fresh reference
    held_at = None
    start = charged0 = None
    for t in range(steps):
        if bud.wants(t):
            bud.charge_keep(b)
            if held_at is None or t - held_at >= bud.reference_refresh():
                bud.charge_reference(ref_rows)
                held_at = t
            bud.observe_contrast(contrasts[bud.kept % len(contrasts)], b)
        bud.tick()
        if not bud.warm and start is None:
            start, charged0 = t + 1, bud.charged
        if start is not None:
            assert bud.charged - charged0 <= value * (t + 1 - start) + worst + 1e-9
    assert bud.kept >= min(steps, 1)  # the first batch is always kept
    assert bud.kept <= WARMUP or not bud.warm


def test_a_larger_budget_keeps_more_batches_after_the_exact_phase():
    kept = []
    for value in (0.05, 0.1, 0.5, 2.0):
        bud = past_warmup(budget(value, b=256, costs=(0.25, 0.75)))
        n = 0
        for t in range(200):
            if bud.wants(t):
                n += 1
                bud.charge_keep(256)
            bud.tick()
        kept.append(n)
    assert kept == sorted(kept)
    assert kept[0] < kept[-1]
    assert kept[-1] == 200  # two steps' budget affords every batch (a quarter of the rows)
    per_batch = 0.25 + 0.75 / 4
    assert kept[1] == pytest.approx(200 * 0.1 / per_batch, abs=1.5)


# ---------------------------------------------------------------- the phases


def test_the_first_phase_is_exact_and_ends_after_warmup_batches():
    bud = budget(b=64)
    assert bud.warm
    assert bud.chosen_rows(64) is None
    assert bud.reference_refresh() == 1
    for t in range(WARMUP - 1):
        assert bud.wants(t)
        bud.charge_keep(64)
        bud.observe_contrast(0.0, 64)  # no contrast: evidence stays 0
        bud.tick()
        assert bud.warm
        assert bud.credit == 0.0
    bud.charge_keep(64)
    bud.observe_contrast(None, 64)
    assert not bud.warm
    assert bud.chosen_rows(64) == MIN_ROWS == 32  # a quarter of 64 is 16 < 32
    assert bud.chosen_rows(12) is None
    assert past_warmup(budget(b=32)).chosen_rows(32) is None  # at most MIN_ROWS: whole
    assert past_warmup(budget(b=256)).chosen_rows(256) == 256 // 4
    # R = B, budget 0.1: the reference's half of the budget buys one every 20 steps
    assert bud.reference_refresh() == 20
    bud.charge_reference(640)
    assert bud.reference_refresh() == MAX_REFRESH


def test_clear_evidence_is_reported_and_does_not_end_the_first_phase_early():
    """A 1-sd gap between two sources gives about 16 squared standard errors a batch of 64:
    summed in the metrics, while the exact phase still lasts WARMUP batches (ending it on
    such evidence made short runs less safe: the module's docstring)."""
    bud = budget(b=64)
    sources = [0] * 32 + [1] * 32
    gap = torch.tensor(sources, dtype=torch.float64) * 1.0
    g = torch.Generator().manual_seed(0)
    n = 0
    while bud.warm:
        bud.charge_keep(64)
        phi = per_row_contrast(torch.randn(64, generator=g, dtype=torch.float64) + gap, sources)
        bud.observe_contrast(phi, 64)
        n += 1
    assert n == WARMUP
    assert bud.evidence > 100
    assert bud.metrics(n)["budget/evidence"] == bud.evidence
    assert 8 < bud.metrics(n)["budget/contrast"] * 64 < 40


def test_the_per_row_contrast_is_an_analysis_of_variance():
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 6.0, 7.0])
    src = [0, 0, 0, 1, 1, 1]
    # means 2 and 6, grand mean 4: between = 3 * 4 + 3 * 4 = 24; within = 2 + 2 = 4, var 1
    assert per_row_contrast(r, src) == pytest.approx((24.0 - 1) / 6)
    assert per_row_contrast(r, [0] * 6) is None  # one source
    assert per_row_contrast(torch.tensor([1.0, float("nan"), 3.0]), [0, 1, 1]) is None
    nan = torch.tensor([1.0, 2.0, 3.0, 5.0, 6.0, 7.0, float("nan")])
    assert per_row_contrast(nan, [*src, 1]) == per_row_contrast(r, src)


def test_the_reference_cosine_is_reported():
    bud = budget()
    a = {"w": torch.tensor([1.0, 0.0])}
    b = {"w": torch.tensor([0.6, 0.8])}
    bud.observe_reference(a, None)
    assert math.isnan(bud.metrics(1)["budget/reference_cosine"])
    bud.observe_reference(b, a)
    assert bud.metrics(1)["budget/reference_cosine"] == pytest.approx(0.6)


# ---------------------------------------------------------------- explicit settings win


def test_explicit_settings_win_over_the_budget():
    bud = budget(every=3, rows=5, refresh=7)
    assert [bud.wants(t) for t in range(7)] == [True, False, False, True, False, False, True]
    assert bud.chosen_rows(64) == 5
    assert bud.reference_refresh() == 7
    for _t in range(40):
        bud.charge_keep(64)
        bud.observe_contrast(1.0, 64)
        bud.tick()
    assert not bud.warm
    assert bud.chosen_rows(64) == 5
    assert bud.reference_refresh() == 7
    assert bud.credit == 0.0


def test_without_a_budget_every_batch_every_row_and_a_fresh_reference():
    bud = Budget(None, 64, (0.25, 0.75), every=None, rows=None, refresh=None)
    for t in range(40):
        assert bud.wants(t)
        bud.charge_keep(64)
        bud.observe_contrast(5.0, 64)
        bud.tick()
    assert bud.chosen_rows(64) is None
    assert bud.reference_refresh() == 1
    assert not bud.warm


def test_a_bad_budget_state_is_refused_naming_the_key():
    bud = budget()
    state = bud.state_dict()
    for key, bad in (("credit", math.nan), ("kept", -1), ("warm", 1), ("reference_rows", 0)):
        with pytest.raises(ValueError, match=rf"budget\['{key}'\]"):
            budget().load_state_dict({**state, key: bad})
    other = budget()
    other.load_state_dict(state)
    assert other.state_dict() == state


# ---------------------------------------------------------------- GAR with the budget


def mixture(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    clean = TensorDataset(x, (x[:, 0] > 0).long())
    noisy = TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 2, (n,), generator=g))
    return {"clean": clean, "noisy": noisy}, clean


def train(workers=0, steps=None, state=None, seed=0, **gar_kw):
    """A GAR loop over a two-source mixture (explicit lag: the same batches with any worker
    count); returns what GAR kept and chose, the weights, and the states at the end."""
    torch.manual_seed(seed)
    sources, clean = mixture()
    s = ad.GARSampler(sources, batch_size=16, seed=seed, lag=12, lr=0.5)
    ref = ad.ReferenceBatches(clean, batch_size=8, seed=1)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gar = ad.GAR(model, s, optimizer=opt, reference=ref, loss_fn=LOSS, **gar_kw)
    if state is not None:
        s.load_state_dict(state["sampler"])
        gar.load_state_dict(state["gar"])
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
    kw = {"num_workers": workers, "prefetch_factor": 2} if workers else {}
    loader = s.track(DataLoader(s.dataset, batch_sampler=s, **kw))
    chosen = []
    done = 0
    for _epoch in range(3):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            r = gar.step()
            m = gar.metrics()
            chosen.append((s.last_batch, None if r is None else r.numel(), m["budget/rows"]))
            opt.step()
            done += 1
            if steps is not None and done == steps:
                saved = {
                    "sampler": s.state_dict(),
                    "gar": gar.state_dict(),
                    "model": model.state_dict(),
                    "opt": opt.state_dict(),
                }
                return chosen, dict(s.weights), gar.metrics(), saved
    return chosen, dict(s.weights), gar.metrics(), None


def test_gar_keeps_a_share_of_the_batches_within_its_budget_and_learns():
    chosen, weights, m, _ = train(budget=0.5)
    kept = [c for c in chosen if c[1] is not None]
    assert chosen[0][1] is not None  # the first batch is rewarded
    assert 0 < len(kept) < len(chosen)
    warm = WARMUP * (sum(KEEP_COSTS["ghost", "cosine"]) + 0.5)  # the exact phase, at most
    assert m["budget/cost_per_step"] * m["steps"] <= 0.5 * m["steps"] + warm + 1.5
    assert m["budget"] == 0.5
    assert weights["clean"] > 0.6


def test_the_budget_chooses_the_same_with_dataloader_workers():
    assert train(workers=0, budget=0.3) == train(workers=2, budget=0.3)


def test_the_budget_resumes_its_choices_exactly():
    full = train(budget=0.3)
    first = train(budget=0.3, steps=7)
    resumed = train(budget=0.3, state=first[3])
    # the resumed run's first epoch ends where the uninterrupted one's did
    assert first[0] + resumed[0][: len(full[0]) - 7] == full[0]
    assert resumed[1] == full[1]
    assert resumed[2] == full[2]


def test_an_explicit_every_overrides_the_budget_in_gar():
    chosen, _, m, _ = train(budget=0.05, every=2)
    assert [c[1] is not None for c in chosen] == [True, False] * (len(chosen) // 2)
    assert m["budget/reference_refresh"] > 1
    assert m["budget/rows"] == 16


def test_default_budget_is_documented_and_checked():
    assert (DEFAULT_BUDGET, NEXT_BATCH_BUDGET) == (0.1, 0.02)
    sources, clean = mixture()
    s = ad.GARSampler(sources, batch_size=16)
    ref = ad.ReferenceBatches(clean, batch_size=8)
    model = nn.Linear(4, 2)
    with pytest.raises(
        ValueError, match=r"budget should be 'auto', None or a number > 0, but got budget=0$"
    ):
        ad.GAR(model, s, reference=ref, loss_fn=LOSS, budget=0)
    with pytest.raises(ValueError, match=r"budget=nan"):
        ad.GAR(model, s, reference=ref, loss_fn=LOSS, budget=float("nan"))
    with pytest.raises(ValueError, match=r"but got budget='Auto'"):
        ad.GAR(model, s, reference=ref, loss_fn=LOSS, budget="Auto")
    gar = ad.GAR(model, s, reference=ref, loss_fn=LOSS)  # "auto" with a held-out reference
    assert "budget=0.1" in repr(gar)
    assert gar.budget == gar.metrics()["budget"] == DEFAULT_BUDGET
    gar.close()
    gar = ad.GAR(model, s, reference=ref, loss_fn=LOSS, budget=0.25)  # a number is kept
    assert gar.budget == gar.metrics()["budget"] == 0.25


def test_a_state_saved_before_the_budget_names_budget_none():
    sources, clean = mixture()
    s = ad.GARSampler(sources, batch_size=16)
    ref = ad.ReferenceBatches(clean, batch_size=8)
    model = nn.Linear(4, 2)
    exact = ad.GAR(model, s, reference=ref, loss_fn=LOSS, budget=None)
    state = exact.state_dict()
    exact.close()
    del state["budget"]
    gar = ad.GAR(model, s, reference=ref, loss_fn=LOSS)
    with pytest.raises(
        ValueError,
        match=r"state has budget=None, but this GAR has budget=0.1 .*"
        r"pass budget=None",
    ):
        gar.load_state_dict(state)
    gar.close()
    ad.GAR(model, s, reference=ref, loss_fn=LOSS, budget=None).load_state_dict(state)


@settings(max_examples=40, deadline=None)
@given(
    value=st.floats(0.02, 1.0),
    contrasts=st.lists(st.one_of(st.none(), st.floats(0.0, 3.0)), min_size=1, max_size=6),
    ref_rows=st.integers(1, 128),
    steps=st.integers(2, 120),
    cut=st.floats(0.0, 1.0),
)
def test_the_choices_resume_exactly_from_a_state(value, contrasts, ref_rows, steps, cut):
    """A budget rebuilt from a state at any step makes the choices of the uninterrupted one
    (they depend on the counts and the evidence only)."""

    def drive(bud: Budget, start: int, stop: int, held_at: list[int | None]) -> list[tuple]:
        seen = []
        for t in range(start, stop):
            kept = bud.wants(t)
            if kept:
                bud.charge_keep(64)
                if held_at[0] is None or t - held_at[0] >= bud.reference_refresh():
                    bud.charge_reference(ref_rows)
                    held_at[0] = t
                bud.observe_contrast(contrasts[t % len(contrasts)], 64)
            bud.tick()
            seen.append((kept, bud.chosen_rows(64), bud.reference_refresh(), bud.warm))
        return seen

    whole = drive(budget(value), 0, steps, [None])
    at = int(cut * steps)
    first, held = budget(value), [None]
    head = drive(first, 0, at, held)
    again = budget(value)
    again.load_state_dict(first.state_dict())
    assert head + drive(again, at, steps, held) == whole


def test_the_vectorised_contrast_is_the_analysis_of_variance_with_many_sources():
    g = torch.Generator().manual_seed(0)
    groups = torch.randint(0, 50, (400,), generator=g)
    r = torch.randn(400, generator=g, dtype=torch.float64) + 0.3 * groups.double() / 50
    ids = groups.unique()
    mean, between, within = r.mean(), 0.0, 0.0
    for s in ids.tolist():  # the textbook form, one source at a time
        rs = r[groups == s]
        between += rs.numel() * float((rs.mean() - mean) ** 2)
        within += float(((rs - rs.mean()) ** 2).sum())
    q = between / (within / (400 - len(ids)))
    want = max(q - (len(ids) - 1), 0.0) / 400
    assert per_row_contrast(r, (groups * 7 + 3).tolist()) == pytest.approx(want, rel=1e-9)


def test_a_bad_budget_state_is_refused_before_anything_is_applied():
    """The reference stream's position and the counters stay as they were when the budget's
    part of a GAR state is refused (no half-loaded state)."""
    sources, clean = mixture()
    s = ad.GARSampler(sources, batch_size=16, seed=0)
    ref = ad.ReferenceBatches(clean, batch_size=8, seed=1)
    model = nn.Linear(4, 2)
    gar = ad.GAR(model, s, reference=ref, loss_fn=LOSS)
    state = gar.state_dict()
    state["steps"] = 5
    state["budget_state"] = {**state["budget_state"], "credit": math.nan}
    before = (gar.state_dict(), ref.state_dict())
    with pytest.raises(ValueError, match=r"budget\['credit'\] should be a finite number"):
        gar.load_state_dict(state)
    after = (gar.state_dict(), ref.state_dict())
    assert str(after) == str(before)
    with pytest.raises(ValueError, match=r"budget_state is missing the key\(s\) \['warm'\]"):
        gar.load_state_dict(
            {
                **state,
                "budget_state": {k: v for k, v in before[0]["budget_state"].items() if k != "warm"},
            }
        )


def test_the_budget_with_gradient_accumulation_in_a_loop():
    """Two micro-batches per optimizer step (as a Trainer's accumulation), every default:
    the exact phase rewards both micro-batches of its steps, the bucket then a share of them,
    and no kept micro-batch is dropped."""
    torch.manual_seed(0)
    sources, clean = mixture(n=480)
    s = ad.GARSampler(sources, batch_size=16, seed=0, lr=0.5)
    ref = ad.ReferenceBatches(clean, batch_size=8, seed=1)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gar = ad.GAR(model, s, optimizer=opt, reference=ref, loss_fn=LOSS)
    loader = s.track(DataLoader(s.dataset, batch_sampler=s))
    steps = 0
    for micro, (x, y) in enumerate(loader):  # 60 micro-batches, 30 steps
        (nn.functional.cross_entropy(model(x), y) / 2).backward()
        if micro % 2:
            gar.step()
            opt.step()
            opt.zero_grad()
            steps += 1
    m = gar.metrics()
    assert m["steps"] == steps == 30
    assert m["batches_dropped"] == 0
    assert m["budget/exact_phase"] == 0.0
    assert 16 < m["batches_rewarded"] < 60  # the exact phase's 16, then a share
    assert s.weights["clean"] > 0.55


# ---------------------------------------------------------------- what a kept batch stands for


def test_a_kept_batch_stands_for_the_steps_since_the_last_one_in_the_second_phase():
    bud = budget(0.1)
    assert [bud.keep_weight(c) for c in range(3)] == [1.0, 1.0, 1.0]  # first phase: exact
    bud.warm = False
    assert bud.keep_weight(7) == 5.0  # kept at 2, then at 7
    assert bud.keep_weight(7) == 5.0  # another batch of the same step (accumulation)
    assert bud.keep_weight(8) == 1.0
    assert bud.keep_weight(8 + MAX_WEIGHT) == MAX_WEIGHT  # at the cap
    assert bud.keep_weight(8 + 2 * MAX_WEIGHT + 3) == MAX_WEIGHT  # a longer gap: capped
    assert bud.keep_weight(8 + 2 * MAX_WEIGHT + 4) == 1.0
    fixed = budget(0.1, every=4)  # an explicit every: each update stands for itself
    fixed.warm = False
    assert [fixed.keep_weight(c) for c in (0, 4, 8)] == [1.0, 1.0, 1.0]
    plain = budget(None)
    assert [plain.keep_weight(c) for c in (0, 3)] == [1.0, 1.0]


def test_gar_weighs_each_update_by_the_steps_since_the_previous_one():
    """In the second phase GAR passes the sampler the steps since the previous rewarded
    batch; before it, and without a budget, every update weighs 1."""
    calls = []
    original = ad.GARSampler.update

    def spy(self, rewards, batch=None, rows=None, weight=1.0):
        calls.append((batch, weight))
        return original(self, rewards, batch=batch, rows=rows, weight=weight)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ad.GARSampler, "update", spy)
        _, weights, m, _ = train(budget=0.3)
    assert m["budget/exact_phase"] == 0.0
    batches = [b for b, _ in calls]
    assert [w for _, w in calls[:WARMUP]] == [1.0] * WARMUP
    gaps = [b - a for a, b in zip(batches[WARMUP - 1 :], batches[WARMUP:], strict=False)]
    assert [w for _, w in calls[WARMUP:]] == [float(min(g, MAX_WEIGHT)) for g in gaps]
    assert max(gaps) > 1  # the bucket skipped batches
    assert weights["clean"] > 0.6
    calls.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ad.GARSampler, "update", spy)
        train(budget=None)
    assert {w for _, w in calls} == {1.0}
