"""Multi-user hybrid (edge + device) inference of personalized diffusion models with DRL-convex
offloading (arXiv 2411.15781), rebuilt from the paper's official code (spec: hybrid.md).

The scheduler half, named after the paper's parts: ``system`` (the accuracy model A(n), the latency
model, the per-user utility and the GQAP objective; the paper's tables as the default profile,
measured profiles from JSON), ``convex`` (the closed-form cut points of the convex sub-problem),
``env`` (the user-by-user admission MDP and its scenario generator), ``agent`` (PER-DQN in Flax NNX
+ optax with flashbax prioritized replay), ``baselines`` (exact optima by enumeration, by batch
size and by OR-Tools; GA, greedy, all-local, admit-all) and ``optimize`` (the binary that trains
the agent and evaluates every method over a grid of edge sizes and user counts).

The model half: ``data`` (each user's few-shot subject set and the cluster-wide model's data),
``method`` (the cluster-wide and U personalized networks in the shared training loop),
``models`` (a finished run's networks and the hybrid sampler, edge batch then device), ``train``
and ``profile`` (binaries: the models; the measured accuracy-vs-cut-point and latency-vs-batch
profiles that ``optimize`` can use instead of the paper's). ``serve`` and ``protocol`` run the
edge loop over sockets.
"""
