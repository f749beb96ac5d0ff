"""A real policy behind a thin wrapper, for tests that watch or break one call of it."""


class PolicyWrapper:
    """Delegates every Policy call to ``inner``; subclasses override the one under test."""

    def __init__(self, policy) -> None:
        self.inner, self.hidden_size = policy, policy.hidden_size

    def sample(self, images, image_ids, num_samples):
        return self.inner.sample(images, image_ids, num_samples)

    def evaluate(self, rollout):
        return self.inner.evaluate(rollout)

    def trainable_parameters(self):
        return self.inner.trainable_parameters()

    def save_pretrained(self, path):
        self.inner.save_pretrained(path)
