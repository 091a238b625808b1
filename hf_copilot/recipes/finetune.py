"""Supervised fine-tuning of a Pilot on instruction examples, with the Copilot learning alongside.

This is the plain ``transformers.Trainer`` path a user would write themselves (prompt tokens masked out of the
loss, optional LoRA through ``peft``), plus :class:`~hf_copilot.CopilotCallback`. The CLI and the quality
benchmark both go through :func:`finetune`, so what they measure is what users run.
"""

from __future__ import annotations

import json
from fnmatch import fnmatch
from pathlib import Path

import torch
from datasets import Dataset
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                          TrainingArguments)
from transformers.trainer_utils import get_last_checkpoint

from ..callback import CopilotCallback
from ..configuration_copilot import LORA_TARGETS
from ..errors import IGNORE_INDEX
from ..safe_io import replace_folder_files, staging_folder
from .prompts import encode_example, prepare_tokenizer
from .tasks import Example, TaskFormat

ADAPTER_FILES = ("adapter_config.json", "adapter_model.*")
FULL_MODEL_FILES = ("model.safetensors", "model-*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
                    "pytorch_model.bin.index.json")
"""The files that decide what :func:`load_pilot` loads: :func:`save_pilot` removes those it did not write itself."""


def add_lora(model, rank: int, dropout: float = 0.0):
    """Wrap ``model`` with LoRA adapters on every attention and MLP projection (the paper: r=32, alpha=2r,
    dropout 0.05)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise ImportError("LoRA fine-tuning needs peft: pip install 'hf_copilot[real]'.") from error
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [name for name in LORA_TARGETS if name in names]
    if not targets:
        raise ValueError(f"None of the LoRA target modules {LORA_TARGETS} exist in {type(model).__name__}.")
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def finetune(pilot, tokenizer, examples: list[Example], task_format: TaskFormat, output_dir: str | Path, *,
             copilot=None, epochs: float = 1.0, max_steps: int = -1, learning_rate: float = 2e-4,
             batch_size: int = 8, max_length: int = 256, seed: int = 0, progress: bool = True,
             copilot_options: dict | None = None, callbacks=(), save_each_epoch: bool = False,
             eval_examples: list[Example] = ()) -> Trainer:
    """Fine-tune ``pilot`` (a plain or peft model) on ``examples``; train ``copilot`` alongside when given.

    ``callbacks`` join the Trainer's (e.g. more :class:`CopilotCallback` s with their own ``name``, to train
    Copilots of several sizes beside one Pilot). ``save_each_epoch`` writes a checkpoint
    (Pilot, tokenizer, Copilots) after every epoch and resumes from the newest one found in ``output_dir``, so an
    interrupted run continues where it stopped. ``eval_examples`` are evaluated after every epoch, which adds the
    Copilots' metrics to the log (see :class:`~hf_copilot.CopilotMetrics`). Returns the finished Trainer (its ``state.log_history`` holds the
    Pilot and Copilot losses). The Pilot's own training is identical with and without Copilots.
    """
    if not examples:
        raise ValueError("No training examples.")
    prepare_tokenizer(tokenizer)
    def dataset(items):
        return Dataset.from_list([encode_example(example, tokenizer, task_format, max_length) for example in items])

    args = TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=batch_size, num_train_epochs=epochs,
        max_steps=max_steps, learning_rate=learning_rate, lr_scheduler_type="cosine", warmup_steps=0.03,
        weight_decay=0.0, logging_steps=10, save_strategy="epoch" if save_each_epoch else "no", report_to=[],
        eval_strategy="epoch" if eval_examples else "no", per_device_eval_batch_size=batch_size,
        seed=seed, data_seed=seed,
        train_sampling_strategy="group_by_length", disable_tqdm=not progress, remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
    )
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    trainer = Trainer(model=pilot, args=args, train_dataset=dataset(examples), data_collator=collator,
                      eval_dataset=dataset(eval_examples) if eval_examples else None, processing_class=tokenizer)
    for callback in callbacks:
        if isinstance(callback, CopilotCallback):
            callback.attach(trainer)  # ahead of the reporters, as the Copilot's metrics need
        else:
            trainer.add_callback(callback)
    if copilot is not None:
        CopilotCallback(copilot, save_dir=str(Path(output_dir) / "copilot"),
                        **{"seed": seed, **(copilot_options or {})}).attach(trainer)
    resume = get_last_checkpoint(str(output_dir)) if save_each_epoch and Path(output_dir).is_dir() else None
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def save_pilot(pilot, tokenizer, folder: str | Path) -> Path:
    """Save the fine-tuned Pilot: the full model, or only the LoRA adapter (which names its base folder).

    The files are written aside and each moved into place by an atomic rename; then the model files of an earlier
    save into ``folder`` that this one did not write are removed, so that a full model saved over an adapter (or the
    reverse) is what loads. Other files in ``folder`` are left alone.
    """
    folder = Path(folder)
    with staging_folder(folder) as staging:
        pilot.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        written = set(replace_folder_files(staging, folder))
    for stale in _files(folder, ADAPTER_FILES + FULL_MODEL_FILES) - written:
        (folder / stale).unlink()
    return folder


def _files(folder: Path, patterns: tuple[str, ...]) -> set[str]:
    return {path.name for path in folder.iterdir()
            if path.is_file() and any(fnmatch(path.name, pattern) for pattern in patterns)}


def check_pilot_folder(folder: str | Path) -> Path:
    """Raises unless ``folder`` holds a saved Pilot (a model or a LoRA adapter); cheap, so callers check first."""
    folder = Path(folder)
    if not folder.is_dir():  # never fall through to a Hub download of a mistyped name
        raise FileNotFoundError(f"No Pilot folder at {str(folder)!r}: pass a folder written by save_pilot / "
                                "save_pretrained (hf-copilot train writes <output>/pilot).")
    if not any((folder / name).is_file() for name in ("config.json", "adapter_config.json")):
        raise FileNotFoundError(f"{folder} holds no saved model (neither config.json nor adapter_config.json): "
                                "pass a folder written by save_pilot / save_pretrained (hf-copilot train writes "
                                "<output>/pilot).")
    return folder


def _adapter_base(folder: Path) -> str:
    """The base model folder a saved LoRA adapter was trained on; it must still exist."""
    base = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    if not Path(base).is_dir():
        raise FileNotFoundError(f"{folder} is a LoRA adapter whose base model folder {base} no longer exists.")
    return base


def load_pilot_config(folder: str | Path):
    """A saved Pilot's config without its weights (a LoRA adapter's is its base model's)."""
    folder = check_pilot_folder(folder)
    if (folder / "config.json").is_file():
        return AutoConfig.from_pretrained(folder)
    return AutoConfig.from_pretrained(_adapter_base(folder))


def load_pilot(folder: str | Path, dtype: torch.dtype = torch.float32):
    """Load a Pilot saved by :func:`save_pilot` (or any causal-LM folder); LoRA adapters are merged in."""
    folder = check_pilot_folder(folder)
    adapter = folder / "adapter_config.json"
    full_weights = sorted(_files(folder, FULL_MODEL_FILES))
    if adapter.is_file() and full_weights:
        raise ValueError(f"{folder} holds both a LoRA adapter (adapter_config.json) and a full model "
                         f"({full_weights[0]}), so which Pilot it is cannot be told: save each Pilot to its own "
                         "folder, or delete the files of the one you do not want.")
    if adapter.is_file():
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(_adapter_base(folder), dtype=dtype)
        model = PeftModel.from_pretrained(base, folder)
        model = model.merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return model.eval(), prepare_tokenizer(AutoTokenizer.from_pretrained(folder))
