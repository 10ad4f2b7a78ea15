"""omnigrpo: GRPO fine-tuning of discrete autoregressive image generators.

The package layout is the architecture, each layer importing only from those below it: ``cli`` on top,
``bench``, ``app`` (the driver loop, preflight, planner, evaluator, tracking), ``cluster`` (Ray actors and
placement), ``trainers`` (GRPO loss, DeepSpeed learner, SFT), ``rollout`` (policies, sampling, decoding),
``rewards`` (judges and their combination), ``sync``, ``data``, ``worlds`` and ``config`` at the bottom.
"""

__version__ = "0.1.0"
