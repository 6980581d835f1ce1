"""plot_history and `adaptive-data plot`: a PNG of the weights (and rewards) from a sampler,
its history, a saved state or a checkpoint; a missing matplotlib names the extra."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

import adaptive_data as ad
from adaptive_data._cli import main

PNG = b"\x89PNG\r\n\x1a\n"


def trained(updates: int = 12) -> ad.GARSampler:
    sources = {n: TensorDataset(torch.full((30,), i)) for i, n in enumerate(("a", "b", "c"))}
    s = ad.GARSampler(sources, batch_size=6, seed=0, num_batches=40)
    it = iter(s.track(s))
    for _ in range(updates):
        sid, _ = s.decode(next(it))
        s.update((sid == 0).double() - 0.5 * (sid == 2).double())
    return s


def is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG and path.stat().st_size > 1000


def test_plot_history_of_a_sampler_draws_weights_and_rewards(tmp_path: Path):
    import matplotlib.pyplot as plt

    s = trained()
    out = ad.plot_history(s, tmp_path / "mix.png", title="three sources")
    assert out == tmp_path / "mix.png"
    assert is_png(out)
    fig, (w_ax, r_ax) = plt.subplots(2, 1)
    assert ad.draw_history(s.history, w_ax, r_ax)  # the rewards were drawn
    assert [line.get_label() for line in w_ax.get_lines()] == ["a", "b", "c"]
    ys = w_ax.get_lines()[0].get_ydata()
    assert list(ys) == [e["weights"]["a"] for e in s.history]
    # the running mean line of source a: the sampler's own reward_mean at the end
    assert r_ax.get_lines()[0].get_ydata()[-1] == pytest.approx(s.metrics()["reward_mean/a"])
    plt.close(fig)


def test_the_command_line_plots_a_saved_state(tmp_path: Path, capsys):
    """A saved state holds the weights' history and each update's rewards: both panels."""
    s = trained()
    torch.save(s.state_dict(), tmp_path / "state.pt")
    main(["plot", str(tmp_path / "state.pt")])
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'state.png'}"
    assert is_png(tmp_path / "state.png")
    entries = ad._plot.history_of(tmp_path / "state.pt")
    assert [e["weights"] for e in entries] == [e["weights"] for e in s.history[1:]]
    assert [e["batch"] for e in entries] == list(range(12))
    assert str([e["rewards"] for e in entries]) == str([e["rewards"] for e in s.history[1:]])


def test_a_checkpoint_holding_a_state_and_a_saved_history_plot_too(tmp_path: Path):
    s = trained()
    checkpoint = {"version": 1, "sampler": s.state_dict(), "gar": None}  # the Trainer's file
    lightning = {"state_dict": {}, "adaptive_data": {"ranks": [s.state_dict()]}}
    torch.save(checkpoint, tmp_path / "trainer.pt")
    torch.save(lightning, tmp_path / "lightning.ckpt")
    torch.save(s.history, tmp_path / "history.pt")
    for name in ("trainer.pt", "lightning.ckpt"):
        main(["plot", str(tmp_path / name), "-o", str(tmp_path / f"{name}.png")])
        assert is_png(tmp_path / f"{name}.png")
    entries = ad._plot.history_of(tmp_path / "history.pt")
    saved = [e["rewards"][n] for e in entries for n in "abc"]  # a saved history keeps them
    assert saved == pytest.approx([e["rewards"][n] for e in s.history for n in "abc"], nan_ok=True)
    assert any(math.isfinite(v) for v in saved)
    plain = [e["weights"] for e in s.history]  # the benchmarks' form: weights only
    assert ad.plot_history(plain, tmp_path / "plain.png", stride=5).stat().st_size > 1000


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ([], r"non-empty list of sampler.history entries .* got list \(empty\)"),
        ({"model": 1}, r"cannot find a sampler's history in a dict with keys \['model'\]"),
        ([{"a": "x"}], r"history entry 0 should be a sampler.history entry"),
        (3, r"non-empty list .* but got int"),
    ],
)
def test_what_cannot_be_plotted_is_named(tmp_path: Path, source, message):
    with pytest.raises(ValueError, match=message):
        ad.plot_history(source, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_bad_stride_and_missing_file(tmp_path: Path):
    with pytest.raises(ValueError, match=r"stride should be a positive integer, .*stride=0"):
        ad.plot_history(trained(1), tmp_path / "x.png", stride=0)
    with pytest.raises(SystemExit, match=r"adaptive-data plot: no such file to plot: .*nope.pt"):
        main(["plot", str(tmp_path / "nope.pt")])


def test_an_empty_state_says_there_is_nothing_to_plot(tmp_path: Path):
    torch.save(trained(0).state_dict(), tmp_path / "state.pt")
    with pytest.raises(SystemExit, match=r"holds no update yet: nothing to plot"):
        main(["plot", str(tmp_path / "state.pt")])


def test_without_matplotlib_the_error_names_the_extra(tmp_path: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    with pytest.raises(
        ModuleNotFoundError,
        match=r"plot_history needs 'matplotlib', which the \[plot\] extra installs: "
        r"pip install 'adaptive-data\[plot\]'",
    ):
        ad.plot_history(trained(2), tmp_path / "x.png")
    torch.save(trained(2).history, tmp_path / "h.pt")
    with pytest.raises(SystemExit, match=r"pip install 'adaptive-data\[plot\]'"):
        main(["plot", str(tmp_path / "h.pt")])
    assert not (tmp_path / "h.png").exists()


def test_rewards_absent_everywhere_draw_one_panel():
    import matplotlib.pyplot as plt

    s = trained(3)
    history = [{**e, "rewards": dict.fromkeys(e["rewards"], math.nan)} for e in s.history]
    fig, (w_ax, r_ax) = plt.subplots(2, 1)
    assert not ad.draw_history(history, w_ax, r_ax)
    plt.close(fig)


def test_the_mixture_benchmark_draws_its_weights_with_the_library(tmp_path: Path, monkeypatch):
    """benchmarks/mixture_quality.py's weights figure goes through draw_history."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import mixture_quality

    calls = []
    real = ad.draw_history
    monkeypatch.setattr(ad, "draw_history", lambda *a, **k: calls.append(k) or real(*a, **k))
    history = [e["weights"] for e in trained(6).history]
    results = {
        "methods": {"gar_exp_grad": {"runs": [{"history": history, "history_stride": 2}]}},
        "steps_per_epoch": 4,
        "seeds": [0],
    }
    assert mixture_quality.plot(results, tmp_path / "w.png")
    assert is_png(tmp_path / "w.png")
    assert calls == [{"stride": 2, "legend": False}]
