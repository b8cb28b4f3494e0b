"""Velocity networks and the FlowModel that puts one on a path."""

from .analytic import GaussianMixtureVelocity
from .egnn import EGNNVelocity
from .flow_model import FlowModel, ResidualVelocity, build_net
from .mlp import MLPVelocity

__all__ = ["FlowModel", "MLPVelocity", "EGNNVelocity", "GaussianMixtureVelocity", "ResidualVelocity", "build_net"]
