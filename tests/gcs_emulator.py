"""A local Google Cloud Storage emulator for tests: `gs://` paths with no network but loopback.

The server is the `gcp-storage-emulator` package (pure Python), run in a subprocess on
127.0.0.1 with one bucket, in memory. Three client stacks must reach it, each with its own knobs;
`GcsEmulator.env` holds all of them and `gcs_emulator()` puts them into `os.environ`:

* etils.epath (our paths, TFDS metadata, orbax metadata): epath's `gs://` goes through
  `tf.io.gfile` whenever TensorFlow is installed, and TF's GCS client has its endpoint hard-coded
  (www.googleapis.com): it cannot be pointed at an emulator. `EPATH_USE_TF=0` makes epath use
  fsspec/gcsfs instead, which reads `STORAGE_EMULATOR_HOST`. Credentials: `FSSPEC_GCS_TOKEN=anon`.
  gcsfs >= 2026.x first asks the Storage Control gRPC API for the bucket type (60 s timeout, no
  emulator implements it): `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false` turns that off.
* tensorstore (orbax's array data): `TENSORSTORE_GCS_HTTP_URL=http://127.0.0.1:PORT` and
  `GOOGLE_AUTH_TOKEN_FOR_TESTING=...` (a fixed bearer token: no credential file, no GCE metadata
  server lookup).
* google-auth (anything else that asks for default credentials): `NO_GCE_CHECK=true`, and
  `GOOGLE_APPLICATION_CREDENTIALS` is removed so a developer's real key is never used.

The emulator lacks two things tensorstore relies on: the `x-goog-generation` header on media
downloads and generation preconditions (`ifGenerationMatch` / `ifGenerationNotMatch`), which
tensorstore/OCDBT use for atomic writes and cache revalidation. `_serve()` adds both to the
emulator's handlers before it starts (a few lines, following the GCS JSON API).

Usage:

    with gcs_emulator() as gcs:          # or the `gcs` fixture of test_gcs_emulator.py
      path = epath.Path(gcs.url("run/ckpt"))   # gs://idgbr-test/run/ckpt

Libraries that read their settings at import (fsspec's config, gcsfs' class choice, etils'
backend choice) are also reset in-process by `_configure_in_process()`, so it works after they
were imported. Run `python tests/gcs_emulator.py --port N` to start a server by hand.
"""
from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import time
import urllib.request
from typing import Iterator, Mapping

DEFAULT_BUCKET = "idgbr-test"
# Fixed bearer token for tensorstore; the emulator accepts any.
_TOKEN = "emulator-token"
_READY = "GCS_EMULATOR_READY"
# Variables a previous session or the developer may have set that would send requests elsewhere.
_REMOVE = ("GOOGLE_APPLICATION_CREDENTIALS", "CLOUDSDK_CONFIG", "GCE_METADATA_HOST",
           "GCE_METADATA_ROOT", "GCE_METADATA_IP")


def emulator_available() -> bool:
  """Whether the `gcp-storage-emulator` package (and gcsfs, epath's gs:// client) are installed."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  return all(importlib.util.find_spec(m) is not None for m in ("gcp_storage_emulator", "gcsfs"))


def emulator_env(endpoint: str) -> dict[str, str]:
  """Environment that sends epath/gcsfs, tensorstore and google-auth to `endpoint`."""
  return {
      "STORAGE_EMULATOR_HOST": endpoint,
      "EPATH_USE_TF": "0",
      "FSSPEC_GCS_TOKEN": "anon",
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
      "TENSORSTORE_GCS_HTTP_URL": endpoint,
      # google-cloud-cpp (array_record's gs:// reader, riegeli::GcsReader): anonymous when set.
      "CLOUD_STORAGE_EMULATOR_ENDPOINT": endpoint,
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": _TOKEN,
      "NO_GCE_CHECK": "true",
      "GOOGLE_CLOUD_PROJECT": "idgbr-test",
  }


class GcsEmulator:
  """An emulator subprocess on 127.0.0.1 with one bucket (in memory)."""

  def __init__(self, bucket: str = DEFAULT_BUCKET, port: int | None = None):
    self.bucket = bucket
    self.port = port
    self._proc: subprocess.Popen | None = None

  @property
  def endpoint(self) -> str:
    return f"http://127.0.0.1:{self.port}"

  @property
  def env(self) -> dict[str, str]:
    return emulator_env(self.endpoint)

  def url(self, *parts: str) -> str:
    """`gs://BUCKET/part/...` (a trailing '/' on the last part is kept: a tensorstore prefix)."""
    path = "/".join(p.strip("/") for p in parts if p.strip("/"))
    url = f"gs://{self.bucket}/{path}" if path else f"gs://{self.bucket}"
    return url + "/" if parts and parts[-1].endswith("/") and path else url

  def start(self, timeout: float = 30.0) -> "GcsEmulator":
    if self.port is None:
      import portpicker  # pylint: disable=import-outside-toplevel
      self.port = portpicker.pick_unused_port()
    self._proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--port", str(self.port),
         "--bucket", self.bucket],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    line = ""
    assert self._proc.stdout is not None
    while time.monotonic() < deadline:
      left = max(0.0, deadline - time.monotonic())
      ready, _, _ = select.select([self._proc.stdout], [], [], left)
      if not ready:  # timed out
        break
      line = self._proc.stdout.readline()
      if not line:  # exited
        break
      lines.append(line)
      if line.startswith(_READY):
        break
    if not line.startswith(_READY):
      self.stop()
      raise RuntimeError(f"GCS emulator did not start on port {self.port}:\n{''.join(lines)}")
    # Drain its (quiet) output so a full pipe never blocks the server.
    import threading  # pylint: disable=import-outside-toplevel
    threading.Thread(target=self._proc.stdout.read, daemon=True).start()
    return self

  def wipe(self) -> None:
    """Deletes every object, keeps the bucket."""
    with urllib.request.urlopen(f"{self.endpoint}/wipe?keep-buckets=true", timeout=10) as r:
      r.read()

  def stop(self) -> None:
    if self._proc is not None:
      self._proc.terminate()
      try:
        self._proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self._proc.kill()
        self._proc.wait()
      self._proc = None

  def __enter__(self) -> "GcsEmulator":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()


def _configure_in_process() -> None:
  """Makes libraries that read their settings once, at import, see the current environment."""
  if "fsspec" in sys.modules:  # fsspec reads FSSPEC_* into its config at import
    import fsspec  # pylint: disable=import-outside-toplevel
    gcs_conf = fsspec.config.conf.setdefault("gcs", {})
    if "FSSPEC_GCS_TOKEN" in os.environ:
      gcs_conf["token"] = os.environ["FSSPEC_GCS_TOKEN"]
    else:
      gcs_conf.pop("token", None)
  if "gcsfs" in sys.modules:
    import gcsfs.core  # pylint: disable=import-outside-toplevel
    gcsfs.core.GCSFileSystem.clear_instance_cache()
  try:  # gcsfs' experimental subclass probes the bucket type over gRPC first: use the plain one.
    import fsspec  # pylint: disable=import-outside-toplevel
    import gcsfs.core  # pylint: disable=import-outside-toplevel
    for proto in ("gs", "gcs"):
      fsspec.register_implementation(proto, gcsfs.core.GCSFileSystem, clobber=True)
  except ImportError:
    pass
  try:  # etils caches "use tf.io.gfile" (EPATH_USE_TF) on first use.
    from etils.epath import gpath  # pylint: disable=import-outside-toplevel
    gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access
  except (ImportError, AttributeError):
    pass


@contextlib.contextmanager
def patched_environ(values: Mapping[str, str], remove: tuple[str, ...] = ()) -> Iterator[None]:
  saved = {k: os.environ.get(k) for k in (*values, *remove)}
  try:
    for k in remove:
      os.environ.pop(k, None)
    os.environ.update(values)
    _configure_in_process()
    yield
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    _configure_in_process()


@contextlib.contextmanager
def gcs_emulator(bucket: str = DEFAULT_BUCKET, set_env: bool = True) -> Iterator[GcsEmulator]:
  """Starts an emulator; with `set_env`, points this process (and its children) at it."""
  with GcsEmulator(bucket) as emu:
    if set_env:
      with patched_environ(emu.env, remove=_REMOVE):
        yield emu
    else:
      yield emu


# ---------------------------------------------------------------------------------------------
# The server process.


def _add_generation_support(objects) -> None:
  """Adds generation preconditions and the x-goog-generation header to the emulator's handlers.

  GCS JSON API semantics (as tensorstore's own GCS mock implements them): `ifGenerationMatch=0`
  means "object must not exist"; a mismatch answers 412; a GET with a matching
  `ifGenerationNotMatch` answers 304.
  """
  from http import HTTPStatus  # pylint: disable=import-outside-toplevel
  from gcp_storage_emulator.exceptions import NotFound  # pylint: disable=import-outside-toplevel

  def query_int(request, name):
    values = request.query.get(name)
    return int(values[0]) if values else None

  def current_generation(storage, bucket, name):
    try:
      return int(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
      return None

  def precondition_failed(request, storage, name, *, for_read):
    """The status to answer instead of running the handler, or None."""
    match = query_int(request, "ifGenerationMatch")
    not_match = query_int(request, "ifGenerationNotMatch")
    if match is None and not_match is None:
      return None
    gen = current_generation(storage, request.params["bucket_name"], name)
    if match is not None:
      if match == 0 and gen is not None:
        return HTTPStatus.PRECONDITION_FAILED
      if match != 0 and gen != match:
        if for_read and gen is None:
          return HTTPStatus.NOT_FOUND
        return HTTPStatus.PRECONDITION_FAILED
    if not_match is not None and gen is not None and gen == not_match:
      return HTTPStatus.NOT_MODIFIED if for_read else HTTPStatus.PRECONDITION_FAILED
    return None

  def upload_name(request):
    if "name" in request.query:
      return request.query["name"][0]
    data = request.data
    if isinstance(data, dict):
      meta = data.get("meta") if isinstance(data.get("meta"), dict) else data
      return meta.get("name")
    return None

  orig_insert, orig_get, orig_download, orig_delete = (
      objects.insert, objects.get, objects.download, objects.delete)

  def insert(request, response, storage, *args, **kwargs):
    name = upload_name(request)
    if name is not None and "upload_id" not in request.query:
      status = precondition_failed(request, storage, name, for_read=False)
      if status is not None:
        response.status = status
        return None
    return orig_insert(request, response, storage, *args, **kwargs)

  def with_generation_headers(request, response, storage):
    if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
      try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      except NotFound:
        return
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))

  def resolve_suffix_range(request, storage):
    """`Range: bytes=-N` (the last N bytes; google-cloud-cpp's ReadLast) -> `bytes=S-`."""
    headers = request._request_handler.headers  # pylint: disable=protected-access
    spec = (headers.get("range") or "").strip()
    if not spec.startswith("bytes=-"):
      return
    try:
      size = int(storage.get_file_obj(request.params["bucket_name"],
                                      request.params["object_id"])["size"])
    except NotFound:
      return
    start = max(0, size - int(spec[len("bytes=-"):]))
    del headers["range"]
    headers["Range"] = f"bytes={start}-"

  def download(request, response, storage, *args, **kwargs):
    status = precondition_failed(request, storage, request.params["object_id"], for_read=True)
    if status is not None:
      response.status = status
      return None
    resolve_suffix_range(request, storage)
    result = orig_download(request, response, storage, *args, **kwargs)
    with_generation_headers(request, response, storage)
    return result

  def get(request, response, storage, *args, **kwargs):
    if request.query.get("alt") and request.query["alt"][0] == "media":
      return download(request, response, storage, *args, **kwargs)
    status = precondition_failed(request, storage, request.params["object_id"], for_read=True)
    if status is not None:
      response.status = status
      return None
    return orig_get(request, response, storage, *args, **kwargs)

  def delete(request, response, storage, *args, **kwargs):
    name = request.params["object_id"]
    match = query_int(request, "ifGenerationMatch")
    if match is not None:
      gen = current_generation(storage, request.params["bucket_name"], name)
      if gen is None:
        response.status = HTTPStatus.NOT_FOUND
        return None
      if gen != match:
        response.status = HTTPStatus.PRECONDITION_FAILED
        return None
    return orig_delete(request, response, storage, *args, **kwargs)

  objects.insert, objects.get, objects.download, objects.delete = insert, get, download, delete


def _add_move_route(server, objects) -> None:
  """`POST .../o/SRC/moveTo/o/DST` (gcsfs' rename): copy + delete. Without it the emulator
  answers 501, which gcsfs retries for ~30 s before falling back to copy + delete itself."""
  from http import HTTPStatus  # pylint: disable=import-outside-toplevel
  from gcp_storage_emulator.exceptions import NotFound  # pylint: disable=import-outside-toplevel

  def move(request, response, storage, *args, **kwargs):
    bucket, src, dst = (request.params[k] for k in ("bucket_name", "object_id", "dest_object_id"))
    try:
      # pylint: disable-next=protected-access
      obj = objects._copy(request.base_url, storage, bucket, src, bucket, dst)
      storage.delete_file(bucket, src)
    except NotFound:
      response.status = HTTPStatus.NOT_FOUND
      return
    response.json(obj)

  api = server.settings.API_ENDPOINT
  route = (rf"^{api}/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/"
           rf"(?P<dest_object_id>.*[^/]+)$", {server.POST: move})
  server.HANDLERS = (route, *server.HANDLERS)


def _serve(argv: list[str]) -> int:
  import argparse  # pylint: disable=import-outside-toplevel
  import logging  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--host", default="127.0.0.1")
  parser.add_argument("--bucket", default=DEFAULT_BUCKET)
  parser.add_argument("--verbose", action="store_true")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO if args.verbose else logging.CRITICAL)
  # Patch before the server module is imported: its routing table holds the handler functions.
  from gcp_storage_emulator.handlers import objects  # pylint: disable=import-outside-toplevel
  _add_generation_support(objects)
  from gcp_storage_emulator import server  # pylint: disable=import-outside-toplevel
  _add_move_route(server, objects)
  srv = server.create_server(args.host, args.port, in_memory=True, default_bucket=args.bucket)
  srv.start()
  print(f"{_READY} {srv._api._host}:{args.port}", flush=True)  # pylint: disable=protected-access
  parent = os.getppid()
  try:
    while os.getppid() == parent:  # exit with the test process, even if it was killed
      time.sleep(0.5)
  except KeyboardInterrupt:
    pass
  finally:
    srv.stop()
  return 0


if __name__ == "__main__":
  import signal
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
  sys.exit(_serve(sys.argv[1:]))
