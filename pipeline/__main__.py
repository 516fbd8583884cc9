"""`python -m pipeline ...` is `headstart ingest ...`."""
import sys

import headstart

sys.exit(headstart.main(["ingest", *sys.argv[1:]]))
