"""State files: a session's state saved to disk, versioned, checksummed and tied to the weights.

    magic "EDGESEQ-STATE\\n" | u32 header length | header JSON | payload | sha256 of all before (32 bytes)

The header holds the format version, the weights' sha256 of the bundle it came from, the family,
the position and each tensor's name/shape/dtype; the payload is the tensors in that order. The
trailing checksum covers header and payload, so any damaged byte is found.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct

import numpy as np

from edgeseq.errors import EdgeseqError

MAGIC = b"EDGESEQ-STATE\n"
VERSION = 1


def save(path: str, arrays: dict[str, np.ndarray], weights_sha256: str, family: str, position: int) -> None:
    header = {"version": VERSION, "weights_sha256": weights_sha256, "family": family, "position": int(position),
              "tensors": [{"name": n, "shape": list(a.shape), "dtype": a.dtype.name} for n, a in arrays.items()]}
    hb = json.dumps(header).encode()
    h = hashlib.sha256()
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        for chunk in (MAGIC, struct.pack("<I", len(hb)), hb, *(np.ascontiguousarray(a).data for a in arrays.values())):
            f.write(chunk)
            h.update(chunk)
        f.write(h.digest())
    os.replace(tmp, path)


def load(path: str, expected: dict[str, tuple[tuple[int, ...], str]], weights_sha256: str, family: str):
    """Read a state file and check it against the model; returns ({name: array}, position)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise EdgeseqError(f"{path}: cannot read state file ({e.strerror})") from None
    if not data.startswith(MAGIC):
        raise EdgeseqError(f"{path}: not an edgeseq state file")
    body, digest = data[:-32], data[-32:]
    if len(data) < len(MAGIC) + 4 + 32 or hashlib.sha256(body).digest() != digest:
        raise EdgeseqError(f"{path}: state file is damaged or truncated (checksum mismatch)")
    try:
        (n,) = struct.unpack_from("<I", body, len(MAGIC))
        header = json.loads(body[len(MAGIC) + 4:len(MAGIC) + 4 + n])
        version, tensors = int(header["version"]), list(header["tensors"])
        position = int(header["position"])
    except (struct.error, ValueError, KeyError, TypeError):
        raise EdgeseqError(f"{path}: damaged state file header") from None
    if version > VERSION:
        raise EdgeseqError(f"{path}: state file version {version} is newer than this edgeseq reads ({VERSION})")
    if header.get("weights_sha256") != weights_sha256 or header.get("family") != family:
        raise EdgeseqError(f"{path}: this state belongs to another model ({header.get('family')}, weights "
                           f"{str(header.get('weights_sha256'))[:12]}…; this model is {family}, weights "
                           f"{weights_sha256[:12]}…)")
    payload = body[len(MAGIC) + 4 + n:]
    out, pos = {}, 0
    try:
        for t in tensors:
            shape, dtype = tuple(int(d) for d in t["shape"]), np.dtype(t["dtype"])
            if t["name"] not in expected or expected[t["name"]] != (shape, dtype.name):
                raise EdgeseqError(f"{path}: tensor {t['name']} {shape} {dtype.name} does not match this model's state")
            count = int(np.prod(shape))
            out[t["name"]] = np.frombuffer(payload, dtype, count=count, offset=pos).reshape(shape)
            pos += count * dtype.itemsize
    except (KeyError, TypeError, ValueError):
        raise EdgeseqError(f"{path}: damaged state file header") from None
    missing = set(expected) - set(out)
    if missing or pos != len(payload):
        raise EdgeseqError(f"{path}: state file does not match this model's state (lacks "
                           f"{', '.join(sorted(missing)) or 'nothing'}, {len(payload) - pos} extra bytes)")
    return out, position
