"""Read an offline W&B run (``offline-run-*/run-<id>.wandb``) without the network or the W&B service.

The file is a LevelDB-style log: a 7-byte header (``:W&B``, magic ``0xBEE1``, version), then 32 KiB blocks
of chunks ``crc32c (4) | length (2) | type (1) | data`` (type 1 a whole record, 2/3/4 its first, middle and
last pieces; a block's tail shorter than a chunk header is zero padding). Each record is a
``wandb_internal_pb2.Record``. Read only after ``wandb.teardown()``: it joins the W&B service process, so
every run file is complete and closed (``wandb.finish`` alone may return before the file is flushed).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK, CHUNK_HEADER = 32768, 7


def records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, f"{path} is not a W&B run file"
    pos, pieces = 7, b""
    while pos + CHUNK_HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK_HEADER:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + CHUNK_HEADER])
        if kind == 0:  # zero padding up to the block's end
            pos += left
            continue
        chunk = data[pos + CHUNK_HEADER:pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        pieces = chunk if kind in (1, 2) else pieces + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            yield record


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_run(path: Path) -> dict[str, Any]:
    """``{"id", "group", "job_type", "tags", "config", "summary", "finished"}`` of one offline run file."""
    run: dict[str, Any] = {"config": {}, "summary": {}, "finished": False, "tags": []}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.update(id=record.run.run_id, group=record.run.run_group, job_type=record.run.job_type,
                       name=record.run.display_name, tags=list(record.run.tags))
            run["config"].update({_key(i): json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            run["config"].update({_key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "summary":
            run["summary"].update({_key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "exit":
            run["finished"] = True
    return run
