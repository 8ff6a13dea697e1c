"""`python -m eval.suite`: the evaluation suite's entry point.

The steps live in `eval.run` (plan -> generate -> FID and each registered metric -> report), the
command line in `eval.cli`; this module keeps the documented name for both.
"""

from eval.cli import main
from eval.plan import teachers_from_recipe
from eval.run import run_suite

__all__ = ["main", "run_suite", "teachers_from_recipe"]

if __name__ == "__main__":
    raise SystemExit(main())
