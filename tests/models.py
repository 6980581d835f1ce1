"""Small models shared by the probe tests: each exercises a different part of the probe."""

from __future__ import annotations

import torch
from torch import nn

NUM_CLASSES = 3


def mlp(d_in: int = 6, hidden: int = 8) -> nn.Module:
    return nn.Sequential(
        nn.Linear(d_in, hidden),
        nn.ReLU(
            inplace=True
        ),  # modifies the Linear's output in place: the hook must see the pre-ReLU grad
        nn.Linear(hidden, hidden),
        nn.LayerNorm(hidden),
        nn.Tanh(),
        nn.Linear(hidden, NUM_CLASSES),
    )


def cnn_bn(channels: int = 4) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1),
        nn.BatchNorm2d(channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(channels, channels, 3, stride=2, padding=1, groups=2, padding_mode="reflect"),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=2, dilation=2, bias=False),
        nn.GroupNorm(2, channels),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, NUM_CLASSES),
    )


class TransformerBlock(nn.Module):
    """Token ids -> Embedding + learned positions (a bare Parameter) -> attention -> MLP -> head."""

    def __init__(
        self, vocab: int = 11, dim: int = 8, heads: int = 2, seq: int = 5, batch_first: bool = True
    ) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.pos = nn.Parameter(0.1 * torch.randn(seq, dim))
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=batch_first)
        self.norm1 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.norm2 = nn.LayerNorm(dim, bias=False)
        self.head = nn.Linear(dim, NUM_CLASSES)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        q = h if self.batch_first else h.transpose(0, 1)
        a, _ = self.attn(q, q, q, key_padding_mask=mask, need_weights=False)
        a = a if self.batch_first else a.transpose(0, 1)
        h = self.norm1(h + a)
        h = self.norm2(h + self.ff(h))
        return self.head(h.mean(1))


def transformer(batch_first: bool = True) -> nn.Module:
    return TransformerBlock(batch_first=batch_first)


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(output, target, reduction="none")


def batch(kind: str, n: int, generator: torch.Generator) -> tuple[object, torch.Tensor]:
    """Inputs and targets of batch size n for the model kind."""
    y = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
    if kind == "mlp":
        return torch.randn(n, 6, generator=generator), y
    if kind == "cnn":
        return torch.randn(n, 3, 8, 8, generator=generator), y
    tokens = torch.randint(0, 11, (n, 5), generator=generator)
    return tokens, y


MODELS = {"mlp": mlp, "cnn": cnn_bn, "transformer": transformer}


def build(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = MODELS[kind]()
    # Make BatchNorm's running statistics non-trivial so eval mode is a real test.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


def random_direction(model: nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        name: torch.randn(p.shape, generator=generator)
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def loop_oracle(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, direction: dict[str, torch.Tensor]
) -> torch.Tensor:
    """r_i from N separate single-example backward passes: slow and obviously correct."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out = []
    for i in range(len(y)):
        loss = loss_fn(model(x[i : i + 1]), y[i : i + 1]).sum()
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        out.append(
            sum(
                (g * direction[n]).sum()
                for n, g in zip(params, grads, strict=True)
                if g is not None
            )
        )
    return torch.stack(out)
