"""hf_copilot's benchmarks, in two rooms: ``cost`` (what the Copilot costs) and ``quality`` (whether it helps).

Every script is a module run from the repository root, e.g. ``python -m benchmarks.quality.quality --help``;
``benchmarks/README.md`` names each room's headline table and the command behind it.
"""
