import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


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
