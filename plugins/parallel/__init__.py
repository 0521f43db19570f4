"""The parallel layer that ExpertParallelStrategy and DualPipeStrategy are thin layers on.

One pipeline x data x expert mesh (torch's ``DeviceMesh``, dimensions named "pp", "dp", "ep"), one
gradient synchronisation (reduction to the global batch's gradient and clipping by the whole model's
norm), the optimizer state sharded over data parallelism (ZeRO-1), and one strategy base with the
lifecycle every parallel strategy shares (mesh, expert shards, dispatchers, checkpoints, teardown).
"""
