"""Ready-made tasks: base data, rewards and metrics (toy2d, energies, molecules and de novo design, digits)."""

from . import design, design_rewards, digits, energies, molecules, toy2d
