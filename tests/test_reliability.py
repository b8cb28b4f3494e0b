"""Reliability: kill -9 and resume, corrupt checkpoints, RNG state, bad input at every public entry.

Resume is checked bit for bit: with every random stream (the training generators, torch,
numpy and Python) in the checkpoint, a run killed at any iteration and resumed from its last
checkpoint recomputes exactly the iterations it lost, so its final weights and checkpoint are
equal to an uninterrupted run's, not merely close.
"""

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tiltflow import checkpoint as ckpt
from tiltflow import cli
from tiltflow.divergences import KL
from tiltflow.methods.fdc import fdc
from tiltflow.methods.finetune import finetune
from tiltflow.methods.gft import gradual_finetune
from tiltflow.methods.pretrain import pretrain
from tiltflow.methods.sample_energy import sample_energy
from tiltflow.models import FlowModel, GaussianMixtureVelocity, MLPVelocity
from tiltflow.objectives import CVaR, ExpectedReward
from tiltflow.rewards import Linear
from tiltflow.utilities import Entropy

MU = torch.tensor([1.0, -0.5])
COV = torch.tensor([[0.49, 0.1], [0.1, 0.3]])
A_LIN = torch.tensor([1.0, 0.5])
TINY = dict(batch_size=16, steps=6, n_offline=32, progress=False)


def gaussian_base():
    return FlowModel(GaussianMixtureVelocity([1.0], MU[None], COV[None]))


def tensors_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- kill -9 and --resume


def _kill_after_first_checkpoint(cmd, out, rng):
    """Start `cmd`, wait until out/checkpoints has a complete checkpoint, wait a random
    0–0.4 s more (a random iteration), then SIGKILL. Returns the step it was killed after."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 90
    while not list((out / "checkpoints").glob("step_*.json")):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint within 90 s"
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.4))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "model.safetensors").exists(), "the run finished before the kill; make it longer"
    return max(json.loads(p.read_text())["step"] for p in (out / "checkpoints").glob("step_*.json"))


@pytest.mark.parametrize("command", ["finetune", "pretrain"])
def test_kill_9_then_resume_reaches_the_uninterrupted_checkpoint_bit_for_bit(tmp_path, command):
    rng = random.Random()
    if command == "finetune":
        gaussian_base().save(tmp_path / "base" / "model.safetensors")
        args = ["finetune", "--run", str(tmp_path / "base"), "--iters", "400", "--batch-size", "32",
                "--steps", "8", "--n-offline", "64", "--checkpoint-every", "25", "--n-eval", "50",
                "--n-kl", "0", "--objective", "cvar", "--level", "0.2", "--no-progress"]
        last, key = "step_00000400", "iter"
    else:
        args = ["pretrain", "--task", "gaussian", "--steps", "1200", "--batch-size", "32", "--hidden", "16,16",
                "--checkpoint-every", "100", "--no-progress"]
        last, key = "step_00001200", "iter"
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert cli.main(args + ["--out", str(full)]) == 0

    step = _kill_after_first_checkpoint([sys.executable, "-m", "tiltflow", *args, "--out", str(killed)], killed, rng)
    assert cli.main(args + ["--out", str(killed), "--resume"]) == 0

    assert tensors_equal(load_file(str(full / "model.safetensors")), load_file(str(killed / "model.safetensors")))
    # The final checkpoints agree in weights, optimiser and training streams. Not in the global
    # torch/numpy/Python RNG states: training never draws from them (explicit generators), they
    # are saved only to give user code its stream back on resume, and the two runs here started
    # in processes with different global states.
    caller = ("rng.torch_global", "rng.numpy_keys", "rng.cuda_")
    a, b = (load_file(str(d / "checkpoints" / f"{last}.safetensors")) for d in (full, killed))
    assert tensors_equal({k: v for k, v in a.items() if not k.startswith(caller)},
                         {k: v for k, v in b.items() if not k.startswith(caller)}), f"killed after step {step}"
    ma, mb = (json.loads((d / "checkpoints" / f"{last}.json").read_text()) for d in (full, killed))
    assert {k: v for k, v in ma.items() if k not in ("rng", "sha256")} == \
        {k: v for k, v in mb.items() if k not in ("rng", "sha256")}
    # the log has each iteration once, with the uninterrupted run's losses
    log_a = [json.loads(line) for line in (full / "log.jsonl").read_text().splitlines()]
    log_b = [json.loads(line) for line in (killed / "log.jsonl").read_text().splitlines()]
    assert [(r[key], r["loss"]) for r in log_a] == [(r[key], r["loss"]) for r in log_b]


# ---------------------------------------------------------------- corrupt and foreign checkpoints


def test_a_truncated_newest_checkpoint_is_reported_and_the_previous_one_used(tmp_path, caplog):
    kw = dict(TINY, checkpoint_every=5)
    full = finetune(gaussian_base(), Linear(A_LIN), lam=1.0, iters=15, **kw)
    finetune(gaussian_base(), Linear(A_LIN), lam=1.0, iters=10, out=tmp_path / "b", **kw)   # "killed" at 10
    newest = tmp_path / "b" / "checkpoints" / "step_00000010.safetensors"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])                        # a partial write
    caplog.clear()
    resumed = finetune(gaussian_base(), Linear(A_LIN), lam=1.0, iters=15, out=tmp_path / "b", resume=True, **kw)
    (out,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name.startswith("tiltflow.")]
    assert "step_00000010.json is corrupt" in out and "checksum" in out and "previous" in out
    assert tensors_equal(full.state_dict(), resumed.state_dict())     # resumed from step 5, same result
    iters = [json.loads(line)["iter"] for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert iters == list(range(1, 16))


def test_checkpoint_holds_every_rng_state_and_restores_it(tmp_path):
    model = torch.nn.Linear(2, 2)
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    ckpt.save_checkpoint(tmp_path, 1, {"m": model}, None, {"train": gen}, config_hash="abc")
    expect = (torch.rand(3, generator=gen), torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    torch.rand(7, generator=gen), torch.rand(5), np.random.rand(4), random.random()     # move every stream on
    meta = ckpt.load_latest(tmp_path, {"m": model}, None, {"train": gen}, config_hash="abc")
    assert meta["step"] == 1 and meta["config_hash"] == "abc"
    got = (torch.rand(3, generator=gen), torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(got[0], expect[0]) and torch.equal(got[1], expect[1])
    assert np.array_equal(got[2], expect[2]) and got[3] == expect[3]


def test_checkpoints_of_another_run_or_model_are_refused(tmp_path):
    model = torch.nn.Linear(2, 2)
    ckpt.save_checkpoint(tmp_path, 1, {"m": model}, None, {}, config_hash="run-a")
    with pytest.raises(ValueError, match="another configuration"):
        ckpt.load_latest(tmp_path, {"m": model}, None, {}, config_hash="run-b")
    with pytest.raises(ValueError, match="another model.*'m'"):
        ckpt.load_latest(tmp_path, {"m": torch.nn.Linear(2, 3)}, None, {})
    with pytest.raises(ValueError, match="no random stream 'train_1'.*processes × grad_accum"):
        ckpt.load_latest(tmp_path, {"m": model}, None, {"train_1": torch.Generator()})

    # end to end: checkpoints copied into a run with another λ are not silently loaded
    finetune(gaussian_base(), Linear(A_LIN), lam=1.0, iters=2, out=tmp_path / "a", checkpoint_every=1, **TINY)
    shutil.copytree(tmp_path / "a" / "checkpoints", tmp_path / "c" / "checkpoints")
    with pytest.raises(ValueError, match="another configuration"):
        finetune(gaussian_base(), Linear(A_LIN), lam=2.0, iters=4, out=tmp_path / "c", resume=True, **TINY)
    # and a run folder of another base model (same architecture, other weights) names the key
    other = FlowModel(GaussianMixtureVelocity([1.0], -MU[None], COV[None]))
    with pytest.raises(ValueError, match="base_weights"):
        finetune(other, Linear(A_LIN), lam=1.0, iters=4, out=tmp_path / "a", resume=True, checkpoint_every=1, **TINY)


# ---------------------------------------------------------------- non-finite losses during training


class SometimesNaN(torch.nn.Module):
    """A velocity that is NaN on the calls listed in `bad` (counted over training forward passes)."""

    def __init__(self, bad):
        super().__init__()
        self.inner, self.bad, self.calls = MLPVelocity(2, (8,)), set(bad), 0

    def config(self):
        return self.inner.config()

    def forward(self, x, t, cond=None):
        v = self.inner(x, t, cond)
        if self.training:
            self.calls += 1
            if self.calls in self.bad:
                return v * float("nan")
        return v


def test_non_finite_steps_are_skipped_and_counted_then_the_run_stops(tmp_path, monkeypatch):
    import tiltflow.methods.finetune as ftm
    base = gaussian_base()

    def model_nan_on(bad):
        return lambda *a, **k: FlowModel(SometimesNaN(bad), base.path, base.shape)

    # a NaN loss at iteration 2 is skipped (no NaN weight is written) and counted; the run goes on
    monkeypatch.setattr(ftm, "make_finetune_model", model_nan_on({2}))
    ft = finetune(base, Linear(A_LIN), lam=1.0, iters=4, out=tmp_path / "a", **TINY)
    assert all(torch.isfinite(p).all() for p in ft.parameters())
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["nonfinite_skipped"] for r in log] == [0, 1, 1, 1]
    # NaN every time: stops after max_nonfinite iterations in a row, saying why
    monkeypatch.setattr(ftm, "make_finetune_model", model_nan_on(range(1, 100)))
    with pytest.raises(FloatingPointError, match="3 iterations in a row.*skipped"):
        finetune(base, Linear(A_LIN), lam=1.0, iters=10, max_nonfinite=3, **TINY)


def test_pretrain_skips_and_counts_non_finite_steps_then_stops(tmp_path, monkeypatch):
    import tiltflow.methods.pretrain as ptm
    data = torch.randn(64, 2)
    kw = dict(batch_size=16, hidden=(8,), progress=False, checkpoint_every=2)

    # a NaN loss at step 2 is skipped (no NaN weight, EMA untouched by it) and counted
    monkeypatch.setattr(ptm, "MLPVelocity", lambda *a, **k: SometimesNaN({2}))
    model = pretrain(data, 4, out=tmp_path / "a", **kw)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["nonfinite_skipped"] == 1 and math.isfinite(log[-1]["loss"])
    ck = json.loads(sorted((tmp_path / "a" / "checkpoints").glob("step_*.json"))[-1].read_text())
    assert ck["extra"]["nonfinite_total"] == 1
    # NaN every time: stops after max_nonfinite steps in a row, saying why
    monkeypatch.setattr(ptm, "MLPVelocity", lambda *a, **k: SometimesNaN(range(1, 100)))
    with pytest.raises(FloatingPointError, match="3 iterations in a row.*skipped"):
        pretrain(data, 10, max_nonfinite=3, **kw)
    with pytest.raises(ValueError, match="max_nonfinite"):
        pretrain(data, 10, max_nonfinite=0, **kw)


# ---------------------------------------------------------------- bad input, table-driven

NAN_DATA = torch.randn(50, 2)
NAN_DATA[3, 1] = float("nan")
INF_TARGET = torch.randn(50, 2)
INF_TARGET[0, 0] = float("inf")


def _ft(model=None, objective=None, **kw):
    """finetune with one bad setting (the rest tiny and valid)."""
    return lambda: finetune(model or gaussian_base(), objective or Linear(A_LIN),
                            **{"lam": 1.0, "iters": 1, **TINY, **kw})


def _no_grad_reward(x):
    return torch.ones(x.shape[0])


def _nan_reward(x):
    return x.sum(1) * float("nan")


def _inf_reward(x):
    return x.sum(1) + float("inf")


def _meta_reward(x):
    return torch.zeros(x.shape[0], device="meta")


BAD_INPUTS = [
    # (case, call, error type, the argument the message must name)
    ("lam = 0", _ft(lam=0.0), ValueError, "lam"),
    ("lam < 0", _ft(lam=-1.0), ValueError, "lam"),
    ("lam = nan", _ft(lam=float("nan")), ValueError, "lam"),
    ("CVaR level 0", lambda: CVaR(Linear(A_LIN), level=0.0), ValueError, "level"),
    ("CVaR level > 1", lambda: CVaR(Linear(A_LIN), level=1.5), ValueError, "level"),
    ("CVaR level < 0", lambda: CVaR(Linear(A_LIN), level=-0.1), ValueError, "level"),
    ("CVaR λ ≤ 0 in stage 1", lambda: CVaR(Linear(A_LIN), level=0.1).pseudo_reward(torch.randn(8, 2), 0.0),
     ValueError, "lam"),
    ("empty batch", _ft(batch_size=0), ValueError, "batch_size"),
    ("empty offline batch", _ft(n_offline=0), ValueError, "n_offline"),
    ("batch not divisible", _ft(batch_size=15, grad_accum=2), ValueError, "batch_size"),
    ("reward without gradient", _ft(objective=_no_grad_reward), ValueError, "reward"),
    ("NaN reward", _ft(objective=_nan_reward), ValueError, "reward"),
    ("inf reward", _ft(objective=_inf_reward), ValueError, "reward"),
    ("reward on another device", _ft(objective=_meta_reward), ValueError, "reward"),
    ("unavailable device", _ft(device="cuda:7" if torch.cuda.is_available() else "cuda"), ValueError, "device"),
    ("not a device", _ft(device="gpu0"), ValueError, "device"),
    ("not a FlowModel", lambda: finetune(torch.nn.Linear(2, 2), Linear(A_LIN), **TINY), ValueError, "model"),
    ("NaN in data", lambda: pretrain(NAN_DATA, 2, progress=False), ValueError, "data"),
    ("empty data", lambda: pretrain(torch.empty(0, 2), 2, progress=False), ValueError, "data"),
    ("pretrain empty batch", lambda: pretrain(torch.randn(9, 2), 2, batch_size=0, progress=False),
     ValueError, "batch_size"),
    ("pretrain unavailable device", lambda: pretrain(torch.randn(9, 2), 2, device="cuda:7", progress=False),
     ValueError, "device"),
    ("inf in target samples", lambda: gradual_finetune(gaussian_base(), INF_TARGET, progress=False),
     ValueError, "target_samples"),
    ("empty target samples", lambda: gradual_finetune(gaussian_base(), torch.empty(0, 2), progress=False),
     ValueError, "target_samples"),
    ("fdc λ < 0", lambda: fdc(gaussian_base(), Entropy(), KL(), lam=-1.0, progress=False), ValueError, "lam"),
    # shapes and dtypes
    ("data of shape (n,)", lambda: pretrain(torch.randn(50), 2, progress=False), ValueError, "data"),
    ("data of shape (n, d, 1)", lambda: pretrain(torch.randn(50, 2, 1), 2, progress=False), ValueError, "data"),
    ("image-shaped data", lambda: pretrain(torch.randn(50, 1, 4, 4), 2, progress=False), ValueError, "data"),
    ("integer data", lambda: pretrain(torch.randint(0, 9, (50, 2)), 2, progress=False), ValueError, "data"),
    ("complex data", lambda: pretrain(torch.randn(50, 2, dtype=torch.complex64), 2, progress=False),
     ValueError, "data"),
    ("bool data", lambda: pretrain(torch.ones(50, 2, dtype=torch.bool), 2, progress=False), ValueError, "data"),
    ("data from a sampler of shape (n,)", lambda: pretrain(lambda n, g: torch.randn(n, generator=g), 2,
                                                         progress=False), ValueError, "data"),
    ("cond of the wrong length", lambda: pretrain(torch.randn(50, 2), 2, cond=torch.randn(49, 1), progress=False),
     ValueError, "cond"),
    ("target samples of shape (n,)", lambda: gradual_finetune(gaussian_base(), torch.randn(50), progress=False),
     ValueError, "target_samples"),
    ("target samples of shape (n, d, 1)",
     lambda: gradual_finetune(gaussian_base(), torch.randn(50, 2, 1), progress=False), ValueError, "target_samples"),
    ("target samples of another dimension",
     lambda: gradual_finetune(gaussian_base(), torch.randn(50, 3), progress=False), ValueError, "target_samples"),
    ("integer target samples",
     lambda: gradual_finetune(gaussian_base(), torch.randint(0, 9, (50, 2)), progress=False),
     ValueError, "target_samples"),
    ("complex target samples",
     lambda: gradual_finetune(gaussian_base(), torch.randn(50, 2, dtype=torch.complex64), progress=False),
     ValueError, "target_samples"),
    ("log_prob x of shape (n,)", lambda: gaussian_base().log_prob(torch.randn(5), steps=2), ValueError, "x must"),
    ("log_prob x of shape (n, d, 1)", lambda: gaussian_base().log_prob(torch.randn(5, 2, 1), steps=2),
     ValueError, "x must"),
    ("log_prob x of another dimension", lambda: gaussian_base().log_prob(torch.randn(5, 3), steps=2),
     ValueError, "x must"),
    ("log_prob integer x", lambda: gaussian_base().log_prob(torch.ones(5, 2, dtype=torch.long), steps=2),
     ValueError, "x must"),
    ("log_prob complex x", lambda: gaussian_base().log_prob(torch.randn(5, 2, dtype=torch.complex64), steps=2),
     ValueError, "x must"),
    ("log_prob x not a tensor", lambda: gaussian_base().log_prob([[0.0, 1.0]], steps=2), ValueError, "x must"),
    ("sample n not an integer", lambda: gaussian_base().sample(2.5, steps=2), ValueError, "n must"),
    ("sample n a shape", lambda: gaussian_base().sample((5, 2), steps=2), ValueError, "n must"),
    ("sample cond of the wrong width",
     lambda: FlowModel(MLPVelocity(2, (8,), cond_dim=2)).sample(4, steps=2, cond=torch.zeros(4, 3)),
     ValueError, "cond"),
    ("sample cond of the wrong batch",
     lambda: FlowModel(MLPVelocity(2, (8,), cond_dim=2)).sample(4, steps=2, cond=torch.zeros(2)),
     ValueError, "cond"),
    ("sample_energy dim a shape", lambda: sample_energy(lambda x: x.pow(2).sum(1), (2,), progress=False),
     ValueError, "dim"),
    ("sample_energy dim True", lambda: sample_energy(lambda x: x.pow(2).sum(1), True, progress=False),
     ValueError, "dim"),
    ("sample_energy batch not divisible",
     lambda: sample_energy(lambda x: x.pow(2).sum(1), 2, batch_size=15, grad_accum=2, progress=False),
     ValueError, "batch_size"),
    ("gft batch not divisible",
     lambda: gradual_finetune(gaussian_base(), torch.randn(50, 2), batch_size=15, grad_accum=2, progress=False),
     ValueError, "batch_size"),
    ("gft max_nonfinite 0", lambda: gradual_finetune(gaussian_base(), torch.randn(50, 2), max_nonfinite=0,
                                                     progress=False), ValueError, "max_nonfinite"),
    ("ExpectedReward not callable", lambda: ExpectedReward(3.0), ValueError, "reward"),
]


@pytest.mark.parametrize("case,call,error,name", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_and_names_the_argument(case, call, error, name):
    with pytest.raises(error) as info:
        call()
    assert name in str(info.value), f"{case}: {info.value}"
