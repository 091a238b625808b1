"""Fine-tune a Pilot with an ordinary Trainer while the CopilotCallback trains a Copilot beside it.

Launch (2 CPU cores are enough; nothing is downloaded):

    python examples/train_with_copilot.py --output_dir outputs/joint

Multi-process (every rank ends with the same Copilot):

    torchrun --nproc_per_node 2 examples/train_with_copilot.py --output_dir outputs/joint_ddp

The Pilot is a small randomly initialised Llama and the data a synthetic "count upwards" task, so the example runs
anywhere. `--pilot DIR` takes any local causal-LM checkpoint folder instead. Every evaluation (held-out rows, every
20 steps) also measures the Copilot: its held-out ratio says whether it can help this Pilot at all, and the run
ends with its best-evaluated state.
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainingArguments

from hf_copilot import CopilotCallback, CopilotModel


def counting_dataset(n, length, vocab, seed):
    """Each sequence counts upwards from a random start; the first 4 tokens are a prompt without labels."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        start = int(torch.randint(3, vocab - length, (1,), generator=gen))
        ids = torch.arange(start, start + length)
        labels = ids.clone()
        labels[:4] = -100
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pilot", default=None, help="local causal-LM folder (default: a tiny random Llama)")
    parser.add_argument("--output_dir", default="outputs/joint")
    parser.add_argument("--max_steps", type=int, default=40)
    parser.add_argument("--copilot_layers", type=int, default=2)
    args = parser.parse_args()

    if args.pilot:
        pilot = AutoModelForCausalLM.from_pretrained(args.pilot)
    else:
        pilot = AutoModelForCausalLM.from_config(LlamaConfig(
            vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4))
    vocab = pilot.config.vocab_size
    copilot = CopilotModel.from_pilot(pilot, num_hidden_layers=args.copilot_layers)
    callback = CopilotCallback(copilot, batch_size=8, learning_rate=5e-4, save_mistake_log=True,
                               load_best_at_end=True)

    training_args = TrainingArguments(output_dir=args.output_dir, max_steps=args.max_steps, learning_rate=1e-3,
                                      per_device_train_batch_size=8, logging_steps=10, save_steps=20,
                                      eval_strategy="steps", eval_steps=20, per_device_eval_batch_size=16,
                                      report_to=[], use_cpu=not torch.cuda.is_available())
    trainer = Trainer(model=pilot, args=training_args, train_dataset=counting_dataset(512, 24, vocab, seed=0),
                      eval_dataset=counting_dataset(64, 24, vocab, seed=1))
    callback.attach(trainer)  # ahead of the reporters, so they see the copilot_* metrics too
    trainer.train()
    trainer.save_model(args.output_dir)
    for entry in trainer.state.log_history:
        if "copilot_loss" in entry:
            print(f"step {entry['step']:>4}: pilot loss {entry['loss']:.3f}  copilot loss {entry['copilot_loss']:.3f}"
                  f"  (fit ratio {entry['copilot_fit_ratio']:.3f}: its loss over the all-zero predictor's)")
        if "eval_copilot_heldout_ratio" in entry:
            print(f"step {entry['step']:>4}: held-out ratio {entry['eval_copilot_heldout_ratio']:.3f} (below 1: it "
                  f"can help); next-token accuracy {entry['eval_copilot_pilot_accuracy']:.3f} alone, "
                  f"{entry['eval_copilot_rectified_accuracy']:.3f} rectified")
    print(f"Pilot saved to {args.output_dir}, Copilot to {args.output_dir}/copilot; log: {callback.mistake_log.stats()}")
    if torch.distributed.is_initialized():  # under torchrun: every rank leaves the process group before exiting
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
