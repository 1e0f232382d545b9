"""Drop-in protection for training frameworks (each module imports its framework lazily).

- :mod:`ckptguard.integrations.transformers`: Hugging Face Trainer and TRL's trainers.
- :mod:`ckptguard.integrations.accelerate`: ``Accelerator.save_state`` / ``load_state``.
- :mod:`ckptguard.integrations.lightning`: a Lightning ``CheckpointIO`` plugin.
"""
