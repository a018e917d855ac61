"""Data sets fetched on first use: Fashion-MNIST and tiny Shakespeare, downloaded once into a cache folder.

The cache folder is `$DNICOMPILE_DATA`, else `$XDG_CACHE_HOME/dnicompile`, else `~/.cache/dnicompile`; each data
set has its own folder in it (`fashion-mnist/`, `tinyshakespeare/`). A file is fetched from its canonical source,
or from `$DNICOMPILE_DATA_MIRROR/<data set>/<file name>` where that is set (the cache's own layout, so a served
copy of a cache folder is a mirror), and `DNICOMPILE_OFFLINE=1` turns downloading off.

[Note: content hash] A file is checked by the SHA-256 of its content: its bytes, or for a `.gz` file the bytes
it decompresses to. The gzip wrapper is not the data: Debian's package and other copies recompress the files
(without the original file name), and their content is the canonical content. A download streams into a
temporary file in the cache folder, is checked, and only then renamed to its name (os.replace), so a file under
its own name in the cache was checked once, and a failed, refused or interrupted download leaves nothing behind.
Memory and time stay bounded: the download may not be larger than the content plus a margin, and decompression
stops once the output passes the content's size.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import secrets
import sys
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

CACHE_ENV = "DNICOMPILE_DATA"
MIRROR_ENV = "DNICOMPILE_DATA_MIRROR"
OFFLINE_ENV = "DNICOMPILE_OFFLINE"
TIMEOUT_S = 30.0  # per connection attempt and per read: a server that stops answering fails the download
CHUNK = 1 << 16


@dataclass(frozen=True)
class Remote:
    """One file of a data set: where it comes from and what it holds (see [Note: content hash])."""

    dataset: str  # its folder in the cache, and under a mirror
    name: str  # its file name there
    url: str  # the canonical source
    sha256: str  # of the content: the file's bytes, or for a .gz file the bytes it decompresses to
    size: int  # bytes of content


FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"  # Zalando's, as torchvision's
TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def _fashion(name: str, sha256: str, size: int) -> Remote:
    return Remote("fashion-mnist", name, FASHION_MNIST_URL + name, sha256, size)


REMOTES: dict[str, tuple[Remote, ...]] = {
    "fashion-mnist": (
        _fashion(
            "train-images-idx3-ubyte.gz", "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888", 47040016
        ),
        _fashion(
            "train-labels-idx1-ubyte.gz", "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9", 60008
        ),
        _fashion(
            "t10k-images-idx3-ubyte.gz", "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b", 7840016
        ),
        _fashion(
            "t10k-labels-idx1-ubyte.gz", "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34", 10008
        ),
    ),
    "tinyshakespeare": (
        Remote(
            "tinyshakespeare",
            "input.txt",
            TINY_SHAKESPEARE_URL,
            "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
            1115394,
        ),
    ),
}


class DownloadError(DataError):
    """A file could not be fetched: downloads are off, the source cannot be reached, or it sent other data.

    The message names the URL and why; the caller adds the other ways to provide the files."""


def cache_dir() -> Path:
    """The cache folder: $DNICOMPILE_DATA, else $XDG_CACHE_HOME/dnicompile, else ~/.cache/dnicompile."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "dnicompile"


def dataset_dir(dataset: str) -> Path:
    """A data set's folder in the cache (it may not exist yet)."""
    return cache_dir() / dataset


def offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def source_url(remote: Remote) -> str:
    """Where `remote` is fetched from: $DNICOMPILE_DATA_MIRROR/<data set>/<name>, else its canonical URL."""
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    if not mirror:
        return remote.url
    if urllib.parse.urlsplit(mirror).scheme not in ("http", "https"):
        raise DownloadError(
            f"{MIRROR_ENV}={mirror}: not an http:// or https:// URL; give the base URL of a folder that holds "
            f"<data set>/<file> (e.g. http://host/data/ serving fashion-mnist/{remote.name}), or unset it."
        )
    return f"{mirror.rstrip('/')}/{remote.dataset}/{remote.name}"


def _present(folder: Path, remote: Remote) -> bool:
    """The file is in the folder, or (for a .gz file) its decompressed form is."""
    return (folder / remote.name).is_file() or (folder / remote.name.removesuffix(".gz")).is_file()


def fetch(dataset: str, progress: bool | None = None) -> Path:
    """The data set's cache folder, holding all its files: those missing are downloaded first.

    Files already there are used as they are (only a checked download is ever saved under a file's name).
    Raises DownloadError, naming the URL and why, when downloads are off or one fails. Several processes may
    fetch at once: one downloads while the others wait for it, then find the files."""
    folder = dataset_dir(dataset)
    remotes = REMOTES[dataset]
    if all(_present(folder, r) for r in remotes):
        return folder
    first = next(r for r in remotes if not _present(folder, r))
    if offline():
        raise DownloadError(
            f"downloads are off ({OFFLINE_ENV}={os.environ[OFFLINE_ENV]}), so {source_url(first)} was not fetched"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(
            f"cannot create the cache folder {folder} ({e.strerror or e}); set {CACHE_ENV} to a folder you can write"
        ) from None
    with _locked(folder):
        for remote in remotes:
            if not _present(folder, remote):  # another process may have fetched it while this one waited
                download(remote, source_url(remote), folder / remote.name, progress)
    return folder


def download(remote: Remote, url: str, dest: Path, progress: bool | None = None) -> None:
    """Fetch `url` into `dest`, checked against `remote` (see [Note: content hash]); on any failure nothing is left.

    `progress`: a rich progress bar on stderr (default: when stderr is a terminal), else one plain line."""
    limit = remote.size + remote.size // 100 + CHUNK  # gzip never grows these files; a margin for other wrappers
    tmp = dest.parent / f".{dest.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:  # not mkstemp: its mode 0600 would make a shared cache private; this one follows the umask
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as e:
        raise DownloadError(
            f"cannot write to the cache folder {dest.parent} ({e.strerror or e}); set {CACHE_ENV} to a folder you "
            "can write"
        ) from None
    try:
        with os.fdopen(fd, "wb") as out:
            content = _Content(remote, url)
            with _get(url) as response:
                total = _declared_length(response, url, limit)
                with _progress(url, dest, total or remote.size, progress) as advance:
                    got = 0
                    while chunk := _read(response, url):
                        got += len(chunk)
                        if got > limit:
                            raise DownloadError(
                                f"{url}: sent more than {limit:,} bytes, more than this file can be; nothing was saved"
                            )
                        content.update(chunk)
                        out.write(chunk)
                        advance(len(chunk))
            if total is not None and got < total:
                raise DownloadError(f"{url}: the connection closed after {got:,} of {total:,} bytes")
            content.finish()
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    except OSError as e:  # the network's errors are DownloadErrors by now: this is the disk (full, read-only)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise DownloadError(
            f"cannot write {dest} ({e.strerror or e}); free some space, or set {CACHE_ENV} to another folder"
        ) from None
    except BaseException:  # an error, Ctrl-C or SIGTERM: nothing half-written stays behind
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class _Content:
    """The SHA-256 and size of a download's content, gunzipped on the fly for a .gz file, bounded by its size."""

    def __init__(self, remote: Remote, url: str):
        self.remote, self.url = remote, url
        self.sha, self.size = hashlib.sha256(), 0
        self.gunzip = zlib.decompressobj(16 + zlib.MAX_WBITS) if remote.name.endswith(".gz") else None

    def update(self, chunk: bytes) -> None:
        if self.gunzip is None:
            self._add(chunk)
            return
        data = chunk
        while data:
            if self.gunzip.eof:
                raise DownloadError(f"{self.url}: data after the end of the gzip stream; nothing was saved")
            try:
                self._add(self.gunzip.decompress(data, CHUNK * 16))
            except zlib.error as e:
                raise DownloadError(f"{self.url}: not a valid gzip file ({e}); nothing was saved") from None
            data = self.gunzip.unused_data if self.gunzip.eof else self.gunzip.unconsumed_tail

    def _add(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.remote.size:
            raise DownloadError(
                f"{self.url}: holds more than the {self.remote.size:,} bytes of {self.remote.name}'s content; it is "
                "another file, nothing was saved"
            )
        self.sha.update(data)

    def finish(self) -> None:
        if self.gunzip is not None:
            with contextlib.suppress(zlib.error):  # output zlib still holds (none where the stream ended)
                self._add(self.gunzip.flush())
        if self.gunzip is not None and not self.gunzip.eof:
            raise DownloadError(f"{self.url}: the gzip stream ends early (a truncated download); nothing was saved")
        what = "content (gunzipped)" if self.gunzip is not None else "content"
        got = self.sha.hexdigest()
        if self.size != self.remote.size or got != self.remote.sha256:
            raise DownloadError(
                f"{self.url}: SHA-256 mismatch: its {what} has SHA-256 {got} ({self.size:,} bytes), expected "
                f"{self.remote.sha256} ({self.remote.size:,} bytes); the server sent other data (a changed file, "
                "an error page, a proxy's answer), nothing was saved"
            )


@contextlib.contextmanager
def _get(url: str) -> Iterator[http.client.HTTPResponse]:
    request = urllib.request.Request(url, headers={"User-Agent": "dnicompile", "Accept-Encoding": "identity"})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)  # http(s) only: source_url
    except urllib.error.HTTPError as e:
        e.close()
        raise DownloadError(f"{url}: the server answered HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise DownloadError(f"{url}: cannot connect ({_reason(e.reason)})") from None
    except (OSError, http.client.HTTPException) as e:
        raise DownloadError(f"{url}: {_reason(e)}") from None
    with response:
        yield response


def _read(response, url: str) -> bytes:
    try:
        return response.read(CHUNK)
    except http.client.IncompleteRead as e:
        raise DownloadError(f"{url}: the connection closed early ({len(e.partial):,} bytes of the last read)") from None
    except (OSError, http.client.HTTPException) as e:
        raise DownloadError(f"{url}: the download broke off ({_reason(e)})") from None


def _reason(e) -> str:
    if isinstance(e, TimeoutError):
        return f"no answer in {TIMEOUT_S:g} s"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def _declared_length(response, url: str, limit: int) -> int | None:
    value = response.headers.get("Content-Length")
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        return None
    if length > limit:
        raise DownloadError(f"{url}: the server offers {length:,} bytes, more than this file can be ({limit:,})")
    return length


@contextlib.contextmanager
def _progress(url: str, dest: Path, total: int, bar: bool | None) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr where it is a terminal, else one line saying what is fetched."""
    if bar is None:
        bar = sys.stderr.isatty()
    if not bar:
        size = f"{total / 1e6:.1f} MB" if total >= 1e6 else f"{total / 1e3:.0f} kB"
        sys.stderr.write(f"dnicompile: downloading {url} ({size}) to {dest}\n")
        sys.stderr.flush()
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True)) as p:
        task = p.add_task(f"downloading {dest.name}", total=total)
        yield lambda n: p.advance(task, n)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold `folder/.lock` (one process downloads, the others wait); no lock where fcntl is missing (Windows)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    try:
        f = open(folder / ".lock", "a")  # closed by the `with f` below
    except OSError:  # a folder this process cannot write: the download fails there with a clear message
        yield
        return
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            sys.stderr.write(f"dnicompile: waiting for another process downloading into {folder}\n")
            sys.stderr.flush()
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
