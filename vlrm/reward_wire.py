"""What a remote reward sends and receives: a rollout and a ``RewardOutput`` as JSON.

Request (``POST /score``): ``image_ids`` (N), ``images`` (N base64 PNGs, lossless, so the
server sees the pixels the trainer holds), ``group`` (B), ``captions`` (B), ``tokens`` and
``mask`` (B x T lists) and ``token_ends`` (B x T or null), enough for per-token text rewards.
The policy's log-probs, values and private state stay with the trainer.

Response: ``sequence`` (B or null), ``token`` (B x T or null) and ``metrics``; an error is
``{"error": message}`` with a 4xx / 5xx status. Floats travel as JSON numbers (a float32
round-trips exactly).
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import torch

from vlrm.structs import RewardOutput, Rollout

PATH = "/score"
HEALTH = "/health"


def _png(image: Any) -> str:
    from PIL import Image

    if not isinstance(image, Image.Image):
        import numpy as np

        image = Image.fromarray(np.asarray(image))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _image(text: str) -> Any:
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(text, validate=True)))
    image.load()
    return image


def encode_rollout(rollout: Rollout) -> bytes:
    """The request body for ``rollout``."""
    return json.dumps({
        "image_ids": [str(i) for i in rollout.image_ids],
        "images": [_png(im) for im in rollout.images],
        "group": rollout.group.tolist(),
        "captions": list(rollout.captions),
        "tokens": rollout.tokens.tolist(),
        "mask": rollout.mask.int().tolist(),
        "token_ends": None if rollout.token_ends is None else rollout.token_ends.tolist(),
    }).encode()


def decode_rollout(body: bytes) -> Rollout:
    """The rollout a request carries (log-probs zero); ``ValueError`` names what is wrong."""
    try:
        data = json.loads(body)
        tokens = torch.tensor(data["tokens"], dtype=torch.long)
        ends = data.get("token_ends")
        return Rollout(images=[_image(t) for t in data["images"]], image_ids=list(data["image_ids"]),
                       group=torch.tensor(data["group"], dtype=torch.long), tokens=tokens,
                       mask=torch.tensor(data["mask"], dtype=torch.long).bool(),
                       logprobs=torch.zeros(tokens.shape), captions=list(data["captions"]),
                       token_ends=None if ends is None else torch.tensor(ends, dtype=torch.long))
    except (KeyError, TypeError, ValueError, OSError) as exc:
        raise ValueError(f"not a rollout: {type(exc).__name__}: {exc}") from exc


def encode_output(out: RewardOutput) -> bytes:
    """The response body for a reward's output."""
    return json.dumps({
        "sequence": None if out.sequence is None else out.sequence.float().tolist(),
        "token": None if out.token is None else out.token.float().tolist(),
        "metrics": {k: float(v) for k, v in out.metrics.items()},
    }).encode()


def decode_output(body: bytes) -> RewardOutput:
    """The reward output a response carries."""
    data = json.loads(body)
    sequence, token = data.get("sequence"), data.get("token")
    return RewardOutput(
        sequence=None if sequence is None else torch.tensor(sequence, dtype=torch.float32),
        token=None if token is None else torch.tensor(token, dtype=torch.float32),
        metrics={k: float(v) for k, v in data.get("metrics", {}).items()})
