"""Supervised trainers beside the RL loop: SFT (a seed policy) and Bradley–Terry reward models."""
