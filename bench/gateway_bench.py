"""Gateway vs direct vLLM benchmark; same as `specialist-router bench gateway` (see router/bench.py)."""
import sys

from router.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "gateway", *sys.argv[1:]]))
