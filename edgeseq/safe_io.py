"""Bounded reading and crash-safe writing, shared by every reader and writer of edgeseq's files.

Readers: JSON headers are checked for absurd nesting before `json.loads` (whose C scanner would raise
RecursionError); a value read from a file is checked for its type and range before it is used
(`need_int`, `need_str`, ...), so a hostile field gives an EdgeseqError naming the file, never a
traceback or a huge allocation; a path named inside a file stays inside its folder (`inside`). Configs
read from any file (config.json, a GGUF's metadata, a manifest) pass `check_config`: every integer of a
family's config is a non-negative count no larger than the file could describe.

Writers: `atomic_file` writes a temporary sibling, fsyncs it and renames it over the target, so a killed
process leaves the old file or the new one, never half of one; `disk_error` turns a full disk into an
EdgeseqError naming the file.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import re
import tempfile

import numpy as np

from edgeseq.errors import EdgeseqError

MAX_JSON_DEPTH = 64  # manifests, headers and configs nest a few levels; 64 is far beyond any real file
MAX_DIM = 1 << 40  # no tensor dimension of a real model comes near 2**40
MAX_COUNT = 1 << 31  # layers, heads, widths, vocabularies: far below this in any real model

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)


def json_depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in JSON text (strings skipped), without parsing it."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    if b"[" not in data and b"{" not in data:
        return 0
    bare = np.frombuffer(_STRING.sub(b'""', data), np.uint8)
    step = np.zeros(len(bare), np.int64)
    step[(bare == ord("[")) | (bare == ord("{"))] = 1
    step[(bare == ord("]")) | (bare == ord("}"))] = -1
    return int(np.cumsum(step).max(initial=0))


def loads(data: bytes | str, where: str, what: str = "JSON", max_depth: int = MAX_JSON_DEPTH):
    """json.loads with the nesting bounded first; any problem is an EdgeseqError naming `where`."""
    try:
        depth = json_depth(data)
    except (ValueError, MemoryError):
        depth = max_depth + 1
    if depth > max_depth:
        raise EdgeseqError(f"{where}: damaged {what}: nested {depth} levels deep (at most {max_depth} expected)")
    try:
        return json.loads(data)
    except (ValueError, RecursionError, MemoryError) as e:  # UnicodeDecodeError is a ValueError
        raise EdgeseqError(f"{where}: damaged {what} ({type(e).__name__}: {str(e)[:200]})") from None


def read_bounded(path: str, max_bytes: int, what: str, limit: str | None = None) -> bytes:
    """A file read whole, refused before reading if it is larger than `max_bytes` (and never more than
    that read, should it grow meanwhile). `limit` says what the bound is, for the error."""
    try:
        size = os.path.getsize(path)
        if size <= max_bytes:
            with open(path, "rb") as f:
                data = f.read(max_bytes + 1)
            size = len(data)
    except OSError as e:
        raise EdgeseqError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    if size > max_bytes:
        raise EdgeseqError(f"{path}: {what} of {size} bytes is larger than {limit or f'the {max_bytes} edgeseq reads'}")
    return data


def load_json_file(path: str, what: str = "JSON", max_bytes: int = 1 << 30):
    """A JSON file read whole (at most `max_bytes`) through `loads`."""
    return loads(read_bounded(path, max_bytes, what), path, what)


# -- typed fields --------------------------------------------------------------------------------

def need_int(v, where: str, what: str, lo: int = 0, hi: int = MAX_COUNT) -> int:
    """An integer (not a bool, not a float) in [lo, hi], or an error naming the field."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise EdgeseqError(f"{where}: {what} is {_show(v)}, expected an integer")
    if not lo <= int(v) <= hi:
        raise EdgeseqError(f"{where}: {what} is {int(v)}, expected {lo} to {hi}")
    return int(v)


def need_float(v, where: str, what: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    """A finite number in [lo, hi] (integers allowed, bools and strings not)."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise EdgeseqError(f"{where}: {what} is {_show(v)}, expected a number")
    f = float(v)
    if not math.isfinite(f) or not lo <= f <= hi:
        raise EdgeseqError(f"{where}: {what} is {f}, expected a finite number from {lo} to {hi}")
    return f


def need_str(v, where: str, what: str, max_len: int = 1 << 20) -> str:
    if not isinstance(v, str):
        raise EdgeseqError(f"{where}: {what} is {_show(v)}, expected a string")
    if len(v) > max_len:
        raise EdgeseqError(f"{where}: {what} is a string of {len(v)} characters (at most {max_len} expected)")
    return v


def need(v, kind: type | tuple, where: str, what: str):
    if not isinstance(v, kind) or isinstance(v, bool) and kind in (int, (int,)):
        names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise EdgeseqError(f"{where}: {what} is {_show(v)}, expected {_article(names)}")
    return v


def need_shape(v, where: str, what: str, max_dims: int = 8) -> tuple[int, ...]:
    """A list of non-negative integer dimensions."""
    if not isinstance(v, (list, tuple)) or len(v) > max_dims:
        raise EdgeseqError(f"{where}: {what} is {_show(v)}, expected a list of at most {max_dims} dimensions")
    return tuple(need_int(d, where, f"{what}[{i}]", 0, MAX_DIM) for i, d in enumerate(v))


def _show(v) -> str:
    s = repr(v)
    return f"{s[:60]}… ({type(v).__name__})" if len(s) > 60 else f"{s} ({type(v).__name__})"


def _article(names: str) -> str:
    return ("an " if names[:1] in "aeiou" else "a ") + names


# -- paths inside files --------------------------------------------------------------------------

def inside(folder: str, name, where: str, what: str = "file") -> str:
    """`folder/name` for a relative `name` that stays inside `folder`, else an error: a file must not point
    an export or a load at files outside its own folder. The check is on the name (no `..` out of the
    folder, no absolute path), not on where symbolic links lead: a folder of links is how the Hugging Face
    cache and a user's own deduplicated copies hold files, and whoever made the links chose their targets."""
    name = need_str(name, where, what, 4096)
    if not name or os.path.isabs(name) or "\0" in name:
        raise EdgeseqError(f"{where}: {what} {name!r} is not a relative path inside {folder}")
    root = os.path.abspath(folder)
    full = os.path.normpath(os.path.join(root, name))
    if os.path.commonpath([root, full]) != root:
        raise EdgeseqError(f"{where}: {what} {name!r} points outside {folder}; refused")
    return os.path.join(folder, name)


# -- configs -------------------------------------------------------------------------------------

def check_config(config, where: str, max_layers: int | None = None) -> None:
    """Every field of a family's config dataclass has the type its annotation names, integers are
    counts from 0 to 2**31 (layers at most `max_layers`: what the file holds), floats are finite. Run
    before anything loops over the config's counts or allocates by them."""
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        ann = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        what = f"config {f.name}"
        if v is None and "None" in ann:
            continue
        if ann.startswith("bool"):
            need(v, (bool, np.bool_), where, what)
        elif ann.startswith("int"):
            if f.name in ("n_layer", "num_layers", "n_layers"):  # a model has a layer; no more than the file holds
                need_int(v, where, what, 1, max_layers if max_layers is not None else MAX_COUNT)
            else:
                need_int(v, where, what, 0, MAX_COUNT)
        elif ann.startswith("float"):
            need_float(v, where, what)
        elif ann.startswith("str"):
            need_str(v, where, what, 1 << 16)
        elif ann.startswith(("tuple", "list")) and isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
                    need_int(x, where, f"{what}[{i}]", 0, MAX_COUNT)
                elif isinstance(x, float):
                    need_float(x, where, f"{what}[{i}]")


_LAYER = re.compile(r"(?:^|\.)(?:blocks|layers|blk)\.(\d+)\.")


def check_layers(config, names, where: str) -> None:
    """A file whose tensors name a layer at or past the config's layer count holds layers the export would
    silently drop (a config, or the tensor its layer count is read from, damaged): refused."""
    n = getattr(config, "n_layer", None)
    if not isinstance(n, int):
        return
    top = max((int(m.group(1)) for k in names if isinstance(k, str) and (m := _LAYER.search(k))), default=-1)
    if top >= n:
        raise EdgeseqError(f"{where}: holds tensors of layer {top}, but the model's config has {n} layers")


# -- writing -------------------------------------------------------------------------------------

_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def disk_error(e: OSError, path: str) -> EdgeseqError:
    """A write that failed, as an error for people (a full disk named as such)."""
    if e.errno in _FULL:
        return EdgeseqError(f"{path}: the disk is full ({e.strerror}); nothing was written")
    return EdgeseqError(f"{path}: cannot write ({e.strerror or e}); nothing was written")


def fsync_tree(path: str) -> None:
    """fsync every file under `path` (or the file `path`) and the folders, before a rename publishes them."""
    if os.path.isfile(path):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a folder; the rename is still atomic
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "wb"):
    """Write `path` all or nothing: a private temporary sibling, fsynced, renamed over `path` when the
    block ends without error; removed otherwise (a full disk then is an EdgeseqError naming `path`)."""
    folder = os.path.dirname(os.path.abspath(path))
    prefix = f".{os.path.basename(path)}."
    try:
        _sweep_files(folder, prefix)  # the temporary files of killed writers
        fd, tmp = tempfile.mkstemp(prefix=f"{prefix}{os.getpid()}-", suffix=".tmp", dir=folder)
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # as open() would have made it, not mkstemp's private 0600
    except OSError as e:
        raise disk_error(e, path) from None
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(folder)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise disk_error(e, path) from None
        raise


@contextlib.contextmanager
def converting(where: str):
    """A family's conversion of a file's tensors: a tensor whose shape or dtype does not fit the config
    (a reshape that cannot be made, an index past a table) is an error naming the file."""
    try:
        yield
    except (ValueError, TypeError, IndexError, KeyError) as e:
        raise EdgeseqError(f"{where}: a tensor does not fit the config ({type(e).__name__}: "
                           f"{str(e)[:200]})") from None


def temp_dir(parent: str, prefix: str) -> str:
    """A private temporary folder `{prefix}{pid}-XXXX` in `parent`, after removing those of the same
    prefix whose process is gone (a killed export or load cannot clean up after itself)."""
    sweep_stale(parent, prefix)
    return tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent)


def sweep_stale(parent: str, prefix: str) -> list[str]:
    import shutil

    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(prefix):
            continue
        pid = name[len(prefix):].split("-", 1)[0]
        if not pid.isdecimal() or _alive(int(pid)):
            continue
        shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
        removed.append(name)
    return removed


def _sweep_files(folder: str, prefix: str) -> None:
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if name.startswith(prefix) and name.endswith(".tmp"):
            pid = name[len(prefix):].split("-", 1)[0]
            if pid.isdecimal() and not _alive(int(pid)):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(folder, name))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def foreign_error(e: BaseException, where: str, doing: str) -> BaseException:
    """An error raised by a native library (tokenizers' Rust code) as an EdgeseqError naming the file. A
    Rust panic arrives as pyo3's PanicException, which derives from BaseException, so `except Exception`
    misses it; interrupts and exits pass through unchanged."""
    if isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit)):
        return e
    if isinstance(e, Exception) or type(e).__name__ == "PanicException":
        return EdgeseqError(f"{where}: {doing} failed ({type(e).__name__}: {str(e)[:300]})")
    return e


def replace_dir(tmp: str, out: str) -> None:
    """Publish the finished folder `tmp` as `out`: an existing `out` is first renamed aside (into `tmp`'s
    name + "-old", which the stale-folder sweep of temp_dir removes if this process is killed), so a kill
    at any moment leaves the old complete folder, the new one, or none, never a half-deleted one."""
    import shutil

    aside = None
    if os.path.lexists(out):
        aside = tmp.rstrip(os.sep) + "-old"
        os.replace(out, aside)
    os.replace(tmp, out)
    _fsync_dir(os.path.dirname(os.path.abspath(out)))
    if aside:
        shutil.rmtree(aside, ignore_errors=True)


# -- untrusted templates -------------------------------------------------------------------------

MAX_TEMPLATE_CHARS = 1 << 20  # the longest real chat template is tens of KB
MAX_RENDER_CHARS = 1 << 22  # what one render may produce (a conversation of 4 M characters)
MAX_RENDER_SECONDS = 2.0  # real templates render in milliseconds
MAX_RENDER_GROWTH = 256 << 20  # peak memory a render may add
_MAX_ARG = 1 << 20  # a number given to a filter or a global (a width, a count): no real template needs more


class _Stop(BaseException):
    """Raised inside a render that went over a limit (a BaseException: no template-level `except
    Exception` in jinja's runtime may swallow it)."""


def render_untrusted(env, source, context: dict, where: str, max_chars: int = MAX_RENDER_CHARS,
                     seconds: float = MAX_RENDER_SECONDS) -> str:
    """Render Jinja `source` (a chat template from a manifest, a GGUF or a checkpoint: untrusted) in the
    sandboxed environment `env` with `context`, bounded: the text's length; nesting that overflows the
    parser; the time (every line the template's code runs checks a deadline, so nested loops stop);
    the output; the memory a render adds; the numbers given to filters and globals (`center(10**9)`);
    `*`, `**` and `%` results (`'x' * 10**10`, `10 ** 10 ** 9`, `'%999999999d' % 1`). Anything that goes
    wrong (a syntax error, `raise_exception`, a TypeError from bad messages, a limit) is one EdgeseqError
    naming `where`. `env` is changed (its filters and globals wrapped): pass a fresh one."""
    import sys
    import time

    import jinja2

    if not isinstance(source, str):
        raise EdgeseqError(f"{where}: the chat template is {_show(source)}, expected text")
    if len(source) > MAX_TEMPLATE_CHARS:
        raise EdgeseqError(f"{where}: the chat template has {len(source)} characters (at most "
                           f"{MAX_TEMPLATE_CHARS} read)")
    _bound_environment(env, max_chars)
    deadline = time.monotonic() + seconds
    rss0 = _peak_rss()
    ticks = [0]

    def line(frame, event, arg):
        ticks[0] += 1
        if ticks[0] % 64 == 0 and time.monotonic() > deadline:
            raise _Stop(f"it ran longer than {seconds} s")
        # every line: one line may double a string (`{% set ns.s = ns.s ~ ns.s %}`)
        if rss0 is not None and _peak_rss() - rss0 > MAX_RENDER_GROWTH:
            raise _Stop(f"it took more than {MAX_RENDER_GROWTH >> 20} MiB of memory")
        return line

    def call(frame, event, arg):  # only the template's own code is traced line by line
        return line if frame.f_code.co_filename == "<template>" else None

    old = sys.gettrace()
    out, n = [], 0
    try:
        template = env.from_string(source)
        sys.settrace(call)
        for piece in template.generate(**context):
            n += len(piece)
            if n > max_chars:
                raise _Stop(f"its output passed {max_chars} characters")
            out.append(piece)
    except _Stop as e:
        raise EdgeseqError(f"{where}: the chat template was stopped: {e}") from None
    except jinja2.TemplateSyntaxError as e:
        raise EdgeseqError(f"{where}: the chat template is not valid Jinja (line {e.lineno}: {e.message})") from None
    except jinja2.TemplateError as e:  # raise_exception(...), a sandbox refusal, an undefined name
        raise EdgeseqError(f"{where}: the chat template failed: {str(e)[:300]}") from None
    except (RecursionError, MemoryError) as e:
        raise EdgeseqError(f"{where}: the chat template nests or recurses too deeply or grows too large "
                           f"({type(e).__name__})") from None
    except Exception as e:  # noqa: BLE001 -- a template is code: any error it raises is the template's
        raise EdgeseqError(f"{where}: the chat template failed on these messages ({type(e).__name__}: "
                           f"{str(e)[:300]})") from None
    finally:
        sys.settrace(old)
    return "".join(out)


def _peak_rss() -> int | None:
    """The process's peak resident bytes (it only grows: a render is stopped when it has grown by
    MAX_RENDER_GROWTH since the render began), or None where there is no `resource` module (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    import sys

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _bound_environment(env, max_chars: int) -> None:
    """`env`'s filters and globals refuse huge numbers and huge results; `*`, `**` and `%` are checked
    before they compute (jinja's sandbox calls `call_binop` for the operators it intercepts)."""
    import functools

    def check_args(name, args, kwargs):
        for a in (*args, *kwargs.values()):
            if isinstance(a, int) and not isinstance(a, bool) and abs(a) > _MAX_ARG:
                raise _Stop(f"{name}() was given {a} (at most {_MAX_ARG})")

    def check_size(name, r):
        if isinstance(r, (str, bytes, list, tuple, dict)) and len(r) > max_chars:
            raise _Stop(f"{name}() made {len(r)} items (at most {max_chars})")
        return r

    def bounded(name, f, skip):
        @functools.wraps(f)  # (keeps jinja's pass_context marks: the context comes first, then the value)
        def g(*args, **kwargs):
            check_args(name, args[skip + (1 if getattr(f, "jinja_pass_arg", None) else 0):], kwargs)
            return check_size(name, f(*args, **kwargs))
        return g

    # a filter's first argument is its value (a message's number may be large); its options are not
    env.filters = {k: bounded(k, f, 1) for k, f in env.filters.items()}
    env.globals = {k: bounded(k, f, 0) if callable(f) and not isinstance(f, type) else f
                   for k, f in env.globals.items()}
    plain_call = env.call

    def call(context, obj, *args, **kwargs):  # every call a template makes: 'x'.ljust(10**9), '{:>9999999}'.format
        name = getattr(obj, "__name__", "a function")
        check_args(name, args, kwargs)
        return check_size(name, plain_call(context, obj, *args, **kwargs))
    env.call = call
    plain_wrap = env.wrap_str_format

    def wrap_str_format(value):  # str.format as the sandbox hands it out: '{:>999999999}'.format(1)
        f = plain_wrap(value)
        if f is not None and re.search(r"\{[^}]*:[^}]*\d{7,}", value.__self__):
            raise _Stop("a format asks for a huge width")
        return f
    env.wrap_str_format = wrap_str_format
    plain_binop = env.call_binop

    def call_binop(context, op, left, right):
        if op == "**" and isinstance(left, (int, float)) and isinstance(right, (int, float)):
            if abs(right) > 64 and abs(left) > 1:
                raise _Stop(f"{left} ** {right} is too large")
        if op == "*":
            for s, k in ((left, right), (right, left)):
                if isinstance(s, (str, list, tuple)) and isinstance(k, int) and len(s) * k > max_chars:
                    raise _Stop(f"a sequence of {len(s)} repeated {k} times is too large")
        if op == "%" and isinstance(left, str) and re.search(r"%[-+ #0]*(?:\*|\d{7,})|%[-+ #0]*\d*\.(?:\*|\d{7,})", left):
            raise _Stop("a % format asks for a huge width")
        return check_size(op, plain_binop(context, op, left, right))

    env.intercepted_binops = frozenset({"*", "**", "%"})
    env.call_binop = call_binop
