"""Measurement primitives shared by the ratio modules: ratio records, steady-state timing,
child processes with CPU time and peak RSS.

    python -m benchmarks --quick --json out/bench.json

Every ratio is measured side by side in one run on one machine, so shared or throttled CPUs
move both sides of a ratio together; absolute figures are recorded next to each ratio.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

# The line a child job prints last: its own and its children's resource usage as JSON.
RUSAGE_MARKER = "BENCH_RUSAGE "
COMPARISONS = (">=", "<=")


@dataclasses.dataclass
class Figure:
  """One absolute measurement behind a ratio (e.g. `extract images/s`)."""
  label: str
  value: float
  unit: str

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready form."""
    return {"label": self.label, "value": self.value, "unit": self.unit}


@dataclasses.dataclass
class Ratio:
  """A benchmark ratio with its two absolute figures and its target.

  Attributes:
    key: `R1` ... `R7`.
    name: what it measures, in a few words.
    value: numerator / denominator (None when it could not be measured).
    numerator, denominator: the absolute figures.
    target: the threshold; `comparison` says which side passes.
    details: further figures (other backbones, modes, per-size breakdowns).
    notes: how it was measured and what the quick mode changes.
  """
  key: str
  name: str
  value: float | None
  numerator: Figure
  denominator: Figure
  target: float
  comparison: str = ">="
  details: dict[str, Any] = dataclasses.field(default_factory=dict)
  notes: str = ""
  reason: str = ""

  def __post_init__(self):
    if self.comparison not in COMPARISONS:
      raise ValueError(f"comparison {self.comparison!r} is not one of {COMPARISONS}")

  @property
  def meets_target(self) -> bool:
    """Whether the value is on the passing side of the target (False when not measured)."""
    if self.value is None:
      return False
    return self.value >= self.target if self.comparison == ">=" else self.value <= self.target

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready form: value, target, verdict, both figures, details, notes."""
    return {
        "name": self.name, "value": self.value, "target": self.target,
        "comparison": self.comparison, "meets_target": self.meets_target,
        "numerator": self.numerator.to_dict(), "denominator": self.denominator.to_dict(),
        "details": self.details, "notes": self.notes, "reason": self.reason,
    }

  def line(self) -> str:
    """One printable line: key, value vs target, verdict and both absolute figures."""
    value = "n/a" if self.value is None else f"{self.value:.4g}"
    verdict = "MEETS" if self.meets_target else "MISSES"
    text = (f"{self.key} {self.name}: {value} (target {self.comparison} {self.target:g}) "
            f"{verdict} | {self.numerator.label} {self.numerator.value:.4g} "
            f"{self.numerator.unit} / {self.denominator.label} {self.denominator.value:.4g} "
            f"{self.denominator.unit}")
    if self.reason and not self.meets_target:
      text += f" | why: {self.reason}"
    return text


def ratio_or_none(numerator: float, denominator: float) -> float | None:
  """numerator / denominator, or None when the denominator is not positive."""
  return numerator / denominator if denominator > 0 else None


def steady_rate(step: Callable[[], int], *, warmup: int = 1, min_seconds: float = 2.0,
                min_steps: int = 2) -> tuple[float, float]:
  """Items per second of `step()` (which returns how many items it processed) after warm-up.

  Returns:
    (items per wall second, items per CPU second of this process).
  """
  if min_steps <= 0:
    raise ValueError(f"min_steps must be positive, got {min_steps!r}")
  for _ in range(warmup):
    step()
  items, steps = 0, 0
  wall, cpu = time.perf_counter(), time.process_time()
  while steps < min_steps or time.perf_counter() - wall < min_seconds:
    items += step()
    steps += 1
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  return items / wall, items / cpu if cpu > 0 else float("inf")


@contextlib.contextmanager
def quiet() -> Iterator[io.StringIO]:
  """Captures stdout and stderr of in-process stage runs (their progress lines)."""
  buffer = io.StringIO()
  with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
    yield buffer


@dataclasses.dataclass
class ChildResult:
  """A job run in a child process: wall and CPU seconds (the whole process tree), peak RSS.

  Attributes:
    max_rss_mb: peak RSS of the job's main process (its own ru_maxrss).
    tree_rss_mb: peak of the summed RSS of the whole process tree (sampled), which counts
      decoder subprocesses and Beam workers too.
    cpu_by_role: sampled CPU seconds of the main process, the isolated decoder processes and
      other workers (the last sample interval of each may be missing).
  """
  wall_seconds: float
  cpu_seconds: float
  max_rss_mb: float
  tree_rss_mb: float
  processes: int
  output: str
  usage: dict[str, Any] = dataclasses.field(default_factory=dict)  # the child's report
  cpu_by_role: dict[str, float] = dataclasses.field(default_factory=dict)  # sampled, see below


class _TreeSampler:
  """Samples a process tree's CPU seconds and summed RSS (psutil), so subprocesses that are
  never reaped (killed pools) still count."""

  def __init__(self, pid: int):
    import psutil
    self._psutil = psutil
    self._root = psutil.Process(pid)
    self.cpu_by_pid: dict[int, float] = {}
    self.role_of_pid: dict[int, str] = {pid: "main"}
    self.peak_rss = 0

  def _role(self, process) -> str:
    """`main` (the job), `decoder` (an isolated decoder process) or `worker` (anything else)."""
    if process.pid not in self.role_of_pid:
      try:
        command = " ".join(process.cmdline())
      except self._psutil.Error:
        command = ""
      self.role_of_pid[process.pid] = "decoder" if "pipeline.decode_worker" in command else "worker"
    return self.role_of_pid[process.pid]

  def cpu_by_role(self) -> dict[str, float]:
    """CPU seconds summed by role (see `_role`)."""
    totals: dict[str, float] = {}
    for pid, seconds in self.cpu_by_pid.items():
      role = self.role_of_pid.get(pid, "worker")
      totals[role] = totals.get(role, 0.0) + seconds
    return totals

  def sample(self) -> None:
    """Records every live process's CPU seconds and the tree's summed RSS."""
    psutil = self._psutil
    try:
      processes = [self._root, *self._root.children(recursive=True)]
    except psutil.Error:
      return
    rss = 0
    for process in processes:
      try:
        times = process.cpu_times()
        rss += process.memory_info().rss
      except psutil.Error:
        continue
      self.cpu_by_pid[process.pid] = times.user + times.system
      self._role(process)
    self.peak_rss = max(self.peak_rss, rss)


def run_child(stage: str, argv: Sequence[str], *, timeout: float = 1800,
              sample_seconds: float = 0.2) -> ChildResult:
  """Runs `benchmarks.subjob STAGE ARGV...` in a fresh Python and measures it.

  CPU time is the larger of this process's RUSAGE_CHILDREN delta (exact for every reaped
  descendant) and the sum over the sampled process tree (catches descendants that exit
  unreaped, e.g. a killed decoder pool; misses at most the last sample interval). Peak RSS of
  the main process comes from its own report, because RUSAGE_CHILDREN's ru_maxrss is a running
  maximum over every child ever waited for.

  Raises:
    RuntimeError: the child failed (its output tail is in the message).
  """
  if timeout <= 0:
    raise ValueError(f"timeout must be positive, got {timeout!r}")
  # Earlier runs' files are written out first: a child that starts with GBs of them still in
  # the page cache has its own writes throttled and its page allocations pay for reclaim (the
  # HTTP ingest's write and cache phases cost twice as much late in the full suite as alone).
  os.sync()
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  started = time.perf_counter()
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
  with tempfile.TemporaryFile("w+") as out:
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.subjob", stage, *argv],
                            stdout=out, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sampler = _TreeSampler(proc.pid)
    while proc.poll() is None:
      sampler.sample()
      if time.perf_counter() - started > timeout:
        proc.kill()
      time.sleep(sample_seconds)
    wall = time.perf_counter() - started
    out.seek(0)
    output = out.read()
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  if proc.returncode != 0:
    raise RuntimeError(f"{stage} child failed (exit {proc.returncode}): {output[-2000:]}")
  usage = {}
  for line in output.splitlines():
    if line.startswith(RUSAGE_MARKER):
      usage = json.loads(line[len(RUSAGE_MARKER):])
  cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
  cpu = max(cpu, sum(sampler.cpu_by_pid.values()))
  return ChildResult(wall, cpu, float(usage.get("self_mb", float("nan"))),
                     sampler.peak_rss / 2**20, len(sampler.cpu_by_pid), output, usage,
                     sampler.cpu_by_role())


def machine() -> dict[str, Any]:
  """CPU model, core count and load, for the record of where a run was measured."""
  model = ""
  with contextlib.suppress(OSError):
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          model = line.split(":", 1)[1].strip()
          break
  return {"cpu_model": model, "cores": os.cpu_count(), "load_average": os.getloadavg(),
          "python": sys.version.split()[0]}


def head_parser(prog: str, description: str, *, head: str, epochs: int):
  """The flags of the stand-alone head benchmarks: a feature dataset, a head, epochs."""
  import argparse

  from heads import zoo
  parser = argparse.ArgumentParser(prog=prog, description=description)
  parser.add_argument("--features", required=True)
  parser.add_argument("--head", default=head, choices=zoo.HEADS)
  parser.add_argument("--epochs", type=int, default=epochs)
  return parser
