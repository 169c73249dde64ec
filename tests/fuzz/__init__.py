"""Long fuzz runs (issue 8): ``python -m tests.fuzz.run_long --help``."""
