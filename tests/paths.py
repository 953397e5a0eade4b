"""Where the tests' files are: the repository root and tests/data (for tests in any sub-folder)."""

from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
DATA = TESTS / "data"
