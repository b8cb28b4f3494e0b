"""Velocity networks and the FlowModel that puts one on a path."""

from .analytic import GaussianMixtureVelocity
from .egnn import EGNNVelocity
# diffusers adapters: diffusers and peft are imported only when one is used (tiltflow[diffusers])
from .diffusers_adapter import (SD3Velocity, UNetVelocity, add_lora, encode_prompts, from_diffusers,
                                load_lora, lora_trainable, save_lora, set_prompt_encoder)
from .flow_model import FlowModel, ResidualVelocity, build_net
from .mlp import MLPVelocity
from .se3 import SE3Velocity
from .unet import FixedCondVelocity, SmallUNetVelocity

__all__ = ["FlowModel", "MLPVelocity", "EGNNVelocity", "SE3Velocity", "GaussianMixtureVelocity", "ResidualVelocity",
           "build_net", "from_diffusers", "SD3Velocity", "UNetVelocity", "encode_prompts", "add_lora", "save_lora",
           "load_lora", "lora_trainable", "set_prompt_encoder", "SmallUNetVelocity", "FixedCondVelocity"]
