"""Shared pieces of the sweep commands (policy_sweep, comm_sweep)."""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Callable


def load_config(path: str):
  """`get_config()` of the config file at `path` (a fresh ConfigDict per call)."""
  spec = importlib.util.spec_from_file_location("sweep_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def save_results(out: str, stem: str, records: list[dict],
                 write_table: Callable[[list[dict], str], None],
                 write_plot: Callable[[list[dict], str], None], plot_name: str) -> None:
  """Writes `<stem>.json`, the markdown table `<stem>.md` and the plot into `out`, and
  prints the table."""
  with open(os.path.join(out, f"{stem}.json"), "w") as f:
    json.dump(records, f, indent=2)
  write_table(records, os.path.join(out, f"{stem}.md"))
  write_plot(records, os.path.join(out, plot_name))
  with open(os.path.join(out, f"{stem}.md")) as f:
    print(f.read())


def labeled_scatter(path: str, points: list[tuple[float, float, str]], *, xlabel: str,
                    ylabel: str, title: str, xscale: dict) -> None:
  """A scatter plot of (x, y, label) points, saved as PNG at `path`."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for x, y, label in points:
    ax.scatter(x, y, s=36)
    ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
  ax.set_xscale(**xscale)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(True, alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def override_steps(config, steps: int) -> None:
  """Sets `config.steps` (if `steps` > 0), keeping the warmup shorter than the run."""
  if steps > 0:
    config.steps = steps
    config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, steps // 10)
