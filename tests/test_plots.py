"""plots: every figure writes a non-empty PNG; bad inputs and a missing matplotlib say what to do."""

import json
import math
import sys

import pytest
import torch

from tiltflow import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    data = path.read_bytes()
    return data[:8] == PNG_SIGNATURE and len(data) > 1000


@pytest.fixture
def mpl():
    return pytest.importorskip("matplotlib")


def test_plot_samples_panels_with_reward_contours(mpl, tmp_path):
    g = torch.Generator().manual_seed(0)
    panels = {"data": torch.randn(300, 2, generator=g),
              "model": torch.randn(200, 2, generator=g).numpy() + 1.0}   # arrays are accepted too
    out = plots.plot_samples(tmp_path / "sub" / "s.png", panels, title="t",
                             density=lambda x: x[:, 0] + 0.5 * x[:, 1])
    assert out == tmp_path / "sub" / "s.png" and _is_png(out)
    assert _is_png(plots.plot_samples(tmp_path / "h.png", panels, kind="hexbin"))


def test_plot_samples_rejects_wrong_shapes(mpl, tmp_path):
    with pytest.raises(ValueError, match="panel 'bad'"):
        plots.plot_samples(tmp_path / "x.png", {"bad": torch.zeros(5, 3)})
    with pytest.raises(ValueError, match="at least one"):
        plots.plot_samples(tmp_path / "x.png", {})
    with pytest.raises(ValueError, match="density must return"):
        plots.plot_samples(tmp_path / "x.png", {"a": torch.zeros(5, 2)}, density=lambda x: x)


def _write_log(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_plot_training_from_finetune_and_pretrain_logs(mpl, tmp_path):
    ft = [{"iter": i, "loss": 5.0 / i, "kl": 0.01 * i, "reward_mean": 0.1 * i, "reward_q05": 0.1 * i - 1,
           "reward_q95": 0.1 * i + 1, "reward_cvar_left_10": 0.1 * i - 1.5, "reward_cvar_right_10": 0.1 * i + 1.5,
           "diversity": 2.0 - 0.001 * i} for i in range(1, 121)]
    assert _is_png(plots.plot_training(tmp_path / "ft.png", _write_log(tmp_path / "ft.jsonl", ft)))
    pre = [{"step": 50 * i, "loss": 2.0 / i, "grad_norm": 1.0, "lr": 1e-3} for i in range(1, 5)]
    assert _is_png(plots.plot_training(tmp_path / "pre.png", _write_log(tmp_path / "pre.jsonl", pre)))


def test_plot_training_errors_name_the_log(mpl, tmp_path):
    with pytest.raises(FileNotFoundError, match="no training log"):
        plots.plot_training(tmp_path / "x.png", tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="no records"):
        plots.plot_training(tmp_path / "x.png", _write_log(tmp_path / "empty.jsonl", []))


def test_plot_reward_hist(mpl, tmp_path):
    g = torch.Generator().manual_seed(1)
    r = {"base": torch.randn(500, generator=g), "tuned": torch.randn(500, generator=g) + 2.0}
    assert _is_png(plots.plot_reward_hist(tmp_path / "r.png", r, level=0.1))
    with pytest.raises(ValueError, match="rewards 'x'"):
        plots.plot_reward_hist(tmp_path / "r.png", {"x": torch.zeros(4, 2)})


def test_smooth_is_a_trailing_mean():
    # closed form: the trailing mean of 1, 2, ..., n over a window of 3 is n − 1 once full
    y = torch.arange(1.0, 11.0).numpy()
    s = plots._smooth(y, 3)
    assert s[0] == 1.0 and s[1] == 1.5 and all(math.isclose(s[i], y[i] - 1.0) for i in range(2, 10))


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)   # makes `import name` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'tiltflow\[plot\]'"):
        plots.plot_samples(tmp_path / "x.png", {"a": torch.zeros(5, 2)})
    assert not (tmp_path / "x.png").exists()
