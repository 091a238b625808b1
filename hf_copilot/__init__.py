"""hf_copilot: Transformer Copilot (Zou et al., NeurIPS 2025) for the Hugging Face stack.

Importing the package registers ``CopilotConfig`` / ``CopilotModel`` with ``AutoConfig`` / ``AutoModel``, so a saved
Copilot loads with ``AutoModel.from_pretrained(path)`` in any process that imported ``hf_copilot``.
"""

from transformers import AutoConfig, AutoModel

from .callback import CopilotCallback
from .configuration_copilot import PAPER_LORA, CopilotConfig
from .copilot_metrics import CopilotMetrics
from .errors import IGNORE_INDEX, CompactErrors, dense_errors, shift_right
from .generation import CopilotLogitsProcessor
from .mistake_batch import MistakeBatch
from .mistake_log import MistakeLog
from .modeling_copilot import CopilotCache, CopilotModel, CopilotOutput, OwnCorrections
from .pilot import PilotTap
from .pilot_record import PilotRecord
from .safe_io import DamagedFileError
from .training import CopilotTrainingConfig, CopilotUpdater, train_copilot

AutoConfig.register(CopilotConfig.model_type, CopilotConfig, exist_ok=True)
AutoModel.register(CopilotConfig, CopilotModel, exist_ok=True)

__version__ = "0.1.0.dev0"

__all__ = [
    "IGNORE_INDEX",
    "CompactErrors",
    "CopilotCache",
    "CopilotCallback",
    "CopilotConfig",
    "CopilotLogitsProcessor",
    "CopilotMetrics",
    "CopilotModel",
    "CopilotOutput",
    "CopilotTrainingConfig",
    "CopilotUpdater",
    "DamagedFileError",
    "MistakeBatch",
    "MistakeLog",
    "OwnCorrections",
    "PAPER_LORA",
    "PilotRecord",
    "PilotTap",
    "dense_errors",
    "shift_right",
    "train_copilot",
]
