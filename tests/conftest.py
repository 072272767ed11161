"""Shared test setup: fixtures live in tests/fixtures_*.py modules, loaded as plugins here."""
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".cache", "torch_extensions"))

pytest_plugins: list[str] = ["tests.fixtures_s3", "tests.fixtures_train"]
