"""Long-running reliability drills (issue 8). ``crash_torture`` is run in a
short form by tests/test_torture_short.py and by hand as
``python -m tests.torture.crash_torture --kills 20``."""
