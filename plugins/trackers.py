"""Experiment trackers (``loggers:`` in a config): TensorBoard, MLflow, Weights & Biases and
Trackio.

    loggers:
      tb: {class_path: tensorboard}                  # writes <output_dir>/tensorboard
      mlflow: {class_path: mlflow}                   # a local store in <output_dir>/mlruns
      wandb: {class_path: wandb, init_args: {project: captions}}
      trackio: {class_path: trackio, init_args: {project: captions}}

Scalars every step under their metrics.jsonl names; every ``trainer.samples_every`` steps a
sample table: each sampled image (``samples/<row>``) and one markdown table (``samples``)
of image id, caption, total reward, each reward term and the advantage. Needs the
``tensorboard`` extra (``pip install 'vlrm[tensorboard]'``). MLflow logs the same scalars,
each sampled image (``log_image`` with its step) and the rows as an MLflow table
(``samples.json``, one row per caption with its step); it needs the ``mlflow`` extra. W&B
logs the scalars, the pictures and a ``wandb.Table``; it needs the ``wandb`` extra. Trackio
logs the scalars and a ``trackio.Table`` with each row's picture; it needs the ``trackio``
extra.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from vlrm import hookimpl
from vlrm.errors import ConfigError


def markdown_table(samples: list[Any]) -> str:
    """The samples as a markdown table (TensorBoard's text plugin renders it)."""
    terms = sorted({t for s in samples for t in s.terms})
    head = ["row", "image", "caption", "reward", *terms, "advantage"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, s in enumerate(samples):
        cells = [str(i), s.image_id, s.caption.replace("|", "\\|"), f"{s.reward:.4f}",
                 *(f"{s.terms[t]:.4f}" if t in s.terms else "" for t in terms),
                 "" if s.advantage is None else f"{s.advantage:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


class TensorBoardLogger:
    """Logs to TensorBoard event files.

    Args:
        log_dir: Where the event files go; default ``<output_dir>/tensorboard``.
        flush_secs: How often the writer flushes to disk.
    """

    def __init__(self, log_dir: str | None = None, flush_secs: int = 30) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ModuleNotFoundError as exc:
            raise ConfigError("loggers: tensorboard needs the tensorboard package: "
                              "pip install 'vlrm[tensorboard]'") from exc
        self.log_dir, self.flush_secs = log_dir, flush_secs
        self.writer: Any = None

    def open(self, output_dir: Path, config: dict[str, Any], step: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter

        folder = Path(self.log_dir) if self.log_dir else Path(output_dir) / "tensorboard"
        # After --resume, events a killed run wrote past its checkpoint are purged.
        self.writer = SummaryWriter(str(folder), flush_secs=self.flush_secs,
                                    purge_step=step + 1 if step else None)
        if config and not step:
            import yaml

            self.writer.add_text("config", "```yaml\n" + yaml.safe_dump(config, sort_keys=False)
                                 + "```", 0)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(name, value, step)

    def log_samples(self, step: int, samples: list[Any]) -> None:
        seen: set[str] = set()
        for i, s in enumerate(samples):
            if s.image_id in seen:  # an image's K captions share one picture
                continue
            seen.add(s.image_id)
            pixels = np.asarray(s.image.convert("RGB"), dtype=np.uint8)
            self.writer.add_image(f"samples/{i}", pixels, step, dataformats="HWC")
        self.writer.add_text("samples", markdown_table(samples), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics row (no bools, no text), as trackers take them."""
    return {k: v for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def sample_columns(step: int, samples: list[Any]) -> dict[str, list[Any]]:
    """The samples as columns (one row per caption), for table-shaped trackers."""
    terms = sorted({t for s in samples for t in s.terms})
    columns: dict[str, list[Any]] = {"step": [step] * len(samples),
                                     "image_id": [s.image_id for s in samples],
                                     "caption": [s.caption for s in samples],
                                     "reward": [s.reward for s in samples]}
    for t in terms:
        columns[f"reward/{t}"] = [s.terms.get(t) for s in samples]
    columns["advantage"] = [s.advantage for s in samples]
    return columns


def picture_rows(step: int, samples: list[Any], picture: Any,
                 ) -> tuple[list[str], list[list[Any]], dict[str, Any]]:
    """The samples as rows with a picture column after the image id, for trackers whose
    tables hold images: the column names, the rows, and the pictures by image id (an image's
    K captions share one). ``picture(image, caption=...)`` makes the tracker's image object."""
    columns = sample_columns(step, samples)
    pictures: dict[str, Any] = {}
    for s in samples:
        if s.image_id not in pictures:
            pictures[s.image_id] = picture(s.image.convert("RGB"), caption=s.image_id)
    names = list(columns)
    rows = [[columns[n][i] for n in names] for i in range(len(samples))]
    return ([*names[:2], "image", *names[2:]],
            [[*row[:2], pictures[row[1]], *row[2:]] for row in rows], pictures)


class MlflowLogger:
    """Logs to MLflow through ``MlflowClient``.

    Args:
        tracking_uri: Where runs go; default a local file store, ``<output_dir>/mlruns``
            (MLflow keeps that store in maintenance mode: vlrm opts in for it, as
            ``MLFLOW_ALLOW_FILE_STORE=true`` does), or e.g. ``http://host:5000``.
        experiment: The experiment's name.
        run_name: The run's name; default the output folder's name.
    """

    def __init__(self, tracking_uri: str | None = None, experiment: str = "vlrm",
                 run_name: str | None = None) -> None:
        try:
            import mlflow  # noqa: F401
        except ModuleNotFoundError as exc:
            raise ConfigError("loggers: mlflow needs the mlflow package: "
                              "pip install 'vlrm[mlflow]'") from exc
        self.tracking_uri, self.experiment, self.run_name = tracking_uri, experiment, run_name
        self.client: Any = None
        self.run_id: str | None = None
        self.file_store = False

    def open(self, output_dir: Path, config: dict[str, Any], step: int = 0) -> None:
        from mlflow import MlflowClient

        uri = self.tracking_uri or (Path(output_dir) / "mlruns").resolve().as_uri()
        self.file_store = uri.startswith("file:") or "://" not in uri
        if self.file_store:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(self.experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(self.experiment)
        marker = Path(output_dir) / "mlflow_run_id"  # --resume continues the same run
        if step and marker.is_file():
            self.run_id = marker.read_text().strip()
            return
        run = self.client.create_run(experiment_id, run_name=self.run_name or Path(output_dir).name)
        self.run_id = run.info.run_id
        marker.write_text(self.run_id + "\n")
        if config:
            self.client.log_dict(self.run_id, config, "config.json")

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(self.key(name), float(value), now, step)
                 for name, value in scalars(metrics).items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def key(self, name: str) -> str:
        """The metric's name: a file store keeps a metric as a file named by its path, so
        ``reward/clip`` and ``reward/clip/truncated`` cannot both be stored; there ``/`` is
        written ``.`` (``reward.clip``)."""
        return name.replace("/", ".") if self.file_store else name

    def log_samples(self, step: int, samples: list[Any]) -> None:
        seen: set[str] = set()
        for i, s in enumerate(samples):
            if s.image_id not in seen:
                seen.add(s.image_id)
                self.client.log_image(self.run_id, s.image.convert("RGB"), key=f"samples-{i}",
                                      step=step)
        self.client.log_table(self.run_id, data=sample_columns(step, samples),
                              artifact_file="samples.json")

    def close(self) -> None:
        if self.client is not None and self.run_id is not None:
            self.client.set_terminated(self.run_id)


class WandbLogger:
    """Logs to Weights & Biases.

    Scalars every step under their metrics.jsonl names; every ``trainer.samples_every`` steps
    the sampled pictures (``samples/images``) and a ``wandb.Table`` of step, image id, image,
    caption, total reward, each term and advantage (``samples``). ``--resume`` continues the
    same W&B run (its id is kept in ``<output_dir>/wandb_run_id``).

    Args:
        project: The W&B project.
        entity: The W&B team or user; default the logged-in user's.
        mode: ``online``, ``offline`` (writes ``<dir>/wandb/offline-run-*``, upload later with
            ``wandb sync``) or ``disabled``; default W&B's own (``WANDB_MODE``, else online).
        name: The run's name; default the output folder's name.
        dir: Where W&B keeps its files; default the output folder.
        tags: Tags for the run.
    """

    def __init__(self, project: str = "vlrm", entity: str | None = None, mode: str | None = None,
                 name: str | None = None, dir: str | None = None,
                 tags: list[str] | None = None) -> None:
        try:
            import wandb  # noqa: F401
        except ModuleNotFoundError as exc:
            raise ConfigError("loggers: wandb needs the wandb package: "
                              "pip install 'vlrm[wandb]'") from exc
        if mode not in (None, "online", "offline", "disabled"):
            raise ConfigError(f"loggers: wandb mode {mode!r} is not one of online, offline, "
                              "disabled")
        self.project, self.entity, self.mode = project, entity, mode
        self.name, self.dir, self.tags = name, dir, tags
        self.run: Any = None

    def open(self, output_dir: Path, config: dict[str, Any], step: int = 0) -> None:
        import wandb

        marker = Path(output_dir) / "wandb_run_id"
        resuming = bool(step) and marker.is_file()
        self.run = wandb.init(project=self.project, entity=self.entity, mode=self.mode,
                              name=self.name or Path(output_dir).name,
                              dir=str(self.dir or output_dir), tags=self.tags, config=config or None,
                              id=marker.read_text().strip() if resuming else None,
                              resume="allow" if resuming else None)
        marker.write_text(self.run.id + "\n")

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(scalars(metrics), step=step)

    def log_samples(self, step: int, samples: list[Any]) -> None:
        import wandb

        names, rows, pictures = picture_rows(step, samples, wandb.Image)
        self.run.log({"samples": wandb.Table(columns=names, data=rows),
                      "samples/images": list(pictures.values())}, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


class TrackioLogger:
    """Logs to Trackio: a local SQLite store (under ``TRACKIO_DIR``, default
    ``$HF_HOME/trackio``; ``trackio show`` opens its dashboard), a Hugging Face Space or a
    self-hosted Trackio server.

    Scalars every step under their metrics.jsonl names; every ``trainer.samples_every`` steps a
    ``trackio.Table`` (``samples``) of step, image id, picture, caption, total reward, each term
    and advantage. ``--resume`` continues the same Trackio run (its name is kept in
    ``<output_dir>/trackio_run``).

    Args:
        project: The Trackio project.
        name: The run's name; default the output folder's name.
        group: A group to file the run under.
        space_id: Log to this Space instead of the local store.
        server_url: Log to this Trackio server instead (ignored with ``space_id``).
    """

    def __init__(self, project: str = "vlrm", name: str | None = None, group: str | None = None,
                 space_id: str | None = None, server_url: str | None = None) -> None:
        try:
            import trackio  # noqa: F401
        except ModuleNotFoundError as exc:
            raise ConfigError("loggers: trackio needs the trackio package: "
                              "pip install 'vlrm[trackio]'") from exc
        self.project, self.name, self.group = project, name, group
        self.space_id, self.server_url = space_id, server_url
        self.run: Any = None

    def open(self, output_dir: Path, config: dict[str, Any], step: int = 0) -> None:
        import trackio

        marker = Path(output_dir) / "trackio_run"
        resuming = bool(step) and marker.is_file()
        name = marker.read_text().strip() if resuming else (self.name or Path(output_dir).name)
        self.run = trackio.init(project=self.project, name=name, group=self.group,
                                space_id=self.space_id, server_url=self.server_url,
                                config=config or None, resume="allow" if resuming else "never",
                                auto_log_gpu=False, auto_log_cpu=False)
        marker.write_text(self.run.name + "\n")

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(scalars(metrics), step=step)

    def log_samples(self, step: int, samples: list[Any]) -> None:
        import trackio

        names, rows, _ = picture_rows(step, samples, trackio.Image)
        self.run.log({"samples": trackio.Table(columns=names, data=rows)}, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


@hookimpl
def vlrm_register_loggers() -> dict[str, Any]:
    return {"tensorboard": TensorBoardLogger, "mlflow": MlflowLogger, "wandb": WandbLogger,
            "trackio": TrackioLogger}
