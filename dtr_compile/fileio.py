"""Safe file writes: atomic artifacts with the user's umask, a staged set of artifacts moved into
place together, the output lock, and the up-front check of every path a run will write.

An interrupted or failed run therefore never leaves a truncated artifact where the previous good
one stood, never a mix of two runs' artifacts, and never writes over one of its own inputs.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import signal
import socket
import stat
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from dtr_compile.errors import InputError, first_line


def _umask() -> int:
    """The process umask (read without changing it for longer than two system calls)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _final_mode(target: Path) -> int:
    """The mode a new artifact at ``target`` gets: the replaced file's, else ``0o666 & ~umask``."""
    try:
        return stat.S_IMODE(target.stat().st_mode)
    except OSError:
        return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    The file gets the mode of the file it replaces, or ``0o666`` less the umask for a new one
    (``mkstemp`` alone would leave 0600, unreadable to a model server under another uid).
    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, _final_mode(target))
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


#: Suffix of an ONNX model's weights file (external data) beside it: ``hybrid.onnx`` keeps its
#: weights in ``hybrid.onnx.data`` (torch.onnx's and onnxruntime-genai's convention).
DATA_SUFFIX = ".data"


#: Weights (initializer bytes) above which a model is written with external data by default:
#: torch.onnx's own threshold (1.5 GiB), below protobuf's 2 GiB limit on one file.
EXTERNAL_DATA_BYTES = 1536 * 2**20


def data_path(model: str | os.PathLike[str]) -> Path:
    """The external-data file an ONNX model at ``model`` is written with (``NAME.data``)."""
    p = Path(model)
    return p.with_name(p.name + DATA_SUFFIX)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM while the body runs (a few renames), then deliver them.

    Moving a set of files into place is not one atomic step: an interrupt between two renames
    would leave a model beside another run's ``NAME.data``, or one run's ONNX beside another's
    report. Python runs signal handlers in the main thread between bytecodes, so replacing them
    for the duration defers the interrupt to just after the body (the handler in place before
    then runs: ``KeyboardInterrupt``, or the CLI's SIGTERM exception). Outside the main thread,
    or when a handler was not set from Python, the body runs as is. A SIGKILL or a power cut
    still stops it anywhere.
    """
    sigs = (signal.SIGINT, signal.SIGTERM)
    previous: dict[int, Any] = {s: signal.getsignal(s) for s in sigs}
    if threading.current_thread() is not threading.main_thread() or \
            any(h is None for h in previous.values()):
        yield
        return
    held: list[int] = []
    holding = [True]

    def hold(signum: int, frame: Any) -> None:  # noqa: ANN401 - a frame
        if holding[0]:
            held.append(signum)
            return
        # a signal between the two restores below: the handler that was in place handles it
        prev = previous[signum]
        if callable(prev):
            prev(signum, frame)
        elif prev == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

    try:
        for s in sigs:  # inside the try: a signal between the two installs is restored too
            signal.signal(s, hold)
        yield
    finally:
        holding[0] = False
        try:
            signal.signal(signal.SIGINT, previous[signal.SIGINT])
        finally:  # restored even when the first restore let a Ctrl-C through
            signal.signal(signal.SIGTERM, previous[signal.SIGTERM])
        if held:  # SIGTERM (stop) wins over Ctrl-C when both came
            signal.raise_signal(signal.SIGTERM if signal.SIGTERM in held else held[0])


def _place_model(written: Path, target: Path) -> None:
    """Move the ONNX model ``written`` (and its ``NAME.data`` if it has one) onto ``target``.

    The weights go first, so ``target`` never names a missing weights file; a ``target.data``
    left by an earlier model at ``target`` is removed when the new one has none (the model it
    belonged to is being replaced). Both files get the mode of the model they replace (else
    ``0o666`` less the umask): the weights are as readable as their model. Call it with signals
    deferred (:func:`signals_deferred`): between the two renames the old model would read the
    new weights."""
    src_data, dst_data = data_path(written), data_path(target)
    mode = _final_mode(target)
    if src_data.exists():
        os.chmod(src_data, mode)
        os.replace(src_data, dst_data)
    elif dst_data.is_file():
        dst_data.unlink()
    os.chmod(written, mode)
    os.replace(written, target)


def folder_mode(target: Path) -> int:
    """The mode a new artifact folder at ``target`` gets: the replaced folder's, else
    ``0o777 & ~umask`` (``mkdtemp`` alone would leave 0700)."""
    try:
        if target.is_dir():
            return stat.S_IMODE(target.stat().st_mode)
    except OSError:
        pass
    return 0o777 & ~_umask()


def copy_artifact(src: Path, dst: Path, like: Path | None = None) -> None:
    """Copy the bytes of ``src`` to ``dst`` with an artifact's mode: that of ``like`` (the
    file ``dst`` will replace) if it exists, else ``0o666`` less the umask (never the source's
    mode, as ``shutil.copy2`` would give)."""
    shutil.copyfile(src, dst)
    os.chmod(dst, _final_mode(like if like is not None else dst))


def check_copied_links(files: Sequence[Path], source: Path) -> None:
    """Files about to be copied from the folder ``source`` into an artifact may be symbolic
    links only to files inside ``source``, or to the ``blobs/`` of a Hugging Face cache
    snapshot (``REPO/snapshots/REV/f`` → ``REPO/blobs/HASH``): the copy is shipped with the
    artifacts, and a crafted folder's ``tokenizer.json -> ~/.ssh/id_rsa`` would put a private
    file in it.

    Raises:
        InputError: a link leads elsewhere (naming it and its target).
    """
    root = source.resolve()
    blobs = root.parent.parent / "blobs" if root.parent.name == "snapshots" else None
    for f in files:
        if not f.is_symlink():
            continue
        real = f.resolve()
        if not (real.is_relative_to(root) or (blobs is not None and real.parent == blobs)):
            raise InputError(f"{f} is a link to {real}, outside the folder {source}: it would "
                             "be copied into the artifacts. Replace the link by the file itself")


def _exchange(a: Path, b: Path) -> bool:
    """Swap the entries ``a`` and ``b`` atomically (Linux ``renameat2(RENAME_EXCHANGE)``, one
    system call: no moment where neither exists); False where the system has no such call."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # no such call, or the filesystem
        return False
    raise OSError(err, os.strerror(err), str(b))


def _place_folder(written: Path, target: Path, aside: Path) -> None:
    """Move the folder ``written`` onto ``target`` whole. A folder (or file) there is swapped
    with it in one step where the system allows (:func:`_exchange`), else first renamed to
    ``aside``; either way the old one ends in the staging folder (removed with it), and
    ``target`` is never half-written. Call it with signals deferred (:func:`signals_deferred`)."""
    os.chmod(written, folder_mode(target))
    if target.exists() or target.is_symlink():
        if _exchange(written, target):
            return
        os.rename(target, aside)
    os.rename(written, target)


@contextlib.contextmanager
def atomic_model_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """:func:`atomic_path` for an ONNX model that may be written with external data.

    Yields ``DIR/NAME`` in a temporary folder beside ``path`` (so an external-data file written
    there is named ``NAME.data`` and the model refers to it by that relative name); on success
    the model and its ``NAME.data``, if any, are renamed beside ``path``. On an exception the
    folder is removed and the previous model is left untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        written = folder / target.name
        yield written
        with signals_deferred():
            _place_model(written, target)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def unloadable(path: str | os.PathLike[str], exc: BaseException) -> InputError:
    """The error for an ONNX file at ``path`` that onnxruntime failed to load with ``exc``; when
    a weights file it refers to is missing, it says to keep the model and its weights together."""
    text = first_line(exc)
    hint = ""
    if "External data path" in text or "external data" in text.lower():
        hint = (f"; {Path(path).name} keeps its weights in a separate file (ONNX external data, "
                f"usually {data_path(path).name}): copy or move it together with the model")
    return InputError(f"{path}: onnxruntime cannot load it: {text}{hint}")


def onnx_weight_bytes(proto: Any) -> int:  # noqa: ANN401 - onnx.ModelProto
    """Bytes of the initializers of ``proto``'s main graph (inline or external; from their
    shapes, so also for a proto whose values were dropped or not loaded)."""
    from onnx import TensorProto, helper

    packed4 = {getattr(TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1")
               if hasattr(TensorProto, n)}  # two values a byte
    total = 0
    for t in proto.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        n = math.prod(t.dims)
        if "length" in ext:
            total += int(ext["length"])
        elif t.data_type == TensorProto.STRING:
            total += sum(len(x) for x in t.string_data)
        elif t.data_type in packed4:
            total += (n + 1) // 2
        else:
            try:
                total += helper.tensor_dtype_to_np_dtype(t.data_type).itemsize * n
            except (KeyError, ValueError, TypeError):  # undefined
                total += len(t.raw_data)
    return total


def has_external_data(proto: Any) -> bool:  # noqa: ANN401 - onnx.ModelProto
    """Whether any initializer of ``proto``'s main graph is stored outside the model file."""
    import onnx

    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


def save_onnx(proto: Any, path: str | os.PathLike[str], *,  # noqa: ANN401 - onnx.ModelProto
              external: bool | None = None) -> None:
    """Save ``proto`` (its weights loaded) at ``path``, with its weights in ``path``'s
    ``NAME.data`` when ``external`` (one file, every tensor of 1 KiB or more); by default when
    they exceed :data:`EXTERNAL_DATA_BYTES`."""
    import onnx

    p = Path(path)
    if external is None:
        external = onnx_weight_bytes(proto) > EXTERNAL_DATA_BYTES
    if external:
        onnx.save_model(proto, str(p), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_path(p).name, size_threshold=1024)
    else:
        onnx.save_model(proto, str(p))


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN / ±inf float replaced by None (JSON ``null``): ``NaN`` and
    ``Infinity`` are not JSON, and other tools' parsers reject them. Tuples become lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def json_text(obj: Any) -> str:
    """Indented, key-sorted, strictly valid JSON of ``obj`` (see :func:`json_safe`)."""
    return json.dumps(json_safe(obj), indent=2, sort_keys=True, default=str,
                      allow_nan=False) + "\n"


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON to ``path`` atomically; non-finite numbers
    are written as ``null``."""
    write_text_atomic(path, json_text(obj))


# --- the path plan ---------------------------------------------------------------------------


def _resolve(path: Path, what: str) -> Path:
    try:
        return path.resolve(strict=False)
    except (RuntimeError, OSError) as exc:  # symlink loop (RuntimeError before Python 3.13)
        raise InputError(f"{what} {str(path)!r} cannot be resolved ({exc}); is it a symlink "
                         "loop?") from None


def _same(a: Path, ra: Path, b: Path, rb: Path) -> bool:
    if ra == rb:
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _writable_folder(folder: Path, what: str, path: Path, probed: set[Path] | None = None) -> None:
    """``folder`` (to be created if missing) can hold a new file: its nearest existing ancestor
    is a writable folder, checked by creating (and removing) a file there: permission bits say
    nothing of ``/proc``, ``/sys`` or a read-only mount, where even root cannot create files.
    ``probed`` remembers folders already tried (a plan names one folder many times)."""
    probe = folder
    while not probe.exists():
        if probe.is_symlink():  # a dangling link
            raise InputError(f"{what} {str(path)!r}: {probe} is a broken symlink")
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"{what} {str(path)!r}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"{what} {str(path)!r}: the folder {probe} is not writable")
    if probed is not None and probe in probed:
        return
    try:
        fd, name = tempfile.mkstemp(prefix=".dtr-probe-", suffix=".tmp", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise InputError(f"{what} {str(path)!r}: the folder {probe} is not writable (creating "
                         f"a file there fails: {exc.strerror or exc}); write elsewhere") from None
    if probed is not None:
        probed.add(probe)


#: Plan names ending so are folders a run writes whole (``tokenizer folder``): replaced as one
#: artifact, so nothing the run reads or writes may lie inside.
FOLDER = " folder"


def check_write_plan(writes: Mapping[str, Path], inputs: Mapping[str, Path | None], *,
                     hint: str = "-o / --report") -> None:
    """Refuse a run whose artifacts would overwrite an input or each other, or cannot be written.

    Args:
        writes: every path the run may write, by a name for messages (``report``, ``pt2``…);
            a name ending in :data:`FOLDER` is a folder written whole.
        inputs: every path the run reads (model, ``--data``, ``--calib``, ``--test``…), by flag;
            None entries are ignored.
        hint: the flags that choose the written paths, for the messages.

    Raises:
        InputError: two paths are the same file (compared resolved, and with
            :func:`os.path.samefile` for hard links), a path to write is a folder (a file, for a
            folder artifact), a device or other non-regular file, or a symlink loop, an input or
            another artifact lies inside a folder artifact, or its folder is a file or not
            writable (no file can be created there).
    """
    resolved_in = {k: (p, _resolve(p, k)) for k, p in inputs.items() if p is not None}
    resolved_out = {k: _resolve(p, k) for k, p in writes.items()}
    seen: dict[Path, str] = {}
    probed: set[Path] = set()
    for name, p in writes.items():
        rp = resolved_out[name]
        folder = name.endswith(FOLDER)
        for flag, (ip, rip) in resolved_in.items():
            if _same(p, rp, ip, rip):
                raise InputError(f"the {name} path {str(p)!r} is the {flag} {str(ip)!r}: the run "
                                 f"would overwrite its own input; choose another {hint}")
            if ip.is_dir() and rp.is_relative_to(rip):
                raise InputError(f"the {name} path {str(p)!r} lies inside the {flag} folder "
                                 f"{str(ip)!r}: write the artifacts elsewhere ({hint})")
            if folder and rip.is_relative_to(rp):
                raise InputError(f"the {flag} {str(ip)!r} lies inside the {name} {str(p)!r}, "
                                 "which the run replaces whole: move it, or choose another "
                                 f"{hint}")
        if folder:
            for other, rq in resolved_out.items():
                if other != name and rq != rp and rq.is_relative_to(rp):
                    raise InputError(f"the {other} path {str(writes[other])!r} lies inside the "
                                     f"{name} {str(p)!r}, which the run replaces whole; choose "
                                     f"another {hint}")
        if rp in seen:
            raise InputError(f"the {name} path {str(p)!r} is also the {seen[rp]} path; choose "
                             f"another {hint}")
        seen[rp] = name
        if folder:
            if p.exists() and not p.is_dir():
                raise InputError(f"{str(p)!r} is a file, where the run writes its {name}: move "
                                 f"it away, or choose another {hint}")
        elif p.is_dir():
            if name.endswith(" weights"):  # planned beside an ONNX path, not given by the user
                raise InputError(f"{str(p)!r} is a folder, where the {name} file (ONNX external "
                                 "data, or a stale one removed) belongs: move it away, or "
                                 f"choose another {hint}")
            raise InputError(f"the {name} path {str(p)!r} is a folder; give a file path")
        elif p.exists() and not stat.S_ISREG(p.stat().st_mode):
            raise InputError(f"the {name} path {str(p)!r} is not a regular file (a device, "
                             "pipe or socket): the run replaces what it writes by a rename, so "
                             f"give the path of a file ({hint})")
        _writable_folder(p.parent, f"the {name} path", p, probed)
        if p.exists() and not os.access(p, os.W_OK) and not os.access(p.parent, os.W_OK):
            raise InputError(f"the {name} path {str(p)!r} is not writable")


def onnx_inputs(flag: str, path: str | os.PathLike[str]) -> dict[str, Path | None]:
    """An ONNX input and its external-data file (``NAME.data``), by ``flag`` and
    ``flag weights``: the inputs of :func:`check_write_plan` for a command that reads it."""
    p = Path(path)
    return {flag: p, f"{flag} weights": data_path(p)}


def check_json_output(path: str | os.PathLike[str] | None,
                      inputs: Mapping[str, Path | None]) -> None:
    """``--json PATH`` of a side command (``run``, ``bench``, ``lint-trt``): a file it may
    write atomically, and none of its ``inputs`` (see :func:`check_write_plan`).

    Raises:
        InputError: as :func:`check_write_plan`.
    """
    if path is not None:
        check_write_plan({"--json": Path(path)}, inputs, hint="--json path")


def check_cache_dir(path: Path, writes: Mapping[str, Path] | None = None,
                    inputs: Mapping[str, Path | None] | None = None) -> None:
    """``path`` is (or can become) a writable folder, none of the run's ``writes``, and not
    inside one of its input folders (a Hugging Face model folder) or folder artifacts.

    Raises:
        InputError: it is a file, resolves through a symlink loop, cannot be created, is the
            path of an artifact the run writes (``writes``, by name as in
            :func:`check_write_plan`) or lies inside a folder one writes whole, or lies inside
            (or is) an input (``inputs``, by flag).
    """
    rp = _resolve(path, "--cache-dir")
    for name, w in (writes or {}).items():
        rw = _resolve(w, name)
        if rw == rp:
            raise InputError(f"--cache-dir {str(path)!r} is also the {name} path: choose another "
                             "--cache-dir (or -o)")
        if name.endswith(FOLDER) and rp.is_relative_to(rw):
            raise InputError(f"--cache-dir {str(path)!r} lies inside the {name} {str(w)!r}, "
                             "which the run replaces whole: choose another --cache-dir")
    for flag, ip in (inputs or {}).items():
        if ip is None:
            continue
        rip = _resolve(ip, flag)
        if rp == rip or (ip.is_dir() and rp.is_relative_to(rip)):
            raise InputError(f"--cache-dir {str(path)!r} lies inside the {flag} "
                             f"{str(ip)!r}: the run never writes into its inputs; choose "
                             "another --cache-dir (default: .dtr-cache beside the output)")
    if path.exists() and not path.is_dir():
        raise InputError(f"--cache-dir {str(path)!r} is a file, not a folder")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise InputError(f"--cache-dir {str(path)!r} is not writable (or pass --no-cache)")
        _writable_folder(path, "--cache-dir", path)
        return
    _writable_folder(path, "--cache-dir", path)


# --- the output lock -------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class OutputLock:
    """``<output>.lock``, created with ``O_EXCL``, holding ``pid host``; released on exit.

    A lock whose process is dead (same host) is stale: it is removed and taken over.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.held = False

    def acquire(self) -> None:
        """Raises:
        InputError: another live run holds the lock (exit 2, naming the lock and its pid).
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        host = socket.gethostname()
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and owner[1] == host and not _pid_alive(owner[0]):
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()  # stale: its process is gone
                    continue
                who = f"pid {owner[0]} on {owner[1]}" if owner else "an unknown process"
                raise InputError(f"another dtr-compile run ({who}) is writing this output: lock "
                                 f"{self.path} exists (that run writes the same file); wait for "
                                 "it to finish, or delete the lock if no such run exists") \
                    from None
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{os.getpid()} {host}\n")
            self.held = True
            return
        raise InputError(f"could not take the lock {self.path}")  # pragma: no cover - a race

    def _owner(self) -> tuple[int, str] | None:
        try:
            pid, host = self.path.read_text().split()[:2]
            return int(pid), host
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self.held = False

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def artifact_lock_path(path: Path) -> Path:
    """The hidden lock of one artifact, ``.NAME.lock`` beside it (see :func:`lock_artifacts`)."""
    return path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def lock_artifacts(plan: Mapping[str, Path], main: str = "lock") -> Iterator[None]:
    """Hold ``plan[main]`` (the output lock, ``<output>.lock``) and an :class:`OutputLock` on
    every other path of the write ``plan`` (:func:`artifact_lock_path`), released on exit.

    Two runs with different ``-o`` may share another artifact (the same ``--report``, hence
    ledger and students; one's ``-o`` another's decoder path): the second to come exits 2
    instead of replacing the first's files, or removing its temporaries as stale. The locks are
    taken in the order of their resolved paths, so of two runs that overlap one always goes on.

    Raises:
        InputError: a live run holds one of the locks (naming it); the ones taken are released.
    """
    paths = {_resolve(p, name): artifact_lock_path(p) for name, p in plan.items() if name != main}
    order = [plan[main]] + [paths[k] for k in sorted(paths, key=str)]
    with contextlib.ExitStack() as stack:
        for lock_file in order:
            stack.enter_context(OutputLock(lock_file))
        yield


# --- staging ---------------------------------------------------------------------------------


class Staging:
    """A hidden folder beside the output where a run's artifacts are written, then moved into
    their places together by :meth:`commit` (each by an atomic rename on the same filesystem).

    An interrupted run leaves the previous set of artifacts untouched, never a mix of two runs.
    """

    PREFIX = ".dtr-stage-"

    def __init__(self, anchor: Path) -> None:
        anchor.parent.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=f".{anchor.name}{self.PREFIX}", dir=anchor.parent))
        self._moves: list[tuple[Path, Path]] = []

    def path(self, final: str | os.PathLike[str]) -> Path:
        """Where to write the artifact whose final place is ``final``: a file, or a folder the
        caller creates there (moved into place whole, replacing the folder at ``final``)."""
        f = Path(final)
        staged = self.dir / f"{len(self._moves)}" / f.name
        staged.parent.mkdir()
        self._moves.append((staged, f))
        return staged

    def staged(self, final: str | os.PathLike[str]) -> Path:
        """The path :meth:`path` gave for ``final`` (where the artifact is until :meth:`commit`).

        Raises:
            KeyError: no artifact was staged for ``final``.
        """
        f = Path(final)
        for staged, fin in reversed(self._moves):
            if fin == f:
                return staged
        raise KeyError(str(final))

    def commit(self) -> list[Path]:
        """Move every written staged file into place (an ``.onnx`` model with its ``NAME.data``,
        see :func:`atomic_model_path`); returns the final paths moved. Ctrl-C or SIGTERM during
        the moves takes effect once the set is in place (:func:`signals_deferred`)."""
        with signals_deferred():
            moved = self._move_all()
        self.discard()
        return moved

    def _move_all(self) -> list[Path]:
        moved = []
        for staged, final in self._moves:
            if not staged.exists():
                continue
            final.parent.mkdir(parents=True, exist_ok=True)
            if staged.is_dir():  # a folder artifact (the tokenizer): the old one set aside
                _place_folder(staged, final, staged.parent / ".replaced")
                moved.append(final)
                continue
            is_model = final.suffix == ".onnx"  # with its NAME.data, if written with one
            try:
                if is_model:
                    _place_model(staged, final)
                else:
                    os.chmod(staged, _final_mode(final))
                    os.replace(staged, final)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                if is_model:  # another filesystem: copy, then rename there
                    with atomic_model_path(final) as tmp:
                        for src, dst in ((data_path(staged), data_path(tmp)), (staged, tmp)):
                            if src.exists():
                                shutil.copyfile(src, dst)
                else:
                    with atomic_path(final) as tmp:
                        shutil.copyfile(staged, tmp)
            moved.append(final)
        return moved

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def clean_stale_temporaries(paths: Sequence[Path]) -> list[Path]:
    """Remove our leftovers beside ``paths`` (call while holding the output lock): the
    ``.NAME.*.tmp`` files of :func:`atomic_path` (folders of :func:`atomic_model_path`) and the
    staging folders of :class:`Staging`."""
    removed = []
    for p in paths:
        if not p.parent.is_dir():
            continue
        for junk in p.parent.glob(f".{p.name}.*.tmp"):
            with contextlib.suppress(OSError):
                if junk.is_dir():  # atomic_model_path's folder
                    shutil.rmtree(junk)
                else:
                    junk.unlink()
                removed.append(junk)
        for junk in p.parent.glob(f".{p.name}{Staging.PREFIX}*"):
            if junk.is_dir():
                shutil.rmtree(junk, ignore_errors=True)
                removed.append(junk)
    return removed


def read_onnx(path: str | os.PathLike[str], *, with_data: bool = False) -> Any:
    """The ONNX ``ModelProto`` at ``path`` (external data loaded only ``with_data``).

    Raises:
        InputError: the file is missing, empty, unreadable, or parses to no graph (protobuf
            accepts many byte strings as a message).
    """
    import onnx

    p = Path(path)
    if not p.is_file():
        raise InputError(f"ONNX file not found: {p}")
    if p.stat().st_size == 0:
        raise InputError(f"{p} is empty (0 bytes), not an ONNX model")
    try:
        proto = onnx.load(str(p), load_external_data=with_data)
    except Exception as exc:  # noqa: BLE001 - a decode error means a corrupt file
        raise InputError(f"{p}: not a readable ONNX model ({first_line(exc)[:200]})") from exc
    if not proto.ir_version or not proto.graph.node or not proto.graph.output:
        raise InputError(f"{p}: not an ONNX model (no graph: ir_version {proto.ir_version}, "
                         f"{len(proto.graph.node)} nodes, {len(proto.graph.output)} outputs)")
    return proto
