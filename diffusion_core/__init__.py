"""diffusion_core: the diffusion math, samplers, guidance and networks. Imports no engine (ray, mlflow, dvc)."""

from .diffusion import GaussianDiffusion
from .schedules import NoiseSchedule

__all__ = ["GaussianDiffusion", "NoiseSchedule"]
__version__ = "0.1.0"
