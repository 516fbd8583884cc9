"""A compare grid's runs as elements of a Beam job, so many machines can share one grid.

    headstart compare --features gs://b/features --heads linear,mlp --seeds 3 \
        --out gs://b/compare --runner DataflowRunner --project P --region R ...
    headstart compare ... --direct_running_mode=multi_processing --direct_num_workers=2

Each element is one (cell, seed) run: a worker trains it with the same function the in-process
grid uses, reading the features from shared storage (`gs://`, or a local path for local runners)
and writing its run directory there. The driver then reads every run's `metrics.json` and
builds the same leaderboard, cost ledger and report as an in-process compare. Training is
deterministic (seeded, deterministic ops), so both paths give the same numbers for the same
seeds.

This is the one stage-3 module that imports Apache Beam; `compare` loads it only when Beam
flags are given, so `headstart train` and an in-process compare never import Beam.
"""
from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from contracts import cli


def _resolve(function_path: str):
  module_name, _, name = function_path.partition(":")
  return getattr(importlib.import_module(module_name), name)


class TrainRunFn(beam.DoFn):
  """One run task (a picklable dict) -> (run directory, finished) after training it."""

  def __init__(self, train_run: str):
    super().__init__()
    # A "module:function" path, resolved on the worker: the function itself need not pickle.
    self._train_run_path = train_run
    self._runs = beam.metrics.Metrics.counter("compare", "runs_trained")

  def setup(self):
    self._train_run = _resolve(self._train_run_path)

  def process(self, task: dict[str, Any]):
    self._train_run(task)
    self._runs.inc()
    yield task["run_dir"]


class TrainRuns(beam.PTransform):
  """Run tasks -> run directories, each trained once, spread over the workers."""

  def __init__(self, tasks: Sequence[dict[str, Any]], train_run: str):
    super().__init__()
    self._tasks = [dict(task) for task in tasks]
    self._train_run = train_run

  def expand(self, root):
    return (root
            | "ListRuns" >> beam.Create(self._tasks)
            # One run per bundle: a worker that takes a run trains only that one, so N
            # workers share N runs instead of one worker taking the whole list.
            | "SpreadRuns" >> beam.Reshuffle()
            | "TrainRuns" >> beam.ParDo(TrainRunFn(self._train_run)))


def build_pipeline(root: beam.Pipeline, tasks: Sequence[dict[str, Any]],
                   train_run: str) -> beam.PCollection:
  """Adds the grid's runs to `root`; returns the PCollection of trained run directories."""
  return root | "TrainGrid" >> TrainRuns(tasks, train_run)


def run_grid(tasks: Sequence[dict[str, Any]], train_run: str, beam_args: Sequence[str]) -> None:
  """Trains every task on the Beam runner the flags name (local runs: the Python runner)."""
  if not tasks:
    return
  root = beam.Pipeline(options=PipelineOptions(cli.with_default_runner(list(beam_args))))
  build_pipeline(root, tasks, train_run)
  root.run().wait_until_finish()


def check_beam_args(beam_args: Sequence[str]) -> None:
  """Refuses flags that are not Beam pipeline options (a typo of a compare flag, say) in one
  line, instead of Beam's silent "Discarding unparseable args".

  Raises:
    cli.UsageError: naming the first unknown flag.
  """
  from apache_beam.options import pipeline_options

  parser = pipeline_options._BeamArgumentParser(allow_abbrev=False)  # noqa: SLF001 (Beam's own)
  for options_class in {str(c): c for c in PipelineOptions.__subclasses__()}.values():
    options_class._add_argparse_args(parser)  # noqa: SLF001
  _, unknown = parser.parse_known_args(list(beam_args))
  if unknown:
    raise cli.UsageError(f"unrecognized argument {unknown[0]!r}: not a compare flag nor a Beam "
                         "pipeline option (headstart compare --help)")
