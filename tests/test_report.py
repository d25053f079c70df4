import pytest

from experiments import heart_disease_table, report


def test_render_file_replaces_only_marked_sections():
  report.register("_test_table", lambda: "| a |\n|---|\n| 1 |")
  text = ("intro 0.5\n<!-- BEGIN generated:_test_table -->\nstale 9.9\n<!-- END generated:_test_table -->\n"
          "outro 0.7\n")
  out = report.render_file(text)
  assert out == ("intro 0.5\n<!-- BEGIN generated:_test_table -->\n| a |\n|---|\n| 1 |\n"
                 "<!-- END generated:_test_table -->\noutro 0.7\n")
  assert report.render_file(out) == out  # idempotent
  assert report.render_file(text, names=("other",)) == text


def test_unregistered_section_is_an_error():
  with pytest.raises(KeyError, match="no registered renderer"):
    report.render_file("<!-- BEGIN generated:nobody -->\nx\n<!-- END generated:nobody -->\n", path="README.md")


def test_committed_tables_are_generated_from_committed_results():
  """README.md and docs/*.md equal what the renderers make of docs/results and docs/perf_*.json."""
  assert report.update_all(check=True) == []
  found = report.sections()
  assert {"heart_disease", "perf_compare", "perf_scale", "security_summary", "heterogeneity_summary",
          "inversion_summary", "privacy_results", "ftl_summary", "dp_streaming_summary"} <= set(found["README.md"])
  for doc, names in {"docs/security.md": ("security_setup", "security_claims", "security_tables"),
                     "docs/heterogeneity.md": ("heterogeneity_tables", "heterogeneity_findings"),
                     "docs/transfer.md": ("ftl_tables", "ftl_findings"),
                     "docs/inversion.md": ("inversion_images", "inversion_records", "inversion_findings",
                                           "inversion_batched_table", "inversion_batched_findings"),
                     "docs/privacy.md": ("privacy_results", "privacy_findings", "privacy_accountants",
                                         "dp_streaming_table"),
                     "docs/model_heterogeneity.md": ("model_heterogeneity", "model_heterogeneity_targets",
                                                     "model_heterogeneity_published"),
                     "docs/inversion_native.md": ("inversion_native",)}.items():
    assert set(names) <= set(found[doc]), doc


def test_heart_disease_verdict_marks_rows_below_flamby():
  flamby = {"source": "x", "rows": {"FedAvg": {"mean_over_4": 0.70, "pooled_test": 0.75},
                                    "FedAdam": {"mean_over_4": 0.73, "pooled_test": 0.78}}}

  def row(vals):
    return {"per_seed": [{"seed": i, "mean_client_accuracy": v, "pooled_test_accuracy": v, "worst_client_accuracy": v,
                          "auc": v} for i, v in enumerate(vals)], "settings": {}}

  results = {"flamby": {"FedAvg": row([0.71, 0.73]), "FedAdam": row([0.70, 0.72])},
             "ours": {"FedAvg": row([0.80, 0.82])}}
  table = heart_disease_table.render_table(results, flamby)
  assert "| FedAvg | 0.700 / 0.750 | 0.720 ± 0.010 ✓ |" in table
  assert "0.710 ± 0.010 ✗" in table
  verdict = heart_disease_table.render_verdict(results, flamby)
  # gap 0.02; se = sqrt(0.01414^2 / 2) = 0.01 (FLamby's sd absent): 2.0 standard errors.
  assert verdict == ("In FLamby's own protocol we match or beat 1 of 2 FLamby rows; below it: FedAdam (0.710 vs "
                     "0.730: 0.020 below, 2.0 standard errors of the difference).")


def test_every_registered_section_is_used_and_renderer_modules_import_no_jax():
  """No renderer is orphaned, and ``make report`` stays cheap: importing the renderers imports no jax."""
  import subprocess
  import sys
  import os
  report.load_renderers()
  used = {name for names in report.sections().values() for name in names}
  # A renderer whose committed result files exist must be used by some README/docs section.
  ready = {n for n, r in report.REGISTRY.items() if not n.startswith("_") and all(map(os.path.exists, r.sources))}
  assert ready - used == set()
  out = subprocess.run([sys.executable, "-c", "import sys; from experiments import report; report.load_renderers(); "
                        "print('jax' in sys.modules)"], cwd=report.ROOT, capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"


def _security_doc(repl_asr):
  from experiments import security_report as sr

  def per(acc=0.8, asr=0.1, tpr=0.0):
    return [{"accuracy": acc, "asr_backdoor": asr, "asr_edge": asr, "tpr": tpr, "fpr": 0.0,
             "rejection_rate_per_client": [0.0, 0.5, 0.0, 0.0]}] * 2
  cells = {f"{a}|{d}": per() for a in ("none", "backdoor", "backdoor+pgd", "edge_case+pgd", "label_flip", "sign_flip",
                                       "gaussian", "alie", "ipm", "fang") for d in sr.DEFENSES}
  cells.update({f"backdoor+pgd+repl|{d}": per(asr=0.1) for d in sr.DEFENSES})
  cells["backdoor+pgd+repl|mean"] = per(asr=repl_asr)
  fed = {"setting": "breastmnist_device", "label": "x", "seeds": [0, 1], "cells": cells, "malicious": [0],
         "label_skew": [0.0, 0.4, 0.1, 0.2], "pretrained": per(asr=0.02), "wall_time_s": 60.0}
  return {"federations": [fed]}


def test_security_discussion_words_follow_the_numbers():
  from experiments import security_report as sr
  strong, weak = sr.discussion_markdown(_security_doc(0.6)), sr.discussion_markdown(_security_doc(0.12))
  assert "breastmnist_device: ASR 0.60, above the stronger of black-box poisoning (0.10)" in strong
  assert "0.10 / 0.10 against 0.60 under FedAvg (a cut;" in strong
  assert "breastmnist_device: ASR 0.12, about the same as the stronger of black-box poisoning" in weak
  assert "against 0.12 under FedAvg (no change;" in weak


def test_ftl_verdicts_use_the_paired_spread():
  from experiments import ftl
  behind, equal, ahead = ftl._verdicts([(10, -0.05, 0.02), (20, -0.01, 0.03), (50, 0.04, 0.01)])
  assert [g[0] for g in behind] == [10] and [g[0] for g in equal] == [20] and [g[0] for g in ahead] == [50]


def test_heterogeneity_findings_count_methods_beating_fedavg():
  from experiments import heterogeneity as het
  rows = []
  for seed in (0, 1):
    for method, mean, worst in (("fedavg", 0.70, 0.40), ("ifca", 0.75, 0.45), ("fedper", 0.72, 0.35)):
      rows.append({"dataset": "synthetic", "method": method, "seed": seed, "accuracy": mean,
                   "mean_client_accuracy": mean + 0.01 * seed, "worst10_client_accuracy": worst, "wall_s": 1.0})
  text = het.findings({"rows": rows}, het.collect(rows))
  assert "1 of 2 clustered / personalised methods beat FedAvg on both" in text and ": ifca." in text
  assert "Best mean: ifca 75.5 % vs FedAvg 70.5 % (+5.0 ± 0.0 points, paired)" in text
  assert "Largest loss on the worst-10% clients: fedper (-5.0 ± 0.0)" in text


def test_privacy_findings_within_noise_and_constant_guess():
  import math
  from experiments import privacy
  rows = []
  for eps, accs in (("none", (0.805, 0.815)), (1.0, (0.50, 0.52)), (3.0, (0.77, 0.83)), (8.0, (0.80, 0.82)),
                    (math.inf, (0.81, 0.81))):
    rows += [{"setting": "hd_patient", "target_epsilon": eps, "seed": s, "accuracy": a, "auc": a,
              "noise_multiplier_patient": None if eps in ("none", math.inf) else 1.0} for s, a in enumerate(accs)]
  text = privacy.findings({"rows": rows, "majority_class_rate": {"hd_patient": 0.516}})
  assert "Accuracy: within seed noise of the non-private model from ε = 3 on; AUC: within seed noise" in text
  assert "accuracy at or below the constant guess at ε = 1" in text
  for r in rows:  # AUC: close at eps = 3 but far below at 8, so no finite eps is close from there on
    r["auc"] = 0.6 if r["target_epsilon"] == 8.0 else r["accuracy"]
  text = privacy.findings({"rows": rows, "majority_class_rate": {"hd_patient": 0.516}})
  assert ("Accuracy: within seed noise of the non-private model from ε = 3 on; AUC: no finite ε tested within "
          "seed noise of the non-private model (gap ≤ the larger seed sd)") in text


def test_inversion_findings_first_dp_level_below_the_mean_image():
  from experiments import inversion_sweep as isw

  def img(group, setting, psnr, eps=None):
    return {"group": group, "setting": setting, "psnr_mean": psnr, "ssim_mean": 0.5, "label_accuracy": 1.0,
            "epsilon_one_upload": eps, "num_attacks": 4, "examples_per_attack": 1, "seconds": 1.0}
  doc = {"images": [img("reference", "guess the train mean (no attack)", 18.0), img("none", "no defence (base)", 40.0),
                    img("DP noise z", "z = 1e-4", 21.0, 2e8), img("DP noise z", "z = 1e-3", 7.0, 2e6)],
         "records": []}
  text = isw.findings(doc)
  assert "The first noise level at or below the mean-image guess is z = 1e-3, with a one-upload eps of 2e+06" in text


def test_privacy_rows_merge_and_missing_plan():
  from experiments import privacy
  old = [{"setting": "hd_client", "target_epsilon": "none", "seed": 0, "accuracy": 0.5, "run": 0},
         {"setting": "hd_client", "target_epsilon": 1.0, "seed": 0, "accuracy": 0.6, "run": 0}]
  new = [{"setting": "hd_client", "target_epsilon": 1.0, "seed": 0, "accuracy": 0.7, "run": 1},
         {"setting": "hd_client", "target_epsilon": 1.0, "seed": 1, "accuracy": 0.8, "run": 1}]
  merged = privacy.merge_rows(old, new)
  assert sorted((r["target_epsilon"] == 1.0, r["seed"], r["accuracy"]) for r in merged) == [
      (False, 0, 0.5), (True, 0, 0.7), (True, 1, 0.8)]
  text = privacy.missing(merged)
  assert text.startswith("hd_client no DP (seeds 1-9); hd_client ε = 1 (seeds 2-9); hd_client ε = 3 (seeds 0-9);")
  assert "hd_patient, every row (seeds 0-9)" in text and "breast_clinics, every row (seeds 0-2)" in text
  full = [{"setting": s, "target_epsilon": privacy._key(e), "seed": seed} for s, seeds in privacy.PLANNED_SEEDS.items()
          for e in (None,) + privacy.EPSILONS for seed in seeds]
  assert privacy.missing(full) == ""
  assert privacy.missing(full[1:]) == "hd_client no DP (seed 0)"


def _dp_streaming_doc(stacked, dense, lowrank, load):
  forms = {n: {"round_ms": t, "first_call_s": 2.0, "max_abs_diff_vs_stacked": 1e-7}
           for n, t in (("stacked", stacked), ("streaming_dense", dense), ("streaming_lowrank", lowrank))}
  return {"workload": "W1", "clients": 1000, "num_params": 159010, "stack_bytes": 636040000, "clip_norm": 1.0,
          "noise_multiplier": 1.0, "repeats": 5, "backend": "cpu", "forms": forms, "date": "d",
          "machine": "m, 2 CPU cores",
          "jax": "j", "commit": "c", "command": "cmd", "load_before": load, "load_after": load}


def test_dp_streaming_wording_follows_the_numbers():
  from benchmarks import dp_streaming as ds
  fast = ds.render_table(_dp_streaming_doc(6506.0, 395.0, 117.0, 0.4))
  assert "| streaming, low-rank path | 117 ms | 56x faster than stacked | 2.0 s |" in fast
  assert "| streaming, dense path | 395 ms | 16x faster than stacked |" in fast
  assert "0.64 GB for 1,000 W1 clients" in fast and "shared machine" not in fast
  slow = ds.render_table(_dp_streaming_doc(100.0, 400.0, 50.0, 3.0))
  assert "| streaming, dense path | 400 ms | 4.0x slower than stacked |" in slow
  assert "| streaming, low-rank path | 50 ms | 2.0x faster than stacked |" in slow
  assert "Taken on a shared machine (load average 3.0 before" in slow
  assert ds.render_summary(_dp_streaming_doc(6506.0, 395.0, 117.0, 0.4)).startswith(
      "  It runs on this path: 117 ms per W1 round, 56x faster than the stacked aggregator's 6,506 ms "
      "(`benchmarks/dp_streaming.py`, d; [docs")
  assert "6,506 ms (`benchmarks/dp_streaming.py`, d, a shared machine at load average 3.0;" in ds.render_summary(
      _dp_streaming_doc(6506.0, 395.0, 117.0, 3.0))


def test_inversion_batched_findings_follow_the_target():
  from benchmarks import inversion_batched as ib

  def row(name, step, jit):
    return {"workload": name, "victims": 256, "steps": 100, "per_step_loop_s": step, "per_victim_jit_s": jit,
            "batched_s": {"32": 1.0}, "best_width": 32, "speedup_vs_per_step": step, "speedup_vs_per_victim_jit": jit}
  doc = {"rows": [row("records", 68.9, 8.8), row("mlp_images", 4.1, 1.0), row("lenet", 1.1, 1.3)], "backend": "cpu",
         "load_before": 9.0, "load_after": 8.0, "machine": "m", "subset": 16, "repeats": 2, "widths": "0,32",
         "date": "d", "jax": "j", "commit": "c", "command": "cmd"}
  text = ib.findings(doc)
  assert text.startswith("The >= 20x target is met for Fed-Heart-Disease records, MLP 13-32-1 against the per-step "
                         "loop (69x). It is not met for Fed-Heart-Disease records, MLP 13-32-1 against the per-victim "
                         "jit (8.8x); BreastMNIST 16x16, MLP 256-64-2 against the per-step loop (4.1x) and the "
                         "per-victim jit (1.0x); ")
  assert "For images, batching gains at most 1.3x over the per-victim jit on this CPU" in text
  table = ib.render_table(doc)
  assert "| Fed-Heart-Disease records, MLP 13-32-1 | 68.9 | 8.80 | 1.00, 32 | **69x** | 8.8x |" in table
  assert "taken on a shared machine (load average 9.0 before" in table
  doc["rows"][2] = row("lenet", 5.0, 5.0)
  assert "For images, batching gains at most 5.0x over the per-victim jit" in ib.findings(doc)
  doc["rows"][2] = row("lenet", 30.0, 25.0)
  text = ib.findings(doc)
  assert ("BreastMNIST 16x16, sigmoid LeNet against the per-step loop (30x) and the per-victim jit (25x)"
          in text.split(". It is not met")[0])
  assert "For images" not in text


def test_privacy_committed_rows_tag_a_legacy_file_as_one_run(tmp_path):
  import json
  from experiments import privacy
  path = tmp_path / "privacy.json"
  path.write_text(json.dumps({"date": "d0", "machine": "m", "jax": "j", "commit": "c0", "command": "cmd0",
                              "note": "cut",
                              "rows": [{"setting": "hd_client", "target_epsilon": 1.0, "seed": 0, "accuracy": 0.5}]}))
  rows, runs = privacy.committed_rows(str(path))
  assert rows == [{"setting": "hd_client", "target_epsilon": 1.0, "seed": 0, "accuracy": 0.5, "run": 0}]
  assert runs == [{"date": "d0", "machine": "m", "jax": "j", "commit": "c0", "command": "cmd0", "note": "cut"}]
  assert privacy.committed_rows(str(tmp_path / "absent.json")) == ([], [])


def test_shared_machine_is_a_load_above_the_core_count():
  from experiments import report
  assert not report.shared_machine(0.3, 1.9, "x86_64 Linux, 2 CPU cores")  # the benchmark's own threads
  assert report.shared_machine(0.3, 2.5, "x86_64 Linux, 2 CPU cores")
  assert not report.shared_machine(6.0, 7.9, "x86_64 Linux, 8 CPU cores")
  assert report.shared_machine(1.5, 0.2, "a machine that does not say")  # counted as 1 core
