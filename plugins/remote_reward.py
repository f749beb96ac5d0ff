"""A reward scored on another machine: posts each rollout to a ``vlrm-serve-reward`` server.

    reward:
      terms:
        judge:
          reward:
            class_path: remote
            init_args: {url: "http://reward-host:8765/score", timeout: 120}

Each call sends the image ids, the images (PNG) and the captions with their tokens
(``vlrm.reward_wire``) and returns the server's scores. A server that is down, slow (no answer
within ``timeout`` seconds) or busy (503/504) is retried ``retries`` times, waiting
``backoff`` seconds and twice as long each time (at most 60 s); then the run stops with a
message naming the URL (``TrainingError``: exit 1, the last checkpoint intact), so a step
never trains on missing scores. A refused request (wrong token, too large, not a rollout)
or a failing reward on the server stops at once: retrying cannot help.

The shared secret comes from the environment variable ``token_env`` (never from a config
file, which runs copy into their output folder).
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from vlrm import hookimpl
from vlrm.errors import ConfigError, TrainingError
from vlrm.reward_wire import decode_output, encode_rollout
from vlrm.structs import RewardOutput, Rollout

RETRY_STATUS = (502, 503, 504)


class RemoteReward:
    """Scores from a reward server (see the module docstring).

    Args:
        url: The server's score endpoint, e.g. ``http://host:8765/score``.
        timeout: Seconds to wait for one answer.
        retries: Further tries after a failed one (down, slow, busy).
        backoff: Seconds before the first retry; doubles each time (at most 60).
        token_env: Environment variable holding the shared secret; unset = none.
        max_request_bytes: Largest request sent (the server has its own limit).
    """

    def __init__(self, url: str, timeout: float = 120.0, retries: int = 5, backoff: float = 1.0,
                 token_env: str = "VLRM_REWARD_TOKEN", max_request_bytes: int = 64 << 20) -> None:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"remote reward: url must start with http:// or https://, got {url!r}")
        if not timeout > 0 or retries < 0 or backoff < 0 or max_request_bytes < 1:
            raise ConfigError(f"remote reward: need timeout > 0, retries >= 0, backoff >= 0 and "
                              f"max_request_bytes >= 1; got {timeout}, {retries}, {backoff}, "
                              f"{max_request_bytes}")
        self.url, self.timeout, self.retries, self.backoff = url, timeout, retries, backoff
        self.token_env, self.max_request_bytes = token_env, max_request_bytes
        self.attempts = 0  # requests sent, retries included

    def _post(self, body: bytes) -> bytes:
        headers = {"Content-Type": "application/json"}
        token = os.environ.get(self.token_env)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        self.attempts += 1
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return response.read()

    def __call__(self, rollout: Rollout) -> RewardOutput:
        body = encode_rollout(rollout)
        if len(body) > self.max_request_bytes:
            raise TrainingError(f"remote reward {self.url}: the request is {len(body)} bytes, over "
                                f"max_request_bytes {self.max_request_bytes}; fewer or smaller "
                                "images per step, or raise the limit here and on the server")
        for attempt in range(self.retries + 1):
            try:
                out = decode_output(self._post(body))
                break
            except urllib.error.HTTPError as exc:
                reason = _server_message(exc)
                if exc.code not in RETRY_STATUS:
                    raise TrainingError(f"remote reward {self.url} refused the request "
                                        f"({exc.code}: {reason})") from exc
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
                reason = str(getattr(exc, "reason", None) or exc) or type(exc).__name__
            if attempt == self.retries:
                raise TrainingError(f"remote reward {self.url} gave no scores after "
                                    f"{self.retries + 1} tries ({reason}); is the server "
                                    "running and reachable? (`vlrm-serve-reward --config ...`)")
            wait = min(self.backoff * 2 ** attempt, 60.0)
            sys.stderr.write(f"vlrm: remote reward {self.url}: {reason}; retry {attempt + 1}/"
                             f"{self.retries} in {wait:.1f} s\n")
            time.sleep(wait)
        b, t = rollout.tokens.shape
        if (out.sequence is not None and tuple(out.sequence.shape) != (b,)) or \
                (out.token is not None and tuple(out.token.shape) != (b, t)):
            raise TrainingError(f"remote reward {self.url} answered {b} captions with scores of "
                                f"shape {None if out.sequence is None else tuple(out.sequence.shape)}"
                                f" / {None if out.token is None else tuple(out.token.shape)}")
        return out


def _server_message(exc: Any) -> str:
    try:
        return json.loads(exc.read())["error"]
    except Exception:
        return str(exc.reason)


@hookimpl
def vlrm_register_rewards() -> dict[str, Any]:
    return {"remote": RemoteReward}
