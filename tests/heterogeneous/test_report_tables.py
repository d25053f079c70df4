"""The model-heterogeneity renderers: targets verdicts and published claims from committed JSON."""

import json

from experiments import heterogeneity_models as hm


def _e(mean, up, gain=None, gain_gf=None, n=3):
  e = {"mean_client_accuracy": [mean, 0.01, n], "worst10_client_accuracy": [mean - 0.1, 0.02, n],
       "bytes_up_per_client": [up, 0.0, n]}
  if gain is not None:
    e["gain_vs_local"] = [gain, 0.01, n]
  if gain_gf is not None:
    e["gain_vs_group_fedavg"] = [gain_gf, 0.02, n]
  return e


STATS = {"breastmnist": {
    "hetero_local": _e(0.80, 0), "hetero_fedavg": _e(0.82, 5000, gain=0.02), "fedavg": _e(0.81, 10000, gain=0.01),
    "fedmd": _e(0.85, 2000, gain=0.05),  # 20% of FedAvg's upload: not within the 1% target
    "fd": _e(0.81, 50, gain=0.01),  # 0.5%: a cheap winner
    "fedproto": _e(0.79, 100, gain=-0.01),  # 1% but no gain
    "feddf": _e(0.81, 5000, gain=0.01, gain_gf=-0.01)}}


def test_targets_pick_cheap_winners_and_pair_feddf_with_group_fedavg():
  [t] = hm.targets(STATS)
  assert [name for name, _, _ in t["cheap_winners"]] == ["fd"]
  assert t["cheap_winners"][0][2] == 50 / 10000
  assert t["feddf_vs_group_fedavg"] == [-0.01, 0.02, 3]
  text = hm.render_targets({"stats": STATS})
  assert "within 1% of FedAvg's upload: **yes** (FD +1.0 ± 1.0 points at 0.50% of FedAvg's upload, a mean gain within the spread over seeds)" in text
  assert "FedDF matches or beats FedAvg within groups: **no** (-1.0 ± 2.0 points, paired by seed)" in text
  del STATS["breastmnist"]["fd"]
  try:
    assert "**no** method does" in hm.render_targets({"stats": STATS})
  finally:
    STATS["breastmnist"]["fd"] = _e(0.81, 50, gain=0.01)


def test_published_claims_render_every_method_with_setting_and_source(tmp_path):
  path = tmp_path / "pub.json"
  path.write_text(json.dumps({"note": "checked", "methods": [
      {"method": "FD", "paper": "P", "claim": "c", "figures": {"communication_reduction": "26x"},
       "setting": {"datasets": "MNIST", "architectures": "one", "clients": "10"}, "source": "arXiv", "checked_in": "abstract"},
      {"method": "FedDF", "paper": "Q", "claim": "d", "figures": {},
       "setting": {"datasets": "CIFAR-10", "architectures": "mixed", "clients": "?"}, "source": "arXiv", "checked_in": "abstract"}]}))
  text = hm.render_published(str(path))
  assert "| FD (P) | c | communication reduction: 26x | MNIST; one; 10 | abstract; arXiv |" in text
  assert "| FedDF (Q) | d | none quoted |" in text
  committed = json.load(open(hm.PUBLISHED))
  assert {m["method"] for m in committed["methods"]} == {"FedMD", "FD", "FedDF", "FedProto"}
  assert all(m["source"] and m["setting"]["datasets"] for m in committed["methods"])
