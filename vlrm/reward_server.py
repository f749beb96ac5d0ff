"""``vlrm-serve-reward``: any reward plugin behind an HTTP server, for a run on another machine.

    vlrm-serve-reward --config reward_server.yaml
    # reward_server.yaml
    reward: {class_path: clip, init_args: {model: ViT-L-14, pretrained: openai, device: cuda}}
    host: 0.0.0.0
    port: 8765
    token_env: VLRM_REWARD_TOKEN   # the shared secret, read from this environment variable

The trainer's ``remote`` reward (``vlrm_plugins.remote_reward``) posts each rollout to
``/score`` (the format: ``vlrm.reward_wire``). Requests that arrive while the reward is busy
(the ranks of a torchrun job, several runs) are scored together in one call, up to
``max_batch_images`` images; each gets its own rows back. A request needs the shared secret
when ``token_env`` names a set variable (``Authorization: Bearer <secret>``), is refused above
``max_request_bytes`` (413), gets 504 when its scores are not ready within ``timeout``
seconds, 400 when it is not a rollout and 500 with the reward's error message when the reward
fails. ``GET /health`` answers ``{"status": "ok", "reward": <class>}``.

Serve a stateless reward: settings that keep running statistics (``normalize`` of a reward
term) belong in the trainer's own reward config, where its checkpoints keep them.
"""

from __future__ import annotations

import hmac
import json
import os
import queue
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import attrs
import torch

from vlrm.cli import EXIT_CONFIG
from vlrm.reward_wire import HEALTH, PATH, decode_rollout, encode_output
from vlrm.structs import RewardOutput, Rollout


@attrs.define
class _Job:
    rollout: Rollout
    done: threading.Event = attrs.field(factory=threading.Event)
    body: bytes | None = None
    error: str | None = None


def merge(rollouts: list[Rollout]) -> Rollout:
    """Several rollouts as one: images concatenated, groups offset, tokens right-padded."""
    width = max(r.tokens.shape[1] for r in rollouts)

    def pad(x: torch.Tensor, value: Any = 0) -> torch.Tensor:
        extra = width - x.shape[1]
        if value == "last":
            return torch.cat([x, x[:, -1:].expand(-1, extra)], dim=1)
        return torch.nn.functional.pad(x, (0, extra), value=value)

    offsets = [0]
    for r in rollouts[:-1]:
        offsets.append(offsets[-1] + len(r.images))
    ends = [r.token_ends for r in rollouts]
    return Rollout(
        images=[im for r in rollouts for im in r.images],
        image_ids=[i for r in rollouts for i in r.image_ids],
        group=torch.cat([r.group + o for r, o in zip(rollouts, offsets)]),
        tokens=torch.cat([pad(r.tokens) for r in rollouts]),
        mask=torch.cat([pad(r.mask, False) for r in rollouts]),
        logprobs=torch.cat([pad(r.logprobs) for r in rollouts]),
        captions=[c for r in rollouts for c in r.captions],
        token_ends=None if any(e is None for e in ends) else torch.cat([pad(e, "last") for e in ends]))


def split(out: RewardOutput, rollouts: list[Rollout]) -> list[RewardOutput]:
    """Each rollout's rows of a merged output (the metrics are the merged batch's)."""
    parts, start = [], 0
    for r in rollouts:
        rows = slice(start, start + r.batch_size)
        start += r.batch_size
        parts.append(RewardOutput(
            sequence=None if out.sequence is None else out.sequence[rows],
            token=None if out.token is None else out.token[rows, :r.tokens.shape[1]],
            metrics=dict(out.metrics)))
    return parts


class RewardServer:
    """A reward served over HTTP (see the module docstring).

    Args:
        reward: Any reward (``vlrm.protocols.Reward``).
        host: Address to listen on [ours: 127.0.0.1, this machine only].
        port: Port; 0 = any free one (``port`` then tells which).
        token: The shared secret a request must bear; None = none.
        max_request_bytes: Largest request body accepted.
        max_batch_images: Images scored in one reward call when requests queue up.
        timeout: Seconds a request waits for its scores before a 504.
    """

    def __init__(self, reward: Any, host: str = "127.0.0.1", port: int = 8765,
                 token: str | None = None, max_request_bytes: int = 64 << 20,
                 max_batch_images: int = 64, timeout: float = 300.0) -> None:
        self.reward, self.token = reward, token
        self.max_request_bytes, self.max_batch_images, self.timeout = (
            max_request_bytes, max_batch_images, timeout)
        self.jobs: queue.Queue[_Job] = queue.Queue()
        self.calls = 0  # reward calls made (several requests may share one)
        self.httpd = ThreadingHTTPServer((host, port), self._handler())
        self.httpd.daemon_threads = True
        self._worker = threading.Thread(target=self._work, daemon=True, name="vlrm-reward")
        self._worker.start()

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self.httpd.server_address[0]}:{self.port}{PATH}"

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _work(self) -> None:
        while True:
            batch = [self.jobs.get()]
            images = len(batch[0].rollout.images)
            while True:  # whatever else is waiting, up to max_batch_images
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if images + len(job.rollout.images) > self.max_batch_images:
                    self.jobs.put(job)
                    break
                batch.append(job)
                images += len(job.rollout.images)
            rollouts = [j.rollout for j in batch]
            try:
                with torch.no_grad():
                    out = self.reward(rollouts[0] if len(rollouts) == 1 else merge(rollouts))
                self.calls += 1
                for job, part in zip(batch, split(out, rollouts)):
                    job.body = encode_output(part)
            except Exception as exc:  # the reward's own failure goes back to its caller
                for job in batch:
                    job.error = f"the reward {type(self.reward).__name__} failed: {type(exc).__name__}: {exc}"
            for job in batch:
                job.done.set()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet: one line per error
                pass

            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _fail(self, status: int, message: str) -> None:
                if status >= 500:
                    sys.stderr.write(f"vlrm-serve-reward: {status}: {message}\n")
                self._send(status, json.dumps({"error": message}).encode())

            def do_GET(self) -> None:
                if self.path != HEALTH:
                    return self._fail(404, f"no {self.path}; POST rollouts to {PATH}")
                self._send(200, json.dumps({"status": "ok",
                                            "reward": type(server.reward).__name__}).encode())

            def do_POST(self) -> None:
                if self.path != PATH:
                    return self._fail(404, f"no {self.path}; POST rollouts to {PATH}")
                if server.token is not None:
                    given = self.headers.get("Authorization", "")
                    if not hmac.compare_digest(given.encode(), f"Bearer {server.token}".encode()):
                        return self._fail(401, "missing or wrong token (Authorization: Bearer ...)")
                size = int(self.headers.get("Content-Length") or 0)
                if size > server.max_request_bytes:
                    self.close_connection = True
                    return self._fail(413, f"request of {size} bytes is over the server's "
                                           f"max_request_bytes {server.max_request_bytes}")
                try:
                    rollout = decode_rollout(self.rfile.read(size))
                except ValueError as exc:
                    return self._fail(400, str(exc))
                job = _Job(rollout)
                server.jobs.put(job)
                if not job.done.wait(server.timeout):
                    return self._fail(504, f"no scores within the server's timeout of {server.timeout} s")
                if job.error is not None:
                    return self._fail(500, job.error)
                self._send(200, job.body)

        return Handler


def build_parser() -> Any:
    from jsonargparse import ActionConfigFile

    from vlrm.cli import new_parser
    from vlrm.protocols import Reward

    parser = new_parser("vlrm-serve-reward", "Serve a reward plugin over HTTP to remote trainers "
                        "(their reward term `remote` posts rollouts here).")
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config file.")
    parser.add_argument("--reward", type=Reward, required=True,
                        help="The reward to serve: class_path (a registered name) and init_args.")
    parser.add_argument("--host", type=str, default="127.0.0.1",
                        help="Address to listen on (0.0.0.0: every interface).")
    parser.add_argument("--port", type=int, default=8765, help="Port; 0 = any free one.")
    parser.add_argument("--token_env", type=str, default="VLRM_REWARD_TOKEN",
                        help="Environment variable holding the shared secret; unset = no token.")
    parser.add_argument("--max_request_bytes", type=int, default=64 << 20,
                        help="Largest request body accepted (413 above).")
    parser.add_argument("--max_batch_images", type=int, default=64,
                        help="Images scored in one reward call when requests queue up.")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="Seconds a request waits for its scores (504 after).")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse, load the reward, serve until interrupted."""
    from vlrm.cli import config_failure, parse_command

    parsed = parse_command("vlrm-serve-reward", build_parser, argv)
    if isinstance(parsed, int):
        return parsed
    parser, cfg, files = parsed
    for name, value in (("max_request_bytes", cfg.max_request_bytes),
                        ("max_batch_images", cfg.max_batch_images), ("timeout", cfg.timeout)):
        if not value > 0:
            sys.stderr.write(f"vlrm-serve-reward: error: {name} must be > 0, got {value}\n")
            return EXIT_CONFIG
    try:
        reward = parser.instantiate(cfg).reward
    except Exception as exc:
        return config_failure(exc, files, "vlrm-serve-reward")
    token = os.environ.get(cfg.token_env) or None
    try:
        server = RewardServer(reward, cfg.host, cfg.port, token, cfg.max_request_bytes,
                              cfg.max_batch_images, cfg.timeout)
    except OSError as exc:
        sys.stderr.write(f"vlrm-serve-reward: error: cannot listen on {cfg.host}:{cfg.port}: {exc}\n")
        return EXIT_CONFIG
    print(f"vlrm-serve-reward: serving {type(reward).__name__} on {server.url} "
          f"({'token required' if token else 'no token'})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
    return 0


def main_entry() -> None:
    """Console script ``vlrm-serve-reward``."""
    raise SystemExit(main())


if __name__ == "__main__":
    main_entry()
