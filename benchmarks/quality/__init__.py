"""Whether the Copilot helps: the quality protocol against fair controls, Copilot variants replayed on its runs,
a synthetic sanity task and probes of what the Pilot's states reveal. Protocols and shared helpers are in
:mod:`benchmarks.quality.protocols`."""
