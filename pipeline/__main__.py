"""`python -m pipeline ...` is `headstart ingest ...`."""
import sys

import headstart

if __name__ == "__main__":  # guarded: spawned decoder processes re-import the main module
  sys.exit(headstart.main(["ingest", *sys.argv[1:]]))
