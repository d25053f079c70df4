"""Model heterogeneity: clients with different architectures exchanging logits or prototypes.

``transforms`` (pure functions), ``groups`` (architecture groups), ``public_data`` (server-held
public sets), ``rounds`` (compiled rounds) and ``algorithms`` (registered wiring).
"""
