"""Joint training under torchrun (2 processes, gloo on CPU); each rank saves its final Copilot weights.

Launched by tests/test_callback.py:  torchrun --nproc_per_node 2 tests/ddp_train.py OUTPUT_DIR
"""

import sys

import torch
import torch.distributed as dist
from conftest import tiny_pilot
from test_callback import pattern_dataset, trainer_args
from transformers import Trainer

from hf_copilot import CopilotCallback, CopilotModel

output = sys.argv[1]
copilot = CopilotModel.from_pilot(tiny_pilot("llama"), num_hidden_layers=2)
trainer = Trainer(model=tiny_pilot("llama"), args=trainer_args(output, max_steps=3, ddp_backend="gloo"),
                  train_dataset=pattern_dataset(), callbacks=[CopilotCallback(copilot, batch_size=4)])
trainer.train()
torch.save(copilot.state_dict(), f"{output}/copilot_rank{dist.get_rank()}.pt")
