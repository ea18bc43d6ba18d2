"""Text-only data, mixed with speech to keep an LLM's text skills (NeMo's `txt`, `txt_jsonl`, `nemo_sft_jsonl`).

- `type: txt`: `paths` to plain text files; every non-empty line is one example, trained on whole (one assistant
  turn, as NeMo's default prompt for a TextExample).
- `type: txt_jsonl`: `paths` to JSON lines; `text_field` (default `text`) of each line is one such example.
- `type: nemo_sft_jsonl`: NeMo's SFT chat JSONL, `{"system": ..., "conversations": [{"from": "User"|"Assistant",
  "value": ...}, ...]}`: a text conversation, loss on the assistant turns.
Text conversations with a question and an answer can also be written as `multimodal_conversation` lines without
audio turns (`orchestrator.data.conversations`).

`paths` takes a file, a list, or NeMo's sharded notation; local or fsspec URLs. Each file is one work item.
"""

from __future__ import annotations

import gzip
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

from orchestrator.data.conversations import role_of
from orchestrator.data.nemo_manifest import expand_paths
from orchestrator.data.records import SharCut, Shard, Turn, conversation_text, part_bounds
from orchestrator.data.shar import CorruptShardError, SharLayoutError, read_manifest_cached
from orchestrator.storage import filesystems
from orchestrator.storage.paths import absolute, is_url

TEXT_FORMATS = ("txt", "txt_jsonl", "nemo_sft_jsonl")


def discover_text(fmt: str, paths: Any, source: str, input_index: int = 0) -> list[Shard]:
    """One shard per text file."""
    if paths is None:
        raise SharLayoutError(f"{source}: paths is not set; point it at the text files (a path, a list, or a pattern)")
    files = [p if is_url(p) else absolute(p) for p in expand_paths(paths)]
    return [Shard(cuts=f, fields={}, source=source, input_index=input_index, format=fmt) for f in files]


_LINES: dict[str, list[str]] = {}  # the last text file read in this process (its parts are read one by one)


def _lines(path: str, storage_options: Mapping[str, Mapping[str, Any]] | None, cache: bool) -> list[str]:
    if cache and path in _LINES:
        return _LINES[path]
    raw = filesystems.read_bytes(path, storage_options)
    if path.endswith(".gz"):
        raw = gzip.decompress(raw)
    lines = raw.decode("utf-8").splitlines()
    if cache:
        _LINES.clear()
        _LINES[path] = lines
    return lines


def read_text_shard(
    shard: Shard,
    options: Mapping[str, Any],
    item: int,
    storage_options: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    with_audio: bool = True,
) -> list[SharCut]:
    """Every example of one text file (of its part, for a shard that is a slice) as a text-only record.

    A big text file is read as several parts (`Shard.part`): only the part's lines become records, since a weighted
    mix takes a few examples from every text file per epoch and building all of them for each part dominated the
    read task (see bench/README.md, mixed case)."""
    stem = PurePosixPath(shard.cuts).name.split(".")[0]
    try:
        if shard.format == "txt":
            rows: list[Any] = _lines(shard.cuts, storage_options, cache=shard.part is not None)
        else:
            rows = read_manifest_cached(shard.cuts, storage_options, cache=shard.part is not None)
    except Exception as exc:
        raise CorruptShardError(f"{shard.cuts}: cannot read the text file ({type(exc).__name__}: {exc})") from exc
    text_field = options.get("text_field") or "text"
    first, last = part_bounds(len(rows), shard.part)
    records = []
    for index, row in enumerate(rows[first:last], start=first):
        if shard.format == "txt":
            turns = (Turn("assistant", text=row.strip()),)
        elif shard.format == "txt_jsonl":
            if text_field not in row:
                continue  # as NeMo: lines without the field are not examples
            turns = (Turn("assistant", text=str(row[text_field]).strip()),)
        else:
            system = [Turn("system", text=str(row["system"]))] if row.get("system") else []
            turns = tuple(
                system
                + [Turn(role_of(t.get("from", "User")), text=str(t.get("value", ""))) for t in row["conversations"]]
            )
        records.append(
            SharCut(
                id=str(row.get("id")) if isinstance(row, dict) and row.get("id") else f"{stem}-{index:08d}",
                duration=0.0,
                text=conversation_text(turns),
                supervisions=[],
                custom={},
                audio={},
                item=item,
                input_index=shard.input_index,
                shard=shard.cuts,
                turns=turns,
            )
        )
    return records
