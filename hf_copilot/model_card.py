"""The model card a saved Copilot carries (``README.md``): what the folder holds, which Pilot it serves and how to
load it, so that a Copilot on the Hub explains itself."""

from __future__ import annotations

import os

from .safe_io import atomic_write_text

CARD_NAME = "README.md"
MARKER = "<!-- written by hf_copilot: edit freely, it is only rewritten while this line stays -->"


def model_card(config) -> str:
    """The card's text for a :class:`~hf_copilot.CopilotConfig`."""
    pilot = config.pilot_name_or_path or f"a {config.pilot_model_type or 'transformers'} model"
    auto_class = "AutoModelForSeq2SeqLM" if config.pilot_kind == "encoder_decoder" else "AutoModelForCausalLM"
    revision = f" at revision `{config.pilot_revision}`" if config.pilot_revision else ""
    front = ["---", "library_name: hf_copilot", "tags:", "- transformer-copilot", "- copilot"]
    if config.pilot_name_or_path and not os.path.isabs(config.pilot_name_or_path):
        front.append(f"base_model: {config.pilot_name_or_path}")
    front.append("---")
    return "\n".join(front + [
        MARKER,
        "",
        "# Copilot",
        "",
        f"A Copilot (Transformer Copilot, Zou et al., NeurIPS 2025, arXiv 2505.16270) for the Pilot `{pilot}`"
        f"{revision}. It was trained on that Pilot's Mistake Log during the Pilot's fine-tuning and predicts the "
        "Pilot's token errors; at generation time its corrections are added to the Pilot's next-token scores. It "
        "is not a language model on its own: it reads the Pilot's hidden states and needs that very Pilot.",
        "",
        f"- Pilot: `{pilot}`{revision} ({config.pilot_kind.replace('_', '-')}, width {config.pilot_hidden_size}, "
        f"vocabulary {config.vocab_size})",
        f"- Copilot: {config.num_hidden_layers} layers of width {config.hidden_size}, correction "
        f"`{config.correction}`",
        "",
        "## How to use",
        "",
        "```bash",
        "pip install hf_copilot  # or pip install -e . in a checkout of its repository",
        "```",
        "",
        "```python",
        "import hf_copilot  # registers the Copilot with AutoConfig / AutoModel",
        f"from transformers import AutoModel, {auto_class}",
        "",
        f'pilot = {auto_class}.from_pretrained("{config.pilot_name_or_path or "<the Pilot>"}")',
        'copilot = AutoModel.from_pretrained("<this folder or repository>")',
        "processor = hf_copilot.CopilotLogitsProcessor(copilot, pilot, lam=1.0)",
        "output = pilot.generate(**inputs, logits_processor=[processor])",
        "```",
        "",
    ])


def write_model_card(folder, config) -> None:
    """Writes the card into ``folder`` unless a card someone else wrote (without :data:`MARKER`) is there."""
    path = os.path.join(folder, CARD_NAME)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as file:
            if MARKER not in file.read():
                return
    atomic_write_text(path, model_card(config))
