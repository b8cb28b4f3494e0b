"""The one training loop (training.Trainer) and what every entry point gets from it.

Closed forms: plain gradient descent on a quadratic has a known next iterate, so clipping, skipping
and averaging can be checked exactly; the schedules are formulas.
"""

import json
import math

import pytest
import torch

import tiltflow as tilt
from tiltflow import training
from tiltflow.methods.finetune import FinetuneConfig
from tiltflow.methods.gft import GFTConfig
from tiltflow.methods.sample_energy import EnergyConfig
from tiltflow.models import FlowModel, GaussianMixtureVelocity


def _quadratic_trainer(losses, grad_clip=0.0, max_nonfinite=3, **kw):
    """Trainer over one parameter w (start 1) with loss c·w² / 2 for the c of each iteration: the
    gradient is c·w, and SGD with lr 1 moves w to w − c·w (clipped to norm grad_clip if > 0)."""
    w = torch.nn.Parameter(torch.tensor([1.0]))
    opt = torch.optim.SGD([w], lr=1.0)
    tr = training.Trainer("test", params=[w], opt=opt, modules={}, gens={}, iters=len(losses),
                          config={}, lr_at=training.constant(1.0), grad_clip=grad_clip,
                          max_nonfinite=max_nonfinite, checkpoint_every=100, progress=False, **kw)

    def step(it):
        c = losses[it]
        loss = 0.5 * c * w.pow(2).sum()
        loss.backward()
        return {"loss": float(loss.detach())}, {"c": c}
    return w, tr, step


def test_grad_clip_zero_is_no_clipping_and_positive_clips_the_norm():
    # gradient at w = 1 with c = 4 is 4: unclipped w → 1 − 4 = −3; clipped to norm 1: w → 0
    w, tr, step = _quadratic_trainer([4.0], grad_clip=0.0)
    tr.run(step)
    assert float(w) == pytest.approx(-3.0)
    w, tr, step = _quadratic_trainer([4.0], grad_clip=1.0)
    rec = tr.run(step)
    assert float(w) == pytest.approx(0.0, abs=1e-6) and rec["grad_norm"] == pytest.approx(4.0)   # the norm before clipping


def test_non_finite_iterations_are_skipped_counted_and_stop_the_run():
    # c = NaN makes the loss NaN: the iteration must not move w; a finite one after it does
    w, tr, step = _quadratic_trainer([float("nan"), 0.5], max_nonfinite=2)
    records = []
    tr.run(step, callback=lambda it, rec: records.append(rec))
    assert float(w) == pytest.approx(0.5)          # only the c = 0.5 step: 1 − 0.5·1
    assert [r["nonfinite_skipped"] for r in records] == [1, 1]
    assert math.isnan(records[0]["loss"])           # a skipped iteration logs NaN, not a stale value
    w, tr, step = _quadratic_trainer([float("nan")] * 3, max_nonfinite=2)
    with pytest.raises(FloatingPointError, match="2 iterations in a row .*skipped"):
        tr.run(step)
    assert float(w) == 1.0


def test_records_average_the_iterations_between_them():
    # log_when every 2: the record of iteration 2 holds the mean loss of iterations 1 and 2
    w, tr, step = _quadratic_trainer([0.5, 0.5, 0.5], log_when=lambda done: done % 2 == 0)
    records = []
    tr.run(step, callback=lambda it, rec: records.append((it, rec)))
    # w: 1 → 0.5 → 0.25 → 0.125; losses 0.25, 0.0625, 0.015625
    assert [it for it, _ in records] == [2, 3]       # every 2nd, and always the last
    assert records[0][1]["loss"] == pytest.approx((0.25 + 0.0625) / 2)
    assert records[1][1]["loss"] == pytest.approx(0.015625)
    assert records[0][1]["c"] == 0.5 and records[0][1]["iter"] == 2


def test_schedules():
    f = training.cosine(1.0, 0.1, 10)
    assert f(0) == pytest.approx(1.0) and f(5) == pytest.approx(0.55) and f(10) == pytest.approx(0.1)
    assert training.cosine(1.0, None, 10)(7) == 1.0
    g = training.warmup(2.0, 4)
    assert [g(i) for i in range(5)] == [0.5, 1.0, 1.5, 2.0, 2.0]
    assert training.warmup(2.0, 0)(0) == 2.0


def test_bad_report_to_names_the_value():
    with pytest.raises(ValueError, match="tensorbord"):
        _quadratic_trainer([1.0], report_to="tensorbord")


def test_configs_validate_when_built():
    with pytest.raises(ValueError, match="lam must be a positive"):
        FinetuneConfig(lam=-1)
    with pytest.raises(ValueError, match="iters must be a positive integer"):
        EnergyConfig(iters=0)
    with pytest.raises(ValueError, match="coupling must be"):
        GFTConfig(coupling="emd")
    with pytest.raises(ValueError, match="lr must be a positive"):
        tilt.PretrainConfig(lr=0.0)


def test_deprecated_energy_spellings_map_onto_iters():
    with pytest.warns(DeprecationWarning, match="use `iters`"):
        cfg = EnergyConfig(epochs=3, batches_per_epoch=4, samples_per_epoch=16)
    assert (cfg.iters, cfg.iters_per_rollout, cfg.samples_per_rollout) == (12, 4, 16)
    assert cfg.epochs is None and cfg.batches_per_epoch is None and cfg.samples_per_epoch is None


def _gaussian_base():
    return FlowModel(GaussianMixtureVelocity([1.0], torch.zeros(1, 2), torch.eye(2)[None]))


def test_entry_points_accept_their_config_objects():
    # a config object and the same settings as keywords must give the same run (same seed, same stream)
    base, r = _gaussian_base(), tilt.rewards.Linear([1.0, 0.0])
    small = dict(iters=3, batch_size=16, steps=6, residual_hidden=(8,), seed=1)
    a = tilt.finetune(base, r, lam=2.0, progress=False, **small)
    b = tilt.finetune(base, r, config=FinetuneConfig(lam=2.0, **small), progress=False)
    c = tilt.finetune(base, r, 2.0, config=FinetuneConfig(**{**small, "iters": 9}), iters=3, progress=False)
    for m in (b, c):     # keywords override the config's fields
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), m.state_dict().values()))
    target = torch.randn(64, 2) + 1.0
    kw = dict(schedule=[0.5, 0.0], iters_per_stage=2, batch_size=16, n_pretrained=32, coupling="independent",
              residual_hidden=(8,))
    g1 = tilt.gradual_finetune(base, target, progress=False, **kw)
    g2 = tilt.gradual_finetune(base, target, config=GFTConfig(**kw), progress=False)
    assert all(torch.equal(x, y) for x, y in zip(g1.state_dict().values(), g2.state_dict().values()))
    from tiltflow.tasks.energies import get_energy
    E = get_energy("gmm40")
    ekw = dict(iters=2, iters_per_rollout=1, samples_per_rollout=8, batch_size=8, buffer_size=16, steps=3, hidden=(8,))
    s1 = tilt.sample_energy(E, 2, progress=False, **ekw)
    s2 = tilt.sample_energy(E, 2, config=EnergyConfig(**ekw), progress=False)
    assert all(torch.equal(x, y) for x, y in zip(s1.model.state_dict().values(), s2.model.state_dict().values()))
    with pytest.raises(ValueError, match="config must be a FinetuneConfig"):
        tilt.finetune(base, r, config=GFTConfig())


def test_tensorboard_gets_the_records_of_log_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    x = torch.randn(256, 2)
    tilt.pretrain(x, 100, hidden=(8,), batch_size=32, out=tmp_path, progress=False, report_to="tensorboard")
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    events = acc.Scalars("loss")
    assert [e.step for e in events] == [r["iter"] for r in log] == [50, 100]
    assert [e.value for e in events] == pytest.approx([r["loss"] for r in log], rel=1e-6)
