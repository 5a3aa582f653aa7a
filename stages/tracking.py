"""MLflow tracking for minilm stages, through ``MlflowClient`` only (no global active run).

One stage = one MLflow run, named after the stage, in the experiment ``cfg.experiment``:

- params are flattened (``{"model": {"d_model": 64}}`` -> ``model.d_model``);
- tags: ``minilm.stage``, the git commit (also as ``mlflow.source.git.commit``), ``dvc.exp_name`` /
  ``dvc.baseline_rev`` / ``dvc.stage`` when DVC set ``DVC_EXP_NAME`` / ``DVC_EXP_BASELINE_REV`` /
  ``DVC_STAGE``, ``minilm.info.*`` from :func:`stages.runinfo.run_info`, and the caller's tags;
- metrics are buffered and sent with ``log_batch`` every ``flush_every`` records and at close.

Grouping: ``group="<name>"`` nests the stage run under a parent run named ``pipeline:<name>`` that
carries the tag ``minilm.group=<name>``. The parent is found by searching the experiment for that tag
(the oldest match wins) and created only when none exists, so every stage of one pipeline run, each in
its own process, lands under the same parent without passing run ids around. The parent's status
follows its latest stage (RUNNING while a stage runs, then that stage's final status). Stages of one
group must not start concurrently (DVC runs them one after another), or two parents may be created.

Resume: ``resume_run_id`` reopens an existing run. The run's metric history is read once, and a
metric is not logged again for a step at or below the last step already stored for that key.

Failures: reaching the tracker is checked at start (:class:`TrackingError`, one line). Once a run is
open, a tracking failure (server gone, disk full) never raises into training: the call is recorded in
``failures``, one warning line is printed, metrics stay buffered, and tracking is retried after a
30 s pause. ``close()`` reports what was lost. Unless already set in the environment, MLflow's HTTP
retries are capped (``MLFLOW_HTTP_REQUEST_MAX_RETRIES=2``, ``..._BACKOFF_FACTOR=1``,
``..._TIMEOUT``) so a dead server costs seconds, not minutes.

``mlflow`` is imported lazily (it takes ~1.3 s); nothing here depends on DVC.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from minilm.errors import TrackingError
from minilm.fileio import safe_join

from .runinfo import run_info

DEFAULT_URI = "sqlite:///mlflow.db"
DVC_ENV_TAGS = {"DVC_EXP_NAME": "dvc.exp_name", "DVC_EXP_BASELINE_REV": "dvc.baseline_rev",
                "DVC_STAGE": "dvc.stage"}
STATUSES = ("FINISHED", "FAILED", "KILLED")
# MLflow 3's UI opens an experiment without this tag in its GenAI view (traces); ours is model training
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
RETRY_PAUSE_S = 30.0           # after a failure, calls are not attempted again for this long
MAX_BUFFERED = 100_000         # metric records kept while the tracker is down
MAX_FAILURES_KEPT = 20
_MAX_KEY, _MAX_PARAM, _MAX_TAG = 250, 6000, 8000
_BATCH_METRICS, _BATCH_PARAMS_TAGS = 1000, 100
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")
_GROUP_NAME = re.compile(r"[\w.:@+\-]+")


@dataclass
class TrackingConfig:
    """Where and how stages log to MLflow (params.yaml ``mlflow:``)."""

    tracking_uri: str = ""            # "" = $MLFLOW_TRACKING_URI if set, else sqlite:///mlflow.db
    experiment: str = "minilm"
    log_checkpoints: bool = False     # upload checkpoints as run artifacts
    flush_every: int = 50             # metric records per log_batch
    timeout_s: float = 5              # reachability probe timeout

    def problems(self) -> list[str]:
        p: list[str] = []
        if not self.experiment.strip():
            p.append("experiment must not be empty")
        if self.flush_every < 1:
            p.append(f"flush_every must be >= 1, got {self.flush_every}")
        if not self.timeout_s > 0:
            p.append(f"timeout_s must be > 0, got {self.timeout_s}")
        return p


# --------------------------------------------------------------------------------------------------
# small helpers


def _one_line(err: BaseException | str, limit: int = 300) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


_KNOWN_CAUSES = (("Connection refused", "connection refused"),
                 ("Failed to establish a new connection", "cannot connect"),
                 ("timed out", "timed out"), ("Name or service not known", "unknown host"),
                 ("database is locked", "database is locked"), ("No space left", "no space left on device"))


def _describe(err: BaseException) -> str:
    """A short cause for a failed tracking call (requests' retry errors run to hundreds of characters)."""
    text = " ".join(str(err).split())
    for needle, cause in _KNOWN_CAUSES:
        if needle in text:
            return f"{type(err).__name__}: {cause}"
    return f"{type(err).__name__}: {_one_line(text, 200)}"


def _key(name: Any) -> str:
    """A valid MLflow param/metric/tag key (invalid characters become '_')."""
    return _BAD_KEY_CHARS.sub("_", str(name))[:_MAX_KEY]


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"d_model": 64}}`` -> ``{"model.d_model": 64}``; dataclasses count as mappings."""
    flat: dict[str, Any] = {}
    for name, value in params.items():
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value) if f.init}
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def _param_value(value: Any) -> str:
    if isinstance(value, (list, tuple, dict)):
        text = json.dumps(value, default=str)
    else:
        text = str(value)
    return text[:_MAX_PARAM]


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


def resolve_uri(uri: str = "") -> str:
    """The tracking URI to use: ``uri``, else $MLFLOW_TRACKING_URI, else ``sqlite:///mlflow.db``.

    A relative sqlite path is made absolute against $DVC_ROOT when set, else the current directory:
    ``dvc exp run --temp/--queue`` runs stages in a scratch copy of the repository (and points
    DVC_ROOT at the real one), where a database would be thrown away with the copy.
    """
    uri = uri.strip() or os.environ.get("MLFLOW_TRACKING_URI", "").strip() or DEFAULT_URI
    path = _sqlite_path(uri)
    if path is not None and not path.is_absolute():
        base = Path(os.environ.get("DVC_ROOT") or Path.cwd())
        query = uri.partition("?")[2]
        uri = f"sqlite:///{(base / path).resolve()}" + (f"?{query}" if query else "")
    return uri


def _fix_hint(uri: str) -> str:
    port = urllib.parse.urlparse(uri).port or 5000
    return (f"start a server (mlflow server --host 127.0.0.1 --port {port} --backend-store-uri "
            "sqlite:///mlflow.db) or set mlflow.tracking_uri to a reachable one (empty = "
            "$MLFLOW_TRACKING_URI, else a local sqlite:///mlflow.db; unset MLFLOW_TRACKING_URI if it "
            "points at a dead server)")


def _http_status(url: str, timeout: float) -> int:
    """HTTP status of a GET (any status counts as an answer); raises OSError when nothing answers."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url), timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


def check_tracking(uri: str, timeout: float = 5.0) -> str:
    """Check that ``uri`` can take runs; returns it. Raises :class:`TrackingError` (one line).

    http(s): GET ``/health`` (falling back to the experiments search endpoint) must answer within
    ``timeout`` seconds. sqlite: the database's directory is created if missing.
    """
    scheme = urllib.parse.urlparse(uri).scheme.lower()
    if scheme in ("http", "https"):
        base = uri.rstrip("/")
        try:
            status = _http_status(f"{base}/health", timeout)
            if status != 200:
                status = _http_status(f"{base}/api/2.0/mlflow/experiments/search?max_results=1", timeout)
        except (OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            raise TrackingError(f"MLflow tracking server {uri} is not reachable "
                                f"({_one_line(reason, 120)}); {_fix_hint(uri)}") from None
        if status not in (200, 401, 403):      # 401/403: a server is there; the client sends credentials
            raise TrackingError(f"{uri} answered HTTP {status} and does not look like an MLflow tracking "
                                f"server; {_fix_hint(uri)}")
    elif scheme == "sqlite":
        path = _sqlite_path(uri)
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise TrackingError(f"cannot create the directory of the MLflow database {path} "
                                    f"({err.strerror or err}); set mlflow.tracking_uri to a writable "
                                    "location") from None
    return uri


def _store_errors() -> tuple[type[BaseException], ...]:
    from mlflow.exceptions import MlflowException

    errors: tuple[type[BaseException], ...] = (MlflowException, OSError)
    try:
        from sqlalchemy.exc import SQLAlchemyError
        errors += (SQLAlchemyError,)
    except ImportError:  # pragma: no cover - sqlalchemy ships with mlflow
        pass
    return errors


def _client(uri: str, cfg: TrackingConfig):
    for name, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"),
                        ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                        ("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(30, int(cfg.timeout_s * 6))))):
        os.environ.setdefault(name, value)
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _experiment_id(client, name: str, uri: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise TrackingError(f"MLflow experiment {name!r} in {uri} is deleted; restore it (mlflow "
                                f"experiments restore --experiment-id {exp.experiment_id}) or set "
                                "mlflow.experiment to another name")
        if exp.tags.get(EXPERIMENT_KIND[0]) is None:
            client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
        return exp.experiment_id
    location = None
    db = _sqlite_path(uri)
    if db is not None:      # keep artifacts beside the database, not in whatever directory we run from
        folder = re.sub(r"[^\w.\-]", "_", name)
        if not folder.strip("."):           # "." or ".." would point at (or above) mlartifacts/ itself
            folder = folder.replace(".", "_")
        location = safe_join(db.parent / "mlartifacts", folder).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id    # created meanwhile by another run


def _context_tags(info: dict[str, Any]) -> dict[str, str]:
    tags = {f"minilm.info.{k}": str(v) for k, v in info.items() if v is not None}
    if info.get("git_commit"):
        tags["mlflow.source.git.commit"] = info["git_commit"]
    for env, tag in DVC_ENV_TAGS.items():
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


def _group_parent(client, experiment_id: str, group: str, tags: dict[str, str]) -> str:
    """Run id of the group's parent run, created on first use."""
    if not _GROUP_NAME.fullmatch(group):
        raise TrackingError(f"tracking group {group!r} may only hold letters, digits and . : @ + - _; "
                            "choose another group name")
    found = client.search_runs([experiment_id], filter_string=f"tags.`minilm.group` = '{group}'",
                               max_results=1, order_by=["attributes.start_time ASC"])
    if found:
        return found[0].info.run_id
    shared = ("dvc.exp_name", "dvc.baseline_rev", "mlflow.source.git.commit")
    parent_tags = {k: tags[k] for k in shared if k in tags}
    parent_tags["minilm.group"] = group
    return client.create_run(experiment_id, run_name=f"pipeline:{group}", tags=parent_tags).info.run_id


# --------------------------------------------------------------------------------------------------
# the run


class StageRun:
    """An open MLflow run for one stage. Logging methods never raise tracking failures."""

    def __init__(self, client, run_id: str, cfg: TrackingConfig, tracking_uri: str, *,
                 parent_run_id: str | None = None, logged_params: dict[str, str] | None = None,
                 last_steps: dict[str, int] | None = None, mirror: Mapping[str, str] | None = None):
        self._client = client
        self.run_id = run_id
        self.cfg = cfg
        self.tracking_uri = tracking_uri
        self.parent_run_id = parent_run_id
        self._params: dict[str, str] = dict(logged_params or {})
        self._last_steps: dict[str, int] = dict(last_steps or {})
        self._buffer: list[tuple[str, Any]] = []        # (run id, Metric)
        self._mirror = dict(mirror or {}) if parent_run_id else {}   # metric key -> key on the parent
        self._paused_until = 0.0
        self.failures: list[str] = []
        self.failure_count = 0
        self.status: str | None = None

    # -- failure handling

    @property
    def skip_until_step(self) -> int | None:
        """Highest step already stored for any metric when this run was resumed (None if fresh)."""
        return max(self._last_steps.values(), default=None)

    @property
    def closed(self) -> bool:
        return self.status is not None

    def _record(self, what: str, problem: str) -> None:
        self.failure_count += 1
        if len(self.failures) < MAX_FAILURES_KEPT:
            self.failures.append(f"{what}: {problem}")
        if self.failure_count == 1:
            print(f"warning: MLflow tracking failed ({what}: {problem}); training goes on and close() "
                  "reports every tracking problem", file=sys.stderr, flush=True)

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
        if time.monotonic() < self._paused_until:
            self._record(what, "not sent (tracking paused after an earlier failure)")
            return False
        try:
            fn(*args, **kwargs)
            return True
        except Exception as err:  # whatever the store raises, training must go on
            self._paused_until = time.monotonic() + RETRY_PAUSE_S
            self._record(what, _describe(err))
            return False

    # -- logging

    def already_logged(self, key: str, step: int) -> bool:
        """True when ``key`` was stored for ``step`` (or a later step) before this run was resumed."""
        last = self._last_steps.get(_key(key))
        return last is not None and step <= last

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Buffer ``metrics`` at ``step``; sent every ``flush_every`` records and at close."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for name, value in metrics.items():
            key = _key(name)
            if self.already_logged(key, step):
                continue
            try:
                number = float(value)
            except (TypeError, ValueError):
                self._record(f"metric {key}", f"value {value!r} is not a number; not logged")
                continue
            if len(self._buffer) >= MAX_BUFFERED:
                self._record(f"metric {key}", "buffer full while tracking is down; dropped")
                continue
            self._buffer.append((self.run_id, Metric(key, number, now, int(step))))
            if key in self._mirror:
                self._buffer.append((self.parent_run_id, Metric(self._mirror[key], number, now, int(step))))
        if len(self._buffer) >= self.cfg.flush_every:
            self.flush()

    def flush(self) -> bool:
        """Send buffered metrics now; returns False (keeping them buffered) when the tracker fails."""
        if not self._buffer or time.monotonic() < self._paused_until:
            return not self._buffer
        pending = self._buffer
        start = 0
        while start < len(pending):
            run_id = pending[start][0]
            end = start
            while end < len(pending) and end - start < _BATCH_METRICS and pending[end][0] == run_id:
                end += 1
            chunk = [metric for _, metric in pending[start:end]]
            if not self._call("log_batch", self._client.log_batch, run_id, metrics=chunk, synchronous=True):
                self._buffer = pending[start:]
                return False
            start = end
        self._buffer = []
        return True

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log (nested) params; a param already logged with another value is reported, not changed."""
        from mlflow.entities import Param

        new = []
        for name, value in flatten_params(params).items():
            key, text = _key(name), _param_value(value)
            old = self._params.get(key)
            if old is None:
                new.append(Param(key, text))
            elif old != text:
                self._record(f"param {key}", f"already logged as {old!r}, not changed to {text!r} (MLflow "
                             "params are immutable; start a new run to change it)")
        for start in range(0, len(new), _BATCH_PARAMS_TAGS):
            chunk = new[start:start + _BATCH_PARAMS_TAGS]
            if self._call("log params", self._client.log_batch, self.run_id, params=chunk,
                          synchronous=True):
                self._params.update((p.key, p.value) for p in chunk)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(_key(k), str(v)[:_MAX_TAG]) for k, v in tags.items() if v is not None]
        for start in range(0, len(items), _BATCH_PARAMS_TAGS):
            self._call("set tags", self._client.log_batch, self.run_id,
                       tags=items[start:start + _BATCH_PARAMS_TAGS], synchronous=True)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> bool:
        """Upload a file or a directory's contents; returns whether it was stored."""
        path = Path(path)
        if not path.exists():
            self._record(f"artifact {path}", "no such file or directory; not logged")
            return False
        fn = self._client.log_artifacts if path.is_dir() else self._client.log_artifact
        return self._call(f"artifact {path.name}", fn, self.run_id, str(path), artifact_path)

    def log_checkpoint(self, path: str | os.PathLike, artifact_path: str = "checkpoints") -> bool:
        """Upload a checkpoint only when ``cfg.log_checkpoints`` is on."""
        return self.cfg.log_checkpoints and self.log_artifact(path, artifact_path)

    def log_dict(self, dictionary: dict[str, Any], artifact_file: str) -> bool:
        return self._call(f"artifact {artifact_file}", self._client.log_dict, self.run_id, dictionary,
                          artifact_file)

    def log_text(self, text: str, artifact_file: str) -> bool:
        return self._call(f"artifact {artifact_file}", self._client.log_text, self.run_id, text,
                          artifact_file)

    # -- ending

    def close(self, status: str = "FINISHED") -> list[str]:
        """Flush, mark the run (and its group parent) ``status``; returns the failures seen."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        if self.closed:
            return self.failures
        self.status = status
        self._paused_until = 0.0                 # one more chance for whatever is still buffered
        if not self.flush():
            self._record("close", f"{len(self._buffer)} metric records were not sent")
        self._call("end run", self._client.set_terminated, self.run_id, status)
        if self.parent_run_id:
            self._call("end group parent", self._client.set_terminated, self.parent_run_id, status)
        if self.failure_count:
            print(f"warning: {self.failure_count} MLflow tracking call(s) failed for run {self.run_id} "
                  f"at {self.tracking_uri} (first: {self.failures[0]}); its record may be incomplete",
                  file=sys.stderr, flush=True)
        return self.failures

    def __enter__(self) -> "StageRun":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.close("KILLED")
        else:
            self.set_tags({"minilm.error": f"{exc_type.__name__}: {_one_line(exc)}"})
            self.close("FAILED")
        return False


def start_run(cfg: TrackingConfig, stage: str, params: Mapping[str, Any], *,
              tags: Mapping[str, Any] | None = None, group: str | None = None,
              resume_run_id: str | None = None, parent_metrics: Iterable[str] = ()) -> StageRun:
    """Open the MLflow run of ``stage`` (new, or ``resume_run_id`` reopened); see the module docstring.

    ``parent_metrics`` are also logged on the group's parent run as ``<stage>/<key>``, so the
    experiment's top-level rows (one per pipeline run) carry the curves and headline figures that the
    MLflow UI's chart view compares side by side.

    Raises :class:`TrackingError` when the tracker cannot be reached or refuses the run.
    """
    uri = check_tracking(resolve_uri(cfg.tracking_uri), cfg.timeout_s)
    client = _client(uri, cfg)
    errors = _store_errors()
    mirror = {_key(k): _key(f"{stage}/{k}") for k in parent_metrics}
    all_tags = {**_context_tags(run_info()), "minilm.stage": stage,
                **{str(k): str(v) for k, v in (tags or {}).items() if v is not None}}
    try:
        experiment_id = _experiment_id(client, cfg.experiment, uri)
        parent = _group_parent(client, experiment_id, group, all_tags) if group else None
        if parent:
            all_tags.update({"mlflow.parentRunId": parent, "minilm.in_group": group})
        if resume_run_id:
            run = _reopen(client, resume_run_id, uri)
            last_steps = {key: max(m.step for m in client.get_metric_history(run.info.run_id, key))
                          for key in run.data.metrics}
            srun = StageRun(client, run.info.run_id, cfg, uri, parent_run_id=parent,
                            logged_params=dict(run.data.params), last_steps=last_steps, mirror=mirror)
        else:
            run = client.create_run(experiment_id, run_name=stage,
                                    tags={_key(k): v[:_MAX_TAG] for k, v in all_tags.items()})
            srun = StageRun(client, run.info.run_id, cfg, uri, parent_run_id=parent, mirror=mirror)
        if parent:
            client.update_run(parent, status="RUNNING")
    except errors as err:
        raise TrackingError(f"MLflow at {uri} could not start the {stage!r} run ({_describe(err)}); "
                            "check mlflow.tracking_uri and the server's logs") from None
    if resume_run_id:
        srun.set_tags(all_tags)
    srun.log_params(params)
    return srun


def _reopen(client, run_id: str, uri: str):
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise TrackingError(f"cannot resume MLflow run {run_id}: it does not exist in {uri}; drop "
                                "the resume run id or point mlflow.tracking_uri at its store") from None
        raise
    if run.info.lifecycle_stage == "deleted":
        raise TrackingError(f"cannot resume MLflow run {run_id}: it is deleted; restore it (mlflow "
                            "runs restore) or start a new run")
    client.update_run(run_id, status="RUNNING")
    return run
