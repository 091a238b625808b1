"""What the Copilot costs: training-step and generation overhead, memory, a joint step part by part, offline
training throughput. The Pilots they measure are in :mod:`benchmarks.cost.pilots`."""
