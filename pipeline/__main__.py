"""`python -m pipeline ...` is `headstart ingest ...`."""
import sys

# A package's __main__ is an entry point, part of the app layer (docs/ARCHITECTURE.md).
from headstart import cli

if __name__ == "__main__":  # guarded: spawned decoder processes re-import the main module
  sys.exit(cli.main(["ingest", *sys.argv[1:]]))
