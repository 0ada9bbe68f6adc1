"""Shared test set-up: deterministic torch, and hypothesis profiles sized for a 2-core CI machine."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("SPECFORMER_EXAMPLES", "12")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=True,
)
settings.register_profile("dev", max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(min(2, torch.get_num_threads()))
# Triton kernels run on CPU tensors through the interpreter; it must be on before any kernel is defined.
os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--slow",
        action="store_true",
        help="run the long fuzz campaigns (10,000 specs) instead of CI's sample",
    )


@pytest.fixture(scope="session")
def fuzz_examples(request: pytest.FixtureRequest) -> int:
    """How many examples a fuzz campaign draws: CI's sample, or 10,000 with `--slow`."""
    return 10_000 if request.config.getoption("--slow") else int(os.environ.get("SPECFORMER_FUZZ", "150"))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
