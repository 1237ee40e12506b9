"""Shared fixtures: where the real data and test tokenizers live.

Real data comes only through $DIALOGUELLM_DATA. Without it, data tests skip with a reason (a user's fresh
machine); with DIALOGUELLM_REQUIRE_DATA=1 (set by .ci/run) a skip of that kind is a failure instead.
"""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REQUIRE = os.environ.get("DIALOGUELLM_REQUIRE_DATA") == "1"


def _need(path: Path | None, what: str) -> Path:
    if path is not None and path.exists():
        return path
    msg = f"{what} not found ({path}); set DIALOGUELLM_DATA to the folder beside shared/data"
    if REQUIRE:
        pytest.fail(msg + " — DIALOGUELLM_REQUIRE_DATA=1 forbids skipping")
    pytest.skip(msg)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real data folder ($DIALOGUELLM_DATA): meld/, emorynlp/, meld_video_descriptions/."""
    env = os.environ.get("DIALOGUELLM_DATA")
    return _need(Path(env) if env else None, "real data folder")


@pytest.fixture(scope="session")
def shared_models(data_dir) -> Path:
    """The test tokenizers folder, shared/models beside shared/data."""
    return _need(data_dir.parent / "models", "shared models folder")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~20 s (still part of CI)")
