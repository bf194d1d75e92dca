"""The MLflow run of a training stage, resumed with the stage.

A killed training job resumes from its newest snapshot; without care its tracking record
does not: the next attempt starts a second MLflow run, or logs the steps it replays a second
time. :class:`MlflowRun` keeps one run per stage and each metric point once:

* **One run.** The run is tagged with the stage (``faultkit.stage`` and a ``faultkit.stage_id``
  that includes the store), and its id travels in every snapshot. A resumed attempt reopens it
  (from the snapshot, or by its tag when the earlier attempt died before its first snapshot).
* **Each point once.** Metrics are buffered and sent (one ``log_batch`` per 1,000 points) when
  a snapshot is taken, before it is written, so a committed snapshot of step ``s`` always has
  every point up to ``s`` in MLflow. Points of steps the resumed attempt replays may already be
  there (sent before a snapshot that did not commit): the run's history is read once when the
  attempt opens it, and a point whose step is not above its metric's newest step in MLflow is
  a replay and is dropped (so log each metric at increasing steps). Points MLflow could not
  take (the server unreachable) stay buffered and travel inside the snapshot.
* **Status.** The run is ``RUNNING`` while an attempt owns it, ``FINISHED`` only when training
  returned, ``KILLED`` when it stopped on a signal (preemption), ``FAILED`` on an error. An
  attempt fenced by a newer one (``StaleAttemptError``) leaves the run to the newer attempt.
* **Params and tags** already on the run with the same value are not sent again; a resumed
  attempt that logs a different value for a param gets a ``ValueError`` (MLflow params are
  immutable: a changed configuration is a new stage).

Only rank 0 of a ``torch.distributed`` job talks to MLflow; the other ranks' calls do nothing.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping
from typing import Any

from .. import _failpoints
from .._errors import StaleAttemptError
from .._stage import Stage
from .._storage import redact_url
from ._dist import World

log = logging.getLogger("faultkit.torch")

__all__ = ["MlflowRun"]

STAGE_TAG = "faultkit.stage"
STAGE_ID_TAG = "faultkit.stage_id"
ATTEMPT_TAG = "faultkit.attempt"
_BATCH = 1000  # MLflow's log_batch limit for metrics


def _mlflow() -> Any:
    try:
        import mlflow  # noqa: F401
        from mlflow.tracking import MlflowClient
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "faultkit.torch.MlflowRun needs the MLflow client, which is not installed: "
            "pip install 'faultkit[mlflow]'"
        ) from exc
    return MlflowClient


class MlflowRun:
    """One MLflow run per training stage, continued by every attempt of the stage.

    Give it to the checkpointer as an ``extra`` object, so the run id and any unsent points
    travel with each snapshot, and restore before logging::

        with store.stage("train") as stage, MlflowRun(stage, experiment="mlp") as run:
            ckpt = TrainingCheckpointer(stage, model=m, optimizer=opt, every_steps=100,
                                        extra={"mlflow": run})
            start = ckpt.restore()
            run.log_params({"lr": 1e-3})
            for step in range(start, steps):
                ...
                run.log_metrics({"loss": loss.item()}, step=step)
                ckpt.step(step)
            ckpt.save(steps - 1, wait=True)
        # the run is FINISHED here; a SIGKILLed attempt's successor continues it

    Args:
        stage: the claimed training stage.
        experiment: the MLflow experiment's name (created if missing).
        run_name: the run's name when this stage creates it.
        tracking_uri: the tracking server (default: MLflow's own, ``MLFLOW_TRACKING_URI``).
        tags: tags set on the run.
        max_buffer: send buffered points early once this many are waiting.
    """

    def __init__(
        self,
        stage: Stage,
        *,
        experiment: str,
        run_name: str | None = None,
        tracking_uri: str | None = None,
        tags: Mapping[str, Any] | None = None,
        max_buffer: int = 10_000,
    ) -> None:
        if not experiment or not isinstance(experiment, str):
            raise ValueError(f"experiment must be a non-empty name, not {experiment!r}")
        if int(max_buffer) < 1:
            raise ValueError(f"max_buffer must be >= 1, not {max_buffer!r}")
        self.stage = stage
        self.experiment = experiment
        self.run_name = run_name
        self.tracking_uri = tracking_uri
        self.tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self.max_buffer = int(max_buffer)
        self.enabled = World(None).rank == 0
        ident = f"{redact_url(stage.store.url)}\0{stage.key}"
        self.stage_id = hashlib.sha256(ident.encode()).hexdigest()[:32]
        self.run_id: str | None = None
        self._client: Any = None
        self._opened = False
        self._closed = False
        self._buffer: list[tuple[str, float, int, int]] = []  # key, value, ms, step
        self._through: dict[str, int] = {}  # each metric's newest step in MLflow
        self._params: dict[str, str] = {}
        self._run_tags: dict[str, str] = {}
        self.replays_dropped = 0

    # -- the checkpointer's extra protocol ----------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Sends the buffered points (a snapshot is being taken) and returns what a resumed
        attempt needs: the run id, and the points MLflow did not take."""
        if not self.enabled:
            return {}
        self._open()
        self.flush(strict=False)
        return {
            "run_id": self.run_id,
            "through": dict(self._through),
            "pending": [list(p) for p in self._buffer],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the run a snapshot names (called by the checkpointer's ``restore()``)."""
        if not self.enabled or not state:
            return
        run_id = state.get("run_id")
        if self._opened and run_id != self.run_id:
            raise RuntimeError(
                f"stage {self.stage.key!r}: MLflow run {self.run_id} was opened before the "
                f"snapshot (of run {run_id}) was restored; call restore() before logging"
            )
        self.run_id = str(run_id) if run_id else None
        self._through = {str(k): int(v) for k, v in (state.get("through") or {}).items()}
        pending = state.get("pending") or []
        self._buffer = [(str(k), float(v), int(t), int(s)) for k, v, t, s in pending]

    # -- logging ------------------------------------------------------------------------

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        """Buffer one point per metric at ``step``; a replayed step already in MLflow is
        dropped."""
        if not self.enabled:
            return
        self._open()
        step = int(step)
        now = int(time.time() * 1000)
        for key, value in metrics.items():
            key = str(key)
            if step <= self._through.get(key, -1):
                self.replays_dropped += 1
                continue
            self._buffer.append((key, float(value), now, step))
        if len(self._buffer) >= self.max_buffer:
            self.flush(strict=False)

    def log_metric(self, key: str, value: float, *, step: int) -> None:
        self.log_metrics({key: value}, step=step)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params once; a value that differs from the run's is a ``ValueError``."""
        if not self.enabled:
            return
        self._open()
        from mlflow.entities import Param

        new = []
        for key, value in params.items():
            key, value = str(key), str(value)
            old = self._params.get(key)
            if old is None:
                new.append(Param(key, value))
                self._params[key] = value
            elif old != value:
                raise ValueError(
                    f"stage {self.stage.key!r}: param {key!r} is {old!r} in MLflow run "
                    f"{self.run_id}, but this attempt logs {value!r}. A resumed attempt must "
                    "run the same configuration; a changed one is a new stage (new key)."
                )
        if new:
            self.stage.check()
            self._client.log_batch(self.run_id, params=new)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        self._open()
        self._set_tags({str(k): str(v) for k, v in tags.items()})

    def flush(self, *, strict: bool = True) -> None:
        """Send the buffered points. With ``strict=False`` a failure is logged and the points
        stay buffered (a snapshot then carries them); a fenced attempt always raises."""
        if not self.enabled or not self._buffer:
            return
        from mlflow.entities import Metric

        self._open()
        # A fenced attempt (a newer one owns the stage) must not add points to its run.
        self.stage.check()
        pending = self._buffer
        try:
            while pending:
                chunk = pending[:_BATCH]
                metrics = [Metric(k, v, t, s) for k, v, t, s in chunk]
                self._client.log_batch(self.run_id, metrics=metrics, synchronous=True)
                _failpoints.hit("mlflow.sent")
                for k, _, _, s in chunk:
                    self._through[k] = max(self._through.get(k, -1), s)
                del pending[: len(chunk)]
        except Exception as exc:
            if strict:
                raise
            log.warning(
                "stage %s: MLflow did not take %d metric points (%s: %s); they stay buffered "
                "and travel with the next snapshot",
                self.stage.key,
                len(pending),
                type(exc).__name__,
                str(exc).splitlines()[0] if str(exc) else "",
            )
            return

    def finish(self, status: str = "FINISHED") -> None:
        """Send what is buffered and end the run with ``status``."""
        if not self.enabled or self._closed:
            return
        self._open()
        self.flush()
        self.stage.check()
        self._client.set_terminated(self.run_id, status=status)
        self._closed = True

    def __enter__(self) -> MlflowRun:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if not self.enabled or self._closed or not self._opened:
            return
        if exc_type is None:
            self.finish()
            return
        if isinstance(exc, StaleAttemptError):
            self._closed = True  # the newer attempt owns the run
            return
        status = "KILLED" if issubclass(exc_type, SystemExit | KeyboardInterrupt) else "FAILED"
        try:
            self.finish(status)
        except Exception:
            log.exception("stage %s: could not mark MLflow run %s %s", self.stage.key,
                          self.run_id, status)  # fmt: skip

    def __repr__(self) -> str:
        return f"MlflowRun({self.stage.key!r}, experiment={self.experiment!r}, run={self.run_id})"

    # -- opening the run ----------------------------------------------------------------

    def _open(self) -> None:
        if self._opened:
            return
        if self._closed:
            raise RuntimeError(f"{self!r} is finished")
        client = _mlflow()(tracking_uri=self.tracking_uri)
        self._client = client
        exp = client.get_experiment_by_name(self.experiment)
        if exp is None:
            try:
                exp_id = client.create_experiment(self.experiment)
            except Exception:  # created meanwhile by another process
                exp = client.get_experiment_by_name(self.experiment)
                if exp is None:
                    raise
                exp_id = exp.experiment_id
        else:
            exp_id = exp.experiment_id
        if self.run_id is None:
            # An earlier attempt may have created the run and died before its first snapshot.
            found = client.search_runs(
                [exp_id],
                filter_string=f"tags.`{STAGE_ID_TAG}` = '{self.stage_id}'",
                order_by=["attributes.start_time ASC"],
                max_results=1,
            )
            if found:
                self.run_id = found[0].info.run_id
            else:
                run = client.create_run(
                    exp_id,
                    run_name=self.run_name,
                    tags={**self.tags, STAGE_TAG: self.stage.key, STAGE_ID_TAG: self.stage_id},
                )
                self.run_id = run.info.run_id
        run = client.get_run(self.run_id)
        if run.data.tags.get(STAGE_ID_TAG) != self.stage_id:
            raise ValueError(
                f"MLflow run {self.run_id} does not belong to stage {self.stage.key!r} of this "
                "store (its faultkit.stage_id tag differs): the snapshot came from another stage"
            )
        self._params = dict(run.data.params)
        self._run_tags = dict(run.data.tags)
        # Points a lost attempt sent beyond the snapshot this attempt resumed from.
        for key in run.data.metrics:
            newest = max((m.step for m in client.get_metric_history(self.run_id, key)), default=-1)
            self._through[key] = max(self._through.get(key, -1), newest)
        self._buffer = [p for p in self._buffer if p[3] > self._through.get(p[0], -1)]
        self._opened = True
        self.stage.check()
        if run.info.status != "RUNNING":
            client.update_run(self.run_id, status="RUNNING")
        self._set_tags({**self.tags, ATTEMPT_TAG: str(self.stage.epoch)})

    def _set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        new = [RunTag(k, v) for k, v in tags.items() if self._run_tags.get(k) != v]
        if new:
            self.stage.check()
            self._client.log_batch(self.run_id, tags=new)
            self._run_tags.update((t.key, t.value) for t in new)
