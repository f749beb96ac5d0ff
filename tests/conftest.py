import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest-xdist workers on a 2-core machine: one thread each (and in
    # the processes they start), or their thread pools spin against each other.
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

import pytest  # noqa: E402


# The longest files first: pytest-xdist hands out whole files (`--dist loadfile`) in collection
# order, so the short ones fill in at the end instead of one worker finishing alone.
LONGEST_FILES = ("test_distributed.py", "test_torchrun.py", "test_resume.py", "test_shapes_demo.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.path.name
        return LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES)

    items.sort(key=rank)  # stable: every other test keeps its place


@pytest.fixture(scope="session", autouse=True)
def _one_thread_per_xdist_worker():
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def tiny_policy_factory():
    from vlrm_plugins.blip2_opt import tiny_blip2_opt

    return tiny_blip2_opt


@pytest.fixture(scope="session")
def tiny_clip():
    from vlrm_plugins.clip_reward import tiny_clip_reward

    return tiny_clip_reward(seed=1)


@pytest.fixture(scope="session")
def photos():
    """Real photographs bundled with scikit-image, as (id, RGB image) pairs."""
    from vlrm_plugins.bundled_photos import bundled_photos

    folder = bundled_photos()
    return [(str(p), folder.load(p)) for p in folder.paths[:6]]
