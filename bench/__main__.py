"""
python -m bench: the whole benchmark, one summary table (see bench.summary).
"""

from bench.summary import main

raise SystemExit(main())
