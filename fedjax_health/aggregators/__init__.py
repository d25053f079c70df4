"""Server-side aggregators and client-update transforms, with a name registry.

Other modules (robust, clustered, privacy) add their factories to ``AGGREGATORS`` and
``TRANSFORMS`` where they are defined, so a config string names any of them.
"""

from fedjax_health.aggregators.base import (Aggregator, EmptyState, UpdateTransform, chain, client_norms,
                                            flatten_updates, identity, reject_nonfinite, unflatten_like,
                                            uniform_mean, weighted_mean, weighted_sum)
from fedjax_health.aggregators import detection as _detection
from fedjax_health.aggregators import robust as _robust

AGGREGATORS = {
    "mean": weighted_mean,
    "uniform_mean": uniform_mean,
    "krum": _robust.krum,
    "multi_krum": _robust.multi_krum,
    "median": _robust.coordinate_median,
    "trimmed_mean": _robust.trimmed_mean,
    "geometric_median": _robust.geometric_median,
    "bulyan": _robust.bulyan,
    "weak_dp": _robust.weak_dp,
}

TRANSFORMS = {
    "identity": identity,
    "reject_nonfinite": reject_nonfinite,
    "norm_bound": _robust.norm_bound,
    "clustering_detection": _detection.clustering_detection,
    "autoencoder_detection": _detection.autoencoder_detection,
    "loss_rejection": _detection.loss_rejection,
}


def get_aggregator(name: str, **kwargs) -> Aggregator:
  """Returns the registered aggregator ``name`` built with ``kwargs``."""
  if name not in AGGREGATORS:
    raise ValueError(f"aggregator must be one of {sorted(AGGREGATORS)}, got {name!r}")
  return AGGREGATORS[name](**kwargs)


def get_transform(name: str, **kwargs) -> UpdateTransform:
  """Returns the registered update transform ``name`` built with ``kwargs``."""
  if name not in TRANSFORMS:
    raise ValueError(f"update transform must be one of {sorted(TRANSFORMS)}, got {name!r}")
  return TRANSFORMS[name](**kwargs)
