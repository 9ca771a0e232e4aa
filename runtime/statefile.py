"""State files: a session's state saved to disk, versioned, checksummed and tied to the weights.

    magic "EDGESEQ-STATE\\n" | u32 header length | header JSON | payload | sha256 of all before (32 bytes)

The header holds the format version, the weights' sha256 of the bundle it came from, the family,
the position and each tensor's name/shape/dtype; the payload is the tensors in that order. The
trailing checksum covers header and payload, so any damaged byte is found.
"""
from __future__ import annotations

import hashlib
import json
import struct

import numpy as np

from edgeseq import safe_io
from edgeseq.errors import EdgeseqError
from edgeseq.safe_io import atomic_file

MAGIC = b"EDGESEQ-STATE\n"
VERSION = 1


MAX_POSITION = 1 << 62


def save(path: str, arrays: dict[str, np.ndarray], weights_sha256: str, family: str, position: int) -> None:
    """Written all or nothing (safe_io.atomic_file): a save killed midway leaves the old file or none.
    A state holding NaN or inf is refused here, as at load (docs/reliability.md): the file could not be
    loaded, and an existing file is left as it was."""
    for name, a in arrays.items():
        _finite(a, f"{path}: not saved: the state's tensor {name}")
    header = {"version": VERSION, "weights_sha256": weights_sha256, "family": family, "position": int(position),
              "tensors": [{"name": n, "shape": list(a.shape), "dtype": a.dtype.name} for n, a in arrays.items()]}
    hb = json.dumps(header).encode()
    h = hashlib.sha256()
    with atomic_file(path) as f:
        for chunk in (MAGIC, struct.pack("<I", len(hb)), hb, *(np.ascontiguousarray(a).data for a in arrays.values())):
            f.write(chunk)
            h.update(chunk)
        f.write(h.digest())


def load(path: str, expected: dict[str, tuple[tuple[int, ...], str]], weights_sha256: str, family: str):
    """Read a state file and check it against the model; returns ({name: array}, position).

    The checksum finds damage; every header field is also checked for its type and range, since a
    file can be edited and its checksum recomputed (a negative or fractional position, version -1)."""
    limit = len(MAGIC) + 4 + (1 << 24) + 32 + sum(_nbytes(s, d) for s, d in expected.values())
    data = safe_io.read_bounded(path, limit, "state file", "this model's state could be")
    if not data.startswith(MAGIC):
        raise EdgeseqError(f"{path}: not an edgeseq state file")
    body, digest = data[:-32], data[-32:]
    if len(data) < len(MAGIC) + 4 + 32 or hashlib.sha256(body).digest() != digest:
        raise EdgeseqError(f"{path}: state file is damaged or truncated (checksum mismatch)")
    (n,) = struct.unpack_from("<I", body, len(MAGIC))
    if len(MAGIC) + 4 + n > len(body):
        raise EdgeseqError(f"{path}: damaged state file header (declares {n} bytes, the file has {len(body)})")
    header = safe_io.loads(body[len(MAGIC) + 4:len(MAGIC) + 4 + n], path, "state file header")
    where = f"{path}: damaged state file header"
    safe_io.need(header, dict, where, "the header")
    version = safe_io.need_int(header.get("version"), where, "version", 1, 1 << 16)
    if version > VERSION:
        raise EdgeseqError(f"{path}: state file version {version} is newer than this edgeseq reads ({VERSION})")
    if header.get("weights_sha256") != weights_sha256 or header.get("family") != family:
        raise EdgeseqError(f"{path}: this state belongs to another model ({header.get('family')}, weights "
                           f"{str(header.get('weights_sha256'))[:12]}…; this model is {family}, weights "
                           f"{weights_sha256[:12]}…)")
    position = safe_io.need_int(header.get("position"), where, "position", 0, MAX_POSITION)
    tensors = safe_io.need(header.get("tensors"), list, where, "tensors")
    payload = body[len(MAGIC) + 4 + n:]
    out, pos = {}, 0
    for i, t in enumerate(tensors):
        safe_io.need(t, dict, where, f"tensors[{i}]")
        name = safe_io.need_str(t.get("name"), where, f"tensors[{i}].name", 256)
        shape = safe_io.need_shape(t.get("shape"), where, f"tensors[{i}].shape")
        dtype = safe_io.need_str(t.get("dtype"), where, f"tensors[{i}].dtype", 16)
        if name not in expected or expected[name] != (shape, dtype):
            raise EdgeseqError(f"{path}: tensor {name} {shape} {dtype} does not match this model's state")
        if name in out:
            raise EdgeseqError(f"{path}: tensor {name} appears twice")
        nbytes = _nbytes(shape, dtype)
        if pos + nbytes > len(payload):
            raise EdgeseqError(f"{path}: state file is truncated inside tensor {name}")
        out[name] = np.frombuffer(payload, np.dtype(dtype), count=nbytes // np.dtype(dtype).itemsize,
                                  offset=pos).reshape(shape)
        pos += nbytes
    missing = set(expected) - set(out)
    if missing or pos != len(payload):
        raise EdgeseqError(f"{path}: state file does not match this model's state (lacks "
                           f"{', '.join(sorted(missing)) or 'nothing'}, {len(payload) - pos} extra bytes)")
    for name, a in out.items():
        _finite(a, f"{path}: damaged state file: tensor {name}")
    return out, position


def _finite(a: np.ndarray, what: str) -> None:
    """A recurrent state carries every value into every later token: one NaN or inf makes all later
    logits NaN, so such a state is never a state to continue from."""
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        bad = np.flatnonzero(~np.isfinite(a.reshape(-1)))
        nan = int(np.isnan(a).sum())
        raise EdgeseqError(f"{what} holds {nan} NaN and {len(bad) - nan} infinite values (first at flat index "
                           f"{bad[0]}); a state must be finite")


def _nbytes(shape, dtype: str) -> int:
    n = np.dtype(dtype).itemsize
    for d in shape:
        n *= int(d)
    return n
