"""`report_to`: the setting, TensorBoard's hyper-parameters, Weights & Biases offline and MLflow on its local store
(each read back through the tracker's own files or client), resume, a tracker failing mid-run, a missing extra, and
`gemmatune train --report-to tensorboard,wandb,mlflow` end to end."""

from __future__ import annotations

import json
import math
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from gemmatune import trackers
from gemmatune.config import TrainConfig
from gemmatune.errors import GemmatuneError
from gemmatune.metrics import MetricsLog

CONFIG = {"lr": 3e-4, "lora": {"rank": 8, "targets": ["q", "v"]}, "eval_prompts": [], "num_processes": None}


# --- the setting -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags,want", [
    ([], ("tensorboard",)),
    (["--report-to", "wandb,mlflow"], ("wandb", "mlflow")),
    (["--report_to", "tensorboard", "wandb"], ("tensorboard", "wandb")),
    (["--report-to", "none"], ("none",)),
])
def test_report_to_flag(flags, want):
    from gemmatune.cli import build_parser
    from gemmatune.settings import train_config_from_args

    args = build_parser().parse_args(["train", "--data", "x.jsonl", *flags])
    assert train_config_from_args(args).report_to == want


@pytest.mark.parametrize("bad", [("tensorbord",), ("none", "wandb"), ("comet",)])
def test_report_to_rejects_unknown_trackers(bad):
    with pytest.raises(GemmatuneError, match=r"report_to: .* expected any of tensorboard, wandb, mlflow"):
        TrainConfig(report_to=bad)


def test_flatten_config():
    assert trackers.flatten(CONFIG) == {"lr": 3e-4, "lora.rank": 8, "lora.targets": "q,v", "eval_prompts": "",
                                        "num_processes": ""}


# --- TensorBoard ---------------------------------------------------------------------------------------------------

def test_tensorboard_gets_the_config_as_hyper_parameters(tmp_path):
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData

    from test_metrics import read_events

    with MetricsLog(tmp_path, config=CONFIG) as log:
        log.log(1, loss=2.0)
    plugin = [HParamsPluginData.FromString(v.metadata.plugin_data.content) for e in read_events(tmp_path)
              for v in e.summary.value if v.metadata.plugin_data.plugin_name == "hparams"]
    [info] = [p.session_start_info for p in plugin if p.HasField("session_start_info")]
    hparams = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in info.hparams.items()}
    assert hparams == {"lr": 3e-4, "lora.rank": 8, "lora.targets": "q,v", "eval_prompts": "", "num_processes": ""}
    [experiment] = [p.experiment for p in plugin if p.HasField("experiment")]
    assert [m.name.tag for m in experiment.metric_infos] == ["loss", "val_loss"]


# --- a tracker failing, a missing extra -----------------------------------------------------------------------------

def test_a_tracker_failing_mid_run_is_named_once_and_dropped(tmp_path, monkeypatch, capsys):
    calls = []

    def broken(self, step, values):
        calls.append(step)
        raise ConnectionError("server gone")

    monkeypatch.setattr(trackers.TensorBoard, "scalars", broken)
    with MetricsLog(tmp_path) as log:
        log.log(1, loss=1.0)
        log.log(2, loss=0.5)
        assert log.where == {"tensorboard": str(tmp_path / "tensorboard")}  # still listed in the summary
    assert calls == [1]
    err = capsys.readouterr().err
    assert err.count("warning: tensorboard failed at step 1 (server gone)") == 1
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.parametrize("tracker,module,extra", [("wandb", "wandb", "wandb"), ("mlflow", "mlflow", "mlflow")])
def test_a_missing_tracker_names_the_extra_to_install(tmp_path, monkeypatch, tracker, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(GemmatuneError, match=re.escape(f"pip install 'gemmatune[{extra}]'")):
        MetricsLog(tmp_path, report_to=("tensorboard", tracker))


# --- Weights & Biases, offline ----------------------------------------------------------------------------------------

@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))  # nothing written outside tmp_path
    monkeypatch.delenv("WANDB_PROJECT", raising=False)


def wandb_records(path: Path) -> list:
    """The protobuf records of a run's .wandb file: a 7-byte header (":W&B", magic, version), then LevelDB's log
    format (32 KiB blocks of records with a 7-byte header: CRC, length, type FULL/FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, records, pending = 7, [], b""
    while pos + 7 <= len(data):
        if (left := 32768 - pos % 32768) < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def wandb_run(sync_dir: Path) -> tuple[dict, dict[int, dict]]:
    """(the run's config, {step: {key: value}}) from an offline run directory."""
    [events] = sync_dir.glob("run-*.wandb")
    config, history = {}, {}
    for record in wandb_records(events):
        kind = record.WhichOneof("record_type")
        if kind in ("run", "config"):  # the config comes with the run record or in config records after it
            updates = record.run.config.update if kind == "run" else record.config.update
            config.update({item.key: json.loads(item.value_json) for item in updates})
        elif kind == "history":
            row = {".".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
            history.setdefault(row["_step"], {}).update(row)
    return config, history


def test_wandb_offline_gets_metrics_texts_config_and_resumes(tmp_path, wandb_offline):
    run = tmp_path / "run"
    with MetricsLog(run, report_to=("wandb",), config=CONFIG) as log:
        log.log(1, loss=2.0, lr=1e-3)
        log.log(2, loss=1.5, lr=1e-3)
        log.log(2, val_loss=1.75, val_ppl=math.exp(1.75))
        log.log_text(2, "hi", "hello there")
        where = Path(log.where["wandb"])
    assert where.parent == run / "wandb" and where.name.startswith("offline-run-")
    run_id = (run / "wandb" / "run_id").read_text().strip()
    assert where.name.endswith(run_id)
    config, history = wandb_run(where)
    assert {k: config[k] for k in CONFIG} == CONFIG
    scalars = {s: {k: v for k, v in row.items() if not k.startswith(("_", "samples."))} for s, row in history.items()}
    assert scalars == {1: {"loss": 2.0, "lr": 1e-3},
                       2: {"loss": 1.5, "lr": 1e-3, "val_loss": 1.75, "val_ppl": pytest.approx(math.exp(1.75))}}
    table = json.loads((where / "files" / history[2]["samples.path"]).read_text())
    assert table["columns"] == ["step", "tag", "text"] and table["data"] == [[2, "hi", "hello there"]]

    # A resumed run continues the same wandb run (a new offline directory with the same id, for `wandb sync`).
    with MetricsLog(run, start_step=2, report_to=("wandb",), config=CONFIG) as log:
        log.log(3, loss=1.25, lr=1e-3)
        resumed = Path(log.where["wandb"])
    assert (run / "wandb" / "run_id").read_text().strip() == run_id and resumed.name.endswith(run_id)
    _, history = wandb_run(resumed)
    assert {s: row["loss"] for s, row in history.items()} == {3: 1.25}

    # A fresh run (start_step 0) is a new wandb run.
    with MetricsLog(tmp_path / "other", report_to=("wandb",)) as log:
        assert not log.where["wandb"].endswith(run_id)


# --- MLflow, local store ---------------------------------------------------------------------------------------------

@pytest.mark.slow  # MLflow builds its SQLite schema, ~10 s
def test_mlflow_local_store_gets_metrics_texts_params_and_resumes(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    from mlflow.tracking import MlflowClient

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory (mlflow's default ./mlruns)
    run = tmp_path / "run"
    with MetricsLog(run, report_to=("mlflow",), config=CONFIG) as log:
        log.log(1, loss=2.0, lr=1e-3)
        log.log(2, loss=1.5, lr=1e-3)
        log.log(2, val_loss=1.75)
        log.log_text(2, "hi", "hello there")
        log.log_text(2, "bye", "see you")
    saved = json.loads((run / "mlflow" / "run.json").read_text())
    uri = f"sqlite:///{run.resolve() / 'mlflow' / 'mlflow.db'}"
    assert saved["tracking_uri"] == uri
    client = MlflowClient(uri)
    run_id = saved["run_id"]

    def history(key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))

    assert history("loss") == [(1, 2.0), (2, 1.5)] and history("val_loss") == [(2, 1.75)]
    info = client.get_run(run_id)
    assert info.info.status == "FINISHED" and info.info.run_name == "run"
    assert info.data.params == {"lr": "0.0003", "lora.rank": "8", "lora.targets": "q,v", "eval_prompts": "",
                                "num_processes": ""}
    assert client.get_experiment(info.info.experiment_id).name == "gemmatune"
    artifacts = Path(client.download_artifacts(run_id, "samples/step-00000002.json", str(tmp_path / "dl")))
    assert json.loads(artifacts.read_text()) == {"hi": "hello there", "bye": "see you"}
    assert (run / "mlflow" / "artifacts").is_dir() and not (tmp_path / "mlruns").exists()

    # A resumed run logs into the same MLflow run; a run that raises ends FAILED.
    with pytest.raises(RuntimeError), MetricsLog(run, start_step=2, report_to=("mlflow",), config=CONFIG) as log:
        log.log(3, loss=1.25)
        raise RuntimeError("stop")
    assert json.loads((run / "mlflow" / "run.json").read_text())["run_id"] == run_id
    assert history("loss") == [(1, 2.0), (2, 1.5), (3, 1.25)]
    assert client.get_run(run_id).info.status == "FAILED"


def test_mlflow_unreachable_server_is_one_message(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://nowhere")
    with pytest.raises(GemmatuneError, match=r"mlflow could not start a run at nosuchscheme://nowhere"):
        MetricsLog(tmp_path, report_to=("mlflow",))
    assert not (tmp_path / "mlflow" / "run.json").exists()


# --- end to end --------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_train_reports_to_every_tracker(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("WANDB_", "MLFLOW_"))}
    env |= {"WANDB_MODE": "offline", "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
            "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"), "WANDB_DATA_DIR": str(tmp_path / "wandb-data")}
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "gemmatune.cli", "train", "--output", str(run), "--max-steps", "4",
                        "--log-every", "2", "--eval-prompts", "hi", "--eval-max-new-tokens", "4",
                        "--report-to", "tensorboard,wandb,mlflow"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = {row["step"]: row["loss"] for row in rows if "loss" in row}
    assert sorted(losses) == [2, 4]
    summary = (run / "summary.txt").read_text()
    wandb_dir = Path(re.search(r"^wandb run\s+(.+)$", summary, re.MULTILINE)[1])
    mlflow_run = re.search(r"^MLflow run\s+(\S+) run (\w+)$", summary, re.MULTILINE)
    assert re.search(rf"^TensorBoard logs\s+{re.escape(str(run / 'tensorboard'))}$", summary, re.MULTILINE)

    config, history = wandb_run(wandb_dir)
    assert {s: row["loss"] for s, row in history.items() if "loss" in row} == pytest.approx(losses)
    assert config["max_steps"] == 4 and config["lora"]["rank"] > 0
    client = MlflowClient(mlflow_run[1])
    assert dict((m.step, m.value) for m in client.get_metric_history(mlflow_run[2], "loss")) == \
        pytest.approx(losses)
    assert client.get_run(mlflow_run[2]).data.params["max_steps"] == "4"
    assert not (tmp_path / "mlruns").exists()
