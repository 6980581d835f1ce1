"""Learn a data mixture inside the Hugging Face Trainer: GARTrainer in place of Trainer.

A DatasetDict built from scikit-learn's digits, with three training splits of the same
images: "curated" (correct labels), "web" (half the labels wrong), "scraped" (every label
random), plus a trusted "reference" split and a "test" split. ``GARTrainer`` draws each
batch from a learned mixture of the three training splits (a ``GARSampler``), rewards every
micro-batch against the reference split's gradient (``gar_reference=``) at every optimizer
step, and logs the weights with the loss. Gradient accumulation 2, AdamW, clipping at 1.0,
a checkpoint every 20 steps; ``--resume`` continues from the last one exactly.

    python examples/transformers_mixture.py            # about 30 seconds on 2 cores
    python examples/transformers_mixture.py --quick    # a smoke run (CI)
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import torch.nn.functional as F
from datasets import Dataset, DatasetDict
from sklearn.datasets import load_digits
from torch import nn
from transformers import PrinterCallback, TrainingArguments

import adaptive_data as ad
from adaptive_data.integrations.transformers import GARTrainer


def build(seed: int) -> DatasetDict:
    digits = load_digits()
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(digits.target), generator=g).tolist()
    x = torch.tensor(digits.data, dtype=torch.float32)[order] / 16.0
    y = torch.tensor(digits.target)[order]
    splits = {}
    for name, (a, b), wrong_share in [
        ("curated", (0, 400), 0.0),
        ("web", (400, 900), 0.5),
        ("scraped", (900, 1400), 1.0),
    ]:
        labels = y[a:b].clone()
        wrong = torch.rand(b - a, generator=g) < wrong_share
        labels[wrong] = torch.randint(0, 10, (int(wrong.sum()),), generator=g)
        splits[name] = Dataset.from_dict({"x": x[a:b].tolist(), "labels": labels.tolist()})
    splits["reference"] = Dataset.from_dict(
        {"x": x[1400:1600].tolist(), "labels": y[1400:1600].tolist()}
    )
    splits["test"] = Dataset.from_dict({"x": x[1600:].tolist(), "labels": y[1600:].tolist()})
    return DatasetDict(splits).with_format("torch")


class Classifier(nn.Module):
    """A model as the Trainer expects one: keyword inputs, ``{"loss", "logits"}`` out."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x, labels=None):
        logits = self.net(x)
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


def per_example_loss(output, labels):
    """GAR's reference gradient needs one loss per example."""
    return F.cross_entropy(output["logits"], labels, reduction="none")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--quick", action="store_true", help="30 steps (a smoke run)")
    parser.add_argument("--output-dir", default=None, help="checkpoints (default: a temp dir)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick:
        args.steps = 30
    torch.set_num_threads(1)
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="gar-trainer-")

    dd = build(args.seed)
    # 42 batches per epoch, a multiple of gradient_accumulation_steps: resumes are exact
    names = ["curated", "web", "scraped"]
    sampler = ad.GARSampler(dd, batch_size=32, seed=args.seed, names=names, num_batches=42)
    torch.manual_seed(args.seed)
    model = Classifier()
    training_args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=32,
        gradient_accumulation_steps=2,
        max_steps=args.steps,
        learning_rate=1e-2,
        max_grad_norm=1.0,
        logging_steps=10,
        save_steps=20,
        report_to="none",  # or "tensorboard", "wandb": the weights go wherever the loss goes
        use_cpu=True,
        seed=args.seed,
        disable_tqdm=True,
    )
    trainer = GARTrainer(
        model=model,
        args=training_args,
        gar_sampler=sampler,  # the training data: the sampler's sources
        gar_reference=dd["reference"],  # trusted held-out data
        gar_loss_fn=per_example_loss,
    )
    trainer.remove_callback(PrinterCallback)  # the summary below instead of every log dict
    trainer.train(resume_from_checkpoint=True if args.resume else None)

    for log in trainer.state.log_history:
        if "loss" in log:
            weights = ", ".join(
                f"{name} {log[f'mixture/weight/{name}']:.2f}" for name in sampler.names
            )
            print(f"step {log['step']}: loss {log['loss']:.3f}, weights {weights}")
    test = dd["test"][:]
    model.eval()
    with torch.no_grad():
        accuracy = (model(test["x"])["logits"].argmax(1) == test["labels"]).float().mean()
    print(f"test accuracy: {100 * accuracy.item():.1f}%")
    print(f"checkpoints in {output_dir}")


if __name__ == "__main__":
    main()
