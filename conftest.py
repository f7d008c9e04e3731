"""The hypothesis profiles of every test file (loaded before any test module is imported, so the
module-level `settings(...)` of the tests inherit them).

    make test   HYPOTHESIS_PROFILE=ci (the default): derandomized, the same examples on every run
    make fuzz   HYPOTHESIS_PROFILE=fuzz: fresh random examples, many more of them per property

A bug that fuzzing finds gets an explicit @example, so `make test` checks it from then on.
"""
import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True, deadline=None)
settings.register_profile("fuzz", max_examples=300, print_blob=True, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
