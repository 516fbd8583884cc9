"""Every head on every backbone's cached features, several seeds each: leaderboard + cost ledger.

    headstart compare --features out/features --heads linear,mlp,conv --seeds 3 --out runs/compare
    # sample data (2 feature datasets x 3 heads x 3 seeds, 96 px): about a minute on 2 CPU cores

Reads `FEATURES/index.json` (written by `headstart extract`; `heads.grid` plans the cells) and
trains one run per cell and seed, by default in process (`train_cell`, i.e.
`heads.training.train`) into `OUT/cells/<feature dataset dir>/<head>/seed<k>`. A seed whose
`metrics.json` exists is not trained again, so an interrupted grid resumes where it stopped.
Writes, at the top of `OUT` (`heads.leaderboard` holds the numbers and names the files):

- `leaderboard.csv`: one row per (feature dataset, head) cell, mean and std over seeds;
- `leaderboard_seeds.csv`: one row per seed run;
- `leaderboard.md` (markdown table + cost-ledger lines) and `leaderboard.png`;
- `cost_ledger.json`: extraction seconds per backbone (paid once), head seconds per cell, and
  what the grid would have cost with the frozen backbone run in every epoch instead;
- `report.html` (see `heads.report`): the leaderboard plus the best cell's plots.

The head `scratch` trains a small CNN on the images themselves (the image dataset the features
were extracted from), once, as the no-transfer baseline; its row's backbone is
`none (from scratch)`.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import tensorflow as tf

from contracts import datasets, progress, runs
from heads import config as config_lib
from heads import grid, leaderboard, zoo

# Trains one cell and seed into a run directory and returns its metrics.json. Module-level
# functions (not closures) so a cell can later run elsewhere, e.g. as a Beam element.
CellTrainer = Callable[[grid.Cell, int, runs.RunDir, config_lib.Config], Mapping[str, Any]]


def train_cell(cell: grid.Cell, seed: int, run: runs.RunDir, config: config_lib.Config, *,
               verbose: int = 0, cache_budget: int | None = None,
               cache_dir: str | None = None) -> dict[str, Any]:
  """Trains one cell and seed in this process (no `model.keras`: only the best run gets one).

  Runs of this process on the same dataset share its parsed, cached splits
  (`caching.cached_split`), so a grid reads each dataset's shards once.
  """
  from heads import training
  return training.train(cell.data_dir, cell.head, run.path, config, verbose=verbose,
                        export_model=False, cache_budget=cache_budget, cache_dir=cache_dir)


def train_task(task: Mapping[str, Any]) -> dict[str, Any]:
  """`train_cell` from a picklable task dict (how a Beam worker trains its runs)."""
  cache_dir = task.get("cache_dir")
  if cache_dir:
    # Worker processes of one machine must not fill the same file cache at once (tf.data
    # refuses a second writer): each keeps its own.
    cache_dir = f"{cache_dir}/worker-{os.getpid()}"
  return train_cell(grid.Cell(**task["cell"]), task["seed"], runs.RunDir(task["run_dir"]),
                    config_lib.from_dict(task["config"]), cache_budget=task.get("cache_budget"),
                    cache_dir=cache_dir)


def run_on_beam(cells: Sequence[grid.Cell], seeds: int, out_dir: str, base: config_lib.Config,
                beam_args: Sequence[str], *, cache_budget: int | None,
                cache_dir: str | None, log: Callable[[str], None]) -> None:
  """Trains the unfinished runs as elements of a Beam job (`heads.grid_beam`)."""
  from heads import grid_beam  # the one stage-3 module that imports Beam

  tasks = []
  for cell in cells:
    for seed in range(seeds):
      run = runs.cell_dir(out_dir, cell.dataset, cell.head, seed)
      if not run.finished:
        tasks.append({"cell": dataclasses.asdict(cell), "seed": seed, "run_dir": run.path,
                      "config": config_lib.to_dict(config_lib.override(
                          base, {"train": {"seed": seed}})),
                      "cache_budget": cache_budget, "cache_dir": cache_dir})
  log(f"compare: {len(tasks)} runs as Beam elements ({' '.join(beam_args)})")
  grid_beam.run_grid(tasks, "heads.compare:train_task", beam_args)


def check_same_settings(run: runs.RunDir, run_config: config_lib.Config) -> None:
  """Refuses to reuse a finished cell trained with other hyperparameters (say, other epochs).

  Raises:
    ValueError: the stored `config.json` differs from what this grid would train.
  """
  stored = run.config() or {}
  # A JSON round trip turns tuples into lists, as they are stored.
  wanted = json.loads(json.dumps(config_lib.to_dict(run_config)))
  for section in ("train", "head"):
    if stored.get(section) != wanted[section]:
      changed = sorted(key for key in wanted[section]
                       if stored.get(section, {}).get(key) != wanted[section][key])
      raise ValueError(f"{run.path!r} was trained with other {section} settings "
                       f"({', '.join(changed)}); use a new --out for a grid with different "
                       "settings")


def say(line: str) -> None:
  """`compare`'s default log: one line in one write (`print` writes the text and the newline
  separately, so runs training at once in threads ran their lines together)."""
  sys.stdout.write(line + "\n")
  sys.stdout.flush()


def default_parallel_runs() -> int:
  """Runs a grid trains at once in this process by default: one per core, at most
  `MAX_PARALLEL_RUNS`. A pooled head's step is a chain of small ops that keeps about one core
  busy, so two runs on two cores finish a grid ~1.2x sooner (`benchmarks` R8 details); beyond a
  few, runs only compete for TensorFlow's shared thread pools."""
  return max(1, min(MAX_PARALLEL_RUNS, os.cpu_count() or 1))


MAX_PARALLEL_RUNS = 4


def runs_together(cell: grid.Cell, config: config_lib.Config) -> bool:
  """Whether a run of `cell` may train beside another run of this process.

  A run's results do not depend on what trains beside it as long as its only draws from
  process-wide random state happen while its head is built (`training.SEEDING`). A search
  builds heads while it trains and the scratch baseline holds a CNN's activations over images:
  those train alone. Ridge heads solve in closed form under `SEEDING`, so they train alone too.
  """
  from heads import ridge
  return (config.train.search == "none" and cell.head != "scratch"
          and cell.head not in ridge.HEADS)


def run_cells(cells: Sequence[grid.Cell], seeds: int, out_dir: str, base: config_lib.Config, *,
              train_one: CellTrainer, log: Callable[[str], None],
              parallel_runs: int = 1) -> list[dict[str, Any]]:
  """Trains every cell and seed not finished yet; returns one leaderboard seed row per run.

  Dataset by dataset, so each dataset's shared cache is filled once, used by all its runs, and
  freed before the next dataset's (memory holds one dataset's cache at a time). Within a
  dataset, its first run trains alone (it fills the shared cache and traces the head); then up
  to `parallel_runs` runs train at once in threads (`runs_together`), each on its own compiled
  model (`heads.compiled.lend`), with the same results as one at a time.
  """
  from heads import caching
  if parallel_runs < 1:
    raise ValueError(f"--parallel-runs must be at least 1, got {parallel_runs!r}")
  total = len(cells) * seeds
  progress.report("compare", total=total, unit="run")
  order = [(cell, seed) for cell in cells for seed in range(seeds)]
  results: dict[tuple[str, str, int], Mapping[str, Any]] = {}

  def seeded(seed: int) -> config_lib.Config:
    return config_lib.override(base, {"train": {"seed": seed}})

  def name(index: int, cell: grid.Cell, seed: int) -> str:
    return f"[{index}/{total}] {cell.dataset}/{cell.head}/seed{seed}"

  def train_run(index: int, cell: grid.Cell, seed: int) -> None:
    run = runs.cell_dir(out_dir, cell.dataset, cell.head, seed)
    log(f"{name(index, cell, seed)}: training")
    results[cell.dataset, cell.head, seed] = train_one(cell, seed, run, seeded(seed))

  try:
    by_dataset: dict[str, list[tuple[int, grid.Cell, int]]] = {}
    for index, (cell, seed) in enumerate(order, start=1):
      by_dataset.setdefault(cell.dataset, []).append((index, cell, seed))
    for dataset in sorted(by_dataset):
      members = by_dataset[dataset]
      # The scratch baseline reads the image dataset behind the features: not shared.
      caching.share_inputs(members[0][1].data_dir,
                           [zoo.input_kind(cell.head) for _, cell, _ in members
                            if zoo.input_kind(cell.head) != "image"])
      pending = []
      for index, cell, seed in members:
        run = runs.cell_dir(out_dir, cell.dataset, cell.head, seed)
        if run.finished:
          check_same_settings(run, seeded(seed))
          log(f"{name(index, cell, seed)}: finished earlier, skipped")
          results[cell.dataset, cell.head, seed] = run.metrics()
          progress.report("compare", advance=1)
        else:
          pending.append((index, cell, seed))
      alone, together = pending, []
      if parallel_runs > 1:
        together = [item for item in pending if runs_together(item[1], base)]
        alone = [item for item in pending if item not in together]
        if together:
          alone.append(together.pop(0))   # fills the cache before runs read it at once
      for item in alone:
        train_run(*item)
        progress.report("compare", advance=1)
      _train_together(together, train_run, parallel_runs)
      caching.release_shared()
  finally:
    progress.report("compare", done=True)
  return [leaderboard.seed_row(cell, seed, runs.cell_dir(out_dir, cell.dataset, cell.head,
                                                         seed).path,
                               results[cell.dataset, cell.head, seed])
          for cell, seed in order]


def _train_together(items: Sequence[tuple[int, grid.Cell, int]],
                    train_run: Callable[[int, grid.Cell, int], None], parallel_runs: int) -> None:
  """Trains `items` in up to `parallel_runs` threads; the first failure stops the rest (runs
  already training finish) and is raised, as it would be one run at a time."""
  if not items:
    return
  with concurrent.futures.ThreadPoolExecutor(parallel_runs,
                                             thread_name_prefix="compare-run") as pool:
    futures = [pool.submit(train_run, *item) for item in items]
    try:
      for future in concurrent.futures.as_completed(futures):
        future.result()
        progress.report("compare", advance=1)
    except BaseException:
      pool.shutdown(wait=True, cancel_futures=True)
      raise


def write_leaderboards(out_dir: str, rows: Sequence[Mapping[str, Any]],
                       seed_rows: Sequence[Mapping[str, Any]], ledger: Mapping[str, Any],
                       notes: Sequence[str]) -> None:
  """`cost_ledger.json`, `leaderboard.csv`, `leaderboard_seeds.csv`, `.md` and `.png`."""
  from heads import plots

  datasets.write_json(f"{out_dir}/{leaderboard.LEDGER_NAME}", ledger)
  texts = {leaderboard.LEADERBOARD_CSV: leaderboard.csv_text(rows,
                                                             leaderboard.LEADERBOARD_COLUMNS),
           leaderboard.SEEDS_CSV: leaderboard.csv_text(seed_rows, leaderboard.SEED_COLUMNS),
           leaderboard.LEADERBOARD_MD: leaderboard.markdown_page(rows, ledger, notes)}
  # Every setting each --search tried, from the runs' own metrics.json.
  searched = [row for seed_row in seed_rows if seed_row.get("search")
              for row in leaderboard.search_rows(seed_row,
                                                 runs.RunDir(seed_row["run_dir"]).metrics())]
  if searched:
    texts[leaderboard.SEARCH_CSV] = leaderboard.csv_text(searched, leaderboard.SEARCH_COLUMNS)
  for name, text in texts.items():
    with tf.io.gfile.GFile(f"{out_dir}/{name}", "w") as f:
      f.write(text)
  with tf.io.gfile.GFile(f"{out_dir}/{leaderboard.LEADERBOARD_PNG}", "wb") as f:
    f.write(plots.leaderboard_chart(rows))


@dataclasses.dataclass(frozen=True)
class CompareResult:
  """What `compare` wrote; rows are the leaderboard, seed_rows the per-seed runs."""
  out_dir: str
  rows: list[dict[str, Any]]
  seed_rows: list[dict[str, Any]]
  ledger: dict[str, Any]
  notes: list[str]
  best: dict[str, Any] | None
  report: str | None


def compare(features_dir: str, heads: Sequence[str], out_dir: str, *, seeds: int = 3,
            backbones: Sequence[str] | None = None, epochs: int | None = None,
            config: config_lib.Config | None = None,
            pairs: Iterable[tuple[str, str]] | None = None, report: bool = True,
            verbose: int = 0, log: Callable[[str], None] = say,
            train_one: CellTrainer | None = None, cache_budget: int | None = None,
            cache_dir: str | None = None, beam_args: Sequence[str] = (),
            search: str | None = None, parallel_runs: int | None = None) -> CompareResult:
  """Trains the grid (skipping finished seeds) and writes leaderboards, ledger and report.

  Args:
    features_dir: `headstart extract --out` folder (holds `index.json`).
    heads: head names (`heads.zoo.HEADS`).
    out_dir: the compare directory.
    seeds: seeds per cell (0 ... seeds-1; the seed sets the head's initialisation and shuffling).
    backbones: only these backbones of the index (None: all).
    epochs: overrides the config's epochs.
    config: hyperparameters shared by every cell (defaults when None).
    pairs: restrict the grid to these `(backbone, head)` pairs.
    report: also write `report.html` (needs the image dataset for the example grids).
    verbose: Keras verbosity of each fit (with the default `train_one`).
    log: where progress lines go.
    train_one: trains one cell and seed (default `train_cell`, in this process).
    cache_budget: bytes of parsed input a dataset may hold in memory (see `heads.caching`).
    cache_dir: local folder for file caches (default `OUT/cache`).
    beam_args: Beam pipeline options; when given, the unfinished runs are trained as elements
      of a Beam job on that runner (`heads.grid_beam`) and gathered from their run directories.
    search: overrides the config's per-head search (`heads.search`; `small`: 6 settings per
      run, trained together, chosen on validation; `search.csv` lists every setting tried).
    parallel_runs: runs trained at once in this process (None: `default_parallel_runs()`; see
      `run_cells`). Results do not depend on it.

  Raises:
    ValueError: bad seeds/epochs, unknown heads or backbones, no index.
  """
  base = _grid_config(config, seeds=seeds, epochs=epochs, search=search)
  out_dir = out_dir.rstrip("/")
  for head in heads:
    zoo.input_kind(head)
  entries = grid.read_index(features_dir, backbones)
  cells, notes = grid.plan_cells(entries, heads, pairs=pairs)
  tf.io.gfile.makedirs(out_dir)
  if cache_dir is None and "://" not in out_dir:
    cache_dir = f"{out_dir}/cache"
  if beam_args:
    run_on_beam(cells, seeds, out_dir, base, beam_args, cache_budget=cache_budget,
                cache_dir=cache_dir, log=log)
  parallel_runs = default_parallel_runs() if parallel_runs is None else parallel_runs
  seed_rows = run_cells(cells, seeds, out_dir, base, log=log,
                        train_one=train_one or functools.partial(
                            train_cell, verbose=verbose, cache_budget=cache_budget,
                            cache_dir=cache_dir),
                        parallel_runs=parallel_runs)
  return _publish(out_dir, entries, seed_rows, notes, report=report, log=log,
                  parallel_runs=None if beam_args else parallel_runs)


def _grid_config(config: config_lib.Config | None, *, seeds: int, epochs: int | None,
                 search: str | None) -> config_lib.Config:
  """The settings every cell trains with (the grid's overrides on top of `config`)."""
  if seeds < 1:
    raise ValueError(f"--seeds must be at least 1, got {seeds!r}")
  if epochs is not None and epochs < 1:
    raise ValueError(f"--epochs must be at least 1, got {epochs!r}")
  base = config or config_lib.Config()
  if epochs is not None:
    base = config_lib.override(base, {"train": {"epochs": epochs}})
  if search is not None:
    base = config_lib.override(base, {"train": {"search": search}})
  return base


def _publish(out_dir: str, entries: Sequence[grid.FeatureEntry],
             seed_rows: list[dict[str, Any]], notes: list[str], *, report: bool,
             log: Callable[[str], None], parallel_runs: int | None) -> CompareResult:
  """Leaderboards, cost ledger, the best run's `model.keras` and the report of a trained grid."""
  rows = leaderboard.aggregate(seed_rows)
  ledger = leaderboard.cost_ledger(entries, seed_rows)
  ledger["parallel_runs"] = parallel_runs   # in-process runs at once (None: Beam elements)
  best = leaderboard.best_run(rows, seed_rows)
  if best and not runs.RunDir(best["run_dir"]).exists(runs.MODEL_NAME):
    # Only the best run gets model.keras: each export holds a whole backbone (16 MB for
    # MobileNet, ~60 MB for VGG16), which across a grid of cells x seeds adds up to gigabytes.
    from heads import training
    training.export_run(best["run_dir"])
  ledger["best_run"] = best["run_dir"] if best else None
  write_leaderboards(out_dir, rows, seed_rows, ledger, notes)
  report_path = None
  if report:
    from heads import report as report_lib
    report_path = report_lib.write_compare_report(out_dir, rows, ledger, best, notes=notes,
                                                  log=log)
  return CompareResult(out_dir, rows, seed_rows, ledger, notes, best, report_path)
