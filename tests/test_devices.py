"""Device cleanliness without a GPU: every entry point under tests/devicecheck.py, and device="auto".

Under DefaultDeviceCheck a tensor that tiltflow makes without a device (or with the literal
"cpu") is a host tensor, and mixing it with the data (the test's tensors) fails as it would on
a GPU; so would a draw whose generator sits on the other side. Each run below is tiny (about a
second): the point is that every line is reached with the data on "the device", not the
numbers. The first tests check the checker itself on lines compiled as if they were tiltflow's,
each a bug class seen on an H200 (issue 17): the quantile levels of metrics.reward_summary, the
weights of metrics.cvar, the randperm of adjoint_matching.loss_times with a CUDA generator.
"""

from __future__ import annotations

import json
import os
import textwrap

import pytest
import torch

import tiltflow as tilt
from tiltflow import cli, metrics
from tiltflow import distributed as dist
from tiltflow.models import FlowModel, GaussianMixtureVelocity
from tiltflow.rewards import Linear
from tiltflow.solvers import SOLVERS

from devicecheck import SRC, DefaultDeviceCheck

MU = torch.tensor([1.0, -0.5])
COV = torch.tensor([[0.49, 0.1], [0.1, 0.3]])
A_LIN = torch.tensor([1.0, 0.5])
FT = dict(iters=2, batch_size=8, steps=4, n_offline=16, progress=False, device="cpu")


def gaussian_base():
    return FlowModel(GaussianMixtureVelocity([1.0], MU[None], COV[None]))


@pytest.fixture
def check():
    with DefaultDeviceCheck():
        yield


# --- the checker --------------------------------------------------------------------------------

def _as_tiltflow(src: str) -> dict:
    """Run `src` as if it were a module of src/tiltflow (its frames' file lies there)."""
    ns = {"torch": torch}
    exec(compile(textwrap.dedent(src), os.path.join(SRC, "_devicecheck_probe.py"), "exec"), ns)
    return ns


PROBES = _as_tiltflow("""
    def quantiles_on_default(r):                 # metrics.reward_summary before the fix
        return torch.quantile(r, torch.tensor([0.1, 0.5], dtype=r.dtype))
    def quantiles_on_data(r):
        return torch.quantile(r, torch.tensor([0.1, 0.5], dtype=r.dtype, device=r.device))
    def weights_on_default(s):                    # metrics.cvar before the fix
        return ((2.5 - torch.arange(s.shape[0], dtype=s.dtype)).clamp(0, 1) * s).sum()
    def weights_said_cpu(s):
        return (torch.ones(s.shape[0], device="cpu") * s).sum()
    def randperm_with_data_generator(n, gen):    # adjoint_matching.loss_times before the fix
        return torch.randperm(n, generator=gen)
    def randperm_on_generator_device(n, gen):
        return torch.randperm(n, generator=gen, device=gen.device)
    def host_generator_for_data(x):
        g = torch.Generator().manual_seed(0)
        return torch.randn(x.shape, generator=g, device=x.device)
    def allowed(x):                               # CPU scalars, CPU indices and explicit moves are fine
        i = torch.arange(2)
        return x[i] * torch.tensor(2.0) + torch.ones(2, x.shape[1]).to(x) + torch.zeros(1, device=x.device)
""")


@pytest.mark.parametrize("name, arg, message", [
    ("quantiles_on_default", torch.randn(20), "mixes a tensor on the data's device"),
    ("weights_on_default", torch.randn(20), "mixes a tensor on the data's device"),
    ("weights_said_cpu", torch.randn(20), "mixes a tensor on the data's device"),
    ("host_generator_for_data", torch.randn(3, 2), "host generator"),
])
def test_the_check_catches_default_device_tensors_and_generators(check, name, arg, message):
    with pytest.raises(AssertionError, match=message) as e:
        PROBES[name](arg)
    assert "_devicecheck_probe.py:" in str(e.value)       # names the line


def test_the_check_catches_a_draw_on_the_default_device_with_the_data_generator(check):
    gen = torch.Generator().manual_seed(0)                 # the test's generator stands for the data's (CUDA) one
    with pytest.raises(AssertionError, match="randperm draws on the host with a generator on the data's device"):
        PROBES["randperm_with_data_generator"](5, gen)
    assert sorted(PROBES["randperm_on_generator_device"](5, gen).tolist()) == list(range(5))


def test_the_check_lets_fixed_code_and_torch_s_own_cross_device_rules_pass(check):
    r, x = torch.randn(20), torch.randn(3, 2)
    torch.testing.assert_close(PROBES["quantiles_on_data"](r), torch.quantile(r, torch.tensor([0.1, 0.5])))
    assert PROBES["allowed"](x).shape == (2, 2)


# --- every entry point under the check, on device="cpu" -----------------------------------------

def _finite(x):
    assert torch.isfinite(x).all()


def test_flow_model_sample_and_log_prob(check):
    m = gaussian_base()
    _finite(m.sample(5, steps=3))
    _finite(m.sample(5, steps=3, sde=True))
    _finite(m.sample(5, steps=3, sde=True, scheme="heun"))
    _finite(m.log_prob(torch.randn(5, 2), steps=3))


@pytest.mark.parametrize("objective", ["expected", "cvar-right", "cvar-left", "cvar-right-tracked",
                                       "cvar-left-tracked"])
def test_finetune_objectives(check, objective):
    r = Linear(A_LIN)
    obj = tilt.ExpectedReward(r) if objective == "expected" else tilt.CVaR(
        r, 0.2, tail=objective.split("-")[1], track=objective.endswith("tracked"))
    _finite(tilt.finetune(gaussian_base(), obj, **FT).sample(4, steps=3))


@pytest.mark.parametrize("solver", SOLVERS)
def test_finetune_every_solver_with_loss_times(check, solver):
    tilt.finetune(gaussian_base(), Linear(A_LIN), solver=solver, n_loss_times=2, **FT)


@pytest.mark.parametrize("options", [dict(grad_accum=2), dict(mixed_precision="bf16"),
                                     dict(lr_final=1e-4, loss_chunk=1), dict(scheme="heun")])
def test_finetune_options(check, options, tmp_path):
    tilt.finetune(gaussian_base(), tilt.CVaR(Linear(A_LIN), 0.2), out=tmp_path, **FT, **options)


def test_nets_log_z(check):
    from tiltflow.solvers.nets import NETS
    base = gaussian_base()
    assert torch.isfinite(torch.tensor(NETS().log_Z(base, base, Linear(A_LIN), n=8, steps=4)))


def test_pretrain_mlp(check, tmp_path):
    data = torch.randn(64, 2)
    kw = dict(batch_size=16, hidden=(8, 8), progress=False, device="cpu")
    tilt.pretrain(data, 3, out=tmp_path / "a", **kw)
    tilt.pretrain(data, 3, coupling="ot", cond=torch.randn(64, 1), grad_accum=2, **kw)
    tilt.pretrain(tilt.toy2d.get_task("moons"), 3, **kw)


def test_pretrain_unet_and_finetune_over_prompts(check, tmp_path):
    from tiltflow.models.unet import SmallUNetVelocity
    from tiltflow.tasks import digits
    c = digits.one_hot(torch.arange(16) % 10)
    base = tilt.pretrain(torch.randn(16, 1, 8, 8), 2, network=SmallUNetVelocity(channels=(4, 8)), cond=c,
                         batch_size=4, progress=False, device="cpu", out=tmp_path / "pre")
    r = digits.DigitReward(digits.DigitClassifier().eval())
    for per_prompt in (False, True):
        ft = tilt.finetune(base, tilt.CVaR(r, 0.2, per_prompt=per_prompt), prompts=digits.prompts(), **FT)
    x, c = digits.sample(ft, 2, steps=3)
    _finite(r(x, c))
    assert torch.isfinite(torch.tensor(digits.path_kl(ft, base, n=4, steps=3, cond=c[:1])))


class _Pipe:
    """Just enough of a diffusers pipeline for from_diffusers (test_diffusers._FakePipe)."""

    def __init__(self, transformer=None, unet=None, scheduler=None):
        self.transformer, self.unet, self.scheduler, self.components = transformer, unet, scheduler, {}


@pytest.mark.parametrize("family", ["sd3", "sd15"])
def test_diffusers_models_sample_and_finetune(check, family):
    """Tiny SD3 transformer (LoRA, two prompts, the scheduler's shifted grid) and SD1.5 U-Net
    (DiscreteVP path, full copy, fixed cond): rollouts, adjoint and loss under the check."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from tiltflow.models import diffusers_adapter as da
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    if family == "sd3":
        net = diffusers.SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16,
            pos_embed_max_size=16)
        sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
        base = da.from_diffusers(_Pipe(transformer=net, scheduler=sched))
        cond = {"encoder_hidden_states": torch.randn(2, 5, 32, generator=g),
                "pooled_projections": torch.randn(2, 16, generator=g)}
        kw = dict(prompts=cond, lora_rank=2, objective_=tilt.CVaR(lambda x, cond=None: x.mean(dim=(1, 2, 3)), 0.5))
    else:
        net = diffusers.UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4)
        sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                        beta_end=0.012)
        base = da.from_diffusers(_Pipe(unet=net, scheduler=sched))
        cond = {"encoder_hidden_states": torch.randn(1, 5, 16, generator=g)}
        kw = dict(cond=cond, objective_=tilt.ExpectedReward(lambda x, cond=None: x.mean(dim=(1, 2, 3))))
    objective = kw.pop("objective_")
    ft = tilt.finetune(base, objective, **{**FT, "batch_size": 2, "steps": 3, "n_offline": 4}, **kw)
    c1 = {k: v[:1] for k, v in cond.items()}
    _finite(ft.sample(2, steps=3, cond=c1))
    _finite(ft.sample(2, steps=3, cond=c1, sde=True))


def test_egnn_conformers(check, tmp_path):
    pytest.importorskip("rdkit")
    from tiltflow.tasks import molecules
    task = molecules.conformers("CCO", n=8, seed=0, cache_dir=tmp_path)
    base = tilt.pretrain(task, 2, network="egnn", cond=task.graph, hidden=(4, 4), batch_size=4, progress=False,
                         device="cpu")
    ft = tilt.finetune(base, tilt.CVaR(task.reward("mmff"), 0.25, tail="left"), lam=100.0, **FT)
    tilt.finetune(base, task.reward("rg"), **FT)
    task.evaluate(ft.sample(4, steps=3))
    task.sample(3, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("utility, divergence, density", [
    ("entropy", "kl", "tilts"), ("mean-variance", "renyi", "tilts"), ("cvar", "ot", "tilts"),
    ("novelty", "kl", "model"), ("diversity", "kl", "tilts"), ("design", "kl", "tilts")])
def test_fdc(check, utility, divergence, density):
    r = Linear(A_LIN)
    u = {"entropy": tilt.Entropy(steps=3), "mean-variance": tilt.MeanVariance(r), "cvar": tilt.CVaRUtility(r, 0.2),
         "novelty": tilt.Novelty(torch.randn(8, 2)), "diversity": tilt.KernelDiversity(),
         "design": tilt.ExperimentDesign()}[utility]
    d = {"kl": tilt.KL(steps=3), "renyi": tilt.Renyi(0.5, steps=3), "ot": tilt.OT(n=8)}[divergence]
    tilt.fdc(gaussian_base(), u, d, iters_outer=1, n_eval=8, eval_steps=3, n_kl=4, density=density, **FT)


@pytest.mark.parametrize("options", [dict(coupling="independent"), dict(coupling="ot"), dict(coupling="sinkhorn"),
                                     dict(coupling="independent", variant="marginal"),
                                     dict(coupling="independent", flow="stochastic")])
def test_gradual_finetune(check, options, tmp_path):
    if options["coupling"] != "independent":
        pytest.importorskip("ot")
    tilt.gradual_finetune(gaussian_base(), torch.randn(32, 2), stages=2, iters_per_stage=2, batch_size=8,
                          n_pretrained=16, pretrained_steps=3, n_ref=8, progress=False, device="cpu",
                          out=tmp_path, **options)


@pytest.mark.parametrize("network", ["mlp", "egnn"])
def test_sample_energy(check, network, tmp_path):
    from tiltflow.tasks.energies import get_energy
    energy = get_energy("dw4" if network == "egnn" else "gmm40")
    s = tilt.sample_energy(energy, energy.dim if network == "egnn" else 2, network=network, hidden=(8, 8),
                           iters=4, samples_per_rollout=8, iters_per_rollout=2, batch_size=8, buffer_size=16,
                           steps=3, progress=False, device="cpu", out=tmp_path)
    _finite(s.sample(4))


def test_estimators(check):
    base, E = gaussian_base(), (lambda x: 0.5 * x.pow(2).sum(1))
    assert torch.isfinite(torch.tensor(tilt.jarzynski(base, base, Linear(A_LIN), 1.0, n=8, steps=3).log_Z))
    assert torch.isfinite(torch.tensor(tilt.crooks(base, lambda x: -E(x), n=8, steps=3).log_Z))
    res = tilt.crooks_two_sided(base, lambda x: -E(x), torch.randn(8, 2), n=8, steps=3)
    assert torch.isfinite(torch.tensor(res.log_Z))


def test_metrics_and_task_samplers(check):
    r, x, y = torch.randn(50), torch.randn(20, 2), torch.randn(21, 2)
    metrics.reward_summary(r)
    metrics.cvar(r, 0.1, "left")
    metrics.energy_distance(x, y)
    metrics.sliced_wasserstein(x, y)
    metrics.sliced_wasserstein(x, y, generator=torch.Generator().manual_seed(0))
    metrics.mean_pairwise_distance(x)
    metrics.effective_sample_size(r)
    metrics.mean_and_cov(x)
    gen = torch.Generator().manual_seed(0)    # samplers draw on their generator's device
    for name in tilt.toy2d.TASKS:
        task = tilt.toy2d.get_task(name)
        _finite(task.sample(5, generator=gen))
        if hasattr(task, "log_prob"):
            task.log_prob(x)
    from tiltflow.tasks.energies import get_energy
    for name in ("gmm40", "manywell"):
        _finite(get_energy(name).sample(5, generator=gen))


def test_cli_commands(check, tmp_path, capsys):
    d = str(tmp_path)
    run = lambda *a: cli.main([*a, "--no-progress"])  # noqa: E731
    assert run("pretrain", "--steps", "3", "--batch-size", "16", "--hidden", "8,8", "--out", f"{d}/pre") == 0
    assert run("finetune", "--run", f"{d}/pre", "--iters", "2", "--batch-size", "8", "--steps", "4", "--n-offline",
               "16", "--n-eval", "20", "--n-kl", "5", "--objective", "cvar", "--out", f"{d}/ft") == 0
    assert run("sample", "--run", f"{d}/ft", "--n", "5", "--steps", "3", "--sde", "--out", f"{d}/x.npy") == 0
    assert run("evaluate", "--run", f"{d}/ft", "--n", "20", "--steps", "3", "--n-loglik", "5",
               "--out", f"{d}/ev.json") == 0
    assert run("gft", "--run", f"{d}/pre", "--target", f"{d}/x.npy", "--stages", "2", "--steps-per-stage", "2",
               "--batch-size", "4", "--n-pretrained", "8", "--pretrained-steps", "3", "--n-ref", "4",
               "--out", f"{d}/gft") == 0
    assert run("fdc", "--run", f"{d}/pre", "--iters-outer", "1", "--iters", "2", "--batch-size", "8", "--steps", "4",
               "--n-eval", "8", "--eval-steps", "3", "--n-kl", "4", "--out", f"{d}/fdc") == 0
    assert run("sample-energy", "--energy", "gmm40", "--iters", "1", "--samples-per-rollout", "8",
               "--iters-per-rollout", "1", "--batch-size", "8", "--buffer-size", "16", "--steps", "3",
               "--hidden", "8,8", "--n-samples", "8", "--n-eval", "8", "--out", f"{d}/en") == 0
    assert run("demo", "--fast", "--pretrain-steps", "3", "--pretrain-batch-size", "16", "--iters", "2",
               "--batch-size", "8", "--steps", "4", "--n-eval", "20", "--eval-steps", "3", "--n-kl", "5",
               "--hidden", "8,8", "--out", f"{d}/demo") == 0
    # the run folders record the device "auto" resolved to, so a resume elsewhere is refused, not garbled
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["device"] == "cpu"


# --- device="auto" ------------------------------------------------------------------------------

def test_auto_resolves_to_the_cpu_here_and_to_an_accelerator_model_s_own_device():
    cpu_model, meta_model = gaussian_base(), torch.nn.Linear(2, 2, device="meta")
    here = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    assert dist.device("auto") == here
    assert dist.device("auto", cpu_model) == here            # a CPU model moves to the GPU if there is one
    # a model already on an accelerator stays there (meta stands in for one: no GPU here)
    assert dist.device("auto", meta_model) == torch.device("meta")
    assert dist.device("auto", gaussian_base().to("meta")) == torch.device("meta")
    assert dist.device("cpu", meta_model) == torch.device("cpu")        # explicit names win
    with pytest.raises(ValueError, match="gpu0"):
        dist.device("gpu0")


def test_auto_is_the_default_of_every_entry_point():
    from tiltflow.methods.sample_energy import EnergyConfig
    for cfg in (tilt.FinetuneConfig(), tilt.PretrainConfig(), tilt.GFTConfig(), EnergyConfig(),
                cli.DemoConfig(), cli.MoleculesConfig(), cli.DigitsConfig()):
        assert cfg.device == "auto", type(cfg).__name__
    import inspect
    from tiltflow.tasks import digits
    assert inspect.signature(digits.pretrain_base).parameters["device"].default == "auto"
    p = cli.build_parser()
    assert p.parse_args(["sample", "--run", "r"]).device == "auto"
    assert p.parse_args(["evaluate", "--run", "r"]).device == "auto"


def test_device_name_is_the_type_under_a_launcher(monkeypatch):
    """Run folders record the resolved device; under torchrun the ranks' cuda:0, cuda:1, ... are one "cuda"
    (every rank computes the same config hash)."""
    assert dist.device_name(torch.device("cuda", 1)) == "cuda:1"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert dist.device_name(torch.device("cuda", 1)) == "cuda"
