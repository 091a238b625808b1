"""Joint training under torchrun (2 processes, gloo on CPU): a run that writes a checkpoint at step 2, then a fresh
run resumed from that checkpoint. Each rank saves both final Copilots, to compare with each other and across ranks.

Both runs evaluate every 2 steps on 8 rows (4 per rank) and keep the best Copilot: each rank saves its evaluation
log entries, to compare across ranks and with the rows' labelled tokens.

Launched by tests/test_integrations.py:  torchrun --nproc_per_node 2 tests/distributed_train.py OUTPUT_DIR ENGINE
with ENGINE one of ddp, zero2, zero3 (DeepSpeed with DS_ACCELERATOR=cpu).
"""

import json
import sys

import torch
import torch.distributed as dist
from conftest import tiny_pilot
from test_callback import pattern_dataset, trainer_args
from transformers import AutoModelForCausalLM, Trainer

from hf_copilot import CopilotCallback, CopilotModel
from hf_copilot.pilot_shape import gathered_parameters

output, engine = sys.argv[1:3]
if engine.startswith("zero"):
    import deepspeed

    deepspeed.init_distributed("gloo")  # before a model is built under ZeRO-3, which partitions it across the ranks


def zero(stage):
    return {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "train_batch_size": "auto", "zero_force_ds_cpu_optimizer": False}


def train(run, resume=None):
    args = trainer_args(f"{output}/{run}", max_steps=4, save_strategy="steps", save_steps=2, ddp_backend="gloo",
                        eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=4,
                        deepspeed=zero(int(engine[-1])) if engine.startswith("zero") else None)
    torch.manual_seed(0)
    # Built after the arguments: under ZeRO-3 transformers then partitions the Pilot as it is created.
    pilot = AutoModelForCausalLM.from_config(tiny_pilot("llama").config)
    copilot = CopilotModel.from_pilot(pilot, num_hidden_layers=2)
    with gathered_parameters(pilot.model.layers[0].parameters()):
        copied = all(torch.equal(c, p) for c, p in zip(copilot.layers[0].mlp.parameters(),
                                                       pilot.model.layers[0].mlp.parameters()))
    rank = dist.get_rank()
    if rank == 0:
        torch.save({key: tensor.clone() for key, tensor in copilot.state_dict().items()}, f"{output}/{run}_start.pt")
    callback = CopilotCallback(copilot, batch_size=4, save_mistake_log=True, resume_from=resume, load_best_at_end=True)
    trainer = Trainer(model=pilot, args=args, train_dataset=pattern_dataset(), eval_dataset=pattern_dataset(8, seed=1),
                      callbacks=[callback])
    trainer.train(resume_from_checkpoint=resume)
    with open(f"{output}/{run}_rank{rank}_evaluations.json", "w") as file:
        json.dump([entry for entry in trainer.state.log_history if "eval_loss" in entry], file)
    torch.save(copilot.state_dict(), f"{output}/{run}_rank{rank}.pt")
    with open(f"{output}/{run}_rank{rank}.json", "w") as file:
        json.dump({"vocab_size": copilot.config.vocab_size, "copied_layer_0": copied}, file)


train("full")
train("resumed", resume=f"{output}/full/checkpoint-2")
