"""The BGPO trainer: ``bgpo train --config CONFIG.yaml [key=value ...]`` or ``python -m bgpo.train``.

``TrainConfig`` documents every option; ``Trainer(config).train()`` runs a job (warm-up, RL steps,
evaluation, checkpoints); under ``torchrun`` it shards with FSDP2 or replicates (DDP-style).
"""
from .config import TrainConfig, load_config
from .trainer import NonFiniteError, Trainer

__all__ = ["TrainConfig", "load_config", "Trainer", "NonFiniteError", "main"]


def main(argv=None) -> int:
    from ..cli import train_main

    return train_main(argv)
