"""bridgerl: reinforcement-learning post-training of language models, offline to online in one loop."""

__version__ = "0.1.0"
