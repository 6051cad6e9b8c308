"""Shared pytest fixtures."""

from pathlib import Path

import pytest

_SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
  """The offline data folder ``../shared/data`` beside the repository; skips when absent."""
  if not _SHARED_DATA.is_dir():
    pytest.skip(f"../shared/data not present: {_SHARED_DATA.resolve()} does not exist")
  return _SHARED_DATA.resolve()
