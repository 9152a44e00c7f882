"""Rectified flow matching (training targets, timestep sampling and shift) and the Euler ODE sampler with CFG."""

from wamjax.diffusion.flow import add_noise, sample_time, sampling_schedule, shift_time, velocity_target
from wamjax.diffusion.sampler import SampleOutput, SamplerOptions, sample

__all__ = ["SampleOutput", "SamplerOptions", "add_noise", "sample", "sample_time", "sampling_schedule", "shift_time",
           "velocity_target"]
