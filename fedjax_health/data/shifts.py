"""Per-cluster feature shifts for images (simulated acquisition differences) with known clusters.

Hospitals that share a scanner brand or protocol see images that differ from other hospitals' in
systematic ways: contrast, brightness, blur, noise (chapter section 4.1). Here clients are put in
``num_clusters`` planted clusters (client c in cluster ``c % num_clusters``); every client of a
cluster gets the same acquisition shift and the same label mix, so the ground-truth clustering is
known and methods can be scored on recovering it (adjusted Rand index).

* ``apply_shift(x, spec, rng)``: contrast (around each image's mean; a negative factor inverts
  polarity), brightness offset, Gaussian blur (sigma in pixels), additive Gaussian noise; values
  stay in [0, 1].
* ``cluster_feature_shift(clusters, specs, seed)``: the ``f(x_client, c)`` hook of
  ``medmnist.load(feature_shift=...)`` and ``partition.apply_partition``.
* ``clustered_label_skew``: each class split across clusters by Dir(alpha), uniformly within one.
* ``load_clustered_medmnist``: MedMNIST with both, ``client_meta["cluster"]`` = planted clusters;
  registered as datasets ``breastmnist_clustered`` and ``retinamnist_clustered`` by the wiring
  module ``fedjax_health.data.shifts_registry`` (this module imports no config machinery).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from fedjax_health.data import medmnist
from fedjax_health.data import partition as part
from fedjax_health.data.federated import FederatedData


@dataclasses.dataclass(frozen=True)
class ShiftSpec:
  """One acquisition shift: contrast factor, brightness offset, blur sigma (pixels), noise std."""

  contrast: float = 1.0
  brightness: float = 0.0
  blur: float = 0.0
  noise: float = 0.0

  def __post_init__(self):
    if not -4.0 <= self.contrast <= 4.0:
      raise ValueError(f"contrast factor must be in [-4, 4], got {self.contrast}")
    if not -1.0 <= self.brightness <= 1.0:
      raise ValueError(f"brightness offset must be in [-1, 1], got {self.brightness}")
    if self.blur < 0:
      raise ValueError(f"blur sigma must be >= 0, got {self.blur}")
    if self.noise < 0:
      raise ValueError(f"noise std must be >= 0, got {self.noise}")

  def scaled(self, strength: float) -> "ShiftSpec":
    """Returns the shift moved ``strength`` of the way from the identity (1 = as given)."""
    return ShiftSpec(1.0 + strength * (self.contrast - 1.0), strength * self.brightness,
                     strength * self.blur, strength * self.noise)


# Four acquisition "sites": the reference scanner, a low-contrast bright one, a blurry noisy one,
# an inverted-polarity one; two more for K up to 6.
ACQUISITION_SHIFTS = (
    ShiftSpec(),
    ShiftSpec(contrast=0.5, brightness=0.25),
    ShiftSpec(blur=1.0, noise=0.08),
    ShiftSpec(contrast=-1.0),
    ShiftSpec(contrast=1.6, brightness=-0.15),
    ShiftSpec(contrast=0.7, noise=0.15),
)


def default_cluster_shifts(num_clusters: int, strength: float = 1.0) -> tuple[ShiftSpec, ...]:
  """Returns the first ``num_clusters`` acquisition shifts scaled by ``strength``."""
  if not 1 <= num_clusters <= len(ACQUISITION_SHIFTS):
    raise ValueError(f"num_clusters must be in [1, {len(ACQUISITION_SHIFTS)}] for the built-in shifts, "
                     f"got {num_clusters}")
  if strength < 0:
    raise ValueError(f"shift strength must be >= 0, got {strength}")
  return tuple(s.scaled(strength) for s in ACQUISITION_SHIFTS[:num_clusters])


def gaussian_kernel(sigma: float) -> np.ndarray:
  """Returns the normalised 1-D Gaussian kernel of radius ``round(3 sigma)`` (as scipy.ndimage)."""
  radius = max(1, int(3.0 * sigma + 0.5))
  t = np.arange(-radius, radius + 1, dtype=np.float64)
  k = np.exp(-0.5 * (t / sigma) ** 2)
  return k / k.sum()


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
  """Returns ``x [n, H, W, C]`` blurred along H and W (separable; edges mirrored, edge pixel repeated)."""
  if sigma <= 0:
    return x
  k = gaussian_kernel(sigma)
  r = len(k) // 2
  out = np.asarray(x, np.float64)
  for axis in (1, 2):
    pad = [(0, 0)] * out.ndim
    pad[axis] = (r, r)
    padded = np.pad(out, pad, mode="symmetric")
    n = out.shape[axis]
    out = sum(w * np.take(padded, np.arange(i, i + n), axis=axis) for i, w in enumerate(k))
  return out.astype(x.dtype)


def apply_shift(x: np.ndarray, spec: ShiftSpec, rng: np.random.Generator) -> np.ndarray:
  """Returns images ``x [n, H, W, C]`` in [0, 1] after contrast, brightness, blur, noise (in order)."""
  x = np.asarray(x, np.float32)
  if x.ndim != 4:
    raise ValueError(f"images must be [n, H, W, C], got shape {x.shape}")
  mean = x.mean(axis=(1, 2, 3), keepdims=True)
  out = (x - mean) * spec.contrast + mean + spec.brightness
  out = gaussian_blur(out, spec.blur)
  if spec.noise > 0:
    out = out + rng.normal(0.0, spec.noise, out.shape)
  return np.clip(out, 0.0, 1.0).astype(np.float32)


def planted_clusters(num_clients: int, num_clusters: int) -> np.ndarray:
  """Returns ``[num_clients]`` cluster ids ``c % num_clusters`` (as ``synthetic.load``)."""
  if num_clusters < 1:
    raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
  if num_clusters > num_clients:
    raise ValueError(f"num_clusters ({num_clusters}) must be <= num_clients ({num_clients})")
  return (np.arange(num_clients) % num_clusters).astype(np.int32)


def cluster_feature_shift(clusters: Sequence[int], specs: Sequence[ShiftSpec], seed: int = 0
                          ) -> Callable[[np.ndarray, int], np.ndarray]:
  """Returns ``f(x_client, c)`` applying ``specs[clusters[c]]``; noise is seeded by (seed, c, call)."""
  clusters = np.asarray(clusters)
  if clusters.size and (clusters.min() < 0 or clusters.max() >= len(specs)):
    raise ValueError(f"cluster ids must be in [0, {len(specs)}) (one ShiftSpec each), got {sorted(set(clusters))}")
  calls: dict[int, int] = {}

  def shift(x_client: np.ndarray, c: int) -> np.ndarray:
    calls[c] = calls.get(c, 0) + 1  # train then test split of client c: different noise draws
    rng = np.random.default_rng([seed, int(c), calls[c]])
    return apply_shift(x_client, specs[int(clusters[c])], rng)

  return shift


def clustered_label_skew(labels: np.ndarray, clusters: np.ndarray, alpha: float, rng: np.random.Generator,
                         min_size: int = 2, max_tries: int = 100) -> part.Partition:
  """Returns a partition where each class is split across clusters by p ~ Dir(alpha).

  Within a cluster a class's share is dealt uniformly at random to the cluster's clients, so the
  clients of one cluster share a label mix (Hsu et al. 2019's label skew, at cluster level).
  Redrawn until every client has at least ``min_size`` examples.
  """
  if not alpha > 0:
    raise ValueError(f"alpha must be > 0, got {alpha}")
  labels = np.asarray(labels).reshape(-1)
  clusters = np.asarray(clusters)
  num_clients, num_clusters = len(clusters), int(clusters.max()) + 1
  members = [np.flatnonzero(clusters == k) for k in range(num_clusters)]
  for _ in range(max_tries):
    assign = np.empty(len(labels), np.int64)
    for y in np.unique(labels):
      idx = rng.permutation(np.flatnonzero(labels == y))
      p = rng.dirichlet(np.full(num_clusters, alpha))
      cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
      for k, chunk in enumerate(np.split(idx, cuts)):
        assign[chunk] = members[k][rng.integers(0, len(members[k]), len(chunk))]
    counts = np.bincount(assign, minlength=num_clients)
    if counts.min() >= min_size:
      shuffle = rng.permutation(len(assign))
      order = shuffle[np.argsort(assign[shuffle], kind="stable")]
      return order, np.concatenate([[0], np.cumsum(counts)])
  raise ValueError(f"could not give every one of {num_clients} clients >= {min_size} examples with "
                   f"alpha={alpha} in {max_tries} draws; raise alpha or lower num_clients")


def load_clustered_medmnist(subset: str = "retinamnist", num_clients: int = 12, num_clusters: int = 4,
                            alpha: float = 1.0, seed: int = 0, strength: float = 1.0,
                            specs: Sequence[ShiftSpec] | None = None, path: str | None = None) -> FederatedData:
  """Returns MedMNIST ``subset`` over clinics in planted clusters of label mix and acquisition shift.

  Train split from MedMNIST's train split (``clustered_label_skew``), test split from its test
  split following each clinic's train label mix; both shifted by the clinic's cluster's
  ``specs`` (default ``default_cluster_shifts(num_clusters, strength)``). MedMNIST's val split,
  unshifted, is ``server_val``. ``client_meta["cluster"]`` holds the planted clusters.
  """
  clusters = planted_clusters(num_clients, num_clusters)
  specs = tuple(specs) if specs is not None else default_cluster_shifts(num_clusters, strength)
  arrays = medmnist.load_arrays(subset, path)
  (x_tr, y_tr), (x_te, y_te) = arrays["train"], arrays["test"]
  rng = np.random.default_rng(seed)
  shift = cluster_feature_shift(clusters, specs, seed)
  ids = tuple(f"clinic_{c}" for c in range(num_clients))
  train = part.apply_partition({"x": x_tr, "y": y_tr}, clustered_label_skew(y_tr, clusters, alpha, rng), ids, shift)
  by_client = [train.client(c)["y"] for c in range(num_clients)]
  test = part.apply_partition({"x": x_te, "y": y_te}, medmnist.follow_label_mix(by_client, y_te, rng), ids, shift)
  x_val, y_val = arrays["val"]
  return FederatedData(train=train, test=test, num_classes=medmnist.SUBSETS[subset], name=f"{subset}_clustered",
                       server_val={"x": x_val, "y": y_val}, client_meta={"cluster": clusters})


_WIRING = ("check_clustered_dataset",)


def __getattr__(name):  # the config check moved to the wiring module; old imports keep working
  if name in _WIRING:
    from fedjax_health.data import shifts_registry  # pylint: disable=import-outside-toplevel
    return getattr(shifts_registry, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
