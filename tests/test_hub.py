"""--model as a Hub id or a Kaggle handle: the real clients (huggingface_hub, kagglehub) against local HTTP servers
that answer the endpoints those clients call, serving the embedded model (Hugging Face layout) and a KerasHub
preset; and the resolution order (local path, `tiny`, presets, Hub ids, Kaggle handles) decided without a network."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from gemmatune.cli import main
from gemmatune.config import DEFAULT_MODEL, PRESETS
from gemmatune.errors import GemmatuneError
from gemmatune.hub import HUB_FILES, resolve_config, resolve_model

SRC = Path(__file__).parents[1] / "src"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
GATED_MESSAGE = "Access to model owner/gated is restricted. You must have access to it and be authenticated."


class Server:
    """A ThreadingHTTPServer on a free port whose handler is `route(handler)`; every request is logged."""

    def __init__(self, route) -> None:
        self.log: list[tuple[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.log.append(("GET", self.path))
                route(self)

            def do_HEAD(self) -> None:
                server.log.append(("HEAD", self.path))
                route(self)

            def do_POST(self) -> None:
                server.log.append(("POST", self.path))
                route(self)

            def log_message(self, *args) -> None:  # quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.paths = self.httpd.paths = []  # the files a Kaggle download request named
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def reply(h: BaseHTTPRequestHandler, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
          content_type: str = "application/json") -> None:
    h.send_response(status)
    h.send_header("Content-Type", content_type)
    h.send_header("Content-Length", str(len(body)))
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.end_headers()
    if h.command != "HEAD":
        h.wfile.write(body)


# ---- the Hugging Face Hub ------------------------------------------------------------------------------------------

def _lfs(name: str) -> bool:
    return name.endswith((".safetensors", ".model", ".bin"))


def hub_route(repos: dict[str, dict[str, bytes]], gated: set[str]):
    """The endpoints huggingface_hub's snapshot_download calls: the revision API (repo_info), the tree API
    (list_repo_tree), and resolve/{revision}/{file} (HEAD for the metadata, GET for the bytes)."""

    def route(h: BaseHTTPRequestHandler) -> None:
        path = h.path.split("?")[0]
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
            repo, files = m[1], repos.get(m[1])
            if files is None:
                return reply(h, 404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"})
            if m[2] not in (None, "main", COMMIT):
                return reply(h, 404, b'{"error": "Invalid rev id"}', {"X-Error-Code": "RevisionNotFound"})
            info = {"id": repo, "modelId": repo, "sha": COMMIT, "private": False,
                    "gated": "manual" if repo in gated else False, "siblings": [{"rfilename": f} for f in files]}
            return reply(h, 200, json.dumps(info).encode())
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/.*)?", path):
            files = repos.get(m[1])
            if files is None:
                return reply(h, 404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"})
            tree = []
            for name, data in files.items():
                entry = {"type": "file", "path": name, "size": len(data),
                         "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
                if _lfs(name):
                    entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                tree.append(entry)
            return reply(h, 200, json.dumps(tree).encode())
        if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            repo, name = m[1], m[3]
            files = repos.get(repo)
            if files is None:
                return reply(h, 404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"})
            if repo in gated:  # what the Hub answers without an accepted license
                return reply(h, 401, json.dumps({"error": GATED_MESSAGE}).encode(),
                             {"X-Error-Code": "GatedRepo", "X-Error-Message": GATED_MESSAGE})
            if name not in files:
                return reply(h, 404, b'{"error": "Entry not found"}', {"X-Error-Code": "EntryNotFound"})
            data = files[name]
            etag = hashlib.sha256(data).hexdigest() if _lfs(name) else hashlib.sha1(
                b"blob %d\0" % len(data) + data).hexdigest()
            headers = {"ETag": f'"{etag}"', "X-Repo-Commit": COMMIT}
            if _lfs(name):
                headers |= {"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))}
            return reply(h, 200, data, headers, content_type="application/octet-stream")
        reply(h, 404, b'{"error": "unknown endpoint"}')

    return route


EMBEDDED_FILES = {p.name: p.read_bytes() for p in DEFAULT_MODEL.iterdir()}
# Files a real repo holds that gemmatune does not read: they must not be downloaded.
EXTRA_FILES = {"pytorch_model.bin": b"not read", "original/model.safetensors": b"not read", "README.md": b"# tiny"}


@pytest.fixture(scope="module")
def hub() -> Iterator[Server]:
    repos = {"owner/tiny": {**EMBEDDED_FILES, **EXTRA_FILES}, "owner/gated": dict(EMBEDDED_FILES),
             "owner/not-a-model": {"README.md": b"# nothing"}}
    server = Server(hub_route(repos, gated={"owner/gated"}))
    yield server
    server.close()


def hub_env(tmp: Path, endpoint: str, **extra: str) -> dict[str, str]:
    """A process environment that points huggingface_hub at `endpoint` with its own cache and no login."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    return {**env, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1",
            "PYTHONPATH": str(SRC), "JAX_PLATFORMS": "cpu", **extra}


RESOLVE = ("import sys\nfrom gemmatune.errors import GemmatuneError\nfrom gemmatune.hub import resolve_model\n"
           "try:\n    print(resolve_model(sys.argv[1]))\nexcept GemmatuneError as e:\n"
           "    print(f'error: {e}', file=sys.stderr)\n    sys.exit(2)\n")


def resolve_in(env: dict[str, str], spec: str) -> subprocess.CompletedProcess:
    """resolve_model in a fresh process: huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE at import."""
    return subprocess.run([sys.executable, "-c", RESOLVE, spec], env=env, capture_output=True, text=True,
                          timeout=120)


def downloads(server: Server) -> list[str]:
    return sorted(p.split("/resolve/")[1].split("/", 1)[1] for m, p in server.log if m == "GET" and "/resolve/" in p)


def test_hub_download_then_cache_then_offline(hub: Server, tmp_path: Path) -> None:
    env = hub_env(tmp_path, hub.url)
    hub.log.clear()
    first = resolve_in(env, "owner/tiny")
    assert first.returncode == 0, first.stderr
    got = Path(first.stdout.strip())
    assert str(tmp_path / "hf") in str(got) and (got / "model.safetensors").read_bytes() == \
        EMBEDDED_FILES["model.safetensors"]
    # Exactly what gemmatune reads; no PyTorch weights, README or sub-folder files.
    assert downloads(hub) == sorted(EMBEDDED_FILES)
    assert all(n not in {p.name for p in got.iterdir()} for n in ("pytorch_model.bin", "README.md", "original"))

    hub.log.clear()
    second = resolve_in(env, "owner/tiny")
    assert second.returncode == 0 and second.stdout == first.stdout
    assert downloads(hub) == [] and not any(m == "HEAD" for m, _ in hub.log)  # the revision lookup only

    hub.log.clear()
    offline = resolve_in({**env, "HF_HUB_OFFLINE": "1"}, "owner/tiny")
    assert offline.returncode == 0 and offline.stdout == first.stdout and hub.log == []

    pinned = resolve_in(env, f"owner/tiny@{COMMIT}")
    assert pinned.returncode == 0 and pinned.stdout == first.stdout


def test_hub_errors_are_explained(hub: Server, tmp_path: Path) -> None:
    env = hub_env(tmp_path, hub.url)
    gated = resolve_in(env, "owner/gated")
    assert gated.returncode == 2
    assert "accept the license at https://huggingface.co/owner/gated" in gated.stderr
    assert "hf auth login" in gated.stderr and "HF_TOKEN" in gated.stderr and "Traceback" not in gated.stderr

    with_token = resolve_in({**env, "HF_TOKEN": "hf_not_granted"}, "owner/gated")
    assert with_token.returncode == 2 and "the token in use has no access" in with_token.stderr

    no_revision = resolve_in(env, "owner/tiny@v9")
    assert no_revision.returncode == 2 and "owner/tiny has no revision 'v9'" in no_revision.stderr

    missing = resolve_in(env, "owner/no-such-model")
    assert missing.returncode == 2 and "no model owner/no-such-model on the Hugging Face Hub" in missing.stderr
    assert "no local directory owner/no-such-model" in missing.stderr

    not_a_model = resolve_in(env, "owner/not-a-model")
    assert not_a_model.returncode == 2 and "has no config.json" in not_a_model.stderr

    offline = resolve_in({**env, "HF_HUB_OFFLINE": "1"}, "owner/never-downloaded")
    assert offline.returncode == 2 and "HF_HUB_OFFLINE is set" in offline.stderr and "not in the cache" in \
        offline.stderr

    with socket.socket() as s:  # a port that was free a moment ago: the connection is refused
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    unreachable = resolve_in(hub_env(tmp_path, closed), "owner/tiny")
    assert unreachable.returncode == 2 and "could not be reached" in unreachable.stderr
    assert "Traceback" not in unreachable.stderr


def test_inspect_from_a_hub_id(hub: Server, tmp_path: Path, capsys) -> None:
    """The whole command in a fresh process: `gemmatune data inspect --model owner/tiny` reads the downloaded
    tokenizer exactly as `--model tiny` reads the embedded one (progress bars go to stderr, not stdout)."""
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "Hello there"}]}) + "\n")
    args = ["data", "inspect", "--data", str(data), "--json"]
    cmd = [sys.executable, "-c", "import sys; from gemmatune.cli import main; sys.exit(main(sys.argv[1:]))"]
    from_hub = subprocess.run(cmd + args + ["--model", "owner/tiny"], env=hub_env(tmp_path, hub.url),
                              capture_output=True, text=True, timeout=300)
    assert from_hub.returncode == 0, from_hub.stderr
    assert main(args + ["--model", "tiny"]) == 0
    assert json.loads(from_hub.stdout) == json.loads(capsys.readouterr().out)


# ---- Kaggle --------------------------------------------------------------------------------------------------------

def kaggle_route(models: dict[str, dict[str, bytes]]):
    """kagglesdk's RPC endpoints (POST /api/v1/models.ModelApiService/<Method>, JSON bodies) that
    kagglehub.model_download calls: GetModelInstance (an unversioned handle's latest version),
    ListModelInstanceVersionFiles, and DownloadModelInstanceVersion (one file's bytes, or the listed files)."""

    def route(h: BaseHTTPRequestHandler) -> None:
        body = json.loads(h.rfile.read(int(h.headers.get("Content-Length", 0))) or b"{}")
        if body.get("path"):
            h.server.paths.append(body["path"])
        method = h.path.rsplit("/", 1)[-1]
        key = f"{body.get('ownerSlug')}/{body.get('modelSlug')}/{body.get('instanceSlug')}"
        files = models.get(key)
        if key.endswith("/gated"):
            return reply(h, 403, json.dumps({"code": 403, "message": "Permission denied"}).encode())
        if files is None:
            return reply(h, 404, json.dumps({"code": 404, "message": "Not found"}).encode())
        if method == "GetModelInstance":
            return reply(h, 200, json.dumps({"slug": body["instanceSlug"], "versionNumber": 1}).encode())
        if method == "ListModelInstanceVersionFiles":
            listing = {"files": [{"name": n, "size": len(d)} for n, d in files.items()], "nextPageToken": ""}
            return reply(h, 200, json.dumps(listing).encode())
        if method == "DownloadModelInstanceVersion" and body.get("path") in files:
            return reply(h, 200, files[body["path"]], content_type="application/octet-stream")
        reply(h, 404, json.dumps({"code": 404, "message": f"no {method} {body.get('path')}"}).encode())

    return route


@pytest.fixture
def kaggle(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A Kaggle stand-in serving `files` as keras/gemma2/keras/gemma2_tiny; kagglehub's cache in tmp_path, no
    credentials. kagglesdk takes its endpoint from a table keyed by KAGGLE_API_ENVIRONMENT (LOCALHOST is
    http://localhost): that table entry is pointed at the server."""
    from kagglesdk.kaggle_env import KaggleEnv, _env_to_endpoint

    servers = []

    def serve(files: dict[str, bytes]) -> Server:
        server = Server(kaggle_route({"keras/gemma2/gemma2_tiny": files}))
        servers.append(server)
        monkeypatch.setitem(_env_to_endpoint, KaggleEnv.LOCAL, server.url)
        return server

    for var in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("KAGGLE_API_ENVIRONMENT", "LOCALHOST")
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle-config"))
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub"))
    yield serve
    for s in servers:
        s.close()


def preset_files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_kaggle_handle_downloads_a_kerashub_preset(kaggle, tmp_path: Path, capsys, monkeypatch) -> None:
    # test_kerashub's preset builder, with Keras on JAX as there (scripts/test.sh installs keras-hub: a missing
    # reference fails, it does not skip). Keras' own initial weights: the preset's numbers are test_kerashub's
    # business, here it is the download.
    monkeypatch.setenv("KERAS_BACKEND", "jax")  # read when keras is first imported
    import keras_hub
    from test_kerashub import BACKBONE, TOKENIZER

    backbone = keras_hub.models.GemmaBackbone(**BACKBONE, dtype="float32")
    lm = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=keras_hub.models.GemmaCausalLMPreprocessor(
        keras_hub.models.GemmaTokenizer(proto=str(TOKENIZER))))
    lm.save_to_preset(str(tmp_path / "preset"))
    files = preset_files(tmp_path / "preset")
    server = kaggle(files)
    rpc = "/api/v1/models.ModelApiService/"

    # plan's config-only read: the latest version, then config.json alone.
    assert resolve_config("keras/gemma2/keras/gemma2_tiny") == resolve_config(str(tmp_path / "preset"))
    assert [p.removeprefix(rpc) for _, p in server.log] == ["GetModelInstance", "DownloadModelInstanceVersion"]
    assert server.paths == ["config.json"]

    server.log.clear()
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "hello world"}) + "\n")
    args = ["data", "inspect", "--data", str(data), "--json"]
    assert main(args + ["--model", "kaggle://keras/gemma2/keras/gemma2_tiny"]) == 0
    from_kaggle = json.loads(capsys.readouterr().out)  # only JSON on stdout: kagglehub's log goes to stderr
    assert main(args + ["--model", str(tmp_path / "preset")]) == 0
    assert json.loads(capsys.readouterr().out) == from_kaggle
    assert sorted(p.removeprefix(rpc) for _, p in server.log) == sorted(
        ["GetModelInstance", "ListModelInstanceVersionFiles"] + ["DownloadModelInstanceVersion"] * len(files))

    server.log.clear()  # a versioned handle in the cache: no request at all
    got = resolve_model("keras/gemma2/keras/gemma2_tiny/1")
    assert preset_files(got) == files and server.log == []


def test_kaggle_errors_are_explained(kaggle) -> None:
    kaggle({"config.json": b"{}"})
    with pytest.raises(GemmatuneError, match=r"Accept the model's license at https://www.kaggle.com/models/keras/"
                                             r"gemma2 and set up Kaggle credentials"):
        resolve_model("keras/gemma2/keras/gated/1")
    with pytest.raises(GemmatuneError, match="no such model on Kaggle"):
        resolve_model("keras/gemma2/keras/nope")
    with pytest.raises(GemmatuneError, match="not jax"):
        resolve_model("google/gemma-2/jax/gemma2-2b")  # Orbax checkpoints: not a format gemmatune reads


# ---- resolution order, without a network ---------------------------------------------------------------------------

@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any download attempt fails the test: these specs must be decided by their text."""
    import huggingface_hub
    import kagglehub

    def refuse(*a, **k):
        raise AssertionError(f"network call for {a}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.setattr(kagglehub, "model_download", refuse)


def test_local_paths_and_names_win(no_network, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_model("tiny") == DEFAULT_MODEL
    assert resolve_config("tiny") == PRESETS["tiny"] == resolve_config(str(DEFAULT_MODEL))
    assert resolve_config("gemma2-2b") == PRESETS["gemma2-2b"]
    # A local directory named like a Hub id is the local directory.
    (tmp_path / "owner" / "tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model("owner/tiny") == Path("owner/tiny")
    assert resolve_model("./owner/tiny") == Path("owner/tiny")


@pytest.mark.parametrize("spec,message", [
    ("./my-model", "no such directory"),
    ("/nowhere/my-model", "no such directory"),
    ("../a/b", "no such directory"),
    ("runs/out/merged", "no such directory"),  # three parts: neither an id nor a handle
    ("a/b/c/d", "no such directory"),  # 'c' is no Kaggle framework
    ("gemma-2-2b-it", "probably google/gemma-2-2b-it"),
    ("gemma2-2b", "--model google/gemma-2-2b"),
    ("small", "configuration preset"),
])
def test_what_is_not_downloaded(no_network, spec: str, message: str) -> None:
    with pytest.raises(GemmatuneError, match=re.escape(message)) as e:
        resolve_model(spec)
    listed = str(e.value)
    if "no such directory" in listed:  # the choices offered all work for a command that loads weights
        assert "tiny" in listed and "google/gemma-2-2b-it" in listed and "gemma2-27b" not in listed


def test_cli_errors_list_what_works(no_network, capsys) -> None:
    assert main(["generate", "--model", "./my-model"]) == 2
    err = capsys.readouterr().err
    assert "no such directory" in err and "gemma2-2b" not in err
    assert main(["plan", "--model", "./my-model", "--device", "cpu", "--seq-len", "8", "--batch-size", "1"]) == 2
    err = capsys.readouterr().err
    assert "no such directory" in err and "gemma2-2b" in err  # plan reads presets


def test_tiny_means_the_embedded_model_everywhere(capsys, tmp_path: Path) -> None:
    """`tiny` was also a config-only preset name, so `--model tiny` failed asking for a tokenizer."""
    assert main(["generate", "--model", "tiny", "--prompt", "Hello there", "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.strip()
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "hello world"}) + "\n")
    assert main(["data", "inspect", "--model", "tiny", "--data", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"]["examples"] == 1


def test_hub_files_cover_what_the_loaders_read() -> None:
    """Every file of the embedded checkpoint (what save_hf writes and the loaders read) matches HUB_FILES."""
    from fnmatch import fnmatch

    assert all(any(fnmatch(f, p) for p in HUB_FILES) for f in EMBEDDED_FILES)
    assert not any(fnmatch(f, p) for p in HUB_FILES for f in EXTRA_FILES)
