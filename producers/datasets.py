"""``pipefleet run-dataset``: a jsonl/csv/parquet file through a deployment, resumable.

Rows stream through :meth:`FleetClient.map` and their outputs are appended to
a JSONL file in input order, one chunk at a time (written, flushed and
fsynced together). A rerun counts the complete lines already written, drops a
torn last line, and skips that many input rows, so an interrupted run resumes
at the first chunk not written. A sidecar ``<output>.progress.json`` records
what the output belongs to, so a rerun never appends to another dataset's
results.

Each output row is ``{"index": i, <id column>: id, "output": ...}``.
"""

from __future__ import annotations

import argparse
import collections
import csv
import itertools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterator

from producers.errors import InvalidInput, InvalidParams

logger = logging.getLogger(__name__)

FORMATS = ("jsonl", "csv", "parquet")
"""Input formats, by file suffix (``.json`` and ``.ndjson`` read as jsonl)."""

SIDECAR_SUFFIX = ".progress.json"
"""The progress sidecar sits next to the output: ``out.jsonl.progress.json``."""


def input_format(path: Path) -> str:
    """The format of an input file, from its suffix."""
    suffix = path.suffix.lower().lstrip(".")
    if suffix in ("jsonl", "ndjson", "json"):
        return "jsonl"
    if suffix in ("csv", "parquet"):
        return suffix
    raise InvalidInput(f"cannot read {path}: the input must be .jsonl, .csv or .parquet")


def read_rows(path: Path) -> Iterator[dict[str, Any]]:
    """The input's rows as dicts, streamed (a parquet file is read one row group at a time)."""
    fmt = input_format(path)
    if fmt == "jsonl":
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as error:
                        raise InvalidInput(f"{path}:{number}: not a JSON line: {error}") from error
    elif fmt == "csv":
        with path.open(encoding="utf-8", newline="") as handle:
            yield from csv.DictReader(handle)
    else:
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches():
            yield from batch.to_pylist()


def count_rows(path: Path) -> int:
    """How many rows the input has (for the progress bar's ETA)."""
    if input_format(path) == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    return sum(1 for _ in read_rows(path))


def completed_rows(output: Path) -> int:
    """Complete lines already in ``output``; a torn last line (killed mid-write) is cut off."""
    if not output.exists():
        return 0
    data = output.read_bytes()
    end = data.rfind(b"\n") + 1
    if end != len(data):
        with output.open("r+b") as handle:
            handle.truncate(end)
    return data[:end].count(b"\n")


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _check_sidecar(sidecar: Path, identity: dict[str, Any], done: int) -> None:
    if done == 0 or not sidecar.exists():
        return
    previous = json.loads(sidecar.read_text())
    mismatched = {k: (previous.get(k), v) for k, v in identity.items() if previous.get(k) != v}
    if mismatched:
        raise InvalidParams(f"the output already holds {done} rows of another run ({mismatched}); "
                            "delete it or choose another --output")


def _values(rows: Iterator[dict[str, Any]], column: str, id_column: str | None,
            ids: "collections.deque[Any]") -> Iterator[Any]:
    for number, row in enumerate(rows):
        if column not in row:
            raise InvalidInput(f"row {number} has no column {column!r} (columns: {sorted(row)})")
        if id_column is not None:
            ids.append(row.get(id_column))
        yield row[column]


def run_dataset(client: Any, args: argparse.Namespace) -> int:
    """Run ``args.input`` through a deployment into ``args.output``; returns the exit status."""
    source, output = Path(args.input), Path(args.output)
    if not source.exists():
        raise InvalidInput(f"no such input file: {source}")
    params = json.loads(args.params) if getattr(args, "params", None) else {}
    chunk_size, max_in_flight = args.chunk_size or 64, getattr(args, "max_in_flight", None) or 8
    identity = {"input": str(source.resolve()), "column": args.column, "id_column": args.id_column,
                "task": args.task, "model": args.model, "deployment": args.deployment, "params": params}
    sidecar = output.with_name(output.name + SIDECAR_SUFFIX)
    done = completed_rows(output)
    _check_sidecar(sidecar, identity, done)
    total = count_rows(source)
    if done:
        print(f"pipefleet: resuming {output} after {done} of {total} rows", file=sys.stderr)
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=done, unit="items", desc="run-dataset", dynamic_ncols=True, file=sys.stderr)
    ids: "collections.deque[Any]" = collections.deque()
    values = _values(itertools.islice(read_rows(source), done, None), args.column, args.id_column, ids)
    outputs = client.map(values, task=args.task, model=args.model, deployment=args.deployment, params=params,
                         chunk_size=chunk_size, max_in_flight=max_in_flight)
    index = done
    buffer: list[str] = []
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        with output.open("a", encoding="utf-8") as handle:
            for out in outputs:
                row = {"index": index}
                if args.id_column is not None:
                    row[args.id_column] = ids.popleft()
                row["output"] = out
                buffer.append(json.dumps(row, ensure_ascii=False, default=_json_default) + "\n")
                index += 1
                if len(buffer) == chunk_size:
                    _write_chunk(handle, buffer, sidecar, identity, index)
                    bar.update(len(buffer))
                    buffer = []
            if buffer:
                _write_chunk(handle, buffer, sidecar, identity, index)
                bar.update(len(buffer))
    finally:
        bar.close()
    print(f"pipefleet: wrote {index} rows to {output}", file=sys.stderr)
    return 0


def _write_chunk(handle: Any, lines: list[str], sidecar: Path, identity: dict[str, Any], rows_done: int) -> None:
    handle.write("".join(lines))
    handle.flush()
    os.fsync(handle.fileno())
    tmp = sidecar.with_name(sidecar.name + ".tmp")
    tmp.write_text(json.dumps({**identity, "rows_done": rows_done}))
    os.replace(tmp, sidecar)
