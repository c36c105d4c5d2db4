"""Shared fixtures. The official ESFT reference files live beside the checkout (../shared/esft_reference) or
where $ESFT_REFERENCE points; tests that need them skip, with the reason, where they are absent."""

import os
from pathlib import Path

import jax
import pytest

REPO = Path(__file__).resolve().parents[1]

# The tests compare fp32 paths at CPU tolerances; a GPU multiplies fp32 in TF32 unless told otherwise.
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def esft_reference() -> Path:
  path = Path(os.environ.get("ESFT_REFERENCE", REPO.parent / "shared" / "esft_reference"))
  if not (path / "README.md").exists():
    pytest.skip(f"official ESFT reference files not found at {path} (set ESFT_REFERENCE to their folder)")
  return path
