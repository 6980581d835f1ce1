"""GARTransform: ops against torchvision, policies, decisions through the sampler and workers."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

from adaptive_data import (
    AugmentPolicy,
    AugmentStatistics,
    CategoricalPolicy,
    GARSampler,
    GARTransform,
    apply_op,
    trivial_augment_wide_table,
)
from adaptive_data.augment._transform import NO_AUGMENTATION

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


@pytest.mark.parametrize("kind", ["tensor", "pil", "tv_image", "float32", "float64_video"])
def test_every_op_at_every_bin_equals_torchvision(kind):
    base = random_image(0)
    image = {
        "tensor": base,
        "pil": v2.functional.to_pil_image(base),
        "tv_image": tv_tensors.Image(base),
        "float32": base.float() / 255,
        "float64_video": tv_tensors.Video(torch.stack([base, 255 - base]).double() / 255),
    }[kind]
    # Float images: every op at every 6th bin (the kernels' float paths do not depend on it).
    stride = 6 if kind.startswith("float") else 1
    tf = GARTransform()
    checked = 0
    for o, op in enumerate(tf.policy.op_names):
        mags, signed = tf.policy.table[op]
        for b in range(0, len(mags) if mags else 1, stride):
            for negate in (False, True) if signed else (False,):
                magnitude = tf.policy.magnitude(o, b, negate) or 0.0
                tf.arm(o, b, negate)
                out = tf(image)
                tf.disarm("the test image")
                assert same(out, oracle(image, op, magnitude)), (op, b, negate)
                checked += 1
    bins = len(range(0, 31, stride))
    assert checked == 3 + 2 * bins * 9 + 2 * bins


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
    dtype=st.sampled_from([torch.uint8, torch.float32]),
)
def test_apply_op_equals_torchvision_on_any_image(
    op, fraction, negate, channels, h, w, batch, fill, interpolation, seed, dtype
):
    if isinstance(fill, list) and channels == 1:
        fill = 77
    image = (
        torch.stack([random_image(seed + i, channels, h, w) for i in range(batch[0])])
        if (batch)
        else random_image(seed, channels, h, w)
    )
    if dtype.is_floating_point:
        image = image.to(dtype) / 255
    mags, signed = trivial_augment_wide_table()[op]
    magnitude = 0.0 if mags is None else mags[round(fraction * (len(mags) - 1))]
    if signed and negate:
        magnitude = -magnitude
    got = apply_op(image, op, magnitude, interpolation=interpolation, fill=fill)
    assert same(got, oracle(image, op, magnitude, interpolation, fill))


def test_invert_and_custom_tables():
    tf = GARTransform({"Invert": (None, False), "Rotate": ([0.0, 45.0, 90.0], True)})
    assert tf.policy.op_names == ["Invert", "Rotate"]
    assert tf.policy.magnitude_weights == {"Rotate": pytest.approx([1 / 3] * 3)}
    img = random_image(1)
    tf.arm(0, 0, False)
    assert torch.equal(tf(img), 255 - img)
    tf.disarm("x")
    tf.arm(1, 2, True)
    assert torch.equal(tf(img), oracle(img, "Rotate", -90.0))
    tf.disarm("x")


def test_subset_of_the_default_ops():
    tf = GARTransform(["Identity", "Posterize"], num_magnitude_bins=5)
    assert tf.policy.op_names == ["Identity", "Posterize"]
    assert tf.policy.table["Posterize"][0] == trivial_augment_wide_table(5)["Posterize"][0]
    assert set(tf.policy.op_weights) == {"Identity", "Posterize"}


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
        (
            torch.zeros(3, 8, 8, dtype=torch.int16),
            TypeError,
            r"dtype torch.uint8 .* or a floating-point dtype .* but got dtype=torch.int16",
        ),
        (torch.zeros(8, 8, dtype=torch.uint8), ValueError, r"shape=\(8, 8\)"),
        (torch.zeros(4, 8, 8, dtype=torch.uint8), ValueError, r"shape=\(4, 8, 8\)"),
        (Image.new("RGBA", (8, 8)), TypeError, r"mode='RGBA'"),
        ([[0]], TypeError, r"one image per call .* but found none in the sample"),
        (
            (tv_tensors.Image(random_image(0)), tv_tensors.Image(random_image(1))),
            TypeError,
            r"but found 2 in the sample",
        ),
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


# ------------------------------------------------------------------ as a torchvision v2 transform


class Depth(tv_tensors.TVTensor):
    """A TVTensor kind that TrivialAugmentWide neither augments nor refuses (it passes it)."""


def paired(a, b, path=""):
    """The leaves of two samples of the same structure (tuples, lists, dicts): (path, a, b)."""
    if isinstance(a, tuple | list | dict):
        assert type(a) is type(b), path
        assert len(a) == len(b), path
        keys = list(a) if isinstance(a, dict) else range(len(a))
        if isinstance(a, dict):
            assert list(a) == list(b), path
        return [leaf for k in keys for leaf in paired(a[k], b[k], f"{path}[{k!r}]")]
    return [(path, a, b)]


def pass_through_samples():
    """(sample, path of its image): what TrivialAugmentWide augments and passes through."""
    img = random_image(3, h=12, w=12)
    pil = v2.functional.to_pil_image(img)
    video = tv_tensors.Video(torch.stack([img, 255 - img]))
    return [
        ((img, 3), "[0]"),
        ((tv_tensors.Image(img), torch.tensor(3)), "[0]"),
        ({"image": pil, "label": 3, "name": "cat"}, "['image']"),
        ([img, torch.arange(5)], "[0]"),  # the first plain Tensor is the image
        ((torch.tensor([1.0, 2.0]), tv_tensors.Image(img)), "[1]"),  # an explicit image wins
        ({"video": video, "meta": {"fps": [24, 25]}}, "['video']"),
        ((img.float() / 255, {"label": 7}), "[0]"),
        ((tv_tensors.Image(img), Depth(torch.zeros(2, 12, 12))), "[0]"),
        (pil, ""),
    ]


@pytest.mark.parametrize("case", range(len(pass_through_samples())))
def test_passes_through_what_trivial_augment_wide_passes_through(case):
    sample, image_at = pass_through_samples()[case]
    got = GARTransform(["Invert"])(sample)
    torch.manual_seed(case)
    theirs = TA(sample)
    ours_leaves, their_leaves = paired(sample, got), paired(sample, theirs)
    assert [p for p, _, _ in ours_leaves] == [p for p, _, _ in their_leaves]
    assert image_at in [p for p, _, _ in ours_leaves]
    for (path, x, ours), (_, _, ta) in zip(ours_leaves, their_leaves, strict=True):
        if path == image_at:
            assert same(ours, oracle(x, "Invert", 0.0)), path
            assert type(ours) is type(ta) is type(x)
        else:
            assert ours is x, path  # untouched, the very object, as TrivialAugmentWide does
            assert ta is x, path


def test_several_arguments_come_back_as_a_tuple():
    img = random_image(0)
    out, label = GARTransform(["Invert"])(img, 4)
    assert torch.equal(out, 255 - img)
    assert label == 4


def refused_samples():
    img = random_image(3, h=8, w=8)
    mask = tv_tensors.Mask(torch.zeros(1, 8, 8, dtype=torch.uint8))
    boxes = tv_tensors.BoundingBoxes([[0, 0, 4, 4]], format="XYXY", canvas_size=(8, 8))
    out = [
        (mask, r"augments images, but got a tv_tensors.Mask"),
        ((img, mask), r"augments images, but got a tv_tensors.Mask"),
        ((tv_tensors.Image(img), boxes), r"augments images, but got a tv_tensors.BoundingBoxes"),
        (3, r"one image per call .* found none in the sample"),
        ({"label": 3, "name": "cat"}, r"found none in the sample"),
        ((tv_tensors.Image(img), tv_tensors.Image(img)), r"but found 2 in the sample"),
        ((v2.functional.to_pil_image(img),) * 2, r"but found 2 in the sample"),
        ((v2.functional.to_pil_image(img), tv_tensors.Video(img[None])), r"found 2 in the"),
    ]
    if hasattr(tv_tensors, "KeyPoints"):  # torchvision >= 0.23
        points = tv_tensors.KeyPoints([[1, 2]], canvas_size=(8, 8))
        out.append(((img, points), r"augments images, but got a tv_tensors.KeyPoints"))
    return out


@pytest.mark.parametrize("case", range(len(refused_samples())))
def test_refuses_what_trivial_augment_wide_refuses(case):
    sample, match = refused_samples()[case]
    with pytest.raises(TypeError):
        TA(sample)
    with pytest.raises(TypeError, match=match):
        GARTransform()(sample)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float16, torch.float32, torch.float64])
def test_standalone_calls_take_uint8_and_float_images(dtype):
    """TrivialAugmentWide takes float images (values in [0, 1]); so does GARTransform."""
    img = random_image(4)
    if dtype.is_floating_point:
        img = img.to(dtype) / 255
    tf = GARTransform(generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    for _ in range(15):
        op, b, negate = (t[0].item() for t in tf.policy.draw(1, g))
        out = tf(img)
        assert out.dtype == dtype
        assert same(
            out, apply_op(img, tf.policy.op_names[op], tf.policy.magnitude(op, b, negate) or 0.0)
        )
    assert TA(img).dtype == dtype


def test_a_batch_gets_one_decision_per_standalone_call_as_in_trivial_augment_wide():
    batch = torch.stack([random_image(i) for i in range(4)])
    tf = GARTransform(generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    ops = set()
    for _ in range(12):
        op, b, negate = (t[0].item() for t in tf.policy.draw(1, g))
        name, magnitude = tf.policy.op_names[op], tf.policy.magnitude(op, b, negate) or 0.0
        out = tf(batch)
        assert same(out, oracle(batch, name, magnitude))
        assert all(same(out[i], oracle(batch[i], name, magnitude)) for i in range(4))
        ops.add(op)
    assert len(ops) > 3


def test_inside_a_gar_pipeline_each_example_gets_its_own_decision():
    tf = GARTransform(num_magnitude_bins=8)
    data = Images(32, v2.Compose([tf]))
    s = GARSampler(data, batch_size=16, seed=0, transform=tf, reference_every=None)
    keys = next(iter(s))
    items = s.dataset.__getitems__(keys)
    for (key, op, b, negate, _), (image, i) in zip(keys, items, strict=True):
        assert i == key
        expected = apply_op(
            data.x[i], tf.policy.op_names[op], tf.policy.magnitude(op, b, negate) or 0.0
        )
        assert torch.equal(image, expected)
    assert len({k[1] for k in keys}) > 4


def test_is_a_v2_transform_and_an_nn_module():
    tf = GARTransform(["Invert"])
    assert isinstance(tf, v2.Transform)
    img = random_image(0)
    pipeline = v2.Compose(
        [v2.RandomHorizontalFlip(p=0.0), tf, v2.ToDtype(torch.float32, scale=True)]
    )
    out, label = pipeline((img, 3))
    assert label == 3
    assert torch.equal(out, v2.functional.to_dtype(255 - img, torch.float32, scale=True))
    holder = torch.nn.ModuleList([v2.RandomApply(torch.nn.ModuleList([tf]), p=1.0)])
    assert torch.equal(holder[0](img), 255 - img)
    seen = []
    holder.apply(seen.append)  # nn.Module.apply reaches it as any child
    assert any(m is tf for m in seen)
    assert repr(tf) == "GARTransform(ops=1, learn_ops=False, learn_magnitudes=False)"
    # The policy's state rides in the nn.Module state of a module that holds the transform.
    a = GARTransform(
        ["Identity", "Rotate"], num_magnitude_bins=4, learn_ops=True, learn_magnitudes=True
    )
    a.policy.update([1, 1, 0], [3, 0, 0], torch.tensor([1.0, 0.8, 0.0]))
    b = GARTransform(  # the same settings: a state resumes the transform it was saved by
        ["Identity", "Rotate"], num_magnitude_bins=4, learn_ops=True, learn_magnitudes=True
    )
    torch.nn.ModuleList([b]).load_state_dict(torch.nn.ModuleList([a]).state_dict())
    assert (
        b.policy.op_weights
        == a.policy.op_weights
        != GARTransform(["Identity", "Rotate"]).policy.op_weights
    )
    assert b.policy.magnitude_weights == a.policy.magnitude_weights


def test_the_policy_is_a_separate_object_the_transform_holds():
    p = AugmentPolicy(
        ["Identity", "Rotate"], num_magnitude_bins=4, learn_ops=True, learn_magnitudes=True
    )
    a, b = GARTransform(policy=p), GARTransform(policy=p, fill=0)
    assert a.policy is p
    assert b.policy is p
    a.policy.update([1, 0], [3, 0], torch.tensor([1.0, 0.0]))
    fresh = AugmentPolicy(
        ["Identity", "Rotate"], num_magnitude_bins=4, learn_ops=True, learn_magnitudes=True
    )
    assert b.policy.op_weights == p.op_weights != fresh.op_weights
    assert (
        b.state_dict()["op_policy"]["logits"].tolist()
        == p.state_dict()["op_policy"]["logits"].tolist()
    )
    with pytest.raises(
        ValueError, match=r"either policy= or the arguments .* policy= and learn_ops, lr"
    ):
        GARTransform(policy=p, lr=0.5, learn_ops=True)
    with pytest.raises(
        TypeError, match=r"policy should be an AugmentPolicy, but got CategoricalPolicy"
    ):
        GARTransform(policy=CategoricalPolicy(2))


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
    tf = GARTransform(
        ["Identity", "Rotate"],
        num_magnitude_bins=4,
        lr=0.3,
        magnitude_lr=0.3,
        learn_ops=True,
        learn_magnitudes=True,
    )
    g = torch.Generator().manual_seed(0)
    for _ in range(30):  # reward Rotate at its largest bin
        ops, bins, _ = tf.policy.draw(64, g)
        r = ((ops == 1) & (bins == 3)).double()
        tf.policy.update(ops.tolist(), bins.tolist(), r)
    ops, bins, negate = tf.policy.draw(20000, g)
    p_rot = tf.policy.op_weights["Rotate"]
    assert p_rot > 0.9
    assert abs(float((ops == 1).double().mean()) - p_rot) < 0.01
    top = tf.policy.magnitude_weights["Rotate"][3]
    assert top > 0.9
    assert abs(float((bins[ops == 1] == 3).double().mean()) - top) < 0.01
    assert bool((bins[ops == 0] == 0).all())  # ops without magnitudes get bin 0
    assert 0.48 < float(negate.double().mean()) < 0.52


def test_frozen_policies_do_not_move():
    for learn_ops, learn_mags in [(False, True), (True, False)]:
        tf = GARTransform(["Identity", "Rotate"], learn_ops=learn_ops, learn_magnitudes=learn_mags)
        ops0, mags0 = tf.policy.op_weights, tf.policy.magnitude_weights
        g = torch.Generator().manual_seed(0)
        for _ in range(5):
            ops, bins, _ = tf.policy.draw(32, g)
            tf.policy.update(ops.tolist(), bins.tolist(), (ops == 1).double() + bins.double())
        assert (tf.policy.op_weights == ops0) != learn_ops
        assert (tf.policy.magnitude_weights == mags0) != learn_mags


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
    before = (tf.policy.op_weights, tf.policy.magnitude_weights)
    with pytest.raises(ValueError, match=match):
        tf.policy.update(ops, bins, torch.tensor([5.0, 0.0]))
    assert (tf.policy.op_weights, tf.policy.magnitude_weights) == before
    assert tf.policy.metrics()["updates"] == 0


any_reward = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e30, -1e30, math.nan, math.inf, 0.0]),
)
reward_batches = st.lists(st.lists(any_reward, min_size=8, max_size=8), min_size=1, max_size=12)
policy_config = st.fixed_dictionaries(
    {
        "rule": st.sampled_from(["exp_grad", "reinforce"]),
        "normalize": st.sampled_from(["batch", "running", "none"]),
        "lr": st.sampled_from([None, 0.0, 0.5, 1e6]),
    }
)


def check_valid(policy: AugmentPolicy) -> None:
    """Every distribution of the policy is finite, sums to 1 and keeps its floor."""
    op_floor = 0.05 / len(policy.op_names)
    assert min(policy.op_weights.values()) >= op_floor - 1e-12
    for probs in [list(policy.op_weights.values()), *policy.magnitude_weights.values()]:
        assert all(math.isfinite(p) for p in probs)
        assert abs(sum(probs) - 1) < 1e-9
        assert min(probs) >= 0.05 / len(probs) - 1e-12


@settings(max_examples=50, deadline=None)
@given(rewards=reward_batches, config=policy_config, seed=st.integers(0, 1000))
def test_policies_stay_valid_distributions_under_any_rewards(rewards, config, seed):
    policy = AugmentPolicy(num_magnitude_bins=5, **config)
    g = torch.Generator().manual_seed(seed)
    bad = 0
    for t, r in enumerate(rewards):
        ops, bins, _ = policy.draw(8, g)
        if t % 4 == 3:  # a reference batch now and then: skipped, not learned from
            ops = torch.full_like(ops, NO_AUGMENTATION)
        else:
            bad += sum(not math.isfinite(v) for v in r)
        policy.update(ops, bins, torch.tensor(r, dtype=torch.float64))
        check_valid(policy)
    m = policy.metrics()
    assert m["nonfinite_rewards"] == bad
    assert m["updates"] + m["reference_batches_skipped"] == len(rewards)
    assert len(policy.history) == 1 + m["updates"]


@settings(max_examples=25, deadline=None)
@given(
    rewards=reward_batches,
    config=policy_config,
    split=st.integers(0, 12),
    seed=st.integers(0, 1000),
)
@example(  # found by hypothesis: finite rewards whose centred sum overflowed (OverflowError)
    rewards=[[0.0] * 8, [0.0] * 8, [0.0] * 6 + [-3.365984682030305e295, -1.7976931348619792e308]],
    config={"rule": "reinforce", "normalize": "none", "lr": None},
    split=0,
    seed=0,
)
def test_policy_state_round_trip_continues_identically(rewards, config, split, seed):
    """A policy restored from a checkpoint (through torch.save and a weights-only load) draws
    and learns exactly as the one that kept going."""
    import io

    a = AugmentPolicy(num_magnitude_bins=5, **config)
    g = torch.Generator().manual_seed(seed)

    def step(policy, gen, r):
        ops, bins, negate = policy.draw(8, gen)
        policy.update(ops, bins, torch.tensor(r, dtype=torch.float64))
        return ops, bins, negate

    for r in rewards[:split]:
        step(a, g, r)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b = AugmentPolicy(num_magnitude_bins=5, **config)
    b.load_state_dict(torch.load(buffer, weights_only=True))
    gb = torch.Generator()
    gb.set_state(g.get_state())
    for r in rewards[split:]:
        da, db = step(a, g, r), step(b, gb, r)
        assert all(torch.equal(x, y) for x, y in zip(da, db, strict=True))
    assert b.op_weights == a.op_weights
    assert b.magnitude_weights == a.magnitude_weights
    assert b.history == a.history
    assert b.metrics() == a.metrics()


def test_state_dict_round_trip_of_both_policies():
    a = GARTransform(num_magnitude_bins=6)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        ops, bins, _ = a.policy.draw(16, g)
        a.policy.update(ops.tolist(), bins.tolist(), bins.double() - ops.double())
    b = GARTransform(num_magnitude_bins=6)
    b.load_state_dict(a.state_dict())
    assert b.policy.op_weights == a.policy.op_weights
    assert b.policy.magnitude_weights == a.policy.magnitude_weights
    assert b.policy.history == a.policy.history
    assert b.policy.metrics() == a.policy.metrics()
    ga, gb = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    for _ in range(3):
        da, db = a.policy.draw(16, ga), b.policy.draw(16, gb)
        assert all(torch.equal(x, y) for x, y in zip(da, db, strict=True))
        a.policy.update(da[0].tolist(), da[1].tolist(), da[1].double())
        b.policy.update(db[0].tolist(), db[1].tolist(), db[1].double())
    assert b.policy.op_weights == a.policy.op_weights
    assert b.policy.magnitude_weights == a.policy.magnitude_weights
    with pytest.raises(ValueError, match=r"this policy has ops \['Identity'\]"):
        GARTransform(["Identity"]).load_state_dict(a.state_dict())
    # Same op names and bin counts, other magnitudes or signs: another table all the same.
    small = GARTransform({"Identity": (None, False), "Rotate": ([0.0, 10.0], True)})
    other = GARTransform({"Identity": (None, False), "Rotate": ([0.0, 90.0], False)})
    with pytest.raises(ValueError, match=r"another op table: op\(s\) \['Rotate'\]"):
        other.load_state_dict(small.state_dict())


def test_update_takes_the_tensors_draw_returns():
    """draw() returns Tensors; update() takes them as it takes lists (the same step)."""
    a = GARTransform(["Identity", "Rotate"], learn_ops=True, learn_magnitudes=True)
    b = GARTransform(["Identity", "Rotate"], learn_ops=True, learn_magnitudes=True)
    ops, bins, _ = a.policy.draw(16, torch.Generator().manual_seed(0))
    r = bins.double() + ops.double()
    a.policy.update(ops, bins, r)
    b.policy.update(ops.tolist(), bins.tolist(), r)
    assert a.policy.op_weights == b.policy.op_weights
    assert a.policy.magnitude_weights == b.policy.magnitude_weights
    assert (
        a.policy.magnitude_weights != GARTransform(["Identity", "Rotate"]).policy.magnitude_weights
    )


def test_magnitude_checks_its_op_and_bin():
    tf = GARTransform(["Identity", "Rotate"], num_magnitude_bins=4)
    assert tf.policy.magnitude(1, 3) == 135.0
    assert tf.policy.magnitude(1, 3, negate=True) == -135.0
    assert tf.policy.magnitude(0, 0) is None
    with pytest.raises(ValueError, match=r"bin should lie in \[0, 4\) for op 'Rotate', but got"):
        tf.policy.magnitude(1, -1)
    with pytest.raises(ValueError, match=r"op should lie in \[0, 2\), but got op=-1"):
        tf.policy.magnitude(-1, 0)


def test_reinforce_magnitude_step_defaults_to_a_fraction_of_the_op_step():
    tf = GARTransform(["Identity", "Rotate"], rule="reinforce")
    op_lr = tf.state_dict()["op_policy"]["config"]["lr"]
    mag_lr = tf.state_dict()["magnitude_policies"]["Rotate"]["config"]["lr"]
    assert mag_lr == pytest.approx(0.3 * op_lr)


def test_metrics_are_flat_and_history_records_updates():
    tf = GARTransform(["Identity", "Rotate"], num_magnitude_bins=3)
    tf.policy.update([0, 1, 1], [0, 2, 0], torch.tensor([0.0, 1.0, math.nan]))
    tf.policy.update([NO_AUGMENTATION] * 2, [0, 0], torch.tensor([1.0, 2.0]))
    m = tf.policy.metrics()
    assert all(isinstance(v, int | float) for v in m.values())
    assert m["updates"] == 1
    assert m["reference_batches_skipped"] == 1
    assert m["nonfinite_rewards"] == 1
    assert m["op_weight/Rotate"] == tf.policy.op_weights["Rotate"]
    assert [h["update"] for h in tf.policy.history] == [0, 1]
    assert tf.policy.history[0]["magnitude"] == {"Rotate": 0.5}


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
    loader = s.track(DataLoader(s.dataset, batch_sampler=s, num_workers=nw))
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


def test_with_updates_too_the_batches_and_policies_are_the_same_with_any_num_workers():
    """The policy lag: the augmentation decisions of batch t come from the updates of batches
    up to t - lag, whatever the prefetch depth (rewards from the images' content)."""
    base, base_keys, s0 = collect(0, update=True)
    assert s0.metrics()["augment/updates"] > 0
    for nw in (1, 2):
        xs, keys, s = collect(nw, update=True)
        assert keys == base_keys
        assert all(torch.equal(a, b) for a, b in zip(xs, base, strict=True))
        assert s.transform.policy.state_dict()["op_policy"]["logits"].tolist() == (
            s0.transform.policy.state_dict()["op_policy"]["logits"].tolist()
        )
        assert s.weights == s0.weights


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
    with pytest.raises(TypeError, match=r"dtype torch.uint8 .* but got dtype=torch.int32"):
        apply_op(torch.zeros(3, 8, 8, dtype=torch.int32), "Solarize", 0.5)
    with pytest.raises(ValueError, match=r"interpolation should be None, an InterpolationMode"):
        apply_op(random_image(0), "Rotate", 10.0, interpolation="cubic-ish")


def test_fetching_leaves_the_global_rng_alone():
    # (A DataLoader iterator itself draws its base seed from it, so fetch directly.)
    tf = GARTransform()
    s = GARSampler(Images(24, pipeline(tf)), batch_size=8, seed=3, transform=tf)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    for keys in s.track(s):
        s.dataset.__getitems__(keys)
        s.dataset[keys[0]]
    assert torch.equal(torch.get_rng_state(), before)


def test_rewards_reach_the_op_that_made_the_image():
    """Identity leaves the constant image at 10, Invert makes it 245: a reward read from the
    batch content moves the op policy only if rewards meet their own decisions."""
    tf = GARTransform(["Identity", "Invert"], lr=0.3, learn_ops=True, learn_magnitudes=True)
    data = Images(64, v2.Compose([tf]), value=10)
    s = GARSampler(data, batch_size=16, seed=0, transform=tf, num_batches=40)
    loader = s.track(DataLoader(s.dataset, batch_sampler=s, num_workers=2, prefetch_factor=3))
    for t, (x, _) in enumerate(loader):
        if t % 3 == 0:  # skipped updates too
            s.update((x.float().mean((1, 2, 3)) > 100).double())
    assert tf.policy.op_weights["Invert"] > 0.95


def test_reference_batches_are_unaugmented_and_train_only_the_mixture():
    tf = GARTransform(["Invert"])
    data = {"a": Images(40, v2.Compose([tf]), value=10), "b": Images(40, v2.Compose([tf]))}
    s = GARSampler(data, batch_size=4, seed=0, transform=tf, reference_every=3, num_batches=9)
    seen = []
    for x, _ in s.track(DataLoader(s.dataset, batch_sampler=s)):
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
        for _ in s.track(DataLoader(s.dataset, batch_sampler=s)):
            pass
    with pytest.raises(RuntimeError, match=r"not in that source's pipeline"):
        for _ in s.track(DataLoader(s.dataset, batch_sampler=s, num_workers=1)):
            pass


def test_transform_twice_in_a_pipeline_is_refused():
    tf = GARTransform()
    s = GARSampler(Images(8, v2.Compose([tf, tf])), batch_size=4, seed=0, transform=tf)
    with pytest.raises(RuntimeError, match=r"called twice for one example"):
        next(iter(s.track(DataLoader(s.dataset, batch_sampler=s))))


def test_sampler_resume_restores_keys_and_both_policies():
    def run(s, n, start=0):
        out = []
        it = iter(s.track(s))
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
    assert resumed.transform.policy.op_weights == first.transform.policy.op_weights
    tail = run(resumed, 4)
    assert head + tail == expected
    assert resumed.transform.policy.op_weights == full.transform.policy.op_weights
    assert resumed.transform.policy.magnitude_weights == full.transform.policy.magnitude_weights
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
        return s, s.track(StatefulDataLoader(s.dataset, batch_sampler=s, num_workers=2))

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
    assert second.transform.policy.op_weights == full.transform.policy.op_weights
    assert second.transform.policy.magnitude_weights == full.transform.policy.magnitude_weights


def test_reference_every_defaults_to_every_other_batch_with_a_transform():
    tf = GARTransform()
    assert GARSampler(Images(8, pipeline(tf)), batch_size=2, transform=tf).reference_every == 2
    assert GARSampler(Images(8, v2.Identity()), batch_size=2).reference_every is None
    off = GARSampler(Images(8, pipeline(tf)), batch_size=2, transform=tf, reference_every=None)
    assert off.reference_every is None
    with pytest.raises(ValueError, match=r"reference_every should be 'auto', None or an integer"):
        GARSampler(Images(8, pipeline(tf)), batch_size=2, transform=tf, reference_every="x")


def test_frozen_control_is_bit_identical_to_learning_with_lr_0():
    """The frozen control (learning off) is the learning arm with a zero step, bit for bit:
    the same keys, images, policies and records, so a comparison of the two isolates what
    the learning does."""

    def run(**kw):
        tf = GARTransform(num_magnitude_bins=8, **kw)
        s = GARSampler(Images(48, pipeline(tf)), batch_size=8, seed=5, transform=tf)
        xs = []
        for _ in range(2):
            for x, _ in s.track(DataLoader(s.dataset, batch_sampler=s)):
                xs.append(x)
                s.update(x.mean((1, 2, 3)).double() + torch.linspace(0, 1, 8))
        return xs, tf

    frozen_x, frozen = run(learn_ops=False, learn_magnitudes=False)
    zero_x, zero = run(lr=0.0, learn_ops=True, learn_magnitudes=True)
    learning_x, learning = run(learn_ops=True, learn_magnitudes=True)
    assert len(frozen_x) == 12
    assert all(torch.equal(a, b) for a, b in zip(frozen_x, zero_x, strict=True))
    start = GARTransform(num_magnitude_bins=8)
    assert frozen.policy.op_weights == zero.policy.op_weights == start.policy.op_weights
    assert (
        frozen.policy.magnitude_weights
        == zero.policy.magnitude_weights
        == start.policy.magnitude_weights
    )
    assert frozen.policy.history == zero.policy.history
    assert frozen.policy.metrics() == zero.policy.metrics()
    assert frozen.policy.metrics()["updates"] == 6  # the augmented half of the batches
    # The same rewards do move a learning policy, and with it the images drawn.
    assert learning.policy.op_weights != frozen.policy.op_weights
    assert not all(torch.equal(a, b) for a, b in zip(frozen_x, learning_x, strict=True))


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


def test_learning_is_opt_in():
    """The default GARTransform is the frozen control (benchmarks/augment_study.py: no variant
    of the learning beat it on two data sets of three); rewards move only an opted-in one."""
    default = GARTransform(["Identity", "Rotate"], num_magnitude_bins=4)
    learning = GARTransform(
        ["Identity", "Rotate"], num_magnitude_bins=4, learn_ops=True, learn_magnitudes=True
    )
    assert not default.policy.learn_ops
    assert not default.policy.learn_magnitudes
    start = (dict(default.policy.op_weights), dict(default.policy.magnitude_weights))
    for tf in (default, learning):
        tf.policy.update([1, 1, 0], [3, 0, 0], torch.tensor([1.0, 0.8, 0.0]))
    assert (default.policy.op_weights, default.policy.magnitude_weights) == start
    assert learning.policy.op_weights != start[0]


def test_augment_statistics_are_named_and_round_trip_through_flat():
    """statistics() names its parts (the op policy's, then one per op with magnitudes, in op
    order); its flat list, all-reduced, reads back to the same statistics, and apply() takes
    either. A table of another shape is refused by name, not sliced at the wrong place."""
    policy = AugmentPolicy(
        ["Identity", "Rotate", "Brightness"], learn_ops=True, learn_magnitudes=True
    )
    stats = policy.statistics(
        [0, 1, 2, 1, NO_AUGMENTATION], [0, 3, 1, 2, 0], torch.tensor([1.0, 2.0, -1.0, 0.5, 9.0])
    )
    assert isinstance(stats, AugmentStatistics)
    assert stats.ops.counts == (1.0, 2.0, 1.0)  # the reference example is left out
    assert stats.ops.n == 4
    assert stats.ops.total == pytest.approx(2.5)
    assert [m.counts[3] for m in stats.magnitudes] == [1.0, 0.0]  # Rotate's bin 3 once
    assert [m.n for m in stats.magnitudes] == [2.0, 1.0]  # Rotate twice, Brightness once
    flat = stats.flat()
    assert len(flat) == policy.statistics_width
    assert policy.statistics_from_flat(flat) == stats
    twin = AugmentPolicy(
        ["Identity", "Rotate", "Brightness"], learn_ops=True, learn_magnitudes=True
    )
    policy.apply(stats)
    twin.apply(flat)
    assert policy.op_weights == twin.op_weights
    assert policy.magnitude_weights == twin.magnitude_weights
    assert policy.op_weights != pytest.approx(dict.fromkeys(policy.op_names, 1 / 3))
    other = AugmentPolicy(["Identity", "Rotate"])
    with pytest.raises(ValueError, match=r"another op table .*3 ops, 2 with magnitudes"):
        other.apply(stats)
    with pytest.raises(ValueError, match=r"should hold \d+ numbers"):
        other.apply(flat)


def test_the_transform_holds_its_policy_and_says_where_its_members_went() -> None:
    tf = GARTransform(["Identity", "Rotate"], num_magnitude_bins=4, learn_ops=True)
    assert isinstance(tf.policy, AugmentPolicy)
    assert tf.policy.learn_ops
    assert tf.policy.op_names == ["Identity", "Rotate"]
    with pytest.raises(AttributeError, match=r"no attribute 'op_weights': it is the policy's"):
        _ = tf.op_weights
    with pytest.raises(AttributeError, match=r"has no attribute 'nothing'"):
        _ = tf.nothing
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['magnitudes'\]"):
        GARTransform(magnitudes=3)
    with pytest.raises(ValueError, match=r"either policy= or the arguments.*got policy= and ops"):
        GARTransform(["Identity"], policy=AugmentPolicy(["Identity", "Rotate"]))
