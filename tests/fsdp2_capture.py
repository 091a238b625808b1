"""PilotTap and from_pilot on a Pilot sharded by FSDP2 (``fully_shard``, 2 processes, gloo on CPU): each rank
records one training forward of the sharded Pilot and the same forward of an unsharded copy, builds a Copilot from
each, and saves both.

Launched by tests/test_integrations.py:  torchrun --nproc_per_node 2 tests/fsdp2_capture.py OUTPUT_DIR
"""

import copy
import sys

import torch
import torch.distributed as dist
from conftest import VOCAB, tiny_pilot
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from hf_copilot import CopilotModel
from hf_copilot.pilot import PilotTap

dist.init_process_group("gloo")
rank = dist.get_rank()
pilot = tiny_pilot("llama").train()
plain = copy.deepcopy(pilot)
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
for layer in pilot.model.layers:
    fully_shard(layer, mesh=mesh)
fully_shard(pilot, mesh=mesh)
ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(rank))
records = {}
for name, model in (("sharded", pilot), ("plain", plain)):
    with PilotTap(model) as tap:
        model(input_ids=ids, labels=ids).loss.backward()
        (record,) = tap.pop_records()
    records[name] = {"class": type(tap.layers[0]).__name__, "input_states": record.input_states,
                     "hidden_states": record.hidden_states, "logits": record.logits,
                     "copilot": CopilotModel.from_pilot(model, num_hidden_layers=2).state_dict()}
torch.save(records, f"{sys.argv[1]}/records_rank{rank}.pt")
dist.destroy_process_group()
