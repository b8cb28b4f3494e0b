"""Velocity networks and the FlowModel that puts one on a path."""

from .analytic import GaussianMixtureVelocity
from .flow_model import FlowModel, ResidualVelocity, build_net
from .mlp import MLPVelocity

__all__ = ["FlowModel", "MLPVelocity", "GaussianMixtureVelocity", "ResidualVelocity", "build_net"]
