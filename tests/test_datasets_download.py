"""The real download code against a local HTTP server on 127.0.0.1 (no dataset host is
contacted): digest match, mismatch, truncated bodies, files without a published digest,
files copied into the cache by hand, and the ``torchcaps data`` command."""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from test_datasets_formats import pin_digests, write_dataset
from torchcaps.cli import main
from torchcaps.data import ChecksumError, DataFormatError, fetch_dataset, load_dataset
from torchcaps.data.fetch import fetch_file
from torchcaps.data.sources import SOURCES, RemoteFile


class _Files(BaseHTTPRequestHandler):
    """Serves ``files`` by name; ``short`` names get a Content-Length larger than the body."""

    files: dict[str, bytes] = {}
    short: set[str] = set()
    hits: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's naming)
        name = self.path.rsplit("/", 1)[-1]
        self.hits.append(name)
        if name not in self.files:
            self.send_error(404)
            return
        body = self.files[name]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if name in self.short else body)

    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture
def server():
    handler = type("Handler", (_Files,), {"files": {}, "short": set(), "hits": []})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield handler, f"http://127.0.0.1:{httpd.server_address[1]}/data"
    httpd.shutdown()
    httpd.server_close()


def _serve(handler, folder: Path) -> None:
    handler.files.update({p.name: p.read_bytes() for p in folder.iterdir()})


def test_download_verifies_and_converts(server, tmp_path, monkeypatch):
    handler, url = server
    expected = write_dataset("fashion-mnist", tmp_path / "published")
    pin_digests(monkeypatch, "fashion-mnist", tmp_path / "published")
    _serve(handler, tmp_path / "published")
    path = fetch_dataset("fashion-mnist", tmp_path / "cache", mirror=url, timeout=5)
    assert path == tmp_path / "cache" / "fashion-mnist.npz"
    assert sorted(handler.hits) == sorted(f.name for f in SOURCES["fashion-mnist"])
    d = load_dataset("fashion-mnist", tmp_path / "cache", val_size=2, download=False)
    assert d.test.images.numpy().tolist() == expected["test"][0].tolist()
    # the verified originals stay in downloads/ (no .part left behind) and are reused
    left = sorted(p.name for p in (tmp_path / "cache" / "downloads").iterdir())
    assert left == sorted(f.name for f in SOURCES["fashion-mnist"])
    handler.hits.clear()
    fetch_dataset("fashion-mnist", tmp_path / "cache", mirror=url, force=True)
    assert handler.hits == []


def test_checksum_mismatch_is_refused_and_nothing_is_kept(server, tmp_path, monkeypatch):
    handler, url = server
    write_dataset("kmnist", tmp_path / "published")
    pin_digests(monkeypatch, "kmnist", tmp_path / "published")
    _serve(handler, tmp_path / "published")
    handler.files["t10k-labels-idx1-ubyte.gz"] = b"tampered"
    with pytest.raises(ChecksumError, match=r"t10k-labels-idx1-ubyte.gz: MD5 mismatch .*"
                                            r"downloaded from http://127\.0\.0\.1"):
        fetch_dataset("kmnist", tmp_path / "cache", mirror=url, timeout=5)
    downloads = tmp_path / "cache" / "downloads"
    assert not (downloads / "t10k-labels-idx1-ubyte.gz").exists()
    assert not list(downloads.glob("*.part"))
    assert not (tmp_path / "cache" / "kmnist.npz").exists()


def test_truncated_download_is_named(server, tmp_path, monkeypatch):
    handler, url = server
    write_dataset("svhn", tmp_path / "published")
    pin_digests(monkeypatch, "svhn", tmp_path / "published")
    _serve(handler, tmp_path / "published")
    handler.short.add("train_32x32.mat")
    with pytest.raises(DataFormatError, match=r"train_32x32.mat: truncated download from "
                                              r"http://127\.0\.0\.1.* of [\d,]+ bytes\)"):
        fetch_dataset("svhn", tmp_path / "cache", mirror=url, timeout=5)
    assert not list((tmp_path / "cache" / "downloads").glob("*.part"))


def test_unreachable_and_missing_files(server, tmp_path, monkeypatch):
    handler, url = server
    f = RemoteFile("nothing.bin", (url + "/nothing.bin",), md5="0" * 32)
    with pytest.raises(ConnectionError, match="could not download nothing.bin.*404.*by hand"):
        fetch_file(f, tmp_path, timeout=5)
    # a file copied into the cache by hand is used without any request
    blob = b"offline copy"
    (tmp_path / "hand.bin").write_bytes(blob)
    g = RemoteFile("hand.bin", (url + "/hand.bin",), sha256=hashlib.sha256(blob).hexdigest())
    assert fetch_file(g, tmp_path) == tmp_path / "hand.bin" and handler.hits == ["nothing.bin"]
    # ... but not when it differs from the published file
    (tmp_path / "hand.bin").write_bytes(b"something else")
    with pytest.raises(ChecksumError, match="hand.bin: SHA-256 mismatch.*delete it"):
        fetch_file(g, tmp_path)


def test_files_without_a_published_digest_need_consent_and_are_pinned(server, tmp_path, monkeypatch):
    handler, url = server
    write_dataset("affnist", tmp_path / "published", n_train=6, n_test=4)
    _serve(handler, tmp_path / "published")
    assert all(f.digest is None for f in SOURCES["affnist"])  # affNIST publishes none
    with pytest.raises(ChecksumError, match="no digest.*--allow-unverified"):
        fetch_dataset("affnist", tmp_path / "cache", mirror=url, timeout=5)
    assert handler.hits == []  # refused before any request
    fetch_dataset("affnist", tmp_path / "cache", mirror=url, allow_unverified=True, timeout=5)
    d = load_dataset("affnist", tmp_path / "cache", val_size=2)
    assert d.in_shape == (1, 40, 40) and len(d.test) == 4
    pinned = tmp_path / "cache" / "downloads" / "test.mat.zip.sha256"
    assert pinned.read_text().strip() == hashlib.sha256(handler.files["test.mat.zip"]).hexdigest()
    # a later change of the file is caught against the recorded digest
    (tmp_path / "cache" / "downloads" / "test.mat.zip").write_bytes(b"changed")
    with pytest.raises(ChecksumError, match="test.mat.zip: SHA-256 mismatch"):
        fetch_dataset("affnist", tmp_path / "cache", mirror=url, force=True)


def test_data_command_fetches_from_a_mirror(server, tmp_path, monkeypatch, capsys):
    handler, url = server
    write_dataset("cifar10", tmp_path / "published", n_train=10, n_test=3)
    pin_digests(monkeypatch, "cifar10", tmp_path / "published")
    _serve(handler, tmp_path / "published")
    argv = ["data", "cifar10", "--mirror", url, "--data-dir", str(tmp_path / "cache"), "--timeout", "5"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "cifar10: verified at" in out and "10 training and 3 test images of 3x32x32" in out
    handler.files["cifar-10-python.tar.gz"] = b"x" * 100
    assert main(["data", "cifar100", "--mirror", url, "--data-dir", str(tmp_path / "c2")]) == 2
    assert "could not download cifar-100-python.tar.gz" in capsys.readouterr().err
    assert main(["data", "mnist", "--mirror", url]) == 2
    assert "do not apply to mnist" in capsys.readouterr().err
