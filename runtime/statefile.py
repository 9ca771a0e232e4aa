"""State files: a session's state saved to disk, versioned, checksummed and tied to the weights.

    magic "EDGESEQ-STATE\\n" | u32 header length | header JSON | payload (state tensors, in spec order)

The header holds the format version, the weights' sha256 of the bundle it came from, the family,
the position, each tensor's name/shape/dtype, and the payload's sha256.
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
    payload = b"".join(np.ascontiguousarray(a).tobytes() for a in arrays.values())
    header = {"version": VERSION, "weights_sha256": weights_sha256, "family": family, "position": position,
              "tensors": [{"name": n, "shape": list(a.shape), "dtype": a.dtype.name} for n, a in arrays.items()],
              "payload_sha256": hashlib.sha256(payload).hexdigest()}
    hb = json.dumps(header).encode()
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(MAGIC + struct.pack("<I", len(hb)) + hb + payload)
    os.replace(tmp, path)


def load(path: str, expected: dict[str, tuple[tuple[int, ...], str]], weights_sha256: str):
    """Read a state file and check it against the model; returns ({name: array}, position)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise EdgeseqError(f"{path}: cannot read state file ({e.strerror})") from None
    if not data.startswith(MAGIC):
        raise EdgeseqError(f"{path}: not an edgeseq state file")
    try:
        (n,) = struct.unpack_from("<I", data, len(MAGIC))
        header = json.loads(data[len(MAGIC) + 4:len(MAGIC) + 4 + n])
    except (struct.error, ValueError):
        raise EdgeseqError(f"{path}: damaged state file header") from None
    if header.get("version", 0) > VERSION:
        raise EdgeseqError(f"{path}: state file version {header.get('version')} is newer than this edgeseq reads")
    if header.get("weights_sha256") != weights_sha256:
        raise EdgeseqError(f"{path}: this state belongs to another model (weights {header.get('weights_sha256', '?')[:12]}…,"
                           f" this model's are {weights_sha256[:12]}…)")
    payload = data[len(MAGIC) + 4 + n:]
    if hashlib.sha256(payload).hexdigest() != header.get("payload_sha256"):
        raise EdgeseqError(f"{path}: state file is damaged (checksum mismatch)")
    out, pos = {}, 0
    for t in header["tensors"]:
        shape, dtype = tuple(t["shape"]), np.dtype(t["dtype"])
        if t["name"] not in expected or expected[t["name"]] != (shape, dtype.name):
            raise EdgeseqError(f"{path}: tensor {t['name']} {shape} {dtype.name} does not match this model's state")
        size = int(np.prod(shape)) * dtype.itemsize
        out[t["name"]] = np.frombuffer(payload, dtype, count=int(np.prod(shape)), offset=pos).reshape(shape)
        pos += size
    missing = set(expected) - set(out)
    if missing:
        raise EdgeseqError(f"{path}: state file lacks {', '.join(sorted(missing))}")
    return out, int(header.get("position", 0))
