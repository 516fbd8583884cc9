"""The application layer: the `headstart` command, logging and progress, `predict`, `reproduce`.

    headstart ingest --source data/sample/gender.csv --out out/images --image-size 96
    python -m headstart ...        # the same

It sits above the three stages (`pipeline`, `features`, `heads`), which sit above `contracts`;
see docs/ARCHITECTURE.md. Importing it is cheap: stages load only when their command runs.
"""
from headstart.cli import main

__all__ = ["main"]
