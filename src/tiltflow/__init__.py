"""tiltflow: fine-tune flow and diffusion models by exponential tilts p* ∝ p_base · exp(r/λ).

    import tiltflow as tilt
    model = tilt.pretrain(tilt.tasks.toy2d.get_task("mixture"), iters=2000)
    ft = tilt.finetune(model, tilt.ExpectedReward(tilt.rewards.Linear([1.0, 0.5])), lam=1.0)
    ft = tilt.finetune(model, tilt.CVaR(r, level=0.1, tail="left"), lam=1.0)
"""

from . import couplings, divergences, integrators, metrics, paths, rewards, tasks, utilities
from .methods.finetune import FinetuneConfig, finetune
from .methods.fdc import FDCConfig, fdc
from .methods.gft import GFTConfig, gradual_finetune
from .methods.pretrain import PretrainConfig, pretrain
from .methods.sample_energy import EnergyConfig, EnergySampler, sample_energy
from . import estimators
from .estimators import crooks, crooks_two_sided, jarzynski
from .models import EGNNVelocity, FlowModel, GaussianMixtureVelocity, MLPVelocity, ResidualVelocity, SmallUNetVelocity
from .objectives import CVaR, ExpectedReward, solve_threshold
from .divergences import KL, OT, Renyi
from .utilities import (CVaRUtility, Entropy, ExpectedRewardUtility, ExperimentDesign, KernelDiversity,
                        MeanVariance, Novelty)
from .tasks import toy2d
from .tracking import Tracker, get_logger

__version__ = "0.1.0"

__all__ = [
    "FlowModel", "MLPVelocity", "GaussianMixtureVelocity", "ResidualVelocity", "EGNNVelocity", "SmallUNetVelocity",
    "pretrain", "PretrainConfig", "finetune", "FinetuneConfig",
    "gradual_finetune", "GFTConfig",
    "ExpectedReward", "CVaR", "solve_threshold",
    "fdc", "FDCConfig", "KL", "Renyi", "OT", "ExpectedRewardUtility", "CVaRUtility", "MeanVariance",
    "Novelty", "Entropy", "KernelDiversity", "ExperimentDesign",
    "paths", "integrators", "couplings", "metrics", "rewards", "tasks", "toy2d",
    "sample_energy", "EnergyConfig", "EnergySampler", "estimators", "jarzynski", "crooks", "crooks_two_sided",
    "Tracker", "get_logger",
]
