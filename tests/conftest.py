import os

from hypothesis import HealthCheck, settings

settings.register_profile("dev", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# Under pytest-xdist (``-n 2``, the default in pyproject.toml) each worker computes on one thread:
# two workers with two threads each on a two-core machine would oversubscribe it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    torch.set_num_threads(1)

import pytest


@pytest.fixture(autouse=True)
def _own_eval_cache(tmp_path_factory, monkeypatch):
    """Each test its own (empty) cache of dense evaluations (ecospa.jobs.eval_cache): no test reads a
    number another test or an earlier run wrote, and nothing is written under ~/.cache."""
    monkeypatch.setenv("ECOSPA_CACHE_DIR", str(tmp_path_factory.mktemp("eval-cache")))
