"""Every path a user gives (workdirs, checkpoints, data, weights, inputs and outputs) is local or
a URL that `etils.epath` handles (`gs://`, `s3://`, ...): one helper set, so no module calls
`os.path` / `open` on a user path.

`resolve` keeps URLs as they are and makes local paths absolute; the readers and writers go
through `epath.Path.open`, so PIL, numpy and json work the same on a bucket as on a disk.
"""
from __future__ import annotations

import io
import json
import os
from typing import Any

import numpy as np
from etils import epath

PathLike = str | os.PathLike


def is_url(path: PathLike) -> bool:
  return "://" in os.fspath(path)


def resolve(path: PathLike) -> epath.Path:
  """`path` as an epath.Path: a URL unchanged, a local path expanded (~) and absolute."""
  if is_url(path):
    return epath.Path(os.fspath(path))
  return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def join(path: PathLike, *parts: str) -> str:
  """`path / parts...` as a string (what orbax, TFDS and the configs take)."""
  return os.fspath(resolve(path).joinpath(*parts))


def makedirs(path: PathLike) -> epath.Path:
  p = resolve(path)
  p.mkdir(parents=True, exist_ok=True)
  return p


def read_bytes(path: PathLike) -> bytes:
  return resolve(path).read_bytes()


def write_bytes(path: PathLike, data: bytes) -> None:
  """Writes `data`, creating the parent folder. On a local disk the file appears complete or not
  at all (written beside, then renamed); object stores upload whole objects anyway."""
  p = resolve(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  if is_url(p):
    p.write_bytes(data)
    return
  tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
  tmp.write_bytes(data)
  os.replace(tmp, p)


def read_json(path: PathLike) -> Any:
  return json.loads(resolve(path).read_text())


def write_json(path: PathLike, value: Any, indent: int = 2) -> None:
  write_bytes(path, (json.dumps(value, indent=indent) + "\n").encode())


def load_npy(path: PathLike) -> np.ndarray:
  return np.load(io.BytesIO(read_bytes(path)), allow_pickle=False)


def save_npy(path: PathLike, array: np.ndarray) -> None:
  buf = io.BytesIO()
  np.save(buf, np.asarray(array), allow_pickle=False)
  write_bytes(path, buf.getvalue())


def read_image(path: PathLike):
  """A PIL image, fully loaded (the file is closed on return)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  im = Image.open(io.BytesIO(read_bytes(path)))
  im.load()
  return im


def write_png(path: PathLike, array: np.ndarray) -> None:
  """An index map (uint8, one channel) or an RGB image as PNG."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  array = np.asarray(array)
  buf = io.BytesIO()
  Image.fromarray(array.astype(np.uint8)).save(buf, format="PNG")  # 2-D uint8: mode "L"
  write_bytes(path, buf.getvalue())


def listdir(path: PathLike) -> list[str]:
  """Names in a folder, sorted."""
  return sorted(p.name for p in resolve(path).iterdir())


def isdir(path: PathLike) -> bool:
  return resolve(path).is_dir()


def exists(path: PathLike) -> bool:
  return resolve(path).exists()


# ---------------------------------------------------------------------------------------------
# Whole folders, and local copies for libraries that only open local paths.

import contextlib  # noqa: E402  (appended section; the imports above belong to the first part)
import tempfile  # noqa: E402
from typing import Iterator  # noqa: E402


def list_files(path: PathLike) -> list[epath.Path]:
  """Every file under folder `path` (recursively, sorted; local or a URL).

  (`epath.Path.rglob` refuses recursive patterns, and `walk` drops the `gs://` prefix on the
  fsspec backend, so this recurses with `iterdir`.)"""
  out = []
  for child in sorted(resolve(path).iterdir()):
    if child.is_dir():
      out += list_files(child)
    else:
      out.append(child)
  return out


def copytree(src: PathLike, dst: PathLike) -> epath.Path:
  """Copies the files under folder `src` into `dst` (either side local or a URL), keeping the
  layout; existing files in `dst` are overwritten, others kept. Returns `dst` resolved.

  Used to upload what a local-only writer produced (e.g. a TFDS build) to a bucket, and by
  `local_copy` to download. Empty folders are not recreated (object stores have none)."""
  src_p, dst_p = resolve(src), resolve(dst)
  if not src_p.is_dir():
    raise FileNotFoundError(f"{src}: not a directory")
  dst_p.mkdir(parents=True, exist_ok=True)
  for path in list_files(src_p):
    write_bytes(dst_p / path.relative_to(src_p), path.read_bytes())
  return dst_p


@contextlib.contextmanager
def local_copy(path: PathLike) -> Iterator[str]:
  """A local path holding what `path` holds, for third-party loaders that only open local files
  (e.g. transformers' `from_pretrained`).

  A local `path` is yielded as it is (as a string; nothing is copied). A URL is downloaded into a
  temporary folder, under its own name (a file or a whole folder), and that copy is removed on
  exit. Prefer bytes or file objects (`read_bytes`, `resolve(path).open()`) where the library
  takes them.

  Raises:
    FileNotFoundError: the URL holds neither a file nor a folder (the message names it).
  """
  if not is_url(path):
    yield os.fspath(path)
    return
  src = resolve(path)
  with tempfile.TemporaryDirectory(prefix="idgbr_local_copy_") as tmp:
    local = os.path.join(tmp, src.name or "root")
    if src.is_dir():
      copytree(src, local)
    elif src.is_file():
      write_bytes(local, src.read_bytes())
    else:
      raise FileNotFoundError(f"{path}: not found")
    yield local


def rmtree(path: PathLike) -> None:
  """Deletes a folder and everything under it (local or a URL)."""
  resolve(path).rmtree()


def ensure_writable_dir(path: PathLike, what: str = "output directory") -> epath.Path:
  """Creates the folder `path` (and its parents) and checks a file can be written in it, before
  any work starts. Raises NotADirectoryError / PermissionError / OSError naming `what` and the
  path (a file in the way, a read-only folder or file system)."""
  import errno  # pylint: disable=import-outside-toplevel
  import uuid  # pylint: disable=import-outside-toplevel
  p = resolve(path)
  if p.exists() and not p.is_dir():
    raise NotADirectoryError(errno.ENOTDIR, f"{what} {p} is a file; expected a folder", str(p))
  probe = p / f".write_check_{uuid.uuid4().hex}"
  try:
    p.mkdir(parents=True, exist_ok=True)
    probe.write_bytes(b"")
    probe.unlink()
  except OSError as e:
    raise type(e)(e.errno, f"{what} {p} is not writable ({e.strerror or e}); expected a folder "
                  "this user can create and write", str(p)) from e
  return p
