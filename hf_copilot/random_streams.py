"""The Copilot draws its random numbers (weight initialisation, dropout) beside the Pilot's, never from them.

Trainer seeds the global generators once. Every number the Copilot took from them would shift the Pilot's later
dropout masks, and the Pilot would train differently with the Copilot than without it.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def separate_random_stream(device, seed: int | None = None):
    """Runs the block on forked generators (the CPU's and ``device``'s when it is a CUDA device) and restores the
    global ones afterwards. With ``seed`` the block's stream starts there, so it depends on nothing outside it."""
    device = torch.device(device)
    accelerators = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=accelerators):
        if seed is not None:
            torch.random.default_generator.manual_seed(seed)
            for accelerator in accelerators:
                with torch.cuda.device(accelerator):
                    torch.cuda.manual_seed(seed)
        yield
