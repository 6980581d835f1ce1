"""Context managers that let the probe run the user's model without leaving a trace on it."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
import torch.autograd.forward_ad as fwad
from torch import nn

__all__: list[str] = []


def cuda_devices(model: nn.Module) -> list[int]:
    devices = {t.device.index for t in model.parameters() if t.device.type == "cuda"}
    devices |= {t.device.index for t in model.buffers() if t.device.type == "cuda"}
    return sorted(d if d is not None else torch.cuda.current_device() for d in devices)


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Run a block and then put back every buffer, the train/eval flags and the global RNG.

    A buffer the block wrote (BatchNorm's running statistics) is copied back in place, so
    tensors the user holds keep their identity; one it left as it was is not written, so its
    version counter does not move (a causal mask kept as a buffer, whose slices a kept layer
    call holds, is not seen as edited). Parameters and ``.grad`` are not touched because the
    probe only ever calls ``torch.autograd.grad``.
    """
    buffers = [(b, b._version, b.detach().clone()) for b in model.buffers()]
    modes = [(m, m.training) for m in model.modules()]
    with torch.random.fork_rng(devices=cuda_devices(model)):
        try:
            yield
        finally:
            with torch.no_grad():
                for buf, version, saved in buffers:
                    # a kernel may write a buffer without moving its version (BatchNorm's)
                    if buf._version != version or not torch.equal(buf, saved):
                        buf.copy_(saved)
            for module, training in modes:
                module.training = training


_decompositions_loaded = False


def _load_forward_ad_decompositions() -> None:
    """Make torch load its forward-AD decompositions now, without its FutureWarning.

    The first ``torch.autograd.forward_ad.make_dual`` of a process imports a torch module that
    compiles its decompositions with ``torch.jit.script``, which warns that ``torch.jit.script``
    is deprecated: a warning about torch's internals, not about anything the user can change.
    One throwaway dual tensor triggers that import here, with exactly that warning silenced;
    every later ``make_dual`` finds the module imported. Other warnings pass through.
    """
    global _decompositions_loaded
    if _decompositions_loaded:
        return
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning
        )
        with fwad.dual_level():
            fwad.make_dual(torch.zeros(()), torch.zeros(()))
    _decompositions_loaded = True


@contextlib.contextmanager
def forward_ad_friendly() -> Iterator[None]:
    """Route attention through kernels that implement forward-mode AD.

    The fused scaled-dot-product-attention kernels and the ``nn.MultiheadAttention`` /
    ``nn.TransformerEncoderLayer`` fast paths have no forward-AD formula; the math backend has.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    _load_forward_ad_decompositions()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


class RngSnapshot:
    """The global RNG state at one moment, to replay a module's forward with the same draws."""

    def __init__(self, devices: list[int]) -> None:
        self.devices = devices
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in devices]

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(self.cpu)
            for d, state in zip(self.devices, self.cuda, strict=True):
                torch.cuda.set_rng_state(state, d)
            yield
