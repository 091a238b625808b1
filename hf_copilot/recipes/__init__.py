"""What the ``hf-copilot`` command and the benchmarks need and a plugin user does not: task formats and data
(``tasks``), real models and data fetched from PyPI (``assets``), tokenising task examples (``prompts``), LoRA
fine-tuning with the Copilot alongside (``finetune``), exact-match scoring (``scoring``), paired significance
against the Pilot alone (``significance``), research diagnostics (``diagnostics``), figures (``plots``) and the
command line (``cli``).

The plugin itself (``hf_copilot``) never imports this package.
"""
