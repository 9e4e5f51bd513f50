"""One-line summaries of exceptions, for error messages that quote the error they wrap."""


def brief(e: BaseException, most: int = 300) -> str:
  """`Type: first line of the message` of the innermost error that `e` was raised from, at most
  `most` characters of it (orbax wraps TensorStore's error, the one naming the damaged array and
  file, in messages that embed whole TensorStore specs)."""
  while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
    e = e.__cause__ if e.__cause__ is not None else e.__context__
  first = (str(e).strip().splitlines() or [""])[0]
  return f"{type(e).__name__}: {first[:most]}{'...' if len(first) > most else ''}"
