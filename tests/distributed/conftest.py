import pytest

from dmm.testing import build_tiny_world


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """Tiny SDXL-shaped base, four fine-tuned teachers (style0..style3) and 64 samples in 4 shards (built once)."""
    return build_tiny_world(tmp_path_factory.mktemp("dist-world"), "sdxl", teachers=4, n_samples=64)
