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
  assert {"heart_disease", "perf_compare", "perf_scale"} <= set(found["README.md"])


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
