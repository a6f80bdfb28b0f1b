"""Root conftest: a bare `pytest --nbval` runs every notebook on the tiny fixture profile.

Environment variables reach the nbval kernel, so setting the profile here is enough; an
explicitly set C2S_PROFILE wins.
"""

import os

os.environ.setdefault("C2S_PROFILE", "fixture")
os.environ.setdefault("MPLBACKEND", "Agg")
