"""GARTransform: ops against torchvision, policies, decisions through the sampler and workers."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

from adaptive_data import GARSampler, GARTransform, apply_op, trivial_augment_wide_table
from adaptive_data._augment import NO_AUGMENTATION

TA = v2.TrivialAugmentWide()


def oracle(image, op, magnitude, interpolation=InterpolationMode.NEAREST, fill=None):
    """torchvision's own auto-augment op application (the reference implementation)."""
    ta = v2.TrivialAugmentWide(interpolation=interpolation, fill=fill)
    return ta._apply_image_or_video_transform(image, op, magnitude, interpolation, ta._fill)


def random_image(seed: int, channels: int = 3, h: int = 32, w: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (channels, h, w), dtype=torch.uint8, generator=g)


def same(a, b) -> bool:
    if isinstance(a, Image.Image):
        return isinstance(b, Image.Image) and a.mode == b.mode and a.tobytes() == b.tobytes()
    return type(a) is type(b) and torch.equal(a, b)


# ------------------------------------------------------------------ the op table and kernels


def test_default_table_is_torchvisions_trivial_augment_wide_space():
    table = trivial_augment_wide_table(31)
    space = TA._AUGMENTATION_SPACE
    assert list(table) == list(space)
    for op, (fn, signed) in space.items():
        mags = fn(31, 32, 32)
        assert table[op][1] == signed
        if mags is None:
            assert table[op][0] is None
        else:
            assert table[op][0] == [float(v) for v in mags]  # exactly: the kernels get these


@pytest.mark.parametrize("kind", ["tensor", "pil", "tv_image"])
def test_every_op_at_every_bin_equals_torchvision(kind):
    base = random_image(0)
    image = {
        "tensor": base,
        "pil": v2.functional.to_pil_image(base),
        "tv_image": tv_tensors.Image(base),
    }[kind]
    tf = GARTransform()
    checked = 0
    for o, op in enumerate(tf.op_names):
        mags, signed = tf.table[op]
        for b in range(len(mags) if mags else 1):
            for negate in (False, True) if signed else (False,):
                magnitude = tf.magnitude(o, b, negate) or 0.0
                tf._arm(o, b, negate)
                out = tf(image)
                tf._disarm("the test image")
                assert same(out, oracle(image, op, magnitude)), (op, b, negate)
                checked += 1
    assert checked == 3 + 2 * 31 * 9 + 2 * 31


@settings(max_examples=60, deadline=None)
@given(
    op=st.sampled_from(list(trivial_augment_wide_table())),
    fraction=st.floats(0, 1),
    negate=st.booleans(),
    channels=st.sampled_from([1, 3]),
    h=st.integers(4, 40),
    w=st.integers(4, 40),
    batch=st.sampled_from([(), (2,)]),
    fill=st.sampled_from([None, 128, [10, 20, 30]]),
    interpolation=st.sampled_from([InterpolationMode.NEAREST, InterpolationMode.BILINEAR]),
    seed=st.integers(0, 2**16),
)
def test_apply_op_equals_torchvision_on_any_image(
    op, fraction, negate, channels, h, w, batch, fill, interpolation, seed
):
    if isinstance(fill, list) and channels == 1:
        fill = 77
    image = (
        torch.stack([random_image(seed + i, channels, h, w) for i in range(batch[0])])
        if (batch)
        else random_image(seed, channels, h, w)
    )
    mags, signed = trivial_augment_wide_table()[op]
    magnitude = 0.0 if mags is None else mags[round(fraction * (len(mags) - 1))]
    if signed and negate:
        magnitude = -magnitude
    got = apply_op(image, op, magnitude, interpolation=interpolation, fill=fill)
    assert same(got, oracle(image, op, magnitude, interpolation, fill))


def test_invert_and_custom_tables():
    tf = GARTransform({"Invert": (None, False), "Rotate": ([0.0, 45.0, 90.0], True)})
    assert tf.op_names == ["Invert", "Rotate"]
    assert tf.magnitude_weights == {"Rotate": pytest.approx([1 / 3] * 3)}
    img = random_image(1)
    tf._arm(0, 0, False)
    assert torch.equal(tf(img), 255 - img)
    tf._disarm("x")
    tf._arm(1, 2, True)
    assert torch.equal(tf(img), oracle(img, "Rotate", -90.0))
    tf._disarm("x")


def test_subset_of_the_default_ops():
    tf = GARTransform(["Identity", "Posterize"], num_magnitude_bins=5)
    assert tf.op_names == ["Identity", "Posterize"]
    assert tf.table["Posterize"][0] == trivial_augment_wide_table(5)["Posterize"][0]
    assert set(tf.op_weights) == {"Identity", "Posterize"}


@pytest.mark.parametrize(
    ("ops", "kwargs", "error", "match"),
    [
        (["Rotate", "Warp"], {}, ValueError, r"unknown op\(s\) \['Warp'\]"),
        ({"Warp": ([0, 1], False)}, {}, ValueError, r"unknown op 'Warp'"),
        ({"Rotate": ([10.0], True)}, {}, ValueError, r"'Rotate' should have at least 2 .* got 1"),
        ({"Rotate": (None, True)}, {}, ValueError, r"'Rotate' needs magnitudes, but got None"),
        (
            {"Rotate": [0.0, 1.0]},
            {},
            TypeError,
            r"'Rotate' should map to a tuple \(magnitudes, signed\)",
        ),
        (
            {"Rotate": ([0.0, math.nan], True)},
            {},
            ValueError,
            r"'Rotate' has non-finite magnitudes",
        ),
        ([], {}, ValueError, r"at least one op"),
        (["Rotate", "Rotate"], {}, ValueError, r"should not repeat an op"),
        ("Rotate", {}, TypeError, r"but got the string 'Rotate'"),
        (None, {"num_magnitude_bins": 1}, ValueError, r"num_bins=1"),
        (None, {"floor": 0.5}, ValueError, r"floor=0.5"),
        (None, {"generator": 3}, TypeError, r"generator should be a torch.Generator"),
        (
            {"Posterize": ([4.0, 9.0], False)},
            {},
            ValueError,
            r"'Posterize' takes unsigned magnitudes in \[0, 8\], but got \[9.0\]",
        ),
        (
            {"Solarize": ([0.0, 0.5], True)},
            {},
            ValueError,
            r"'Solarize' takes unsigned magnitudes in \[0, 1\], but got signed=True",
        ),
        (None, {"learn_ops": "no"}, TypeError, r"learn_ops should be a bool, but got"),
        (None, {"fill": {torch.Tensor: 128}}, TypeError, r"fill should be None, a number"),
    ],
)
def test_bad_tables_raise(ops, kwargs, error, match):
    with pytest.raises(error, match=match):
        GARTransform(ops, **kwargs)


@pytest.mark.parametrize(
    ("image", "error", "match"),
    [
        (torch.zeros(3, 8, 8), TypeError, r"dtype torch.uint8 .* but got dtype=torch.float32"),
        (torch.zeros(8, 8, dtype=torch.uint8), ValueError, r"shape=\(8, 8\)"),
        (torch.zeros(4, 8, 8, dtype=torch.uint8), ValueError, r"shape=\(4, 8, 8\)"),
        (Image.new("RGBA", (8, 8)), TypeError, r"mode='RGBA'"),
        ([[0]], TypeError, r"but got list"),
        (
            tv_tensors.Mask(torch.zeros(1, 8, 8, dtype=torch.uint8)),
            TypeError,
            r"augments images, but got a tv_tensors.Mask",
        ),
    ],
)
def test_unsupported_images_raise(image, error, match):
    with pytest.raises(error, match=match):
        GARTransform()(image)


# ------------------------------------------------------------------ the policies


def test_standalone_calls_sample_from_the_policy_with_the_generator():
    img = random_image(2)
    a = GARTransform(generator=torch.Generator().manual_seed(5))
    b = GARTransform(generator=torch.Generator().manual_seed(5))
    outs_a = [a(img) for _ in range(20)]
    outs_b = [b(img) for _ in range(20)]
    assert all(torch.equal(x, y) for x, y in zip(outs_a, outs_b, strict=True))
    assert len({x.sum().item() for x in outs_a}) > 5  # it does augment
    only_identity = GARTransform(["Identity"])
    assert torch.equal(only_identity(img), img)


def test_draw_follows_the_policies():
    tf = GARTransform(["Identity", "Rotate"], num_magnitude_bins=4, lr=0.3, magnitude_lr=0.3)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):  # reward Rotate at its largest bin
        ops, bins, _ = tf.draw(64, g)
        r = ((ops == 1) & (bins == 3)).double()
        tf.update(ops.tolist(), bins.tolist(), r)
    ops, bins, negate = tf.draw(20000, g)
    p_rot = tf.op_weights["Rotate"]
    assert p_rot > 0.9
    assert abs(float((ops == 1).double().mean()) - p_rot) < 0.01
    top = tf.magnitude_weights["Rotate"][3]
    assert top > 0.9
    assert abs(float((bins[ops == 1] == 3).double().mean()) - top) < 0.01
    assert bool((bins[ops == 0] == 0).all())  # ops without magnitudes get bin 0
    assert 0.48 < float(negate.double().mean()) < 0.52


def test_frozen_policies_do_not_move():
    for learn_ops, learn_mags in [(False, True), (True, False)]:
        tf = GARTransform(["Identity", "Rotate"], learn_ops=learn_ops, learn_magnitudes=learn_mags)
        ops0, mags0 = tf.op_weights, tf.magnitude_weights
        g = torch.Generator().manual_seed(0)
        for _ in range(5):
            ops, bins, _ = tf.draw(32, g)
            tf.update(ops.tolist(), bins.tolist(), (ops == 1).double() + bins.double())
        assert (tf.op_weights == ops0) != learn_ops
        assert (tf.magnitude_weights == mags0) != learn_mags


@pytest.mark.parametrize(
    ("ops", "bins", "match"),
    [
        ([1, 2], [0, 0], r"ops should lie in \[0, 2\) or be NO_AUGMENTATION"),
        ([1, 1], [-1, 0], r"bins should lie in \[0, 4\) for op 'Rotate', but example 0 has bin -1"),
        ([1, 1], [0, 4], r"bins should lie in \[0, 4\) for op 'Rotate', but example 1 has bin 4"),
        ([0, 1], [2, 0], r"bins should lie in \[0, 1\) for op 'Identity', but example 0 has bin 2"),
        ([1], [0], r"rewards should have shape \(1,\), one per example, but got shape=\(2,\)"),
        ([1, 1], [0], r"ops, bins and rewards should have the same length, got 2, 1, 2"),
    ],
)
def test_bad_update_inputs_raise_and_leave_the_policies(ops, bins, match):
    tf = GARTransform(["Identity", "Rotate"], num_magnitude_bins=4)
    before = (tf.op_weights, tf.magnitude_weights)
    with pytest.raises(ValueError, match=match):
        tf.update(ops, bins, torch.tensor([5.0, 0.0]))
    assert (tf.op_weights, tf.magnitude_weights) == before
    assert tf.metrics()["updates"] == 0


@settings(max_examples=50, deadline=None)
@given(
    rewards=st.lists(
        st.lists(
            st.one_of(
                st.floats(allow_nan=True, allow_infinity=True),
                st.sampled_from([1e30, -1e30, math.nan, math.inf]),
            ),
            min_size=8,
            max_size=8,
        ),
        min_size=1,
        max_size=15,
    ),
    seed=st.integers(0, 1000),
)
def test_policies_stay_valid_distributions_under_any_rewards(rewards, seed):
    tf = GARTransform(num_magnitude_bins=5)
    g = torch.Generator().manual_seed(seed)
    bad = 0
    for r in rewards:
        ops, bins, _ = tf.draw(8, g)
        tf.update(ops.tolist(), bins.tolist(), torch.tensor(r, dtype=torch.float64))
        bad += sum(not math.isfinite(v) for v in r)
    floor = 0.05 / len(tf.op_names)
    for probs in [list(tf.op_weights.values()), *tf.magnitude_weights.values()]:
        assert all(math.isfinite(p) for p in probs)
        assert abs(sum(probs) - 1) < 1e-9
    assert min(tf.op_weights.values()) >= floor - 1e-12
    assert tf.metrics()["nonfinite_rewards"] == bad


def test_state_dict_round_trip_of_both_policies():
    a = GARTransform(num_magnitude_bins=6)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        ops, bins, _ = a.draw(16, g)
        a.update(ops.tolist(), bins.tolist(), bins.double() - ops.double())
    b = GARTransform(num_magnitude_bins=6)
    b.load_state_dict(a.state_dict())
    assert b.op_weights == a.op_weights
    assert b.magnitude_weights == a.magnitude_weights
    assert b.history == a.history
    assert b.metrics() == a.metrics()
    ga, gb = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    for _ in range(3):
        da, db = a.draw(16, ga), b.draw(16, gb)
        assert all(torch.equal(x, y) for x, y in zip(da, db, strict=True))
        a.update(da[0].tolist(), da[1].tolist(), da[1].double())
        b.update(db[0].tolist(), db[1].tolist(), db[1].double())
    assert b.op_weights == a.op_weights
    assert b.magnitude_weights == a.magnitude_weights
    with pytest.raises(ValueError, match=r"this transform has ops \['Identity'\]"):
        GARTransform(["Identity"]).load_state_dict(a.state_dict())
    # Same op names and bin counts, other magnitudes or signs: another table all the same.
    small = GARTransform({"Identity": (None, False), "Rotate": ([0.0, 10.0], True)})
    other = GARTransform({"Identity": (None, False), "Rotate": ([0.0, 90.0], False)})
    with pytest.raises(ValueError, match=r"another op table: op\(s\) \['Rotate'\]"):
        other.load_state_dict(small.state_dict())


def test_update_takes_the_tensors_draw_returns():
    """draw() returns Tensors; update() takes them as it takes lists (the same step)."""
    a, b = GARTransform(["Identity", "Rotate"]), GARTransform(["Identity", "Rotate"])
    ops, bins, _ = a.draw(16, torch.Generator().manual_seed(0))
    r = bins.double() + ops.double()
    a.update(ops, bins, r)
    b.update(ops.tolist(), bins.tolist(), r)
    assert a.op_weights == b.op_weights
    assert a.magnitude_weights == b.magnitude_weights
    assert a.magnitude_weights != GARTransform(["Identity", "Rotate"]).magnitude_weights


def test_magnitude_checks_its_op_and_bin():
    tf = GARTransform(["Identity", "Rotate"], num_magnitude_bins=4)
    assert tf.magnitude(1, 3) == 135.0
    assert tf.magnitude(1, 3, negate=True) == -135.0
    assert tf.magnitude(0, 0) is None
    with pytest.raises(ValueError, match=r"bin should lie in \[0, 4\) for op 'Rotate', but got"):
        tf.magnitude(1, -1)
    with pytest.raises(ValueError, match=r"op should lie in \[0, 2\), but got op=-1"):
        tf.magnitude(-1, 0)


def test_reinforce_magnitude_step_defaults_to_a_fraction_of_the_op_step():
    tf = GARTransform(["Identity", "Rotate"], rule="reinforce")
    op_lr = tf.state_dict()["op_policy"]["config"]["lr"]
    mag_lr = tf.state_dict()["magnitude_policies"]["Rotate"]["config"]["lr"]
    assert mag_lr == pytest.approx(0.3 * op_lr)


def test_metrics_are_flat_and_history_records_updates():
    tf = GARTransform(["Identity", "Rotate"], num_magnitude_bins=3)
    tf.update([0, 1, 1], [0, 2, 0], torch.tensor([0.0, 1.0, math.nan]))
    tf.update([NO_AUGMENTATION] * 2, [0, 0], torch.tensor([1.0, 2.0]))
    m = tf.metrics()
    assert all(isinstance(v, int | float) for v in m.values())
    assert m["updates"] == 1
    assert m["reference_batches_skipped"] == 1
    assert m["nonfinite_rewards"] == 1
    assert m["op_weight/Rotate"] == tf.op_weights["Rotate"]
    assert [h["update"] for h in tf.history] == [0, 1]
    assert tf.history[0]["magnitude"] == {"Rotate": 0.5}


# ------------------------------------------------------------------ through the sampler


class Images:
    """A map-style dataset of uint8 images with a torchvision-style ``transform``."""

    def __init__(self, n: int, transform, seed: int = 0, value: int | None = None) -> None:
        g = torch.Generator().manual_seed(seed)
        if value is None:
            self.x = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g)
        else:
            self.x = torch.full((n, 3, 16, 16), value, dtype=torch.uint8)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.transform(self.x[i]), i


def pipeline(tf) -> v2.Compose:
    return v2.Compose(
        [v2.RandomCrop(16, padding=2), v2.RandomHorizontalFlip(), tf, v2.ToDtype(torch.float32)]
    )


def collect(nw: int, update: bool, **kw):
    tf = GARTransform(num_magnitude_bins=8)
    data = Images(96, pipeline(tf))
    s = GARSampler(data, batch_size=8, seed=3, transform=tf, **kw)
    loader = DataLoader(s.dataset, batch_sampler=s, num_workers=nw)
    xs, keys = [], []
    for x, _ in loader:
        xs.append(x)
        keys.append(s._records[s.last_batch].batch())
        if update:
            s.update(x.mean((1, 2, 3)).double())
    return xs, keys, s


def test_batches_are_bit_identical_with_any_num_workers():
    base, base_keys, _ = collect(0, update=False)
    assert len({k[1] for batch in base_keys for k in batch}) > 5  # decisions vary
    for nw in (1, 2):
        xs, keys, _ = collect(nw, update=False)
        assert keys == base_keys
        assert all(torch.equal(a, b) for a, b in zip(xs, base, strict=True))


def test_workers_apply_exactly_the_decisions_in_the_keys():
    """With updates, keys depend on the prefetch lag; the images must still be exactly what
    the main process makes of the same keys."""
    xs, keys, s = collect(2, update=True)
    for x, k in zip(xs, keys, strict=True):
        again = torch.stack([item[0] for item in s.dataset.__getitems__(k)])
        assert torch.equal(x, again)


def test_decode_takes_decision_keys():
    tf = GARTransform()
    s = GARSampler(
        {"a": Images(24, pipeline(tf)), "b": Images(8, pipeline(tf))},
        batch_size=8,
        seed=3,
        transform=tf,
    )
    keys = next(iter(s))
    assert isinstance(keys[0], tuple)
    src, idx = s.decode(keys)
    plain_src, plain_idx = s.decode([k[0] for k in keys])
    assert torch.equal(src, plain_src)
    assert torch.equal(idx, plain_idx)


def test_apply_op_checks_its_image():
    with pytest.raises(TypeError, match=r"dtype torch.uint8 .* but got dtype=torch.float32"):
        apply_op(torch.zeros(3, 8, 8), "Solarize", 0.5)


def test_fetching_leaves_the_global_rng_alone():
    # (A DataLoader iterator itself draws its base seed from it, so fetch directly.)
    tf = GARTransform()
    s = GARSampler(Images(24, pipeline(tf)), batch_size=8, seed=3, transform=tf)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    for keys in s:
        s.dataset.__getitems__(keys)
        s.dataset[keys[0]]
    assert torch.equal(torch.get_rng_state(), before)


def test_rewards_reach_the_op_that_made_the_image():
    """Identity leaves the constant image at 10, Invert makes it 245: a reward read from the
    batch content moves the op policy only if rewards meet their own decisions."""
    tf = GARTransform(["Identity", "Invert"], lr=0.3)
    data = Images(64, v2.Compose([tf]), value=10)
    s = GARSampler(data, batch_size=16, seed=0, transform=tf, num_batches=40)
    loader = DataLoader(s.dataset, batch_sampler=s, num_workers=2, prefetch_factor=3)
    for t, (x, _) in enumerate(loader):
        if t % 3 == 0:  # skipped updates too
            s.update((x.float().mean((1, 2, 3)) > 100).double())
    assert tf.op_weights["Invert"] > 0.95


def test_reference_batches_are_unaugmented_and_train_only_the_mixture():
    tf = GARTransform(["Invert"])
    data = {"a": Images(40, v2.Compose([tf]), value=10), "b": Images(40, v2.Compose([tf]))}
    s = GARSampler(data, batch_size=4, seed=0, transform=tf, reference_every=3, num_batches=9)
    seen = []
    for x, _ in DataLoader(s.dataset, batch_sampler=s):
        ref = s.is_reference(s.last_batch)
        seen.append(ref)
        rec = s._records[s.last_batch]
        expected = torch.stack(
            [data["ab"[src]].x[i - 40 * src] for src, i in zip(rec.sources, rec.keys, strict=True)]
        )
        assert torch.equal(x, expected if ref else 255 - expected)
        s.update(torch.ones(4))
    assert seen == [False, False, True] * 3
    m = s.metrics()
    assert m["augment/reference_batches_skipped"] == 3
    assert m["augment/updates"] == 6
    assert m["updates"] == 9  # the mixture learns from every batch


def test_transform_missing_from_the_pipeline_is_detected():
    tf = GARTransform()
    data = {"with": Images(8, pipeline(tf)), "without": Images(8, pipeline(GARTransform()))}
    s = GARSampler(data, batch_size=8, seed=0, transform=tf)
    with pytest.raises(RuntimeError, match=r"of source 'without' was fetched: this GARTransform"):
        for _ in DataLoader(s.dataset, batch_sampler=s):
            pass
    with pytest.raises(RuntimeError, match=r"not in that source's pipeline"):
        for _ in DataLoader(s.dataset, batch_sampler=s, num_workers=1):
            pass


def test_transform_twice_in_a_pipeline_is_refused():
    tf = GARTransform()
    s = GARSampler(Images(8, v2.Compose([tf, tf])), batch_size=4, seed=0, transform=tf)
    with pytest.raises(RuntimeError, match=r"called twice for one example"):
        next(iter(DataLoader(s.dataset, batch_sampler=s)))


def test_sampler_resume_restores_keys_and_both_policies():
    def run(s, n, start=0):
        out = []
        it = iter(s)
        for _ in range(n):
            keys = next(it)
            out.append(keys)
            s.update(torch.tensor([float(k[1] + k[2]) for k in keys]))
        return out

    def make():
        tf = GARTransform(num_magnitude_bins=5)
        return GARSampler(
            Images(50, pipeline(tf)), batch_size=5, seed=1, transform=tf, reference_every=2
        )

    full = make()
    expected = run(full, 7)
    first = make()
    head = run(first, 3)
    state = first.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    assert resumed.transform.op_weights == first.transform.op_weights
    tail = run(resumed, 4)
    assert head + tail == expected
    assert resumed.transform.op_weights == full.transform.op_weights
    assert resumed.transform.magnitude_weights == full.transform.magnitude_weights
    plain = GARSampler(Images(50, pipeline(GARTransform())), batch_size=5, seed=1)
    with pytest.raises(ValueError, match=r"saved by a sampler with a transform"):
        plain.load_state_dict(state)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"transform": v2.RandomCrop(4)}, TypeError, r"should be a GARTransform, but got"),
        ({"reference_every": 2}, ValueError, r"needs transform=; got transform=None"),
        (
            {"transform": GARTransform(), "reference_every": 1},
            ValueError,
            r"reference_every=1",
        ),
    ],
)
def test_sampler_transform_arguments_are_checked(kwargs, error, match):
    with pytest.raises(error, match=match):
        GARSampler(Images(4, v2.Identity()), batch_size=2, **kwargs)


def test_resume_under_stateful_dataloader_with_workers():
    from torchdata.stateful_dataloader import StatefulDataLoader

    def make():
        tf = GARTransform(num_magnitude_bins=5, lr=0.5)
        s = GARSampler(Images(40, pipeline(tf)), batch_size=4, seed=2, transform=tf)
        return s, StatefulDataLoader(s.dataset, batch_sampler=s, num_workers=2)

    def train(s, loader, epochs, stop=None):
        out = []
        for _ in range(epochs):
            for x, _ in loader:
                out.append(x)
                s.update(x.mean((1, 2, 3)).double())
                if stop is not None and len(out) == stop:
                    return out
        return out

    full, full_loader = make()
    expected = train(full, full_loader, epochs=2)
    first, loader = make()
    got = train(first, loader, epochs=1, stop=4)
    loader_state, sampler_state = loader.state_dict(), first.state_dict()
    del loader
    second, loader2 = make()
    loader2.load_state_dict(loader_state)
    second.load_state_dict(sampler_state)
    got += train(second, loader2, epochs=2)
    assert len(got) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert second.transform.op_weights == full.transform.op_weights
    assert second.transform.magnitude_weights == full.transform.magnitude_weights


def test_reference_every_defaults_to_every_other_batch_with_a_transform():
    tf = GARTransform()
    assert GARSampler(Images(8, pipeline(tf)), batch_size=2, transform=tf).reference_every == 2
    assert GARSampler(Images(8, v2.Identity()), batch_size=2).reference_every is None
    off = GARSampler(Images(8, pipeline(tf)), batch_size=2, transform=tf, reference_every=None)
    assert off.reference_every is None
    with pytest.raises(ValueError, match=r"reference_every should be 'auto', None or an integer"):
        GARSampler(Images(8, pipeline(tf)), batch_size=2, transform=tf, reference_every="x")


def test_a_state_without_a_key_is_refused_by_name():
    tf = GARTransform(["Identity", "Rotate"])
    for path in (["counters"], ["op_policy", "logits"], ["magnitude_policies", "Rotate"]):
        state = tf.state_dict()
        parent = state
        for k in path[:-1]:
            parent = parent[k]
        del parent[path[-1]]
        with pytest.raises(ValueError, match=rf"lacks the key\(s\) \['{path[-1]}'\]"):
            GARTransform(["Identity", "Rotate"]).load_state_dict(state)
