import json
import sys

import pytest
import torch
from scipy.optimize import linear_sum_assignment

from tiltflow.methods import pretrain as pt
from tiltflow.methods.pretrain import PretrainConfig, cfm_loss, ot_pairing, pretrain
from tiltflow.metrics import energy_distance
from tiltflow.models import FlowModel, MLPVelocity
from tiltflow.tasks.toy2d import get_task


@pytest.fixture(autouse=True)
def one_thread():
    # These MLPs are tiny: two intra-op threads only add synchronisation (10x slower on a busy
    # 2-core machine), so the file runs single-threaded and restores the setting afterwards.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------- learning a mixture


def test_mixture_is_learned_energy_distance_and_weights(tmp_path):
    task = get_task("mixture")  # weights (0.5, 0.3, 0.2), means 3 or more apart, std 0.5
    model = pretrain(task, 1500, hidden=(128, 128, 128), seed=0, out=tmp_path, progress=False)
    assert not model.training and not any(p.requires_grad for p in model.parameters())

    g = gen(123)  # reference data independent of the training stream
    ref = task.sample(2000, generator=g)
    x = model.sample(2000, steps=50, seed=7)
    d_trained = energy_distance(x, ref)

    with torch.random.fork_rng():
        torch.manual_seed(0)
        untrained = FlowModel(MLPVelocity(2, (128, 128, 128)))
    d_untrained = energy_distance(untrained.sample(2000, steps=50, seed=7), ref)
    short = pretrain(task, 50, hidden=(128, 128, 128), seed=0, progress=False)
    d_short = energy_distance(short.sample(2000, steps=50, seed=7), ref)

    # Measured: trained ≈ 0.002, 50 steps ≈ 0.11, 200 steps ≈ 0.09, untrained ≈ 0.4. The
    # U-statistic at n = m = 2000 has standard deviation ~1e-3 between two fresh data sets, so
    # 0.02 is far above estimator noise for a good model and far below any poorly fitted one.
    assert d_trained < 0.02
    assert d_untrained > 0.1 and d_short > 0.05
    assert d_trained < d_short / 3

    # Component weights: nearest-mean assignment errs with probability ≈ Φ(−3) ≈ 0.1% (means at
    # least 6σ apart); the sampling sd of a fraction at n = 2000 is ≤ 0.011, so 0.05 is ~4.5 sd.
    frac = torch.bincount(torch.cdist(x, task.means).argmin(1), minlength=3).float() / 2000
    assert torch.allclose(frac, task.weights, atol=0.05), frac

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["energy_distance"] < 0.02
    assert metrics["energy_distance_reference"] == "fresh data samples"
    assert abs(metrics["energy_distance_noise_floor"]) < 0.01  # two fresh data sets: ≈ 0 ± 1e-3
    assert metrics["final_loss"] > 0
    assert state_equal(FlowModel.load(tmp_path / "model.safetensors"), model)


def test_conditional_pretraining_separates_classes():
    # Two well separated classes labelled by cond ∈ {(1, 0), (0, 1)}: each conditional sample
    # must land near its own class mean (class std 0.3, means 4 apart).
    g = gen(5)
    label = torch.randint(0, 2, (2000,), generator=g)
    means = torch.tensor([[-2.0, 0.0], [2.0, 0.0]])
    data = means[label] + 0.3 * torch.randn(2000, 2, generator=g)
    cond = torch.nn.functional.one_hot(label, 2).float()
    model = pretrain(data, 400, hidden=(64, 64), cond=cond, progress=False)
    for k in range(2):
        c = torch.nn.functional.one_hot(torch.full((500,), k), 2).float()
        x = model.sample(500, steps=30, cond=c, seed=k)
        # mean of 500 samples of std 0.3 has sd 0.013; 0.3 allows a modest fit error
        assert torch.allclose(x.mean(0), means[k], atol=0.3), (k, x.mean(0))


# ---------------------------------------------------------------- OT coupling


def test_ot_pairing_is_the_optimal_assignment():
    # For n points on each side with weights 1/n, the Kantorovich problem's optimum is attained at
    # a permutation (Birkhoff–von Neumann), i.e. it equals the assignment problem's optimum.
    # Costs in float64 on both sides, so rel 1e-9 only absorbs summation order.
    g = gen(1)
    x0 = torch.randn(128, 2, generator=g)
    x1 = get_task("mixture").sample(128, generator=g)
    perm = ot_pairing(x0, x1)
    assert torch.equal(torch.sort(perm).values, torch.arange(128))  # both marginals preserved

    x0, x1 = x0.double(), x1.double()
    cost = ((x0[perm] - x1) ** 2).sum(1)
    independent = ((x0 - x1) ** 2).sum(1)
    assert cost.sum() <= independent.sum()
    c = ((x0[:, None] - x1[None]) ** 2).sum(-1)
    rows, cols = linear_sum_assignment(c.numpy())
    assert float(cost.sum()) == pytest.approx(float(c[rows, cols].sum()), rel=1e-9)


def test_ot_pairing_handles_image_shaped_batches():
    # the helper flattens (batch, *dims); the optimal cost is again the assignment optimum
    g = gen(2)
    x0, x1 = torch.randn(16, 1, 3, 3, generator=g), torch.randn(16, 1, 3, 3, generator=g) + 1
    perm = ot_pairing(x0, x1)
    x0, x1 = x0.double(), x1.double()
    c = ((x0.reshape(16, 1, -1) - x1.reshape(1, 16, -1)) ** 2).sum(-1)
    rows, cols = linear_sum_assignment(c.numpy())
    cost = ((x0[perm] - x1) ** 2).sum((1, 2, 3)).sum()
    assert float(cost) == pytest.approx(float(c[rows, cols].sum()), rel=1e-9)


def test_ot_coupling_without_pot_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ot", None)  # makes `import ot` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'tiltflow\[ot\]'"):
        pretrain(get_task("gaussian"), 5, coupling="ot", progress=False)


# ---------------------------------------------------------------- loss


def test_cfm_loss_is_zero_only_for_the_conditional_target():
    # A net that returns the conditional target u = x1 − x0 for a fixed pairing has loss 0;
    # a zero net has loss E‖x1 − x0‖² (sum over dims, mean over batch), here computed directly.
    class Zero(torch.nn.Module):
        dim = 3

        def forward(self, x, t, cond=None):
            return torch.zeros_like(x)

    model = FlowModel(Zero(), "rectified")
    g = gen(3)
    x0, x1, t = torch.randn(64, 3, generator=g), torch.randn(64, 3, generator=g) + 2, torch.rand(64, generator=g)
    expected = ((x1 - x0) ** 2).sum(1).mean()
    assert float(cfm_loss(model, x0, x1, t)) == pytest.approx(float(expected), rel=1e-6)


# ---------------------------------------------------------------- resume and I/O


class Interrupting:
    """Mixture sampler that raises KeyboardInterrupt on call number `limit` (None: never)."""

    def __init__(self, limit=None):
        self.task, self.calls, self.limit = get_task("mixture"), 0, limit

    def __repr__(self):
        return "Interrupting(mixture)"

    def __call__(self, n, generator):
        self.calls += 1
        if self.limit is not None and self.calls >= self.limit:
            raise KeyboardInterrupt
        return self.task.sample(n, generator=generator)


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path):
    # Same seed, same stream: the weights after N steps must be bitwise equal whether or not
    # the run was killed after its checkpoint at N/2 and resumed.
    kw = dict(batch_size=64, hidden=(32, 32), coupling="ot", ema=0.9, lr_warmup=10,
              checkpoint_every=30, progress=False)
    full = pretrain(Interrupting(), 60, out=tmp_path / "a", **kw)

    # call 1 is the shape probe; call 1 + k draws step k's batch, so this dies in step 45
    with pytest.raises(KeyboardInterrupt):
        pretrain(Interrupting(limit=46), 60, out=tmp_path / "b", **kw)
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").glob("*.json")) == ["step_00000030.json"]
    resumed = pretrain(Interrupting(), 60, out=tmp_path / "b", resume=True, **kw)

    assert state_equal(full, resumed)
    assert state_equal(FlowModel.load(tmp_path / "b" / "model.safetensors"), full)
    log = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log] == [50, 60]
    assert set(log[0]) == {"iter", "loss", "grad_norm", "lr", "nonfinite_skipped"} and log[0]["lr"] == 1e-3
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg["coupling"] == "ot" and cfg["data"] == "Interrupting(mixture)"

    # a finished run resumed with more steps trains on; a different setting is refused
    longer = pretrain(Interrupting(), 70, out=tmp_path / "b", resume=True, **kw)
    assert not state_equal(longer, full)
    with pytest.raises(ValueError, match="lr"):
        pretrain(Interrupting(), 80, out=tmp_path / "b", resume=True, **{**kw, "lr": 1e-2})


def test_save_load_round_trip_gives_identical_samples(tmp_path):
    data = get_task("gaussian").sample(500, generator=gen(4))
    rng = torch.get_rng_state()
    model = pretrain(data, 20, batch_size=32, hidden=(16,), progress=False)
    assert torch.equal(torch.get_rng_state(), rng)  # explicit generator: global RNG untouched
    model.save(tmp_path / "m.safetensors")
    loaded = FlowModel.load(tmp_path / "m.safetensors")
    assert torch.equal(model.sample(100, steps=10, seed=9), loaded.sample(100, steps=10, seed=9))
    # same seed and data, same weights: the run is a function of its arguments
    again = pretrain(data, 20, batch_size=32, hidden=(16,), progress=False)
    assert state_equal(model, again)


def test_ema_zero_returns_the_trained_weights(tmp_path):
    # ema = 0 makes the average equal the last iterate, which the checkpoint stores as "model"
    from tiltflow import checkpoint as ckpt

    data = torch.randn(200, 2, generator=gen(6))
    avg = pretrain(data, 10, batch_size=16, hidden=(8,), ema=0.0, out=tmp_path, progress=False)
    raw = FlowModel(MLPVelocity(2, (8,)))
    ckpt.load_latest(tmp_path, {"model": raw}, None, {})
    assert state_equal(avg, raw)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("data, match", [
    (torch.randn(10), r"data must have shape \(n, d\)"),
    (torch.empty(0, 2), "data is empty"),
    (torch.randn(10, 0), "data must have at least one feature"),
    ("not data", "data must be a tensor"),
])
def test_malformed_data_is_rejected(data, match):
    with pytest.raises(ValueError, match=match):
        pretrain(data, 5, progress=False)


def test_non_finite_data_reports_how_many_rows():
    x = torch.randn(100, 2)
    x[3, 0], x[7, 1], x[7, 0], x[50, 1] = float("nan"), float("inf"), float("nan"), -float("inf")
    with pytest.raises(ValueError, match="data has 3 of 100 rows with NaN or inf"):
        pretrain(x, 5, progress=False)
    with pytest.raises(ValueError, match="data has 2 of 2 rows with NaN or inf"):
        pretrain(lambda n, g: torch.full((n, 2), float("nan")), 5, progress=False)


def test_image_shaped_data_asks_for_a_convolutional_net():
    with pytest.raises(ValueError, match="data must have shape.*convolutional"):
        pretrain(torch.randn(10, 1, 8, 8), 5, progress=False)


@pytest.mark.parametrize("kwargs, name", [
    ({"iters": 0}, "iters"), ({"iters": -3}, "iters"), ({"batch_size": 0}, "batch_size"),
    ({"lr": 0.0}, "lr"), ({"lr": -1e-3}, "lr"), ({"ema": 1.0}, "ema"), ({"ema": -0.1}, "ema"),
    ({"coupling": "sinkhorn"}, "coupling"), ({"checkpoint_every": 0}, "checkpoint_every"),
    ({"lr_warmup": -1}, "lr_warmup"), ({"hidden": ()}, "hidden"), ({"grad_clip": -1.0}, "grad_clip"),
    ({"path": "cosine"}, "path"), ({"resume": True}, "resume"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    args = {"iters": 5, **kwargs}
    with pytest.raises(ValueError, match=name):
        pretrain(torch.randn(10, 2), args.pop("iters"), progress=False, **args)


def test_cond_must_pair_with_tensor_rows():
    with pytest.raises(ValueError, match="cond must have shape"):
        pretrain(torch.randn(10, 2), 5, cond=torch.randn(9, 1), progress=False)
    with pytest.raises(ValueError, match="cond must be paired"):
        pretrain(get_task("gaussian"), 5, cond=torch.randn(9, 1), progress=False)


def test_config_defaults_match_the_signature():
    # the dataclass is what config.json records; pretrain's own config-field arguments default to
    # None ("the config's value") and every other field is a keyword: a bare run records PretrainConfig()
    import inspect

    sig = inspect.signature(pretrain).parameters
    for name in ("iters", "hidden", "path"):
        assert sig[name].default is None, name
    assert any(p.kind is p.VAR_KEYWORD for p in sig.values())
    assert PretrainConfig().hidden == (256, 256, 256)


def test_a_config_object_and_the_deprecated_spellings_give_the_same_run(tmp_path):
    # PretrainConfig(...) as config=, iters=/network= and the deprecated steps=/model= spellings
    # must train the same weights (same seed, same stream); the old spellings warn naming the new
    x = torch.randn(64, 2)
    kw = dict(batch_size=16, hidden=(8,), progress=False)
    a = pretrain(x, 12, network="mlp", **kw)
    b = pretrain(x, config=PretrainConfig(iters=12, batch_size=16, hidden=(8,)), progress=False)
    with pytest.warns(DeprecationWarning, match="use `iters`"):
        c = pretrain(x, steps=12, **kw)
    with pytest.warns(DeprecationWarning, match="use `network`"):
        d = pretrain(x, 12, model="mlp", **kw)
    for m in (b, c, d):
        assert state_equal(a, m)
    with pytest.warns(DeprecationWarning, match="use `iters`"):
        assert PretrainConfig(steps=7).iters == 7
    with pytest.raises(ValueError, match="lr must be a positive"):
        PretrainConfig(lr=-1.0)            # configs validate when built, not when used
