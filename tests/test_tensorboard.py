"""TensorBoard events are read back with TensorBoard's own reader and match metrics.jsonl."""

import glob
import json
import math
import os
import shutil

import numpy as np
import pytest

from fedjax_health import simulation
from fedjax_health import tensorboard as tb
from fedjax_health.config_base import base_config

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def _read(run_dir):
  acc = event_accumulator.EventAccumulator(run_dir, size_guidance={
      event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0, event_accumulator.HISTOGRAMS: 0,
      event_accumulator.TENSORS: 0})
  acc.Reload()
  return acc


def _scalar_series(acc, tag):
  return {e.step: e.value for e in acc.Scalars(tag)}


def _image_pixels(acc, tag):
  from PIL import Image
  import io
  ev = acc.Images(tag)[-1]
  return np.asarray(Image.open(io.BytesIO(ev.encoded_image_string)).convert("RGB"))


def _png_pixels(path):
  import matplotlib.image
  img = matplotlib.image.imread(path)[..., :3]
  return np.round(img * 255).astype(np.uint8)


def _text(acc, tag):
  return acc.Tensors(f"{tag}/text_summary")[-1].tensor_proto.string_val[0].decode()


def _assert_same(read, expected):
  expected = np.float32(expected)
  if math.isnan(expected):
    assert math.isnan(read)
  else:
    assert read == expected


def test_training_run_events_equal_metrics_jsonl_also_after_resume(tmp_path):
  config = base_config()
  config.num_rounds, config.client.num_steps, config.checkpoint_every = 2, 3, 2
  workdir = str(tmp_path)
  simulation.run(config, workdir, log=lambda s: None)
  shutil.rmtree(tmp_path / "tb")  # as if killed before the events were flushed
  config.num_rounds = 3  # resumes from round 2's checkpoint: the board replays rounds 1-2
  simulation.run(config, workdir, log=lambda s: None)
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  acc = _read(os.path.join(workdir, "tb", "fedavg"))
  scalars_tags = set(acc.Tags()["scalars"])
  checked = 0
  for key in rows[0]:
    if key in ("experiment", "round"):
      continue
    values = [r[key] for r in rows]
    if isinstance(values[0], list):  # per-client lists: a histogram and one curve per hospital
      hist = {e.step: e.histogram_value for e in acc.Histograms(key)}
      for r in rows:
        h = hist[r["round"]]
        assert (h.num, h.min, h.max) == (len(r[key]), min(r[key]), max(r[key]))
        np.testing.assert_allclose(h.sum, sum(r[key]), rtol=1e-9)
        for i, v in enumerate(r[key]):
          _assert_same(_scalar_series(acc, f"{key}/{i}")[r["round"]], v)
          checked += 1
    else:
      assert key in scalars_tags, key
      series = _scalar_series(acc, key)
      assert sorted(series) == [r["round"] for r in rows]
      for r in rows:
        _assert_same(series[r["round"]], r[key])
        checked += 1
  assert checked >= 3 * 20  # every number of every row was compared
  np.testing.assert_array_equal(_image_pixels(acc, "learning_curves"),
                                _png_pixels(tmp_path / "learning_curves.png"))
  table = _text(acc, "final_metrics")
  assert f"| fedavg | {rows[-1]['accuracy']:.4g} |" in table


def test_board_starts_empty_and_replays_rows(tmp_path):
  board = tb.RunBoard(str(tmp_path))
  board.write_row({"experiment": "a", "round": 1, "accuracy": 0.5})
  board.write_row({"experiment": "a", "round": 2, "accuracy": 0.75})
  board.close()
  board = tb.RunBoard(str(tmp_path), replay=[{"experiment": "a", "round": 1, "accuracy": 0.25}])
  board.close()
  assert len(glob.glob(str(tmp_path / "tb" / "a" / "events.out.tfevents.*"))) == 1  # old events removed
  assert _scalar_series(_read(str(tmp_path / "tb" / "a")), "accuracy") == {1: 0.25}


def test_nested_lists_nonfinite_and_epsilon_curve(tmp_path):
  board = tb.RunBoard(str(tmp_path))
  rows = []
  for r in (1, 2):
    row = {"experiment": "dp_fedavg", "round": r, "accuracy": 0.5 + r / 10, "asr": float("nan"),
           "epsilon_client": 0.7 * r, "epsilon_patient": float("inf"), "delta": 1e-5,
           "by_level": {"client": r, "patient": 2 * r},
           "per_client_accuracy": [float(i) / (r + 3) for i in range(tb.MAX_LIST_SCALARS + 1)]}
    rows.append(row)
    board.write_row(row)
  summary = {"experiments": {"dp_fedavg": {"accuracy": 0.7, "asr": 0.25, "epsilon": 1.4}}}
  simulation.plot_curves(rows, str(tmp_path / "learning_curves.png"), keys=("accuracy", "asr"))
  tb.finish_training(board, rows, summary, str(tmp_path))
  acc = _read(str(tmp_path / "tb" / "dp_fedavg"))
  assert _scalar_series(acc, "by_level/patient") == {1: 2.0, 2: 4.0}
  assert math.isnan(_scalar_series(acc, "asr")[2])
  assert _scalar_series(acc, "epsilon_patient")[1] == float("inf")
  assert "per_client_accuracy/0" not in acc.Tags()["scalars"]  # too many entries: histogram only
  assert acc.Histograms("per_client_accuracy")[1].histogram_value.num == tb.MAX_LIST_SCALARS + 1
  assert os.path.exists(tmp_path / "epsilon_curve.png")
  np.testing.assert_array_equal(_image_pixels(acc, "epsilon_curve"), _png_pixels(tmp_path / "epsilon_curve.png"))
  assert "| dp_fedavg | 0.7 | 0.25 | 1.4 |" in _text(acc, "final_metrics")
  assert "| experiment | accuracy | asr | epsilon |" in _text(acc, "final_metrics")


def test_no_epsilon_no_epsilon_curve(tmp_path):
  rows = [{"experiment": "fedavg", "round": 1, "accuracy": 0.5}]
  assert not tb.plot_epsilon(rows, str(tmp_path / "e.png"))
  assert not os.path.exists(tmp_path / "e.png")


def test_inversion_summary_and_grid(tmp_path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  grid = str(tmp_path / "inversion_grid.png")
  plt.imsave(grid, np.random.default_rng(0).random((20, 30)), cmap="gray")
  summary = {"attack": "idlg", "psnr_mean": 21.5, "label_accuracy": 1.0, "num_attacks": 4,
             "per_feature_mae": {"age": 0.25, "sex": 0.5}, "dataset": "breastmnist"}
  tb.write_inversion(str(tmp_path), summary, grid)
  acc = _read(str(tmp_path / "tb" / "inversion"))
  assert _scalar_series(acc, "psnr_mean") == {0: 21.5}
  assert _scalar_series(acc, "per_feature_mae/sex") == {0: 0.5}
  np.testing.assert_array_equal(_image_pixels(acc, "reconstructions"), _png_pixels(grid))
  assert "| per_feature_mae | 0.25 | 0.5 |" in _text(acc, "per_feature_mae")
