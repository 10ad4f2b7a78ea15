"""omnigrpo: GRPO fine-tuning of discrete autoregressive image generators.

The package layout is the architecture: ``platform`` (config, CLI, worlds, registry, tracking,
the driver loop), ``rollout`` (sampling and decoding image tokens), ``rewards`` (judges and their
combination), ``trainers`` (GRPO loss, DeepSpeed learner, SFT) and ``cluster`` (Ray actors).
"""

__version__ = "0.1.0"
