"""Drop-in use of bgpo inside other RL training stacks.

* ``bgpo.integrations.trl``: ``DiffusionGRPOConfig`` / ``DiffusionGRPOTrainer``, TRL's ``GRPOTrainer``
  for masked diffusion LMs, trained with BGPO (or any objective of ``bgpo.policy_update``).

Nothing is imported here: each integration imports its framework (TRL, ...) only when it is itself
imported, so ``import bgpo`` never needs them.
"""
