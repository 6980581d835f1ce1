"""The language-model how-to's loss takes what the model returns: a Hugging Face output
object (its .logits) or plain logits, with the same per-sequence losses."""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def snippet_loss():
    text = (ROOT / "docs" / "howto-lm-mixture.md").read_text()
    code = re.search(r"^def per_example_loss\(output, labels\):.*?(?=\n\n)", text, re.M | re.S)
    assert code, "docs/howto-lm-mixture.md has no per_example_loss(output, labels)"
    scope = {"F": F}
    exec(code.group(0), scope)
    return scope["per_example_loss"]


def test_the_lm_loss_takes_a_hugging_face_output_or_logits():
    from transformers import GPT2Config, GPT2LMHeadModel

    loss = snippet_loss()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2))
    x = torch.randint(0, 16, (3, 8))
    labels = torch.randint(0, 16, (3, 8))
    output = model(x)  # an output object, not a tensor
    assert not isinstance(output, torch.Tensor)
    got = loss(output, labels)
    want = F.cross_entropy(output.logits.reshape(-1, 16), labels.reshape(-1), reduction="none")
    assert got.shape == (3,)
    torch.testing.assert_close(got, want.reshape(3, 8).mean(1))
    torch.testing.assert_close(loss(output.logits, labels), got)
