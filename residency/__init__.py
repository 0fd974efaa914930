"""residency: VRAM as a managed cache for diffusion world models on consumer GPUs.

The data layer (formats, checkpoint, device, workload, plan, simulate) is the public API.
"""

__version__ = "0.1.0"
