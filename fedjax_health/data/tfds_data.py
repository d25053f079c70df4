"""Any TensorFlow Datasets (tfds) image or tabular dataset as a federated dataset, without TensorFlow.

``config.dataset.name = "tfds"`` with the fields of ``dataset_config()`` (see ``configs/tfds_*.py``):
the train and test splits named by ``train_split`` / ``test_split`` (tfds split syntax, so
``"train[:80%]"`` / ``"train[80%:]"`` carve a test split out of a dataset that has none) are read
through ``tfds.data_source`` (random access to array_record files: no TensorFlow, no tf.data),
then split across clients:

* by a natural client feature (``client_feature``, e.g. ``"island"`` for ``penguins/simple``, a
  hospital or device id): one client per value, train and test alike;
* otherwise by one of the partitioners of ``partition.py`` (``partition``: dirichlet | iid |
  quantity | shards over ``num_clients``), the test split following each client's label mix as
  for MedMNIST.

Inputs: an ``Image`` feature becomes float32 in [0, 1] (``image_size`` resizes variable-size
images); a ``Tensor`` feature is used as it is; a dict of scalar features (tabular) becomes one
vector, ``ClassLabel`` features one-hot, z-scored with the pooled train statistics
(``normalize="pooled"``). The input and label features default to the dataset's
``supervised_keys``.

Data must be prepared in the array_record format first (``download=False`` by default; the error
says how). ``mock_examples > 0`` reads ``tfds.testing.mock_data`` instead: random examples of the
dataset's real feature spec, for smoke runs and CI without network.
"""

from __future__ import annotations

import contextlib
from typing import Any

import ml_collections
import numpy as np

from fedjax_health.config_validation import register_check, require
from fedjax_health.data import partition as part
from fedjax_health.data.federated import FederatedData, FederatedDataset
from fedjax_health.data.medmnist import follow_label_mix

PARTITIONS = ("dirichlet", "iid", "quantity", "shards")


def dataset_config() -> ml_collections.ConfigDict:
  """Returns the ``config.dataset`` fields of a tfds dataset (defaults: MNIST over 10 clients)."""
  d = ml_collections.ConfigDict()
  d.name = "tfds"
  d.tfds_name = "mnist"  # any tfds name, with config/version: "penguins/simple", "mnist:3.0.1"
  d.train_split = "train"
  d.test_split = "test"  # tfds split syntax; "train[80%:]" for datasets without a test split
  d.val_split = ""  # optional held-out split kept whole on the server (e.g. for defences)
  d.data_dir = ""  # tfds data_dir ("" = tfds's default, ~/tensorflow_datasets or $TFDS_DATA_DIR)
  d.download = False  # True: tfds downloads and prepares (needs network, and TensorFlow for images)
  d.input_key = ""  # feature(s) used as input; "" = supervised_keys[0] (comma-separated list allowed)
  d.label_key = ""  # "" = supervised_keys[1]
  d.client_feature = ""  # natural clients: one per value of this feature ("" = use partition)
  d.partition = "dirichlet"  # dirichlet | iid | quantity | shards (when client_feature is "")
  d.num_clients = 10
  d.alpha = 0.5
  d.shards_per_client = 2
  d.partition_seed = 0
  d.image_size = 0  # > 0: resize images to image_size x image_size (needed for variable-size images)
  d.normalize = "pooled"  # tabular inputs: "pooled" z-score with all train rows' statistics | "none"
  d.mock_examples = 0  # > 0: tfds.testing.mock_data with that many random examples per split (CI)
  return d


def _tfds():
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError("config.dataset.name='tfds' needs tensorflow-datasets: "
                      "pip install 'fedjax_health[tfds]' (no TensorFlow needed)") from e
  from fedjax_health.data import tfds_builders  # registers the shipped datasets with tfds
  del tfds_builders
  return tfds


def prepare_hint(name: str, data_dir: str) -> str:
  where = f" --data_dir={data_dir}" if data_dir else ""
  return (f"prepare it once in the array_record format, e.g. `pip install tensorflow tensorflow-datasets && "
          f"tfds build {name}{where} --file_format=array_record` (TensorFlow is only needed to prepare), "
          f"or set config.dataset.download=True; manual-download datasets need their files in "
          f"<data_dir>/downloads/manual first (see the dataset's tfds page)")


def _builder(cfg):
  tfds = _tfds()
  try:
    return tfds.builder(cfg.tfds_name, data_dir=cfg.data_dir or None)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"config.dataset.tfds_name={cfg.tfds_name!r} is not a tfds dataset "
                     f"({str(e).splitlines()[0]})") from None


def _check_prepared(builder, cfg) -> None:
  """Raises FileNotFoundError saying how to prepare the data when it is not there in array_record."""
  if cfg.mock_examples > 0:
    return
  from fedjax_health.data.tfds_builders import SHIPPED
  if builder.name in SHIPPED and not builder.is_prepared():
    builder.download_and_prepare(file_format="array_record")  # from the package's files, no network
    return
  if cfg.download:
    return
  if not builder.is_prepared():
    raise FileNotFoundError(f"tfds dataset {cfg.tfds_name!r} is not prepared in {builder.data_dir} "
                            f"(config.dataset.download=False); {prepare_hint(cfg.tfds_name, cfg.data_dir)}")
  fmt = str(getattr(builder.info.file_format, "value", builder.info.file_format))
  if fmt != "array_record":
    raise FileNotFoundError(f"tfds dataset {cfg.tfds_name!r} in {builder.data_dir} is prepared as {fmt}, which "
                            f"has no random access without TensorFlow; {prepare_hint(cfg.tfds_name, cfg.data_dir)}")


def _flatten(example: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in example.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _feature(features, path: str):
  f = features
  for part_name in path.split("/"):
    f = f[part_name]
  return f


def resolve_keys(info, cfg) -> tuple[list[str], str]:
  """Returns (input feature paths, label feature path) from the config or ``supervised_keys``."""
  sup = info.supervised_keys
  if cfg.label_key:
    label = cfg.label_key
  elif sup and isinstance(sup[1], str):
    label = sup[1]
  else:
    raise ValueError(f"config.dataset.label_key must name the label feature of {cfg.tfds_name!r} "
                     f"(it has no supervised_keys); features: {sorted(_flatten(info.features.get_serialized_info()))}")
  if cfg.input_key:
    inputs = [k.strip() for k in cfg.input_key.split(",") if k.strip()]
  elif sup and isinstance(sup[0], str):
    inputs = [sup[0]]
  elif sup and isinstance(sup[0], dict):
    inputs = sorted(sup[0].values())
  else:
    inputs = sorted(k for k in info.features.keys() if k != label)
  inputs = [k for k in inputs if k not in (label, cfg.client_feature)]
  known = set(_flatten(info.features.get_serialized_info()))
  for key, field in [(label, "label_key")] + [(k, "input_key") for k in inputs] + (
      [(cfg.client_feature, "client_feature")] if cfg.client_feature else []):
    if key not in known and key not in info.features.keys():
      raise ValueError(f"config.dataset.{field}={key!r} is not a feature of {cfg.tfds_name!r}; "
                       f"features: {sorted(known)}")
  if not inputs:
    raise ValueError(f"config.dataset.input_key: no input features left in {cfg.tfds_name!r}")
  return inputs, label


def _resize(img: np.ndarray, size: int) -> np.ndarray:
  from PIL import Image
  squeeze = img.ndim == 3 and img.shape[-1] == 1
  out = np.asarray(Image.fromarray(img[..., 0] if squeeze else img).resize((size, size), Image.BILINEAR))
  return out[..., None] if squeeze else out


def _is_image(feature) -> bool:
  """Image features, and [H, W, C] tensors (how images are stored without TensorFlow)."""
  return type(feature).__name__ == "Image" or (type(feature).__name__ == "Tensor" and len(feature.shape) == 3)


def _is_class_label(feature) -> bool:
  return type(feature).__name__ == "ClassLabel"


def read_split(source, info, inputs: list[str], label: str, client_feature: str, image_size: int):
  """Returns (x float32 [N, ...] before normalisation, y int32 [N], client values [N] or None).

  Reads examples one by one (``source[i]``): array_record random access, no TensorFlow.
  """
  n = len(source)
  feats = [_feature(info.features, k) for k in inputs]
  image = len(feats) == 1 and _is_image(feats[0])
  if image:
    shape = tuple(feats[0].shape)
    if None in shape and image_size <= 0:
      raise ValueError(f"config.dataset.image_size must be > 0: {inputs[0]!r} has variable shape {shape}")
  xs, ys, cs = [], np.empty(n, np.int64), [] if client_feature else None
  for i in range(n):
    ex = _flatten(source[i])
    ys[i] = int(ex[label])
    if cs is not None:
      c = ex[client_feature]
      cs.append(c.item() if isinstance(c, np.ndarray) else c)
    if image:
      img = np.asarray(ex[inputs[0]])
      xs.append(_resize(img, image_size) if image_size > 0 and img.shape[:2] != (image_size, image_size) else img)
    else:
      row = []
      for k, f in zip(inputs, feats):
        v = np.asarray(ex[k])
        if _is_class_label(f):
          row.append(np.eye(f.num_classes, dtype=np.float32)[int(v)])
        elif v.dtype.kind in "biuf":
          row.append(v.astype(np.float32).reshape(-1))
        else:
          raise ValueError(f"config.dataset.input_key: feature {k!r} of dtype {v.dtype} is not numeric")
      xs.append(np.concatenate(row))
  if image:
    x = np.stack(xs).astype(np.float32)
    x = x / 255.0 if feats[0].np_dtype == np.uint8 else x
    if x.ndim == 3:
      x = x[..., None]
  else:
    x = np.stack(xs).astype(np.float32) if xs else np.zeros((0, 0), np.float32)
  if not image and len(feats) == 1 and len(feats[0].shape) > 1:
    x = x.reshape((n,) + tuple(feats[0].shape))
  clients = None if cs is None else np.asarray([c.decode() if isinstance(c, bytes) else c for c in cs])
  return x, ys.astype(np.int32), clients


def _partition(cfg, y: np.ndarray, rng: np.random.Generator):
  if cfg.partition == "dirichlet":
    return part.dirichlet_label_skew(y, cfg.num_clients, cfg.alpha, rng, min_size=2)
  if cfg.partition == "iid":
    return part.iid(len(y), cfg.num_clients, rng)
  if cfg.partition == "quantity":
    return part.quantity_skew(len(y), cfg.num_clients, rng, min_size=2)
  return part.pathological_shards(y, cfg.num_clients, cfg.shards_per_client, rng)


def _client_names(info, client_feature: str, values: np.ndarray) -> tuple[str, ...]:
  f = _feature(info.features, client_feature)
  if _is_class_label(f):
    return tuple(f.int2str(int(v)) for v in values)
  return tuple(str(v) for v in values)


def load(cfg, seed: int = 0) -> FederatedData:
  """Returns the tfds dataset of ``cfg`` (a ``config.dataset`` section) split across clients."""
  tfds = _tfds()
  builder = _builder(cfg)
  _check_prepared(builder, cfg)
  mock = tfds.testing.mock_data(num_examples=cfg.mock_examples) if cfg.mock_examples > 0 else contextlib.nullcontext()
  inputs, label = resolve_keys(builder.info, cfg)
  label_feature = _feature(builder.info.features, label)
  if not _is_class_label(label_feature):
    raise ValueError(f"config.dataset.label_key={label!r} must be a ClassLabel feature, "
                     f"got {type(label_feature).__name__}")
  num_classes = int(label_feature.num_classes)
  with mock:
    splits = {}
    for field in ("train_split", "test_split") + (("val_split",) if cfg.val_split else ()):
      try:
        source = tfds.data_source(cfg.tfds_name, split=cfg[field], data_dir=cfg.data_dir or None,
                                  download=bool(cfg.download))
      except (ValueError, KeyError) as e:
        raise ValueError(f"config.dataset.{field}={cfg[field]!r}: {e}") from None
      splits[field] = read_split(source, builder.info, inputs, label, cfg.client_feature, cfg.image_size)
  (x_tr, y_tr, c_tr), (x_te, y_te, c_te) = splits["train_split"], splits["test_split"]
  if len(y_tr) == 0 or len(y_te) == 0:
    raise ValueError(f"config.dataset.train_split / test_split: empty split of {cfg.tfds_name!r}")
  server_val = None
  if cfg.val_split:
    server_val = {"x": splits["val_split"][0], "y": splits["val_split"][1]}
  if not _is_image(_feature(builder.info.features, inputs[0])) and cfg.normalize == "pooled":
    # Statistics in float64, as heart_disease.load computes them.
    mu, sd = x_tr.astype(np.float64).mean(0), x_tr.astype(np.float64).std(0)
    z = lambda a: ((a - mu) / (sd + 1e-9)).astype(np.float32)
    x_tr, x_te = z(x_tr), z(x_te)
    if server_val is not None:
      server_val["x"] = z(server_val["x"])
  rng = np.random.default_rng(seed + cfg.partition_seed)
  if cfg.client_feature:
    values = np.unique(c_tr)
    train = part.apply_partition({"x": x_tr, "y": y_tr}, part.natural(c_tr),
                                 _client_names(builder.info, cfg.client_feature, values))
    keep = np.isin(c_te, values)  # test examples of clients that have no train data are dropped
    test_ids = np.searchsorted(values, c_te[keep])
    order = np.argsort(test_ids, kind="stable")
    offsets = np.concatenate([[0], np.cumsum(np.bincount(test_ids, minlength=len(values)))])
    test = FederatedDataset({"x": x_te[keep][order], "y": y_te[keep][order]}, offsets, train.client_ids)
  else:
    ids = tuple(f"client_{c}" for c in range(cfg.num_clients))
    train = part.apply_partition({"x": x_tr, "y": y_tr}, _partition(cfg, y_tr, rng), ids)
    by_client = [train.client(c)["y"] for c in range(cfg.num_clients)]
    test = part.apply_partition({"x": x_te, "y": y_te}, follow_label_mix(by_client, y_te, rng), ids)
  return FederatedData(train=train, test=test, num_classes=num_classes, name=f"tfds:{cfg.tfds_name}",
                       server_val=server_val)


@register_check
def check_tfds(config, data=None) -> None:
  """Checks the ``config.dataset`` fields of a tfds dataset before anything is read."""
  del data
  ds = config.dataset
  if ds.name != "tfds":
    return
  missing = [f for f in dataset_config().keys() if f not in ds]
  if missing:
    raise ValueError(f"config.dataset lacks the tfds fields {missing}: start the section from "
                     "fedjax_health.data.tfds_data.dataset_config() (see configs/tfds_mnist.py)")
  require(isinstance(ds.tfds_name, str) and ds.tfds_name, "dataset.tfds_name", "a tfds dataset name", ds.tfds_name)
  require(ds.train_split != "", "dataset.train_split", "a tfds split", ds.train_split)
  require(ds.test_split != "", "dataset.test_split", "a tfds split (e.g. 'train[80%:]')", ds.test_split)
  if not ds.client_feature:
    require(ds.partition in PARTITIONS, "dataset.partition", f"one of {list(PARTITIONS)}", ds.partition)
    require(ds.num_clients >= 1, "dataset.num_clients", ">= 1", ds.num_clients)
    if ds.partition == "dirichlet":
      require(ds.alpha > 0, "dataset.alpha", "> 0", ds.alpha)
  require(ds.normalize in ("pooled", "none"), "dataset.normalize", "'pooled' or 'none'", ds.normalize)
  require(ds.image_size >= 0, "dataset.image_size", ">= 0 (0: keep the size)", ds.image_size)
  require(ds.mock_examples >= 0, "dataset.mock_examples", ">= 0 (0: real data)", ds.mock_examples)
