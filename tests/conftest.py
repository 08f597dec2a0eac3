import sys
from pathlib import Path

import pytest
import torch

# the repository root, so `import lsq` works without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

torch.set_num_threads(2)


@pytest.fixture
def seed():
    """Fix torch's RNG for one test; returns a seeded torch.Generator too."""
    torch.manual_seed(0)
    return torch.Generator().manual_seed(0)
