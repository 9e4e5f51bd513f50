"""Tests for cdjax.registry: registering, lookup, and the errors for taken and unknown names."""
import pytest

from cdjax.registry import Registry


def test_register_returns_the_object_and_get_finds_it():
  reg = Registry("thing")

  @reg.register("beta")
  def beta():
    return 2

  alpha = reg.register("alpha")(object())
  assert beta() == 2 and reg.get("beta") is beta and reg.get("alpha") is alpha
  assert reg.names() == ["alpha", "beta"]   # sorted, not in order of registration
  assert "alpha" in reg and "gamma" not in reg


def test_a_taken_name_is_refused_and_keeps_its_object():
  reg = Registry("thing")
  first = reg.register("a")(object())
  with pytest.raises(ValueError, match="thing 'a' is already registered"):
    reg.register("a")(object())
  assert reg.get("a") is first


def test_an_unknown_name_lists_the_closest_and_all_known_names():
  reg = Registry("predictor")
  for name in ("heun", "euler", "ddim", "ancestral"):
    reg.register(name)(name)
  with pytest.raises(KeyError) as e:
    reg.get("eulr")
  assert e.value.args[0] == ("Unknown predictor 'eulr'. Did you mean 'euler'? "
                             "Known: ancestral, ddim, euler, heun.")
  with pytest.raises(KeyError) as e:
    reg.get("xyz")
  assert e.value.args[0] == "Unknown predictor 'xyz'. Known: ancestral, ddim, euler, heun."
