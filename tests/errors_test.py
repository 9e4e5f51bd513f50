import pytest

from cdjax import errors


def _raise_chain(explicit: bool):
  try:
    try:
      raise OSError("disk gone: /ckpt/7/state/d/0001\nsecond line")
    except OSError as inner:
      if explicit:
        raise ValueError("orbax wrapper " + "{spec}" * 200) from inner
      raise ValueError("while handling")
  except ValueError as e:
    return e


@pytest.mark.parametrize("explicit", [True, False])
def test_brief_quotes_the_root_cause_first_line(explicit):
  assert errors.brief(_raise_chain(explicit)) == "OSError: disk gone: /ckpt/7/state/d/0001"


def test_brief_stops_at_a_suppressed_context_and_cuts_long_lines():
  try:
    try:
      raise OSError("hidden")
    except OSError:
      raise KeyError("x" * 50) from None
  except KeyError as e:
    assert errors.brief(e, most=10) == "KeyError: 'xxxxxxxxx..."
  assert errors.brief(RuntimeError("")) == "RuntimeError: "
