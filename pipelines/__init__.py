"""Workloads: plain PyTorch pipelines that run without `residency` attached.

`pipelines.world_model` is the causal diffusion world model the project exists to run.
"""
