"""Shared command-line pieces of the absl entry points (launch.train, launch.serve)."""

from __future__ import annotations

import sys
from typing import Callable

from absl import flags


def flags_parser(prog: str, unknown_keys: Callable[[list[str]], list[str]]):
  """An absl `flags_parser` that reports unknown `--config.KEY` overrides (found by
  `unknown_keys(args)`) and flag errors as `<prog>: ...` on stderr, exit status 2."""

  def parse(argv: list[str]) -> list[str]:
    problems = unknown_keys(argv[1:])
    if problems:
      print(f"{prog}: " + "\n  ".join(problems), file=sys.stderr)
      sys.exit(2)
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      print(f"{prog}: {e}\nSee --helpfull for the flags.", file=sys.stderr)
      sys.exit(2)

  return parse
