"""fedjax_health: federated learning for digital health, one compiled round per cohort."""

__version__ = "0.1.0"
