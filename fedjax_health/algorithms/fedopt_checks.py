"""Config checks for the FedOpt server fields (``server.form``, ``server.weighting``, ...)."""

from fedjax_health.algorithms import fedopt
from fedjax_health.config_validation import register_check, require


@register_check
def check_server(config, data=None) -> None:
  del data
  s = config.get("server")
  if s is None:
    return
  form = s.get("form", "reddi")
  require(form in ("reddi", "optax"), "server.form", "one of ['optax', 'reddi']", form)
  weighting = s.get("weighting", "examples_used")
  require(weighting in fedopt.WEIGHTINGS, "server.weighting", f"one of {list(fedopt.WEIGHTINGS)}", weighting)
  require(0 <= s.get("b1", 0.9) < 1, "server.b1", "in [0, 1)", s.get("b1"))
  if s.get("optimizer") in ("adam", "yogi"):
    require(0 <= s.get("b2", 0.999) < 1, "server.b2", "in [0, 1)", s.get("b2"))
