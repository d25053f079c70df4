"""Federated transfer learning (Liu et al. 2020): parties with different features and few shared records.

``data``: vertical / transfer splits (labelled party A, unlabelled party B, overlap ids);
``ftl``: the plaintext FTL model, loss and the per-party gradient components of the protocol;
``paillier``: the protocol with additively homomorphic encryption and random masks;
``secret_sharing``: the protocol with additive shares and Beaver triples;
``experiment``: the ``ftl`` run mode (wiring; not imported by the pure modules).
"""
