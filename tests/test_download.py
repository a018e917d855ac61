"""Data a new user does not have: Fashion-MNIST and tiny Shakespeare fetched on first use into the cache folder.

Every download here comes from a small HTTP server on 127.0.0.1 serving ../shared/data (the real files, checked
against the real hash table) or small made-up files with their own table entries; never from the internet.
What a download gives is compared with loading ../shared/data directly.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from dnicompile.cli import main
from dnicompile.errors import DataError
from dnicompile.train import data as data_mod
from dnicompile.train import download
from dnicompile.train.tasks import load_text

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
FASHION = SHARED / "fashion-mnist"
TEXT = SHARED / "tinyshakespeare" / "input.txt"
needs_shared = pytest.mark.skipif(
    not (FASHION / "train-images-idx3-ubyte.gz").is_file() or not TEXT.is_file(), reason=f"no data in {SHARED}"
)


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET /<path>: the server's `files[path]` (bytes, or a Path read at each request), with what `cut` and
    `no_length` say to do wrong; every request path is recorded in `requests`."""

    def do_GET(self):
        srv = self.server
        srv.requests.append(self.path)
        body = srv.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        if isinstance(body, Path):
            body = body.read_bytes()
        self.send_response(200)
        if self.path not in srv.no_length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: srv.cut.get(self.path, len(body))])  # then HTTP/1.0 closes the connection

    def log_message(self, *args):
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a client that stops reading (a refused download) breaks the pipe: expected here


@pytest.fixture
def server():
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.files, srv.requests, srv.cut, srv.no_length = {}, [], {}, set()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    thread.join()
    srv.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch, server):
    """An empty cache folder, downloads on, from the test server; no system folder."""
    folder = tmp_path / "cache"
    monkeypatch.setenv(download.CACHE_ENV, str(folder))
    monkeypatch.setenv(download.MIRROR_ENV, server.url)
    monkeypatch.delenv(download.OFFLINE_ENV, raising=False)
    monkeypatch.setattr(data_mod, "SYSTEM_DIRS", ())
    return folder


def _serve_shared(server) -> None:
    for remote in download.REMOTES["fashion-mnist"]:
        server.files[f"/fashion-mnist/{remote.name}"] = FASHION / remote.name
    server.files["/tinyshakespeare/input.txt"] = TEXT


def _fake(monkeypatch, server, name: str, content: bytes, served: bytes | None = None) -> download.Remote:
    """A made-up data set `fake` of one file whose table entry is `content`'s hash and size; the server sends
    `served` (default: the file itself, gzipped where the name ends in .gz)."""
    remote = download.Remote(
        "fake", name, "http://example.invalid/" + name, hashlib.sha256(content).hexdigest(), len(content)
    )
    monkeypatch.setitem(download.REMOTES, "fake", (remote,))
    if served is None:
        served = gzip.compress(content) if name.endswith(".gz") else content
    server.files[f"/fake/{name}"] = served
    return remote


def _left(folder: Path) -> list[str]:
    """What a download left in its folder, apart from the lock file."""
    return sorted(p.name for p in folder.iterdir() if p.name != ".lock") if folder.exists() else []


@needs_shared
def test_download_then_load_equals_shared_data(server, cache):
    _serve_shared(server)
    got = data_mod.load_fashion_mnist(None)
    assert Path(got.source) == (cache / "fashion-mnist").resolve()
    assert sorted(server.requests) == sorted(f"/fashion-mnist/{r.name}" for r in download.REMOTES["fashion-mnist"])
    assert _left(cache / "fashion-mnist") == sorted(r.name for r in download.REMOTES["fashion-mnist"])
    for remote in download.REMOTES["fashion-mnist"]:
        assert (cache / "fashion-mnist" / remote.name).read_bytes() == (FASHION / remote.name).read_bytes()
    want = data_mod.load_fashion_mnist(str(FASHION))
    for key in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(got, key), getattr(want, key)), key
    # the second time (and in each worker process) the files are found in the cache, not downloaded again
    assert data_mod.find_fashion_mnist(None) == cache / "fashion-mnist"
    text = load_text(None)
    assert text.source == str((cache / "tinyshakespeare" / "input.txt").resolve())
    want_text = load_text(str(TEXT))
    assert text.vocab == want_text.vocab and torch.equal(text.train, want_text.train)
    assert torch.equal(text.valid, want_text.valid)
    assert load_text(None).source == text.source
    assert len(server.requests) == 5 and server.requests[-1] == "/tinyshakespeare/input.txt"


def test_only_missing_files_are_fetched_and_present_ones_kept(server, cache, monkeypatch):
    a = _fake(monkeypatch, server, "a.txt", b"a" * 300)
    b = download.Remote("fake", "b.txt", "http://example.invalid/b.txt", hashlib.sha256(b"b" * 50).hexdigest(), 50)
    monkeypatch.setitem(download.REMOTES, "fake", (a, b))
    server.files["/fake/b.txt"] = b"b" * 50
    (cache / "fake").mkdir(parents=True)
    (cache / "fake" / "a.txt").write_bytes(b"mine")  # a user's own copy is used as it is
    assert download.fetch("fake") == cache / "fake"
    assert server.requests == ["/fake/b.txt"]
    assert (cache / "fake" / "a.txt").read_bytes() == b"mine" and (cache / "fake" / "b.txt").read_bytes() == b"b" * 50


def test_wrong_hash_is_refused_and_leaves_no_file(server, cache, monkeypatch):
    remote = _fake(monkeypatch, server, "a.gz", b"the right content " * 40, served=gzip.compress(b"x" * 720))
    with pytest.raises(download.DownloadError) as e:
        download.fetch("fake")
    msg = str(e.value)
    url = f"{server.url}fake/a.gz"
    assert url in msg and remote.sha256 in msg and hashlib.sha256(b"x" * 720).hexdigest() in msg
    assert "SHA-256 mismatch" in msg and "nothing was saved" in msg
    assert _left(cache / "fake") == []


@pytest.mark.parametrize(
    "how, expected",
    [
        ("short body, Content-Length of the whole", "connection closed"),
        ("short gzip, no Content-Length", "gzip stream ends early"),
        ("not gzip", "not a valid gzip file"),
        ("data after the gzip stream", "data after the end of the gzip stream"),
        ("sends more than it can be", "more than"),
        ("declares more than it can be", "offers"),
        ("decompresses to more", "holds more than the 5,000 bytes"),
        ("no such file", "HTTP 404"),
    ],
)
def test_a_broken_download_leaves_no_file(server, cache, monkeypatch, how, expected):
    content = (bytes(range(256)) * 20)[:5000]  # hard to compress: its gzip is about as long as the content
    name = "a.txt" if "than it can be" in how else "a.gz"  # the size limit itself, before any gzip check
    remote = _fake(monkeypatch, server, name, content)
    path = f"/fake/{name}"
    body = server.files[path]
    if how.startswith("short"):
        server.cut[path] = len(body) // 2
        if "no Content-Length" in how:
            server.no_length.add(path)
    elif how == "not gzip":
        server.files[path] = b"<html>not found</html>"
    elif how == "data after the gzip stream":
        server.files[path] = body + b"more"
    elif how.endswith("than it can be"):
        server.files[path] = body + bytes(2 * download.CHUNK)
        if how.startswith("sends"):
            server.no_length.add(path)
    elif how == "decompresses to more":
        server.files[path] = gzip.compress(bytes(10 * remote.size))  # a small file that decompresses 10x past it
    elif how == "no such file":
        del server.files[path]
    with pytest.raises(download.DownloadError, match=expected) as e:
        download.fetch("fake")
    assert f"{server.url}fake/{name}" in str(e.value)
    assert _left(cache / "fake") == []


def test_an_interrupted_download_leaves_no_file(server, cache, monkeypatch):
    _fake(monkeypatch, server, "a.txt", b"z" * 5000)

    def interrupt(self, chunk):
        raise KeyboardInterrupt

    monkeypatch.setattr(download._Content, "update", interrupt)
    with pytest.raises(KeyboardInterrupt):
        download.fetch("fake")
    assert _left(cache / "fake") == []


def test_progress_bar_download(server, cache, monkeypatch, capsys):
    remote = _fake(monkeypatch, server, "a.gz", b"some content " * 100)
    (cache / "fake").mkdir(parents=True)
    download.download(remote, f"{server.url}fake/a.gz", cache / "fake" / "a.gz", progress=True)
    assert gzip.decompress((cache / "fake" / "a.gz").read_bytes()) == b"some content " * 100
    assert "a.gz" in capsys.readouterr().err


def test_a_mirror_must_be_http(cache, monkeypatch):
    monkeypatch.setenv(download.MIRROR_ENV, "file:///etc/")
    with pytest.raises(DataError, match="not an http:// or https:// URL"):
        data_mod.find_fashion_mnist(None)


@needs_shared
def test_explicit_data_wins_and_is_never_downloaded(server, cache, tmp_path):
    _serve_shared(server)
    assert data_mod.find_fashion_mnist(str(FASHION)) == FASHION
    assert load_text(str(TEXT)).source == str(TEXT.resolve())
    with pytest.raises(DataError, match="Fashion-MNIST not found in .*no such directory"):
        data_mod.find_fashion_mnist(str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="no such file"):
        load_text(str(tmp_path / "nowhere.txt"))
    assert server.requests == [] and not cache.exists()


def test_offline_error_names_the_three_ways(cache, monkeypatch, capsys):
    monkeypatch.setenv(download.OFFLINE_ENV, "1")
    argv = [str(ROOT / "examples/mlp.py"), "--spec", str(ROOT / "specs/mlp_cdni.yaml"), "--train", "--steps", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    for part in (
        "--data DIR",
        "data.path",
        "dataset-fashion-mnist",
        str(cache / "fashion-mnist"),
        "DNICOMPILE_OFFLINE=1",
    ):
        assert part in err, part
    assert "train-images-idx3-ubyte.gz" in err and "Traceback" not in err
    with pytest.raises(DataError) as e:
        load_text(None)
    for part in ("--data FILE", str(cache / "tinyshakespeare" / "input.txt"), download.TINY_SHAKESPEARE_URL):
        assert part in str(e.value), part
    assert not cache.exists()


@pytest.mark.skipif(any(Path(d).is_dir() for d in data_mod.SYSTEM_DIRS), reason="Debian's data set is installed")
def test_unreachable_mirror_from_the_command_line(tmp_path):
    env = dict(os.environ, DNICOMPILE_DATA=str(tmp_path / "cache"), DNICOMPILE_DATA_MIRROR="http://127.0.0.1:1/")
    env.pop("DNICOMPILE_OFFLINE", None)
    cmd = [sys.executable, "-m", "dnicompile", "examples/mlp.py", "--spec", "specs/mlp_cdni.yaml", "--train"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr
    assert "http://127.0.0.1:1/fashion-mnist/train-images-idx3-ubyte.gz: cannot connect" in err
    for part in ("(1) pass --data DIR", "(2) install Debian's package `dataset-fashion-mnist`", "(3) put them in"):
        assert part in err, part
    assert str(tmp_path / "cache" / "fashion-mnist") in err and "Traceback" not in err
    assert _left(tmp_path / "cache" / "fashion-mnist") == []


def test_processes_fetching_at_once_download_once(server, cache, monkeypatch):
    _fake(monkeypatch, server, "a.txt", os.urandom(200_000))
    errors = []

    def fetch():
        try:
            download.fetch("fake")
        except Exception as e:  # reported below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(3)]  # each opens the lock file: flock keeps them apart
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and server.requests == ["/fake/a.txt"]
    assert _left(cache / "fake") == ["a.txt"]
