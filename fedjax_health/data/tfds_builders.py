"""The shipped data as tfds datasets, so that the ``tfds`` path reads them like any other.

* ``fed_heart_disease``: Fed-Heart-Disease with FLamby's preprocessing and split
  (``heart_disease.load_center``), unnormalised, with the hospital as the ``center`` feature:
  ``client_feature="center"`` + ``normalize="pooled"`` gives exactly ``heart_disease.load()``.
* ``shipped_medmnist/breastmnist`` and ``/retinamnist``: the shipped MedMNIST files; the same
  partition and seed give exactly ``medmnist.load()``.

Both are prepared from the package's own files, without network or TensorFlow (images are stored
as uint8 ``Tensor`` features, since encoding tfds ``Image`` features needs TensorFlow), in the
array_record format that ``tfds.data_source`` reads; ``tfds_data.load`` prepares them on first use.
Examples keep their file order (``disable_shuffling``, keys in that order), so the partitions match the direct loaders.
Importing this module registers the builders with tfds.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from fedjax_health.data import heart_disease, medmnist

CITATION_HEART = ("Janosi, Steinbrunn, Pfisterer & Detrano (1989), Heart Disease, UCI ML Repository, "
                  "https://doi.org/10.24432/C52P4X; preprocessing of FLamby (du Terrail et al., NeurIPS 2022).")
CITATION_MEDMNIST = "Yang et al., MedMNIST v2, Scientific Data 10, 41 (2023)."

SHIPPED = ("fed_heart_disease", "shipped_medmnist")


class FedHeartDisease(tfds.core.GeneratorBasedBuilder):
  """Fed-Heart-Disease (4 hospitals), FLamby's 13 features and per-centre train/test split."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "FLamby's preprocessing of the shipped UCI files."}
  url_infos = None  # nothing to download (tfds would look for a checksums file next to this module)

  def _info(self):
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "features": tfds.features.Tensor(shape=(heart_disease.NUM_FEATURES,), dtype=np.float32),
            "label": tfds.features.ClassLabel(names=["no_disease", "disease"]),
            "center": tfds.features.ClassLabel(names=list(heart_disease.CENTERS)),
        }),
        supervised_keys=("features", "label"),
        citation=CITATION_HEART,
        disable_shuffling=True,  # file order, so partitions match the direct loader
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the files ship with the package
    parts = [heart_disease.load_center(os.path.join(heart_disease.default_data_dir(), f"processed.{c}.data"))
             for c in heart_disease.CENTERS]
    return {"train": self._generate_examples(parts, 0), "test": self._generate_examples(parts, 2)}

  def _generate_examples(self, parts, first):
    for c, (center, p) in enumerate(zip(heart_disease.CENTERS, parts)):
      x, y = p[first], p[first + 1]
      for i in range(len(y)):
        yield f"{c}_{i:06d}", {"features": x[i].astype(np.float32), "label": int(y[i]), "center": center}


class ShippedMedmnist(tfds.core.GeneratorBasedBuilder):
  """The shipped MedMNIST v2 subsets (28x28 grey BreastMNIST, 28x28 RGB RetinaMNIST)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "The shipped .npz files."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=s, description=f"MedMNIST v2 {s}") for s in medmnist.SUBSETS]
  url_infos = None  # nothing to download (tfds would look for a checksums file next to this module)

  def _info(self):
    subset = self.builder_config.name
    with np.load(medmnist.default_path(subset)) as f:
      shape = f["train_images"].shape[1:]
    shape = shape + (1,) if len(shape) == 2 else shape
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=shape, dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=medmnist.SUBSETS[subset]),
        }),
        supervised_keys=("image", "label"),
        citation=CITATION_MEDMNIST,
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in ("train", "val", "test")}

  def _generate_examples(self, split):
    with np.load(medmnist.default_path(self.builder_config.name)) as f:
      x, y = f[f"{split}_images"], f[f"{split}_labels"].reshape(-1)
    if x.ndim == 3:
      x = x[..., None]
    for i in range(len(y)):
      yield i, {"image": x[i].astype(np.uint8), "label": int(y[i])}
