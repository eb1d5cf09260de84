"""Shards on S3: a real S3-compatible server on loopback (moto's server mode, tests/conftest.py), img2dataset-style
shards uploaded to it, streamed through fsspec/s3fs; a connection cut in the middle of a shard (a loopback proxy)
is reconnected at the byte where it stopped, a shard that keeps failing is skipped and counted, never a hang."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from faults.faultrun import free_port

from launch.cli import main as twinscale
from tests.foreign_shards import CLASSES, write_scanned_set
from trainer.config import DataConfig
from trainer.data import remote
from trainer.data.shardsets import open_shard_set, shard_samples
from trainer.data.stream import _DeclaredMembers, _WorkerState, eval_batches, train_batches
from trainer.errors import DataError

FIELDS = {"input": "txt", "label": "json.label"}


def s3_env(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """Credentials and endpoint from the environment only, as users give them."""
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1"), ("AWS_ENDPOINT_URL_S3", endpoint)):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)


@pytest.fixture
def s3(s3_server: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> str:
    """A fresh bucket on the loopback server, named after the test: its s3:// URL."""
    s3_env(monkeypatch, s3_server)
    bucket = "t-" + request.node.name.lower().replace("_", "-")[:50].strip("-")
    fs, _ = remote.filesystem(f"s3://{bucket}")
    fs.mkdir(bucket)
    return f"s3://{bucket}"


@pytest.fixture(scope="module")
def local_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_scanned_set(tmp_path_factory.mktemp("img2dataset"))


def upload(local: Path, url: str) -> None:
    fs, path = remote.filesystem(url)
    for file in sorted(local.iterdir()):
        fs.put_file(str(file), f"{path}/{file.name}")


def config(spec: str, **settings: object) -> DataConfig:
    return DataConfig(train=spec, test=None, fields=FIELDS, batch_size=16, shuffle_buffer=32,
                      **settings)  # type: ignore[arg-type]


def keys(batches: Iterator[dict]) -> list[list[str]]:
    return [batch["keys"] for batch in batches]


def test_a_set_on_s3_streams_like_the_local_copy(s3: str, local_set: Path) -> None:
    upload(local_set, f"{s3}/set")
    spec, local = f"{s3}/set/{{00000..00003}}.tar", config(f"{local_set}/{{00000..00003}}.tar")
    index = open_shard_set(spec, FIELDS)
    assert index.location == f"{s3}/set" and [s.samples for s in index.shards] == [40] * 4
    cfg = config(spec, loader_workers=2)
    assert keys(train_batches(spec, cfg, seed=2, epoch=1, rank=0, world_size=1)) == \
        keys(train_batches(local.train, local.model_copy(update={"loader_workers": 2}), seed=2, epoch=1, rank=0,
                           world_size=1))
    evaluated = list(eval_batches(spec, cfg, batch_size=64, rank=1, world_size=2))
    assert [k for b in evaluated for k in b["keys"]] == [f"{n:09d}" for n in range(80, 160)]
    assert [int(k) % CLASSES for b in evaluated for k in b["keys"]] == \
        [label for b in evaluated for label in b["labels"]["input"].tolist()]


def test_scan_reads_and_writes_s3(s3: str, local_set: Path) -> None:
    for file in local_set.glob("*.tar"):
        remote.write_bytes(f"{s3}/raw/{file.name}", file.read_bytes())
    assert twinscale(["scan", f"{s3}/raw/{{00000..00003}}.tar", "--out", f"{s3}/raw/index.json"]) == 0
    assert open_shard_set(f"{s3}/raw/*.tar", FIELDS).num_samples == 160  # a glob, counts next to the shards


class CuttingProxy:
    """A TCP proxy on loopback to `port` that cuts the first `cuts` connections after `after` response bytes,
    as a flaky network or a restarting load balancer does in the middle of a download."""

    def __init__(self, port: int, *, after: int, cuts: int) -> None:
        self.target, self.after, self.cuts = port, after, cuts
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, response: bool) -> None:
        forwarded = 0
        try:
            while data := source.recv(65536):
                with self.lock:
                    cut = response and self.cuts > 0 and forwarded + len(data) > self.after
                    if cut:
                        self.cuts -= 1
                if cut:
                    sink.sendall(data[: self.after - forwarded])
                    break
                sink.sendall(data)
                forwarded += len(data)
        except OSError:
            pass
        for end in (source, sink):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            end.close()

    def close(self) -> None:
        self.server.close()


def test_a_connection_cut_mid_shard_is_resumed(s3: str, s3_server: str, local_set: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    upload(local_set, f"{s3}/set")
    proxy = CuttingProxy(int(s3_server.rsplit(":", 1)[1]), after=30_000, cuts=3)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{proxy.port}")
    try:
        cfg = config(f"{s3}/set/{{00000..00003}}.tar")
        batches = list(eval_batches(cfg.train, cfg, batch_size=40))
    finally:
        proxy.close()
    assert proxy.cuts == 0  # the proxy did cut three downloads (each shard is ~180 kB)
    assert [k for b in batches for k in b["keys"]] == [f"{n:09d}" for n in range(160)]
    assert batches[-1]["corrupt"] == 0  # every cut was reconnected, nothing lost


def test_a_shard_that_keeps_failing_is_skipped_and_counted(s3: str, local_set: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    dead = socket.create_server(("127.0.0.1", 0))  # accepts, never answers: every request times out or resets
    threading.Thread(target=lambda: [dead.accept()[0].close() for _ in range(10_000)], daemon=True).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{dead.getsockname()[1]}")
    monkeypatch.setattr(remote, "BACKOFF_S", 0.05)
    state = _WorkerState("skip")
    stage = shard_samples(state.tar_error, _DeclaredMembers({"txt", "json"}), FIELDS)
    started = time.monotonic()
    samples = list(stage(iter([{"url": f"{s3}/set/00000.tar"}, {"url": str(local_set / "00001.tar")}])))
    dead.close()
    assert time.monotonic() - started < 60
    assert state.corrupt == 1 and [s["__key__"] for s in samples] == [f"{n:09d}" for n in range(40, 80)]


def test_unreachable_or_missing_data_is_one_error_naming_it(s3: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(DataError, match=r"4 of 4 shard\(s\) do not exist, e.g. s3://.*/none/00000.tar"):
        open_shard_set(f"{s3}/none/{{00000..00003}}.tar", FIELDS)
    assert twinscale(["scan", "s3://no-such-bucket-here/{0..3}.tar", "--out", str(tmp_path / "i.json")]) == 2
    assert "s3://no-such-bucket-here" in capsys.readouterr().err and not (tmp_path / "i.json").exists()
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{port}")  # nothing listens there
    monkeypatch.setattr(remote, "BACKOFF_S", 0.05)
    with pytest.raises(DataError, match=f"{s3}/set"):
        open_shard_set(f"{s3}/set/{{00000..00003}}.tar", FIELDS)


def fake_checkpoint(run_dir: Path, step: int) -> Path:
    path = run_dir / "checkpoints" / f"step_{step:08d}"
    (path / "deepspeed").mkdir(parents=True)
    (path / "deepspeed" / "mp_rank_00_model_states.pt").write_bytes(f"weights {step}".encode())
    (path / "run_state.json").write_text(f'{{"step": {step}}}')
    return path


def test_remote_checkpoints_publish_atomically_and_resume_from_the_newest(
        s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer import remote_runs

    monkeypatch.setenv("TWINSCALE_RUN_CACHE", str(tmp_path / "node-a"))
    url = f"{s3}/runs/r"
    run_dir = remote_runs.local_mirror(url)
    assert remote_runs.remote_of(run_dir) == url and remote_runs.remote_of(tmp_path) is None
    (run_dir / "model").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("name: r\n")
    (run_dir / "model" / "model.safetensors").write_bytes(b"m")
    remote_runs.upload_outputs(run_dir, url)
    for step in (10, 20):
        remote_runs.upload_checkpoint(fake_checkpoint(run_dir, step), url, keep_last=2)
    # An upload that dies before its run_state.json: never complete, never resumed from.
    fs, root = remote.filesystem(url)
    failing = fake_checkpoint(run_dir, 30)
    monkeypatch.setattr(remote, "BACKOFF_S", 0.01)
    fs.put_file = _failing_on("run_state.json", fs.put_file)  # the cached filesystem the upload uses
    try:
        with pytest.raises(DataError, match="ConnectionResetError"):
            remote_runs.upload_checkpoint(failing, url, keep_last=2)
    finally:
        del fs.put_file
    monkeypatch.setenv("TWINSCALE_RUN_CACHE", str(tmp_path / "node-b"))  # another machine, nothing local
    assert remote_runs.remote_checkpoints(url) == (["step_00000010", "step_00000020"], ["step_00000030"])
    fetched = remote_runs.fetch_run(url)
    assert fetched == tmp_path / "node-b" / "s3" / url[5:]
    assert sorted(p.name for p in (fetched / "checkpoints").iterdir()) == ["step_00000020"]
    assert (fetched / "checkpoints" / "step_00000020" / "deepspeed" / "mp_rank_00_model_states.pt").read_bytes() \
        == b"weights 20" and (fetched / "model" / "model.safetensors").read_bytes() == b"m"
    remote_runs.upload_checkpoint(fake_checkpoint(fetched, 40), url, keep_last=2)  # removes 30, prunes 10
    assert remote_runs.remote_checkpoints(url) == (["step_00000020", "step_00000040"], [])


def _failing_on(name: str, put_file: Callable[..., object]) -> Callable[..., object]:
    def put(source: str, target: str, **kwargs: object) -> object:
        if target.endswith(name):
            raise ConnectionResetError("connection reset by peer")
        return put_file(source, target, **kwargs)
    return put


def test_a_worker_checks_it_can_write_a_remote_output_dir(s3: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer import preflight, remote_runs

    monkeypatch.setenv("TWINSCALE_RUN_CACHE", str(tmp_path))
    preflight._check_run_dir(remote_runs.local_mirror(f"{s3}/runs/ok"), "worker 0")
    assert remote_runs.remote_checkpoints(f"{s3}/runs/ok") == ([], [])  # the probe object is gone
    fs, root = remote.filesystem(f"{s3}/runs/ok")
    assert fs.find(root) == []
    with pytest.raises(preflight.WorkerPathError, match="s3://no-such-bucket-for-runs/runs/r.*no such bucket"):
        preflight._check_run_dir(remote_runs.local_mirror("s3://no-such-bucket-for-runs/runs/r"), "worker 0")


@pytest.fixture(scope="module")
def s3_with_auth() -> Iterator[str]:
    """A second loopback S3 server that checks credentials (moto's IAM auth on from the first request)."""
    import subprocess
    import sys

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env={**remote.os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    yield f"http://127.0.0.1:{port}"
    server.terminate()
    server.wait(timeout=30)


def test_refused_credentials_are_one_line_naming_the_url(s3_with_auth: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    s3_env(monkeypatch, s3_with_auth)  # keys the server does not know
    monkeypatch.setattr(remote, "BACKOFF_S", 0.01)
    out = tmp_path / "index.json"
    assert twinscale(["scan", "s3://guarded/train/{00000..00003}.tar", "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: s3://guarded/") and "credentials" in error and "\n" not in error, error
    assert not out.exists()


@pytest.fixture(scope="module")
def http_set(local_set: Path) -> Iterator[str]:
    """The same shards served over HTTP by a loopback web server (what https:// URLs go through: fsspec's HTTP
    filesystem on aiohttp)."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(local_set)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def test_a_set_over_http_streams_like_the_local_copy(http_set: str, local_set: Path) -> None:
    spec = f"{http_set}/{{00000..00003}}.tar"
    index = open_shard_set(spec, FIELDS)  # counts from the index.json served next to the shards
    assert index.location == http_set and [s.samples for s in index.shards] == [40] * 4
    local = config(f"{local_set}/{{00000..00003}}.tar")
    assert keys(train_batches(spec, config(spec), seed=3, epoch=0, rank=1, world_size=2)) == \
        keys(train_batches(local.train, local, seed=3, epoch=0, rank=1, world_size=2))
    with pytest.raises(DataError, match=r"no count for 2 shard.*00008\.tar"):
        open_shard_set(f"{http_set}/{{00008..00009}}.tar", FIELDS)
