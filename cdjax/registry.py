"""One small registry mechanism, used for SDEs, predictors, correctors, networks, datasets, ..."""
import difflib
from typing import Any, Callable


class Registry:
  """Maps names to objects; `@REG.register("name")` adds one, `REG.get("name")` looks it up.

  An unknown name raises a `KeyError` that lists the known names and the closest matches.
  """

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: dict[str, Any] = {}

  def register(self, name: str) -> Callable[[Any], Any]:
    def decorator(obj):
      if name in self._entries:
        raise ValueError(f"{self.kind} {name!r} is already registered.")
      self._entries[name] = obj
      return obj
    return decorator

  def get(self, name: str) -> Any:
    if name not in self._entries:
      close = difflib.get_close_matches(str(name), self._entries, n=3)
      hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
      raise KeyError(f"Unknown {self.kind} {name!r}.{hint} Known: {', '.join(sorted(self._entries))}.")
    return self._entries[name]

  def names(self) -> list[str]:
    return sorted(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries
