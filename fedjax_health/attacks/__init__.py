"""Attacks on federated learning: data and model poisoning, gradient inversion (privacy)."""
