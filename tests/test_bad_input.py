"""Bad input through the launcher: every case fails with one line naming the field or file.

The corpus of issue 15 (section 1) runs the launcher in-process (``launch.main.parse_flags`` then
``main``, exactly what ``python -m launch.main`` does); all but the run-time cases fail before
anything is compiled. One subprocess checks the real command line (exit status, no traceback).
"""

import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from absl import flags

from fedjax_health.data import heart_disease, medmnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HD = "--config=configs/heart_disease_fedavg.py:smoke"
BREAST = "--config=configs/breastmnist_dirichlet.py:smoke"
SYNTH = "--config=configs/synthetic_1000_clients.py:smoke"
ATTACK = "--config=configs/heart_disease_attack.py:smoke"


def launch(args, workdir, capsys):
  """Runs the launcher in-process; returns (exit status, stderr, stdout)."""
  from launch import main as launcher
  flags.FLAGS.unparse_flags()
  for name in [n for n in flags.FLAGS if n.startswith("config.")]:
    delattr(flags.FLAGS, name)  # config_flags defines one flag per override; a new parse defines them again
  argv = ["launch.main", *args, f"--workdir={workdir}"]
  cwd, sys_argv = os.getcwd(), sys.argv
  os.chdir(ROOT)
  sys.argv = argv  # config_flags reads the --config.<field> overrides from sys.argv
  try:
    launcher.main(launcher.parse_flags(argv))
    code = 0
  except SystemExit as e:
    code = e.code
  finally:
    os.chdir(cwd)
    sys.argv = sys_argv
    flags.FLAGS.unparse_flags()
  out = capsys.readouterr()
  return code, out.err, out.out


def _one_line_error(code, err, *needles):
  assert code != 0
  lines = [l for l in err.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
  for needle in needles:
    assert needle in lines[0], lines[0]
  assert "Traceback" not in err


# --------------------------------------------------------------------------------------------
# Config: fields, files, variants. (case id, arguments, text the one-line error must contain)

CONFIG_CASES = [
    ("client_lr_inf", [HD, "--config.client.learning_rate=inf"], ["config.client.learning_rate", "inf"]),
    ("client_lr_nan", [HD, "--config.client.learning_rate=nan"], ["config.client.learning_rate", "nan"]),
    ("server_lr_inf", [HD, "--config.server.learning_rate=inf"], ["config.server.learning_rate"]),
    ("server_lr_negative", [HD, "--config.server.learning_rate=-1.0"], ["config.server.learning_rate"]),
    ("adam_b1_negative", [HD, "--config.server.optimizer=adam", "--config.server.b1=-0.5"], ["config.server.b1"]),
    ("adam_b2_one", [HD, "--config.server.optimizer=adam", "--config.server.b2=1.0"], ["config.server.b2"]),
    ("server_momentum_negative", [HD, "--config.server.momentum=-0.9"], ["config.server.momentum"]),
    ("client_momentum_nan", [HD, "--config.client.momentum=nan"], ["config.client.momentum"]),
    ("num_clusters_negative", [SYNTH, "--config.dataset.num_clusters=-2"], ["config.dataset.num_clusters"]),
    ("seed_negative", [HD, "--config.seed=-1"], ["config.seed", ">= 0"]),
    ("mlp_hidden_zero", [SYNTH, "--config.model.hidden=(0,)"], ["config.model.hidden"]),
    ("synthetic_one_sample", [SYNTH, "--config.dataset.samples_per_client=1"], ["config.dataset.samples_per_client"]),
    ("on_divergence_typo", [HD, "--config.on_divergence=ignore"], ["config.on_divergence"]),
    ("variant_typo", ["--config=configs/heart_disease_fedavg.py:smok"], ["no variant 'smok'", "did you mean :smoke"]),
    ("override_typo", [HD, "--config.client.learnign_rate=0.1"],
     ["--config.client.learnign_rate", "did you mean --config.client.learning_rate"]),
    ("override_unknown_section", [HD, "--config.clinet.learning_rate=0.1"], ["--config.clinet.learning_rate"]),
    ("missing_file", ["--config=configs/no_such_config.py"], ["not found", "configs/no_such_config.py"]),
    ("bad_value_type", [HD, "--config.num_rounds=abc"], ["--config.num_rounds", "abc"]),
    ("weak_dp_negative_std", [ATTACK, "--config.defense.aggregator=weak_dp", "--config.defense.noise_std=-1.0"],
     ["config.defense.noise_std", ">= 0"]),
    ("norm_bound_zero", [ATTACK, "--config.defense.aggregator=norm_bound", "--config.defense.max_norm=0.0"],
     ["config.defense.max_norm"]),
    ("trim_fraction_half", [ATTACK, "--config.defense.aggregator=trimmed_mean", "--config.defense.trim_fraction=0.5"],
     ["config.defense.trim_fraction"]),
    ("krum_cohort_too_small", [ATTACK, "--config.defense.aggregator=krum", "--config.defense.num_byzantine=2"],
     ["defense.num_byzantine=2", "cohorts of 4 clients", "config.cohort_size"]),
]


@pytest.mark.parametrize("args, needles", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_is_one_line_naming_the_field(args, needles, tmp_path, capsys):
  code, err, _ = launch(args, tmp_path / "wd", capsys)
  _one_line_error(code, err, *needles)
  assert not os.path.exists(tmp_path / "wd" / "metrics.jsonl")  # refused before anything ran


CONFIG_FILES = {
    "no_get_config": ("def make():\n  return None\n", ["no_get_config.py", "get_config"]),
    "missing_section": ("from fedjax_health.config_base import base_config\n"
                        "def get_config(arg=''):\n  c = base_config()\n  del c['client']\n  return c\n",
                        ["config.client", "section"]),
    "missing_field": ("from fedjax_health.config_base import base_config\n"
                      "def get_config(arg=''):\n  c = base_config()\n  del c.server['tau']\n  return c\n",
                      ["config.server", "tau"]),
    "misspelt_field": ("from fedjax_health.config_base import base_config\n"
                       "def get_config(arg=''):\n  c = base_config()\n  c.client.learnign_rate = 0.1\n  return c\n",
                       ["config.client.learnign_rate", "did you mean config.client.learning_rate"]),
    "misspelt_model_param": ("from fedjax_health.config_base import base_config\n"
                             "def get_config(arg=''):\n  c = base_config()\n  c.model.name = 'mlp'\n"
                             "  c.model.hiden = (8,)\n  return c\n", ["config.model.hiden", "config.model.hidden"]),
    "syntax_error": ("def get_config(arg=''):\n  return (\n", ["syntax_error.py", "cannot be imported"]),
}


@pytest.mark.parametrize("name", sorted(CONFIG_FILES))
def test_bad_config_file_is_one_line_naming_it(name, tmp_path, capsys):
  source, needles = CONFIG_FILES[name]
  path = tmp_path / f"{name}.py"
  path.write_text(source)
  code, err, _ = launch([f"--config={path}"], tmp_path / "wd", capsys)
  _one_line_error(code, err, *needles)


# --------------------------------------------------------------------------------------------
# Data files.


def _breast_npz(tmp_path, change=None, raw=None):
  path = tmp_path / "breast.npz"
  if raw is not None:
    path.write_bytes(raw)
    return str(path)
  with np.load(medmnist.default_path("breastmnist")) as f:
    arrays = {k: f[k] for k in f.files}
  if change:
    change(arrays)
  np.savez(path, **arrays)
  return str(path)


def _set(key, fn):
  def change(arrays):
    arrays[key] = fn(arrays[key])
  return change


NPZ_CASES = {
    "label_out_of_range": (_set("train_labels", lambda y: np.where(np.arange(len(y))[:, None] == 3, 7, y)),
                           ["train_labels", "[0, 2)", "index 3"]),
    "label_negative": (_set("test_labels", lambda y: np.where(np.arange(len(y))[:, None] == 0, -1, y.astype(np.int64))),
                       ["test_labels", "-1"]),
    "label_nan": (_set("val_labels", lambda y: np.full(y.shape, np.nan)), ["val_labels", "nan"]),
    "length_mismatch": (_set("train_labels", lambda y: y[:-5]), ["546 images", "541 labels"]),
    "nan_pixels": (_set("train_images", lambda x: np.where(np.arange(len(x))[:, None, None] == 2, np.nan, x / 255.0)),
                   ["train_images", "NaN or inf", "image 2"]),
    "wrong_rank": (_set("train_images", lambda x: x.reshape(len(x), -1)), ["train_images", "(546, 784)"]),
    "missing_array": (lambda a: a.pop("val_images"), ["missing array 'val_images'"]),
}


@pytest.mark.parametrize("name", sorted(NPZ_CASES))
def test_bad_medmnist_file_names_file_and_array(name, tmp_path, capsys):
  change, needles = NPZ_CASES[name]
  path = _breast_npz(tmp_path, change)
  code, err, _ = launch([BREAST, f"--config.dataset.path={path}"], tmp_path / "wd", capsys)
  _one_line_error(code, err, path, *needles)


def test_truncated_and_non_zip_npz_name_the_file(tmp_path, capsys):
  good = open(medmnist.default_path("breastmnist"), "rb").read()
  for raw in (good[: len(good) // 2], b"this is not a zip archive\n" * 10, b"PK\x03\x04" + b"\x00" * 40):
    path = _breast_npz(tmp_path, raw=raw)
    code, err, _ = launch([BREAST, f"--config.dataset.path={path}"], tmp_path / "wd", capsys)
    _one_line_error(code, err, path, "MedMNIST .npz")


def _heart_dir(tmp_path, center, rewrite):
  data_dir = tmp_path / "hd"
  shutil.copytree(heart_disease.default_data_dir(), data_dir)
  path = data_dir / f"processed.{center}.data"
  text = path.read_text()
  result = rewrite(text)
  (path.write_bytes if isinstance(result, bytes) else path.write_text)(result)
  return str(data_dir), str(path)


def _rows(fn):
  return lambda text: "\n".join(fn(line.split(",")) for line in text.strip().splitlines()) + "\n"


HEART_CASES = {
    "binary_garbage": (lambda t: bytes(range(256)) * 8, ["binary data"]),
    "not_utf8": (lambda t: t.encode() + b"\xff\xfe\xfa,1\n", ["not UTF-8"]),
    "all_rows_dropped": (_rows(lambda f: ",".join(f[:3] + ["?"] + f[4:])), ["0 of", "complete"]),
    "labels_all_missing": (_rows(lambda f: ",".join(f[:13] + ["?"])), ["every label"]),
    "label_negative": (lambda t: t.replace("\n", "\n50,1,2,140,289,0,0,172,0,0,?,?,?,-1\n", 1), [":2:", "'num'"]),
    "inf_feature": (lambda t: t.replace("\n", "\n50,1,2,inf,289,0,0,172,0,0,?,?,?,0\n", 1), [":2:", "'trestbps'"]),
}


@pytest.mark.parametrize("name", sorted(HEART_CASES))
def test_bad_heart_disease_file_names_the_file(name, tmp_path, capsys):
  rewrite, needles = HEART_CASES[name]
  data_dir, path = _heart_dir(tmp_path, "hungarian", rewrite)
  code, err, _ = launch([HD, f"--config.dataset.data_dir={data_dir}"], tmp_path / "wd", capsys)
  _one_line_error(code, err, path, *needles)


def test_python_api_data_check_names_split_and_example():
  from fedjax_health.data.federated import FederatedData, FederatedDataset
  from fedjax_health.input_validation import check_data

  def make(x, y, k=2):
    ds = FederatedDataset({"x": x, "y": y}, np.array([0, len(y)]))
    return FederatedData(train=ds, test=ds, num_classes=k)

  x, y = np.zeros((4, 3), np.float32), np.array([0, 1, 0, 1], np.int32)
  check_data(make(x, y))
  with pytest.raises(ValueError, match=r"labels must be class ids in \[0, 2\), found 2"):
    check_data(make(x, np.array([0, 1, 2, 1], np.int32)))
  with pytest.raises(ValueError, match="1-D integer array"):
    check_data(make(x, y.astype(np.float32)))
  with pytest.raises(ValueError, match="NaN or inf values \\(first at example 1\\)"):
    check_data(make(np.where(np.arange(4)[:, None] == 1, np.inf, x).astype(np.float32), y))


# --------------------------------------------------------------------------------------------
# Workdir and run time.


def test_workdir_of_another_config_is_refused_then_overwritten_and_divergence_stops(tmp_path, capsys):
  wd = tmp_path / "wd"
  wd.mkdir()
  from fedjax_health.config_base import base_config
  earlier = base_config()
  earlier.client.learning_rate = 0.5
  (wd / "config.json").write_text(earlier.to_json_best_effort())
  (wd / "final_params_local_cleveland.npz").write_bytes(b"stale")
  # Server SGD lr 1e6 on logistic regression: train loss ~0.6 in round 1, ~4e3 in round 2.
  args = [HD, "--config.num_rounds=4", "--config.server.learning_rate=1e6", "--config.divergence_loss_limit=1000"]
  code, err, _ = launch(args, wd, capsys)
  _one_line_error(code, err, "holds the outputs of an earlier run with a different config", "'client'",
                  "--config.overwrite=True")
  assert (wd / "final_params_local_cleveland.npz").exists()  # nothing touched
  code, err, out = launch(args + ["--config.overwrite=True"], wd, capsys)
  _one_line_error(code, err, "diverged at round 2", "divergence_loss_limit=1000", "server.learning_rate=1000000.0",
                  "on_divergence=warn")
  assert not (wd / "final_params_local_cleveland.npz").exists()  # the earlier run's outputs were deleted
  rows = [json.loads(l) for l in open(wd / "metrics.jsonl")]
  assert [r["round"] for r in rows] == [1]  # written before the divergence, kept
  assert not (wd / "summary.json").exists()


def test_launcher_subprocess_one_line_and_exit_status(tmp_path):
  cmd = [sys.executable, "-m", "launch.main", HD, f"--workdir={tmp_path}", "--config.server.b1=-0.5"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1
  assert out.stderr.strip() == "error: config.server.b1 must be a finite number in [0, 1), got -0.5", out.stderr


def test_traceback_flag_shows_the_traceback(tmp_path, capsys):
  code, err, _ = launch([HD, "--config.server.b1=-0.5", "--traceback"], tmp_path, capsys)
  assert code == 1 and "Traceback (most recent call last)" in err and "input_validation.py" in err
  assert err.strip().splitlines()[-1] == "error: config.server.b1 must be a finite number in [0, 1), got -0.5"
