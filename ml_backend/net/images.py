"""Fetching task images with guards: where from, how big, how long.

A task's image value may be

* Label Studio-hosted: ``/data/upload/...``, ``/data/local-files/?d=...``, ``/storage-data/...``,
  ``/tasks/<id>/resolve/...`` — fetched from the Label Studio URL with its ``Authorization`` header;
* an absolute ``http(s)://`` URL on Label Studio's host or a host in ``ALLOWED_IMAGE_HOSTS`` (headers are
  sent to Label Studio's host only);
* a local path (or ``file://``) under ``LOCAL_FILES_ROOT`` (no traversal out of it, symlinks resolved);
* a ``data:image/...;base64,`` URI.

Cloud URIs (``s3://``, ``gs://``, ``azure-blob://``) are refused with the remedy. Downloads are streamed
and stop past ``IMAGE_MAX_BYTES``; a whole download must finish within ``IMAGE_TIMEOUT_S``; redirects are
followed only to allowed hosts, and never carry the token to another host.
"""

from __future__ import annotations

import base64
import binascii
import functools
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import unquote, urljoin, urlsplit

import requests
import urllib3
from PIL import Image

from ml_backend.labelstudio.connections import LSConnection
from ml_backend.settings import Settings
from model.errors import DataError
from model.images import content_hash, load_image

__all__ = [
    "CHUNK",
    "CLOUD_SCHEMES",
    "ImageFetchError",
    "LS_PREFIXES",
    "MAX_REDIRECTS",
    "TaskImage",
    "fetch_image_bytes",
    "fetch_many",
    "fetch_task_images",
    "is_remote",
]

LS_PREFIXES = ("/data/upload/", "/data/local-files", "/storage-data/", "/tasks/")
"""Relative URLs Label Studio serves itself (a local path starting like this is read as Label Studio's)."""

CLOUD_SCHEMES = ("s3", "gs", "gcs", "azure-blob", "azure", "wasb", "wasbs", "abfs", "abfss")
MAX_REDIRECTS = 3
CHUNK = 64 * 1024

_sessions = threading.local()
T = TypeVar("T")
R = TypeVar("R")


class ImageFetchError(DataError):
    """An image could not be fetched; the message names the image, the reason and the remedy."""


def fetch_image_bytes(
    value: str,
    settings: Settings,
    conn: LSConnection | None = None,
    headers: Mapping[str, str] | None = None,
) -> bytes:
    """The raw bytes of one task image.

    Args:
        value: the task's image value (URL, Label Studio-relative URL, local path, data URI).
        settings: limits and allowed places (``image_max_bytes``, ``image_timeout_s``, ``allowed_image_hosts``,
            ``local_files_root``).
        conn: the project's Label Studio connection; needed for Label Studio-hosted images.
        headers: auth headers for Label Studio (``LabelStudioClient.auth_headers()``); sent to its host only.

    Raises:
        ImageFetchError: the reason (forbidden host, too large, timeout, HTTP status, missing file, ...).
    """
    if not isinstance(value, str) or not value.strip():
        raise ImageFetchError(f"The image value {value!r} is empty or not a string; store the image URL or path in the task data.")
    value = value.strip()
    parts = urlsplit(value)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        return _fetch_http(value, settings, conn, headers)
    if scheme == "data":
        return _decode_data_uri(value, settings)
    if scheme == "file":
        return _read_local(unquote(parts.path), settings)
    if scheme in CLOUD_SCHEMES:
        raise ImageFetchError(
            f"The image {value!r} is a {scheme}:// URI, which the backend does not read. Connect the bucket as "
            "cloud storage in Label Studio with presigned URLs (or 'proxy through Label Studio'), or sync the "
            "files to a local directory and set LOCAL_FILES_ROOT."
        )
    if scheme and len(scheme) > 1:  # a one-letter scheme is a Windows drive letter
        raise ImageFetchError(f"The image {value!r} uses the unsupported scheme {scheme!r}; use http(s) URLs or local files.")
    if value.startswith(LS_PREFIXES):
        if conn is None:
            raise ImageFetchError(
                f"The image {value!r} is hosted by Label Studio but its URL is unknown: set LABEL_STUDIO_URL and "
                "LABEL_STUDIO_API_KEY, or connect the model in Label Studio so that /setup sends them."
            )
        return _fetch_http(urljoin(conn.url + "/", value.lstrip("/")), settings, conn, headers)
    return _read_local(value, settings)


def fetch_many(
    values: Sequence[str],
    settings: Settings,
    conn: LSConnection | None = None,
    headers: Mapping[str, str] | None = None,
    executor: Executor | None = None,
) -> list[bytes | Exception]:
    """Fetch several images in parallel (``settings.image_fetch_threads``), keeping the order.

    Returns:
        one entry per value: the bytes, or the exception that stopped that image (never raised).
    """
    def one(v: str) -> bytes | Exception:
        try:
            return fetch_image_bytes(v, settings, conn, headers)
        except Exception as exc:  # per-image boundary: the caller reports each failure with its task
            return exc

    return _map(one, values, settings, executor)


@dataclass(frozen=True)
class TaskImage:
    """One task's image bytes and their content hash, or why there are none. Decoding is left to the caller
    (:meth:`decode`), so that an image whose embedding is cached is never decoded.

    Attributes:
        data: the encoded image bytes, or None.
        content_hash: sha256 of ``data`` (the embedding cache key), or None.
        error: the reason there is no image (None when there is one).
        reason: a short machine-readable kind of failure for metrics: missing, fetch, decode.
    """

    data: bytes | None
    content_hash: str | None
    error: str | None = None
    reason: str | None = None

    def decode(self, max_pixels: int) -> tuple[Image.Image | None, TaskImage]:
        """``(RGB image, self)``, or ``(None, a failed TaskImage naming why)`` for missing or undecodable bytes."""
        if self.data is None:
            return None, self
        try:
            return load_image(self.data, max_pixels), self
        except Exception as exc:  # corrupt, truncated, too many pixels: reported with its task by the caller
            return None, TaskImage(None, None, str(exc), "decode")


def fetch_task_images(
    values: Sequence[str | None],
    settings: Settings,
    conn: LSConnection | None = None,
    headers: Mapping[str, str] | None = None,
    executor: Executor | None = None,
) -> list[TaskImage]:
    """Fetch and hash several task images (remote ones in parallel), keeping the order; no decoding.

    Args:
        values: the task image values; None where a task has no image value.
        settings, conn, headers: as for :func:`fetch_image_bytes`.
        executor: a pool for remote images; default a pool of ``image_fetch_threads`` for this call.

    Returns:
        one :class:`TaskImage` per value; failures are returned, never raised.
    """
    def one(v: str | None) -> TaskImage:
        if v is None:
            return TaskImage(None, None, "the task has no image value", "missing")
        try:
            data = fetch_image_bytes(v, settings, conn, headers)
        except Exception as exc:  # per-image boundary: reported with its task by the caller
            return TaskImage(None, None, str(exc), "fetch")
        return TaskImage(data, content_hash(data))

    return _map(one, values, settings, executor)


def is_remote(value: str | None) -> bool:
    """Whether fetching ``value`` goes over the network (http(s) or Label Studio-hosted)."""
    if not isinstance(value, str):
        return False
    v = value.strip()
    return v.startswith(LS_PREFIXES) or v[:8].lower().startswith(("http://", "https://"))


def _map(fn: Callable[[T], R], values: Sequence[T], settings: Settings, executor: Executor | None) -> list[R]:
    """``[fn(v) for v in values]``, order kept; in parallel only when some value is remote (local files and
    data URIs are read faster in this thread than handed to a pool). The calling thread takes the first value
    itself (a lone image never waits for a pool thread to wake up)."""
    if not values:
        return []
    if len(values) == 1 or int(settings.image_fetch_threads) <= 1 or not any(is_remote(v) for v in values):  # type: ignore[arg-type]
        return [fn(v) for v in values]
    if executor is not None:
        rest = [executor.submit(fn, v) for v in values[1:]]
        first = fn(values[0])
        return [first, *(f.result() for f in rest)]
    workers = min(int(settings.image_fetch_threads), len(values) - 1)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="image-fetch") as pool:
        rest = [pool.submit(fn, v) for v in values[1:]]
        first = fn(values[0])
        return [first, *(f.result() for f in rest)]


# ----- http ------------------------------------------------------------------------------------------


def _host_port(url: str) -> tuple[str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())
    return (parts.hostname or "").lower(), port


def _allowed(url: str, settings: Settings, conn: LSConnection | None) -> bool:
    host, port = _host_port(url)
    if conn is not None and (host, port) == _host_port(conn.url):
        return True
    for entry in settings.allowed_image_hosts:
        entry = entry.strip().lower()
        if "://" in entry:
            if (host, port) == _host_port(entry):
                return True
        elif ":" in entry:
            h, _, p = entry.rpartition(":")
            if host == h and str(port) == p:
                return True
        elif host == entry:
            return True
    return False


def _is_label_studio(url: str, conn: LSConnection | None) -> bool:
    return conn is not None and _host_port(url) == _host_port(conn.url)


def _session() -> requests.Session:
    s = getattr(_sessions, "session", None)
    if s is None:
        s = requests.Session()
        s.trust_env = False  # no proxies or .netrc credentials from the environment
        _sessions.session = s
    return s


def _fetch_http(url: str, settings: Settings, conn: LSConnection | None, headers: Mapping[str, str] | None) -> bytes:
    limit = int(settings.image_max_bytes)
    timeout = float(settings.image_timeout_s)
    deadline = time.monotonic() + timeout
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        if not _allowed(current, settings, conn):
            host = urlsplit(current).netloc
            raise ImageFetchError(
                f"The image host {host!r} is not allowed ({current}); add it to ALLOWED_IMAGE_HOSTS "
                "(Label Studio's own host is always allowed)."
            )
        send = dict(headers or {}) if _is_label_studio(current, conn) else {}
        try:
            resp = _session().get(current, headers=send, stream=True, allow_redirects=False, timeout=(timeout, timeout))
        except requests.Timeout:
            raise ImageFetchError(f"Timed out after {timeout:g} s fetching {current}; raise IMAGE_TIMEOUT_S or check the host.") from None
        except requests.RequestException as exc:
            raise ImageFetchError(f"Cannot fetch {current}: {exc.__class__.__name__}: {exc}.") from None
        with resp:
            if resp.is_redirect:
                location = resp.headers.get("Location", "")
                current = urljoin(current, location)
                continue
            if resp.status_code != 200:
                hint = (
                    " Check the Label Studio token (LABEL_STUDIO_API_KEY or the one /setup sends)."
                    if resp.status_code in (401, 403)
                    else ""
                )
                raise ImageFetchError(f"Fetching {current} answered HTTP {resp.status_code}.{hint}")
            declared = resp.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > limit:
                raise ImageFetchError(f"The image {current} has {int(declared)} bytes, over IMAGE_MAX_BYTES={limit}.")
            return _read_stream(resp, current, limit, deadline, timeout)
    raise ImageFetchError(f"Fetching {url} redirected more than {MAX_REDIRECTS} times; store the final image URL in the task.")


def _read_stream(resp: requests.Response, url: str, limit: int, deadline: float, timeout: float) -> bytes:
    buf = bytearray()
    raw = resp.raw
    try:
        while True:
            # read1 returns what has arrived (a trickling server cannot hold a full-chunk read past the deadline)
            chunk = raw.read1(CHUNK, decode_content=True)
            if not chunk:
                break
            buf.extend(chunk)
            if len(buf) > limit:
                raise ImageFetchError(f"The image {url} is larger than IMAGE_MAX_BYTES={limit}; download stopped.")
            if time.monotonic() > deadline:
                raise ImageFetchError(f"Fetching {url} took longer than IMAGE_TIMEOUT_S={timeout:g} s; download stopped.")
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
        raise ImageFetchError(f"Reading {url} failed: {exc.__class__.__name__}: {exc}.") from None
    if not buf:
        raise ImageFetchError(f"The image {url} is empty (0 bytes).")
    return bytes(buf)


# ----- local and inline ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _resolved_root(root: str) -> Path:
    return Path(root).expanduser().resolve()


def _read_local(value: str, settings: Settings) -> bytes:
    root = settings.local_files_root
    if root is None:
        raise ImageFetchError(
            f"The image {value!r} is a local path, and local paths are off: set LOCAL_FILES_ROOT to the directory "
            "holding the images (or serve them through Label Studio)."
        )
    root_real = _resolved_root(str(root))
    candidate = Path(value).expanduser()
    if not candidate.is_absolute():
        candidate = root_real / candidate
    real = candidate.resolve()
    if not real.is_relative_to(root_real):
        raise ImageFetchError(f"The image path {value!r} lies outside LOCAL_FILES_ROOT={str(root_real)!r}; refused.")
    try:
        size = real.stat().st_size
        if not real.is_file():
            raise ImageFetchError(f"The image path {value!r} is not a regular file.")
        if size > settings.image_max_bytes:
            raise ImageFetchError(f"The image {value!r} has {size} bytes, over IMAGE_MAX_BYTES={settings.image_max_bytes}.")
        with real.open("rb") as fh:
            data = fh.read(settings.image_max_bytes + 1)
    except FileNotFoundError:
        raise ImageFetchError(f"The image file {value!r} does not exist under LOCAL_FILES_ROOT.") from None
    except OSError as exc:
        raise ImageFetchError(f"Cannot read the image file {value!r}: {exc.strerror or exc}.") from None
    if len(data) > settings.image_max_bytes:
        raise ImageFetchError(f"The image {value!r} grew past IMAGE_MAX_BYTES={settings.image_max_bytes} while read.")
    return data


def _decode_data_uri(value: str, settings: Settings) -> bytes:
    header, sep, payload = value.partition(",")
    if not sep or ";base64" not in header:
        raise ImageFetchError("A data: image URI must be base64 encoded (data:image/png;base64,...).")
    if len(payload) * 3 // 4 > settings.image_max_bytes:
        raise ImageFetchError(f"The inline image is larger than IMAGE_MAX_BYTES={settings.image_max_bytes}.")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageFetchError("The inline data: image is not valid base64.") from None
