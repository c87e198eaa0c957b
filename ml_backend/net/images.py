"""Fetching task images with guards: where from, how big, how long — every remote download through the gate.

A task's image value may be

* Label Studio-hosted: ``/data/upload/...``, ``/data/local-files/?d=...``, ``/storage-data/...``,
  ``/tasks/<id>/resolve/...`` — resolved against the project's Label Studio URL; the gate adds its credentials;
* an absolute ``http(s)://`` URL on Label Studio's origin or on a host of ``ALLOWED_IMAGE_HOSTS`` (credentials go
  to Label Studio's exact origin only; an allowed image host must resolve to public addresses unless
  ``ALLOW_PRIVATE_IMAGE_HOSTS`` is set);
* a local path (or ``file://``) under ``LOCAL_FILES_ROOT`` (no traversal out of it, symlinks resolved);
* a ``data:image/...;base64,`` URI.

Cloud URIs (``s3://``, ``gs://``, ``azure-blob://``) are refused with the remedy. Downloads stop past
``IMAGE_MAX_BYTES`` and ``IMAGE_TIMEOUT_S``; redirects are checked hop by hop by the gate. Each call of
:meth:`ImageFetcher.fetch_many` has its own small pool of threads, so one request's slow hosts never hold another
request's downloads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import unquote, urljoin

from PIL import Image

from ml_backend.labelstudio.client import LabelStudioClient, default_gate
from ml_backend.net.gate import Destination, GateRefused, GateUnreachable, Origin, OutboundGate, safe_url
from ml_backend.net.image_sources import ImageFetchError, decode_data_uri, read_local
from ml_backend.settings import Settings
from model.errors import ConfigError
from model.images import content_hash, load_image

__all__ = ["CLOUD_SCHEMES", "LS_PREFIXES", "ImageFetchError", "ImageFetcher", "TaskImage", "image_destination",
           "is_remote"]

LS_PREFIXES = ("/data/upload/", "/data/local-files", "/storage-data/", "/tasks/")
"""Relative URLs Label Studio serves itself (a local path starting like this is read as Label Studio's)."""

CLOUD_SCHEMES = ("s3", "gs", "gcs", "azure-blob", "azure", "wasb", "wasbs", "abfs", "abfss")

T = TypeVar("T")
R = TypeVar("R")


def image_destination(settings: Settings, client: LabelStudioClient | None) -> Destination:
    """Where images may come from: Label Studio's origin (with its credentials) and ``ALLOWED_IMAGE_HOSTS``.

    Raises:
        ConfigError: an ``ALLOWED_IMAGE_HOSTS`` entry that is not a host, ``host:port`` or ``scheme://host[:port]``.
    """
    origins: set[Origin] = set()
    hosts: set[str] = set()
    for raw in settings.allowed_image_hosts:
        entry = raw.strip().lower()
        if not entry:
            continue
        try:
            if "://" in entry:
                origins.add(Origin.of(entry))
            elif ":" in entry.rstrip("]"):
                host, _, port = entry.rpartition(":")
                origins |= {Origin.of(f"http://{host}:{int(port)}"), Origin.of(f"https://{host}:{int(port)}")}
            else:
                hosts.add(Origin.of(f"http://{entry}").host)
        except (GateRefused, ValueError):
            raise ConfigError(f"ALLOWED_IMAGE_HOSTS entry {raw!r} is not a host, host:port or scheme://host[:port].") \
                from None
    private_ok: set[Origin] = set(origins) if settings.allow_private_image_hosts else set()
    private_hosts = frozenset(hosts) if settings.allow_private_image_hosts else frozenset()
    remedy = "list it in ALLOWED_IMAGE_HOSTS and set ALLOW_PRIVATE_IMAGE_HOSTS=true"
    if client is None:
        return Destination(origins=frozenset(origins), hosts=frozenset(hosts), private_ok=frozenset(private_ok),
                           private_hosts_ok=private_hosts, private_remedy=remedy)
    origins.add(client.origin)
    private_ok |= set(client.destination.private_ok)
    return Destination(origins=frozenset(origins), hosts=frozenset(hosts), private_ok=frozenset(private_ok),
                       private_hosts_ok=private_hosts, credentials_for=client.origin, auth=client.auth,
                       private_remedy=remedy)


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


def is_remote(value: str | None) -> bool:
    """Whether fetching ``value`` goes over the network (http(s) or Label Studio-hosted)."""
    if not isinstance(value, str):
        return False
    v = value.strip()
    return v.startswith(LS_PREFIXES) or v[:8].lower().startswith(("http://", "https://"))


class ImageFetcher:
    """Fetches the images of one project's tasks.

    Args:
        settings: limits and allowed places (``image_max_bytes``, ``image_timeout_s``, ``allowed_image_hosts``,
            ``allow_private_image_hosts``, ``local_files_root``, ``image_fetch_threads``).
        client: the project's Label Studio (None: no Label Studio-hosted images).
        gate: the outbound gate (default: the process's).
    """

    def __init__(self, settings: Settings, client: LabelStudioClient | None = None,
                 gate: OutboundGate | None = None) -> None:
        self.settings = settings
        self.client = client
        self.gate = gate or (client.gate if client is not None else default_gate())
        self.destination = image_destination(settings, client)

    def key(self, value: str) -> str:
        """What identifies an image value across Label Studio servers: Label Studio-relative URLs are made absolute
        with the project's origin (so an image index never hands another origin's image to a URL)."""
        v = value.strip()
        if v.startswith(LS_PREFIXES) and self.client is not None:
            return self.client.absolute_url(v)
        return v

    def fetch(self, value: str) -> bytes:
        """The raw bytes of one task image.

        Raises:
            ImageFetchError: the reason (forbidden host, too large, timeout, HTTP status, missing file, ...).
        """
        if not isinstance(value, str) or not value.strip():
            raise ImageFetchError(f"The image value {value!r} is empty or not a string; store the image URL or path "
                                  "in the task data.")
        value = value.strip()
        scheme = value.split(":", 1)[0].lower() if ":" in value else ""
        if scheme in ("http", "https"):
            return self._fetch_http(value)
        if scheme == "data":
            return decode_data_uri(value, self.settings)
        if scheme == "file":
            return read_local(unquote(value[len("file://"):] if value.startswith("file://") else value[5:]),
                               self.settings)
        if scheme in CLOUD_SCHEMES:
            raise ImageFetchError(
                f"The image {value!r} is a {scheme}:// URI, which the backend does not read. Connect the bucket as "
                "cloud storage in Label Studio with presigned URLs (or 'proxy through Label Studio'), or sync the "
                "files to a local directory and set LOCAL_FILES_ROOT."
            )
        if len(scheme) > 1 and scheme.isalpha() and not value.startswith(("/", ".")):
            raise ImageFetchError(f"The image {safe_url(value)!r} uses the unsupported scheme {scheme!r}; use http(s) "
                                  "URLs or local files.")
        if value.startswith(LS_PREFIXES):
            if self.client is None:
                raise ImageFetchError(
                    f"The image {value!r} is hosted by Label Studio but its URL is unknown: set LABEL_STUDIO_URL and "
                    "LABEL_STUDIO_API_KEY, or connect the model in Label Studio so that /setup sends them."
                )
            return self._fetch_http(urljoin(self.client.url + "/", value.lstrip("/")))
        return read_local(value, self.settings)

    def fetch_many(self, values: Sequence[str]) -> list[bytes | Exception]:
        """Fetch several images in parallel (up to ``image_fetch_threads`` for this call), keeping the order.

        Returns:
            one entry per value: the bytes, or the exception that stopped that image (never raised).
        """
        def one(v: str) -> bytes | Exception:
            try:
                return self.fetch(v)
            except Exception as exc:  # per-image boundary: the caller reports each failure with its task
                return exc

        return self._map(one, values)

    def fetch_task_images(self, values: Sequence[str | None]) -> list[TaskImage]:
        """Fetch and hash several task images (remote ones in parallel), keeping the order; no decoding.

        Args:
            values: the task image values; None where a task has no image value.

        Returns:
            one :class:`TaskImage` per value; failures are returned, never raised.
        """
        def one(v: str | None) -> TaskImage:
            if v is None:
                return TaskImage(None, None, "the task has no image value", "missing")
            try:
                data = self.fetch(v)
            except Exception as exc:  # per-image boundary: reported with its task by the caller
                return TaskImage(None, None, str(exc), "fetch")
            return TaskImage(data, content_hash(data))

        return self._map(one, values)

    def _map(self, fn: Callable[[T], R], values: Sequence[T]) -> list[R]:
        """``[fn(v) for v in values]``, order kept; in a pool of this call's own threads when some value is remote
        (local files and data URIs are read faster in this thread)."""
        if not values:
            return []
        threads = min(int(self.settings.image_fetch_threads), len(values))
        if threads <= 1 or not any(is_remote(v) for v in values):  # type: ignore[arg-type]
            return [fn(v) for v in values]
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="image-fetch") as pool:
            return list(pool.map(fn, values))

    def _fetch_http(self, url: str) -> bytes:
        limit = int(self.settings.image_max_bytes)
        timeout = float(self.settings.image_timeout_s)
        try:
            answer = self.gate.request("GET", url, self.destination, timeout=timeout, max_bytes=limit,
                                       deadline_s=timeout)
        except GateRefused as exc:
            raise ImageFetchError(str(exc)) from None
        except GateUnreachable as exc:
            raise ImageFetchError(f"{exc} (IMAGE_TIMEOUT_S={timeout:g} s)") from None
        if answer.status != 200:
            hint = (" Check the Label Studio token (LABEL_STUDIO_API_KEY or the one /setup sends)."
                    if answer.status in (401, 403) else "")
            raise ImageFetchError(f"Fetching {safe_url(answer.url)} answered HTTP {answer.status}.{hint}")
        if not answer.body:
            raise ImageFetchError(f"The image {safe_url(answer.url)} is empty (0 bytes).")
        return answer.body
