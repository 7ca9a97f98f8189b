"""
python -m bench: the whole benchmark, one summary table (see bench.summary).
"""

from bench.summary import main

if __name__ == "__main__":
    raise SystemExit(main())
