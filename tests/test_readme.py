"""Every figure the README quotes equals the results file it cites: the demo's tables (its
summary.json; tests/test_demo.py checks a fresh run against that file) and the results
table (benchmarks/results/*.json). A number added to either without a source fails here."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = (ROOT / "README.md").read_text()
NUMBER = re.compile(r"\d+(?:\.\d+)?")


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def row(first_cell: str) -> list[str]:
    """The cells of the README table row that starts with ``first_cell``."""
    found = [line for line in README.splitlines() if line.startswith(f"| {first_cell}")]
    assert len(found) == 1, f"README should hold one row starting {first_cell!r}: {found}"
    return [c.strip() for c in found[0].strip("|").split("|")]


def test_the_demo_tables_are_the_demo_summary():
    summary = load("demo/summary.json")
    assert summary["command"] == "adaptive-data demo --out benchmarks/results/demo"
    for name in ("clean", "random_labels", "pixel_noise"):
        _, gar, uniform = row(f"{name} |")
        assert gar == f"{summary['gar']['weights'][name]:.3f}"
        assert uniform == f"{summary['uniform']['weights'][name]:.3f}"
    for run, key in (("GAR", "gar"), ("uniform", "uniform")):
        _, accuracy, wall = row(f"{run} |")
        assert accuracy == f"{summary[key]['accuracy']:.1f}%"
        assert wall == f"{summary[key]['wall_s']:.1f}"
    assert "benchmarks/results/demo/summary.json" in README


def mean(name: str, method: str, key: str) -> float:
    return load(name)["methods"][method][key]["mean"]


def ratio(name: str, method: str) -> float:
    return load(name)["methods"][method]["time_vs_uniform"]


def cost(name: str, model: str, variant: str = "default_heldout") -> float:
    return load(name)["models"][model][variant]["vs_plain_paired"]["median"]


def lm_cost(name: str, model: str) -> float:
    """The default's paired median at the largest size a results file has for ``model``."""
    sizes = load(name)["models"][model]
    largest = max(sizes.values(), key=lambda size: size["params"])
    return largest["variants"]["default"]["vs_plain_paired"]["median"]


# The results table: first cell -> (the files its last cell must name, the figures of its
# result cell in order, each formatted as the README prints it).
TABLE = {
    "Fashion-MNIST with 3 corrupted sources": (
        ["mixture_quality.json"],
        lambda: [
            f"{mean('mixture_quality.json', m, 'accuracy'):.2f}"
            for m in ("gar_exp_grad", "uniform", "oracle")
        ],
    ),
    "The same, `GAR` at its defaults": (
        ["mixture_budget.json"],
        lambda: [
            f"{mean('mixture_budget.json', 'gar_default', 'accuracy'):.2f}",
            f"{ratio('mixture_budget.json', 'gar_default'):.2f}",
            f"{mean('mixture_budget.json', 'gar_line', 'accuracy'):.2f}",
            f"{ratio('mixture_budget.json', 'gar_line'):.2f}",
        ],
    ),
    "Byte-level LM, 6 domains": (
        ["lm_mixture_budget_300.json"],
        lambda: [
            f"{mean('lm_mixture_budget_300.json', 'gar_default', 'final_loss'):.3f}",
            f"{ratio('lm_mixture_budget_300.json', 'gar_default'):.2f}",
            f"{mean('lm_mixture_budget_300.json', 'gar', 'final_loss'):.3f}",
            f"{ratio('lm_mixture_budget_300.json', 'gar'):.2f}",
            f"{mean('lm_mixture_budget_300.json', 'uniform', 'final_loss'):.3f}",
        ],
    ),
    "`gar.step()` loop vs a plain loop": (
        ["gar_cost_defaults_mlp.json", "gar_cost_defaults_resnet.json"],
        lambda: [
            f"{cost(name, model, variant):.2f}"
            for variant in ("default_heldout", "default_next_batch")
            for name, model in (
                ("gar_cost_defaults_mlp.json", "mlp"),
                ("gar_cost_defaults_resnet.json", "resnet_bn"),
            )
        ],
    ),
    "The same on byte-level LMs": (
        ["lm_cost_defaults.json", "lm_cost_defaults_hf.json"],
        lambda: [
            f"{lm_cost(name, model):.2f}"
            for name, model in (
                ("lm_cost_defaults.json", "stock"),
                ("lm_cost_defaults_hf.json", "gpt2"),
                ("lm_cost_defaults_hf.json", "llama"),
            )
        ],
    ),
    "The same at 25-32M parameters": (
        [
            "lm_cost_defaults_d512.json",
            "lm_cost_defaults_d512_gpt2.json",
            "lm_cost_defaults_d512_llama.json",
        ],
        lambda: [
            f"{lm_cost(name, model):.2f}"
            for name, model in (
                ("lm_cost_defaults_d512.json", "stock"),
                ("lm_cost_defaults_d512_gpt2.json", "gpt2"),
                ("lm_cost_defaults_d512_llama.json", "llama"),
            )
        ],
    ),
}


@pytest.mark.parametrize("first", list(TABLE))
def test_each_results_row_equals_the_file_it_cites(first: str):
    files, figures = TABLE[first]
    _, result, cited = row(first)
    assert re.findall(r"`([^`]+\.json)`", cited) == files
    assert NUMBER.findall(result) == figures()


def test_the_results_table_has_no_row_without_a_check():
    start = README.index("| what | result | file |")
    lines = README[start:].split("\n\n", 1)[0].splitlines()[2:]
    assert len(lines) == len(TABLE)
    for line, first in zip(lines, TABLE, strict=True):
        assert line.startswith(f"| {first}")
