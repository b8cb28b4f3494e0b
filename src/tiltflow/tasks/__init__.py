"""Ready-made tasks: base data, rewards and metrics (toy2d, energies, molecules, digits)."""

from . import digits, molecules
