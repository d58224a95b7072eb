import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

REFERENCE_PROFILE = ROOT.parent / "shared" / "reference" / "efficientnetv2b0-paper-testbed.json"


@pytest.fixture
def reference_profile() -> Path:
    if not REFERENCE_PROFILE.exists():
        pytest.skip(f"reference profile not found at {REFERENCE_PROFILE}")
    return REFERENCE_PROFILE
