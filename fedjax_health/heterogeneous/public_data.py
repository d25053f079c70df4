"""Server-held public data for distillation methods, disjoint from every client's data.

FedMD needs a *labelled* public set (its parties first learn the public task); FedDF needs only
*unlabelled* inputs (its server distils on them); FD and FedProto need none. Two choices:

* Fed-Heart-Disease: one hospital is held out whole (train and test rows) as the public set and
  is not a client; the other hospitals are the federation (``with_public_site``).
* MedMNIST: ``val`` -- MedMNIST's own validation split (labelled, in-domain, disjoint from the
  train and test splits the clinics hold), or ``other`` -- the *other* MedMNIST set's train split
  converted to this one's shape (RGB RetinaMNIST averaged to grey for BreastMNIST, grey
  BreastMNIST repeated to RGB for RetinaMNIST): out-of-domain and unlabelled (``y = -1``).

``check_disjoint`` refuses a public set that shares an example with the clients' data.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fedjax_health.data import heart_disease, medmnist
from fedjax_health.data.federated import FederatedData

UNLABELLED = -1
MEDMNIST_SOURCES = ("val", "other")


def _row_keys(x: np.ndarray) -> set:
  x = np.ascontiguousarray(np.asarray(x, np.float32).reshape(len(x), -1))
  return {r.tobytes() for r in x}


def check_disjoint(public_x: np.ndarray, private_x: np.ndarray, field: str = "public") -> None:
  """Raises ValueError naming ``field`` if any public example equals a private one (exact rows)."""
  if public_x.shape[1:] != private_x.shape[1:]:
    raise ValueError(f"{field}: public inputs have shape {public_x.shape[1:]} per example, the clients' "
                     f"{private_x.shape[1:]}")
  shared = _row_keys(public_x) & _row_keys(private_x)
  if shared:
    raise ValueError(f"{field}: the public set overlaps the clients' private data ({len(shared)} identical "
                     f"examples); the server may not hold the clients' examples")


def with_public_site(data: FederatedData, public_site: str, private_sites=()) -> FederatedData:
  """Returns ``data`` with hospital ``public_site`` (all its rows) as the public set, not a client.

  ``private_sites`` (default: every other site) are the clients, in the given order; listing the
  public site among them is refused (it would overlap the public set).
  """
  ids = list(data.train.client_ids or ())
  if public_site not in ids:
    raise ValueError(f"dataset.public_site must be one of {ids}, got {public_site!r}")
  private = list(private_sites) or [s for s in ids if s != public_site]
  for s in private:
    if s not in ids:
      raise ValueError(f"dataset.private_sites must be among {ids}, got {s!r}")
  if public_site in private:
    raise ValueError(f"dataset.private_sites includes the public site {public_site!r}: the public set "
                     "would overlap a client's private data")
  c = ids.index(public_site)
  tr, te = data.train.client(c), data.test.client(c)
  public = {"x": np.concatenate([tr["x"], te["x"]]), "y": np.concatenate([tr["y"], te["y"]]).astype(np.int32)}
  keep = [ids.index(s) for s in private]
  out = dataclasses.replace(data, train=data.train.select_clients(keep), test=data.test.select_clients(keep),
                            public=public, name=f"{data.name}_public_{public_site}")
  check_disjoint(public["x"], out.train.x, "dataset.public_site")
  return out


def heart_disease_with_public(public_site: str = "cleveland", private_sites=(), normalize: str = "pooled",
                              data_dir: str | None = None) -> FederatedData:
  """Returns Fed-Heart-Disease with ``public_site`` held out as the labelled public set."""
  return with_public_site(heart_disease.load(data_dir, normalize=normalize), public_site, private_sites)


def convert_images(x: np.ndarray, channels: int) -> np.ndarray:
  """Returns images ``[N, H, W, C]`` with ``channels`` channels (RGB -> grey by mean, grey -> RGB by repeat)."""
  if x.shape[-1] == channels:
    return x
  if channels == 1:
    return x.mean(axis=-1, keepdims=True).astype(np.float32)
  if x.shape[-1] == 1:
    return np.repeat(x, channels, axis=-1)
  raise ValueError(f"cannot convert {x.shape[-1]}-channel images to {channels} channels")


def medmnist_public(subset: str, source: str, path: str | None = None, other_path: str | None = None) -> dict:
  """Returns the public set ``{"x", "y"}`` for MedMNIST ``subset`` from ``source`` (val | other)."""
  if source == "val":
    x, y = medmnist.load_arrays(subset, path)["val"]
    return {"x": x, "y": y.astype(np.int32)}
  if source == "other":
    other = [s for s in medmnist.SUBSETS if s != subset][0]
    x_other, _ = medmnist.load_arrays(other, other_path)["train"]
    channels = medmnist.load_arrays(subset, path)["test"][0].shape[-1]
    x = convert_images(x_other, channels)
    return {"x": x, "y": np.full(len(x), UNLABELLED, np.int32)}
  raise ValueError(f"dataset.public_source must be one of {list(MEDMNIST_SOURCES)}, got {source!r}")


def medmnist_with_public(subset: str, source: str = "val", **load_kwargs) -> FederatedData:
  """Returns MedMNIST ``subset`` across clinics (``medmnist.load``) plus its public set."""
  data = medmnist.load(subset, **load_kwargs)
  public = medmnist_public(subset, source, load_kwargs.get("path"))
  check_disjoint(public["x"], data.train.x, "dataset.public_source")
  return dataclasses.replace(data, public=public, name=f"{subset}_public_{source}")
