import pytest

from tests.distributed.world import build_world


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """Tiny SDXL-shaped base, four fine-tuned teachers and 64 samples in 4 shards (built once)."""
    return build_world(tmp_path_factory.mktemp("dist-world"), n_teachers=4, n_samples=64)
