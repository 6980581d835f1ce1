"""The norm rules: per-example squared gradient norms and dots with a direction, against
per-example gradients from one autograd call per example."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adaptive_data.probe.rules import Request, rule_for
from adaptive_data.probe.rules.conv import gram_is_cheaper as _conv_gram_is_cheaper
from adaptive_data.probe.rules.conv import unfold2d as _unfold2d


def _cases() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    return {
        "linear": (nn.Linear(5, 3), torch.randn(4, 5, generator=g)),
        "linear_seq_gram": (nn.Linear(16, 12), torch.randn(4, 2, 16, generator=g)),
        "linear_seq_direct": (nn.Linear(3, 2), torch.randn(4, 6, 3, generator=g)),
        "conv2d_direct": (nn.Conv2d(2, 3, 3, padding=1), torch.randn(4, 2, 6, 6, generator=g)),
        # more examples than one chunk of the grouped per-example weight gradient (8)
        "conv2d_direct_chunks": (nn.Conv2d(2, 3, 3), torch.randn(19, 2, 5, 5, generator=g)),
        "conv2d_gram": (
            nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
            torch.randn(4, 8, 4, 4, generator=g),
        ),
        "conv2d_gram_dilated_circular": (
            nn.Conv2d(8, 16, 3, dilation=2, padding=2, padding_mode="circular"),
            torch.randn(4, 8, 3, 3, generator=g),
        ),
        # channels_last inputs, as CNNs on CPU are often run (the gradient is made alike)
        "conv2d_direct_channels_last": (
            nn.Conv2d(2, 3, 3, padding=1),
            torch.randn(4, 2, 6, 6, generator=g).contiguous(memory_format=torch.channels_last),
        ),
        "conv2d_gram_channels_last": (
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            torch.randn(4, 8, 4, 4, generator=g).contiguous(memory_format=torch.channels_last),
        ),
        "conv2d_same_padding": (
            nn.Conv2d(2, 3, 4, padding="same"),
            torch.randn(4, 2, 5, 5, generator=g),
        ),
        "conv2d_gram_same_padding": (
            nn.Conv2d(8, 16, 4, padding="same", dilation=2),
            torch.randn(4, 8, 3, 3, generator=g),
        ),
        "conv1d": (
            nn.Conv1d(2, 4, 3, stride=2, padding=2, dilation=2),
            torch.randn(4, 2, 9, generator=g),
        ),
        "conv3d_groups": (nn.Conv3d(2, 4, 2, groups=2, padding=1), torch.randn(4, 2, 3, 3, 3)),
        "embedding": (nn.Embedding(7, 4, padding_idx=2), torch.randint(0, 7, (4, 5), generator=g)),
        "embedding_scaled": (
            nn.Embedding(7, 4, scale_grad_by_freq=True),
            torch.randint(0, 7, (4, 5), generator=g),
        ),
        "batchnorm2d_train": (nn.BatchNorm2d(3), torch.randn(4, 3, 5, 5, generator=g)),
        "batchnorm1d_eval": (nn.BatchNorm1d(3).eval(), torch.randn(4, 3, generator=g)),
        "layernorm": (nn.LayerNorm([3, 4]), torch.randn(4, 2, 3, 4, generator=g)),
        "groupnorm": (nn.GroupNorm(2, 4), torch.randn(4, 4, 3, 3, generator=g)),
        "rmsnorm": (nn.RMSNorm(5), torch.randn(4, 3, 5, generator=g)),
    }


CASES = _cases()


def _oracle(module: nn.Module, x: torch.Tensor, b: torch.Tensor, d: dict, names: list[str]):
    """One autograd call per example i of <B_i, out_i>: its gradient is g_i. Returns the
    squared norms, the dots with d and each parameter's per-example gradients [N, numel]."""
    params = [getattr(module, n) for n in names]
    out = module(x)
    sq, dot, per_example = [], [], []
    for i in range(x.shape[0]):
        grads = torch.autograd.grad((b[i] * out[i]).sum(), params, retain_graph=True)
        sq.append(sum(gr.pow(2).sum() for gr in grads))
        dot.append(sum((gr * d[n]).sum() for n, gr in zip(names, grads, strict=True)))
        per_example.append([gr.reshape(-1) for gr in grads])
    kept = {n: torch.stack([g[j] for g in per_example]) for j, n in enumerate(names)}
    return torch.stack(sq), torch.stack(dot), kept


# every case with all parameters trainable, and with each one frozen where another is left
FROZEN = [
    (case, frozen)
    for case, (module, _) in CASES.items()
    for frozen in [None, *(n for n, _ in module.named_parameters())]
    if frozen is None or len(list(module.parameters())) > 1
]


@pytest.mark.parametrize(("case", "frozen"), FROZEN)
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
def test_norm_and_dot_match_per_example_gradients(case: str, frozen: str | None) -> None:
    module, x = CASES[case]
    names = [n for n, p in module.named_parameters() if n != frozen]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    b = torch.randn(module(x).shape, generator=g)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        b = b.contiguous(memory_format=torch.channels_last)
    d = {n: torch.randn(getattr(module, n).shape, generator=g) for n in names}
    if isinstance(module, nn.Embedding) and module.padding_idx is not None:
        d["weight"][module.padding_idx] = 0  # the padding row gets no gradient
    found = rule_for(module)
    assert found is not None
    rule = found.batch_pieces
    with torch.no_grad():
        sq, dot, kept = rule(module, x, b, Request(names, d))
        sq_only, none, _ = rule(module, x, b, Request(names, None))
        # a parameter used elsewhere too: its per-example gradients instead of its norm
        sq_kept, dot_kept, per_example = rule(module, x, b, Request(names, d, keep=names))
    want_sq, want_dot, want_per_example = _oracle(module, x, b, d, names)
    torch.testing.assert_close(sq, want_sq, rtol=1e-4, atol=1e-5)
    assert dot is not None
    torch.testing.assert_close(dot, want_dot, rtol=1e-4, atol=1e-5)
    assert none is None
    assert kept == {}
    torch.testing.assert_close(sq_only, sq)
    assert torch.equal(sq_kept, torch.zeros_like(sq))
    torch.testing.assert_close(dot_kept, want_dot, rtol=1e-4, atol=1e-5)
    assert sorted(per_example) == sorted(names)
    for n in names:
        torch.testing.assert_close(per_example[n], want_per_example[n], rtol=1e-4, atol=1e-5)


def test_the_gram_cases_take_the_gram_form() -> None:
    """The cases named gram exercise the Gram form; the direct cases the per-example one."""
    for case, (module, x) in CASES.items():
        if isinstance(module, nn.Conv2d):
            b = module(x)
            assert _conv_gram_is_cheaper(module, b) == ("gram" in case), case


@pytest.mark.parametrize(
    ("stride", "dilation", "padding"), [(1, 1, 0), (2, 1, 1), (1, 2, 2), ((2, 1), (1, 3), (0, 2))]
)
def test_unfold_equals_torch_unfold(stride, dilation, padding) -> None:
    x = torch.randn(3, 4, 9, 8, generator=torch.Generator().manual_seed(0))
    pair = nn.modules.utils._pair
    want = torch.nn.functional.unfold(x, (3, 2), dilation, padding, stride)
    got = _unfold2d(x, (3, 2), pair(dilation), pair(padding), pair(stride))
    assert torch.equal(got, want)
    channels_last = x.contiguous(memory_format=torch.channels_last)
    got_cl = _unfold2d(channels_last, (3, 2), pair(dilation), pair(padding), pair(stride))
    assert torch.equal(got_cl, want)


def test_broken_invariants_raise_real_errors():
    """The invariants that were asserts (gone under ``python -O``) raise RuntimeError."""
    from adaptive_data.probe.rules import Sums as _Sums

    with pytest.raises(RuntimeError, match=r"direction of parameter 'weight' was read by a"):
        _Sums(3, torch.device("cpu"), Request(["weight"])).d("weight")
