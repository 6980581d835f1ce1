"""Learn a data mixture inside PyTorch Lightning: one callback and a tracked loader.

Three training splits of scikit-learn's digits: "curated" (correct labels), "web" (half the
labels wrong), "scraped" (every label random), plus a trusted "reference" split and a "test"
split. ``GARCallback`` rewards every training batch against the reference split's gradient
at every optimizer step and learns which split to draw from; the weights are logged with
``pl_module.log`` (CSV logs here) and saved in Lightning's checkpoints, so ``--resume``
continues from the last one exactly. ``accumulate_grad_batches=2``, AdamW, clipping at 1.0.

    python examples/lightning_mixture.py            # about 30 seconds on 2 cores
    python examples/lightning_mixture.py --quick    # a smoke run (CI)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import adaptive_data as ad
from adaptive_data.integrations.lightning import GARCallback


def build(seed: int) -> dict[str, TensorDataset]:
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
        splits[name] = TensorDataset(x[a:b], labels)
    splits["reference"] = TensorDataset(x[1400:1600], y[1400:1600])
    splits["test"] = TensorDataset(x[1600:], y[1600:])
    return splits


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)  # self(x): the forward GAR watches
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def per_example_loss(output, y):
    """GAR's reference gradient needs one loss per example."""
    return F.cross_entropy(output, y, reduction="none")


class PrintWeights(pl.Callback):
    def __init__(self, sampler: ad.GARSampler) -> None:
        self.sampler = sampler

    def on_train_epoch_end(self, trainer, pl_module):
        weights = ", ".join(f"{k} {v:.2f}" for k, v in self.sampler.weights.items())
        print(f"epoch {trainer.current_epoch + 1} (step {trainer.global_step}): weights {weights}")


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
    output_dir = Path(args.output_dir or tempfile.mkdtemp(prefix="gar-lightning-"))

    splits = build(args.seed)
    sources = {name: splits[name] for name in ("curated", "web", "scraped")}
    sampler = ad.GARSampler(sources, batch_size=32, seed=args.seed)
    gar = GARCallback(
        sampler,
        reference=ad.ReferenceBatches(splits["reference"], 32, seed=args.seed),  # trusted data
        loss_fn=per_example_loss,
    )
    loader = gar.track(DataLoader(sampler.dataset, batch_sampler=sampler))
    torch.manual_seed(args.seed)
    model = Classifier()
    checkpoints = pl.callbacks.ModelCheckpoint(
        dirpath=output_dir / "checkpoints", every_n_train_steps=20, save_last=True
    )
    trainer = pl.Trainer(
        max_steps=args.steps,
        accumulate_grad_batches=2,
        gradient_clip_val=1.0,
        accelerator="cpu",
        devices=1,
        logger=pl.loggers.CSVLogger(output_dir),  # mixture/weight/<split> beside the loss
        log_every_n_steps=10,
        callbacks=[gar, checkpoints, PrintWeights(sampler)],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    last = output_dir / "checkpoints" / "last.ckpt"
    trainer.fit(model, loader, ckpt_path=last if args.resume else None)

    x, y = splits["test"].tensors
    model.eval()
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean()
    print(f"test accuracy: {100 * accuracy.item():.1f}%")
    print(f"checkpoints and CSV logs in {output_dir}")


if __name__ == "__main__":
    main()
