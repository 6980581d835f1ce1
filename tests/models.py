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


# ---------------------------------------------------------------- language models from stock parts

VOCAB, SEQ = 13, 8


class CausalLM(nn.Module):
    """Token and position ``nn.Embedding`` (the latter called on ``arange(T)``: its output holds
    no batch), a pre-norm ``nn.TransformerEncoder`` with a causal mask, a Linear head (tied to
    the token embedding with ``tied``)."""

    def __init__(self, dim: int = 16, heads: int = 2, layers: int = 2, tied: bool = False):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, dim)
        self.pos = nn.Embedding(SEQ, dim)
        layer = nn.TransformerEncoderLayer(
            dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, VOCAB)
        if tied:
            self.head.weight = self.tok.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        h = self.tok(x) + self.pos(torch.arange(t, device=x.device))
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=x.device)
        return self.head(self.body(h, mask=mask, is_causal=True))


class StockLM(nn.Module):
    """A stock ``nn.TransformerEncoder`` language model as nanoGPT-style code keeps it: the
    causal mask a registered buffer sliced in each forward and passed with ``is_causal``,
    torch's default dropout 0.1, learned positions."""

    def __init__(self, dim: int = 16, heads: int = 2, layers: int = 2, dropout: float = 0.1):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, dim)
        self.pos = nn.Embedding(SEQ, dim)
        layer = nn.TransformerEncoderLayer(
            dim, heads, 2 * dim, dropout=dropout, batch_first=True, norm_first=True
        )
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, VOCAB)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(SEQ))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        h = self.tok(x) + self.pos(torch.arange(t, device=x.device))
        return self.head(self.body(h, mask=self.mask[:t, :t], is_causal=True))


class SelfAttention(nn.Module):
    """A GPT-style attention: one Linear for q, k, v and ``F.scaled_dot_product_attention``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        q, k, v = (
            z.view(n, t, self.heads, c // self.heads).transpose(1, 2)
            for z in self.qkv(x).split(c, dim=2)
        )
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(n, t, c))


class Block(nn.Module):
    """RMSNorm, SDPA attention scaled by a bare Parameter (a LayerScale), LayerNorm, MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, dim))
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.gamma * self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """A position Parameter on the root (used by broadcasting), blocks, a head tied to the token
    embedding."""

    def __init__(self, dim: int = 16, heads: int = 2, layers: int = 2) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, dim)
        self.pos = nn.Parameter(0.1 * torch.randn(1, SEQ, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads) for _ in range(layers)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, VOCAB, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) + self.pos[:, : x.shape[1]]
        return self.head(self.norm(self.blocks(h)))


def lm_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean next-token cross-entropy: ``[N, T, V], [N, T] -> [N]``."""
    return nn.functional.cross_entropy(output.transpose(1, 2), target, reduction="none").mean(1)


def lm_batch(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, VOCAB, (n, SEQ), generator=generator)
    return x, torch.randint(0, VOCAB, (n, SEQ), generator=generator)


def loop_rewards(
    model: nn.Module, loss: object, x: torch.Tensor, y: torch.Tensor, direction: dict
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(<g_i, d>, <g_i, d> / (||g_i|| ||d||))`` from N single-example backward passes."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    d_norm = torch.sqrt(sum(t.pow(2).sum() for t in direction.values()))
    dots, cosines = [], []
    for i in range(len(y)):
        li = loss(model(x[i : i + 1]), y[i : i + 1]).sum()  # type: ignore[operator]
        grads = torch.autograd.grad(li, list(params.values()), allow_unused=True)
        grads = [
            torch.zeros_like(p) if g is None else g
            for p, g in zip(params.values(), grads, strict=True)
        ]
        dot = sum((g * direction[n]).sum() for n, g in zip(params, grads, strict=True))
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        dots.append(dot)
        cosines.append(dot / (norm * d_norm))
    return torch.stack(dots), torch.stack(cosines)


def cnn_bn_eval() -> nn.Module:
    """The ``"cnn"`` model with its BatchNorm in eval mode (running statistics: the examples
    do not mix)."""
    model = build("cnn")
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    return model
