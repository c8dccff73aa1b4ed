"""Experiment trackers a run's metrics are mirrored to (`report_to`): TensorBoard, Weights & Biases, MLflow.

Each gets the scalars and evaluation texts `MetricsLog` writes, and the run's configuration as hyper-parameters.
TensorBoard is a dependency; wandb and mlflow are extras. All of them work without a network:
    RUN/tensorboard/        TensorBoard event files
    RUN/wandb/              wandb's run directory (`WANDB_MODE=offline`: everything stays here for `wandb sync`);
                            run_id: the wandb run a resumed run continues
    RUN/mlflow/             mlflow.db, the local MLflow store (SQLite) unless MLFLOW_TRACKING_URI names another,
                            artifacts/ (evaluation texts); run.json: the tracking URI and run a resume continues
"""

from __future__ import annotations

import abc
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gemmatune.atomic import write_text
from gemmatune.config import TRACKERS
from gemmatune.errors import GemmatuneError

TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
MLFLOW_DIR = "mlflow"
PROJECT = "gemmatune"  # wandb project and MLflow experiment unless WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME say


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str | int | float | bool]:
    """{"lora": {"rank": 8}, "eval_prompts": ["a", "b"]} -> {"lora.rank": 8, "eval_prompts": "a,b"}: the flat,
    scalar form TensorBoard's HParams and MLflow's params take. None becomes ""."""
    flat: dict[str, str | int | float | bool] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            flat[name] = ",".join(map(str, value))
        elif value is None:
            flat[name] = ""
        else:
            flat[name] = value
    return flat


def _missing(tracker: str, module: str) -> GemmatuneError:
    return GemmatuneError(f"report_to: {tracker} needs the {module} package, which is not installed; run "
                          f"pip install 'gemmatune[{tracker}]', or drop {tracker} from --report-to.")


class Tracker(abc.ABC):
    """What every experiment tracker (TensorBoard, Wandb, Mlflow below) does. `where` is what the end-of-run summary
    shows: where its records went."""

    name = ""
    where = ""

    @abc.abstractmethod
    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Record `values` at `step`."""

    @abc.abstractmethod
    def text(self, step: int, tag: str, text: str) -> None:
        """Record an evaluation text under `tag` at `step`."""

    @abc.abstractmethod
    def close(self, failed: bool) -> None:
        """End the tracker's run, marked failed when the training run raised."""


class TensorBoard(Tracker):
    name = "tensorboard"

    def __init__(self, run_dir: Path, *, start_step: int, config: Mapping[str, Any] | None) -> None:
        from tensorboardX import SummaryWriter  # imported here: it takes ~2 s and is not needed otherwise
        from tensorboardX.summary import hparams

        self.where = str(run_dir / TENSORBOARD_DIR)
        # purge_step writes a restart marker; TensorBoard then hides the interrupted run's events from that step
        # on, matching the truncated JSON lines.
        self._writer = SummaryWriter(self.where, purge_step=start_step + 1 if start_step > 0 else 0)
        if config is not None:
            # Written into this run's own event file (add_hparams would start a sub-run per call): the HParams
            # dashboard lists the run with its settings and these scalars' last values.
            for summary in hparams(flatten(config), {"loss": None, "val_loss": None}):
                self._writer.file_writer.add_summary(summary)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        for tag, value in values.items():
            self._writer.add_scalar(tag, float(value), step)  # TensorBoard shows NaN as a gap
        self._writer.flush()

    def text(self, step: int, tag: str, text: str) -> None:
        self._writer.add_text(tag, text, step)
        self._writer.flush()

    def close(self, failed: bool) -> None:
        self._writer.close()


class Wandb(Tracker):
    """Weights & Biases; WANDB_MODE=offline keeps the run in RUN/wandb for a later `wandb sync`. Its other
    environment settings (WANDB_PROJECT, WANDB_ENTITY, WANDB_API_KEY, ...) apply as usual."""

    name = "wandb"

    def __init__(self, run_dir: Path, *, start_step: int, config: Mapping[str, Any] | None) -> None:
        try:
            import wandb
        except ImportError:
            raise _missing("wandb", "wandb") from None
        self._wandb = wandb
        root = run_dir / WANDB_DIR
        root.mkdir(parents=True, exist_ok=True)
        id_file = root / "run_id"
        # A resumed run continues the same wandb run. Online, wandb drops (with a warning) the steps the interrupted
        # run logged after its checkpoint; an exact resume logs the same values for them anyway.
        run_id = id_file.read_text().strip() if start_step > 0 and id_file.exists() else None  # None: a new id
        try:
            self._run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=run_dir.resolve().name,
                                   dir=str(run_dir), id=run_id, resume="allow", config=dict(config or {}))
        except Exception as e:  # wandb raises its own errors (UsageError, CommError) for login and network
            raise GemmatuneError(f"report_to: wandb could not start a run ({e}). Log in with `wandb login`, or "
                                 "set WANDB_MODE=offline to keep the run on disk and `wandb sync` it later.") from None
        write_text(id_file, self._run.id + "\n")
        offline = self._run.settings.mode in ("offline", "dryrun")  # (asking an offline run for its url warns)
        self.where = str(Path(self._run.dir).parent) if offline else self._run.url  # offline: what `wandb sync` takes
        self._samples: list[list[Any]] = []

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        self._run.log({k: float(v) for k, v in values.items()}, step=step)

    def text(self, step: int, tag: str, text: str) -> None:
        # One table of every evaluation text so far, logged again with each new row: wandb shows the last one.
        self._samples.append([step, tag, text])
        self._run.log({"samples": self._wandb.Table(columns=["step", "tag", "text"], data=list(self._samples))},
                      step=step)

    def close(self, failed: bool) -> None:
        self._run.finish(exit_code=1 if failed else 0)


class Mlflow(Tracker):
    """MLflow through its client (no global active run): to MLFLOW_TRACKING_URI when set (a server, a database),
    else to the SQLite store RUN/mlflow/mlflow.db, which needs no server (the full mlflow package's `mlflow ui
    --backend-store-uri sqlite:///RUN/mlflow/mlflow.db` shows it)."""

    name = "mlflow"
    PARAM_LIMIT = 6000  # characters MLflow keeps of a parameter's value
    BATCH_LIMIT = 100  # params per log_batch call

    def __init__(self, run_dir: Path, *, start_step: int, config: Mapping[str, Any] | None) -> None:
        try:
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise _missing("mlflow", "mlflow-skinny") from None
        root = (run_dir / MLFLOW_DIR).resolve()
        root.mkdir(parents=True, exist_ok=True)
        local = not os.environ.get("MLFLOW_TRACKING_URI")
        uri = f"sqlite:///{root / 'mlflow.db'}" if local else os.environ["MLFLOW_TRACKING_URI"]
        ids_file = root / "run.json"
        saved = json.loads(ids_file.read_text()) if start_step > 0 and ids_file.exists() else {}
        try:
            client = MlflowClient(uri)
            experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
            experiment = client.get_experiment_by_name(experiment_name)
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(
                # A local store keeps its artifacts beside it; a server uses its own default location.
                experiment_name, artifact_location=(root / "artifacts").as_uri() if local else None)
            if saved.get("tracking_uri") == uri:
                run_id = saved["run_id"]
                client.update_run(run_id, status="RUNNING")
            else:
                run_id = client.create_run(experiment_id, run_name=run_dir.resolve().name).info.run_id
                params = [Param(k, str(v)[:self.PARAM_LIMIT]) for k, v in flatten(config or {}).items()]
                for i in range(0, len(params), self.BATCH_LIMIT):
                    client.log_batch(run_id, params=params[i:i + self.BATCH_LIMIT])
        except ImportError as e:  # the SQLite store needs sqlalchemy and alembic, which mlflow-skinny leaves out
            raise GemmatuneError(f"report_to: mlflow's local store needs {e.name}; run pip install "
                                 "'gemmatune[mlflow]', or set MLFLOW_TRACKING_URI to a tracking server.") from None
        except Exception as e:  # MlflowException and connection errors from a tracking server
            raise GemmatuneError(f"report_to: mlflow could not start a run at {uri} ({e}). Check "
                                 "MLFLOW_TRACKING_URI, or unset it to log to RUN/mlflow/mlflow.db.") from None
        write_text(ids_file, json.dumps({"tracking_uri": uri, "run_id": run_id}) + "\n")
        self._client, self._run_id = client, run_id
        self.where = f"{uri} run {run_id}"
        self._texts: dict[int, dict[str, str]] = {}

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(self._run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def text(self, step: int, tag: str, text: str) -> None:
        # One JSON artifact per evaluation, {tag: text}, rewritten as each text arrives.
        self._texts.setdefault(step, {})[tag] = text
        self._client.log_dict(self._run_id, self._texts[step], f"samples/step-{step:08d}.json")

    def close(self, failed: bool) -> None:
        self._client.set_terminated(self._run_id, "FAILED" if failed else "FINISHED")


_KINDS: dict[str, type[Tracker]] = {"tensorboard": TensorBoard, "wandb": Wandb, "mlflow": Mlflow}


def open_trackers(names: tuple[str, ...] | list[str], run_dir: Path, *, start_step: int,
                  config: Mapping[str, Any] | None) -> list[Tracker]:
    """The trackers `names` asks for ("none" and repeats ignored), started in run_dir; any that fails to start
    closes those started before it."""
    opened: list[Tracker] = []
    try:
        for name in dict.fromkeys(n for n in names if n != "none"):
            if name not in _KINDS:
                raise GemmatuneError(f"report_to: unknown tracker {name!r}; expected any of {', '.join(TRACKERS)}.")
            opened.append(_KINDS[name](run_dir, start_step=start_step, config=config))
    except BaseException:
        for tracker in opened:
            tracker.close(failed=True)
        raise
    return opened
