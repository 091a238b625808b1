"""Build a Copilot for a Pilot, save it, load it back with AutoModel, and run it once.

Launch (CPU is enough; nothing is downloaded):

    python examples/build_copilot.py --output_dir outputs/copilot

The Pilot here is a small randomly initialised Llama so the example runs anywhere; pass any local
`--pilot DIR` (a Llama, Qwen2, Mistral, GPT2 or T5 checkpoint folder) to build a Copilot for a real model.
"""

import argparse
import logging

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoConfig, LlamaConfig

import hf_copilot  # noqa: F401  (registers CopilotConfig/CopilotModel with the Auto classes)
from hf_copilot import CopilotModel


def load_pilot(path):
    if path is None:
        config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2)
        return AutoModelForCausalLM.from_config(config)
    auto = AutoModelForSeq2SeqLM if AutoConfig.from_pretrained(path).is_encoder_decoder else AutoModelForCausalLM
    return auto.from_pretrained(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pilot", default=None, help="local Pilot checkpoint folder (default: a tiny random Llama)")
    parser.add_argument("--num_hidden_layers", type=int, default=4)
    parser.add_argument("--output_dir", default="outputs/copilot")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    pilot = load_pilot(args.pilot)
    copilot = CopilotModel.from_pilot(pilot, num_hidden_layers=args.num_hidden_layers)
    copilot.save_pretrained(args.output_dir)
    loaded = AutoModel.from_pretrained(args.output_dir)
    n_params = sum(p.numel() for p in loaded.parameters())
    print(f"Copilot saved to {args.output_dir}: {type(loaded).__name__}, {n_params / 1e6:.2f}M parameters, "
          f"layers {loaded.config.attention_kinds()}")

    width = loaded.config.pilot_hidden_size
    states = torch.randn(1, 5, width, dtype=loaded.dtype)
    kwargs = dict(pilot_hidden_states=states, pilot_input_states=states)
    print("untrained correction is exactly zero:", bool((loaded(**kwargs).corrections == 0).all()))


if __name__ == "__main__":
    main()
