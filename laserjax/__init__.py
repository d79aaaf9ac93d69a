"""laserjax: LaSeR (Reinforcement Learning with Last-Token Self-Rewarding) in pure JAX.

The data flow, one module per step:
config -> data -> sampler -> reward -> laser (objective) -> train_step -> trainer -> checkpoint.
"""

__version__ = "0.1.0"
