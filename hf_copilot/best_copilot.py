"""BestCopilot: the Copilot state with the best evaluation so far, kept beside joint training the way Trainer keeps
its best Pilot checkpoint (``load_best_model_at_end``), so that a Copilot that got worse late is not what is saved."""

from __future__ import annotations

import math
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .safe_io import atomic_write

BEST_FILE = "best_copilot.safetensors"
BEST_METRICS = {"heldout_ratio": "lower", "loss": "lower", "rectified_accuracy": "higher"}
"""The evaluation metrics that can pick the best Copilot, and which way is better."""


class BestCopilot:
    """The trainable weights (a LoRA Copilot's adapters, else every weight) of the best-scoring state so far, on the
    CPU, with its score and step.

    Args:
        metric: a key of :data:`BEST_METRICS`, read from the evaluation whose metrics start with ``eval_``, or a full
            logged key such as ``"eval_arc_copilot_heldout_ratio"`` (several evaluation datasets) ending with one.
        name: the callback's name, which prefixes its metrics.
    """

    def __init__(self, metric: str, name: str):
        short = next((known for known in BEST_METRICS if metric == known or metric.endswith(f"_{name}_{known}")), None)
        if short is None:
            raise ValueError(f"best_metric={metric!r}: pick one of {sorted(BEST_METRICS)}, or a full evaluation key "
                             f"ending with one of them, e.g. 'eval_<dataset>_{name}_heldout_ratio'.")
        self.key = metric if metric != short else f"eval_{name}_{short}"
        self.lower_is_better = BEST_METRICS[short] == "lower"
        self.value = math.nan
        self.step: int | None = None
        self.weights: dict[str, torch.Tensor] | None = None

    def consider(self, metrics: dict, step: int, copilot) -> bool:
        """Keeps ``copilot``'s current weights when ``metrics`` holds :attr:`key` with a better value than kept;
        returns whether it did. A NaN is never better."""
        value = metrics.get(self.key)
        if value is None or not math.isfinite(value):
            return False
        if self.step is not None and not (value < self.value if self.lower_is_better else value > self.value):
            return False
        self.value, self.step = float(value), step
        self.weights = {name: parameter.detach().to("cpu", copy=True)
                        for name, parameter in copilot.named_parameters() if parameter.requires_grad}
        return True

    def restore(self, copilot) -> None:
        """Puts the kept weights back into ``copilot`` (in place, on its device)."""
        parameters = dict(copilot.named_parameters())
        with torch.no_grad():
            for name, tensor in self.weights.items():
                parameters[name].copy_(tensor)

    def save(self, folder: str | os.PathLike) -> str | None:
        """Writes the kept state into ``folder``; returns the file name, or None when nothing is kept yet."""
        if self.weights is None:
            return None
        metadata = {"key": self.key, "value": repr(self.value), "step": str(self.step)}
        atomic_write(os.path.join(folder, BEST_FILE),
                     lambda path: save_file({n: t.contiguous() for n, t in self.weights.items()}, path, metadata))
        return BEST_FILE

    def load(self, folder: str | os.PathLike) -> None:
        """Reads the state :meth:`save` wrote into ``folder`` (kept as it is when the folder has none, or one that
        another metric chose)."""
        path = os.path.join(folder, BEST_FILE)
        if not os.path.isfile(path):
            return
        with safe_open(path, framework="pt") as file:
            metadata = file.metadata()
            if metadata.get("key") != self.key:
                return
            self.weights = {name: file.get_tensor(name) for name in file.keys()}
        self.value, self.step = float(metadata["value"]), int(metadata["step"])
