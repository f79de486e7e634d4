"""pack: the user's data, tokenized with the model's chat template and packed into fixed-length rows.

Output (finetune/packed.py's format): ``train/`` and, when the source has one, ``validation/`` (always under these
names, whatever the source calls them), ``meta.json`` last, and ``prompts.jsonl``: up to 1000 training prompts with
their token counts, the prompt/length distribution for benchmark and the calibration text for quantize.

Keyed by the data's content (``fingerprint``) and the data section of the profile, so new data repacks and a moved
directory or an edited comment does not.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from finetune.data_sources import Record, open_source, validation_split
from finetune.packed import build_packs, write_meta, write_split
from finetune.profile import DataConfig, Profile
from finetune.stage import PermanentError, StageContext, StageSpec
from finetune.store import atomic_file
from tasks.pack.chat import ChatEncoder, Encoded, Segment, load_tokenizer, pad_id
from tasks.pack.records import INVALID_JSON, TOO_LONG, BadRecord, BadRecords, Messages, to_messages

CHUNK = 4096  # records per tokenizer batch: large enough for the batch encoder, small enough to report progress
PROMPTS_FILE = "prompts.jsonl"
PROMPT_SAMPLE = 1000
PROMPT_SEED = 0


def config(profile: Profile) -> dict[str, Any]:
    # Where the data lives is keyed through its content (fingerprint), not its path.
    return profile.data.model_dump(mode="json", exclude={"source", "revision"})


def fingerprint(profile: Profile) -> dict[str, Any]:
    data = profile.data
    return open_source(data.source, data.revision, data.train_split).fingerprint()


class PromptSample:
    """A uniform sample (reservoir, fixed seed) of training prompts, kept in data order."""

    def __init__(self, size: int = PROMPT_SAMPLE, seed: int = PROMPT_SEED):
        self.size, self.rng, self.seen = size, random.Random(seed), 0
        self.kept: list[tuple[int, dict[str, Any]]] = []

    def offer(self, conversations: list[Messages], encoded: Encoded) -> None:
        for messages, prompt, response in zip(conversations, encoded.prompt_tokens.tolist(),
                                              encoded.response_tokens.tolist()):
            slot = len(self.kept) if len(self.kept) < self.size else self.rng.randrange(self.seen + 1)
            if slot < self.size:
                last_turn = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
                entry = (self.seen, {"messages": messages[:last_turn], "prompt_tokens": prompt,
                                     "response_tokens": response})
                if slot == len(self.kept):
                    self.kept.append(entry)
                else:
                    self.kept[slot] = entry
            self.seen += 1

    def rows(self) -> list[dict[str, Any]]:
        return [row for _, row in sorted(self.kept, key=lambda entry: entry[0])]


def _chunks(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    chunk: list[Record] = []
    for record in records:
        chunk.append(record)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def encode_split(
    records: Iterable[Record],
    data: DataConfig,
    encoder: ChatEncoder,
    bad: BadRecords,
    on_chunk: Callable[[list[Messages], Encoded], None] = lambda conversations, encoded: None,
) -> tuple[Encoded, int]:
    """Validate, tokenize and length-check every record; returns the kept documents and the records read."""
    parts: list[Encoded] = []
    read = 0
    for chunk in _chunks(records, CHUNK):
        read += len(chunk)
        locations: list[str] = []
        conversations: list[Messages] = []
        segments: list[list[Segment]] = []
        for record in chunk:
            try:
                if record.error is not None:
                    raise BadRecord(INVALID_JSON, record.error)
                messages = to_messages(record.value, data.format)
                segments.append(encoder.segments(messages, record.location))
            except BadRecord as problem:
                bad.report(record.location, problem)
                continue
            locations.append(record.location)
            conversations.append(messages)
        encoded = encoder.encode(segments)
        fits = encoded.lengths <= data.max_seq_len
        for index in np.flatnonzero(~fits).tolist():
            bad.report(locations[index], BadRecord(
                TOO_LONG, f"{encoded.lengths[index]} tokens exceed data.max_seq_len {data.max_seq_len}"))
        if not fits.all():
            encoded = encoded.select(fits)
            conversations = [c for c, keep in zip(conversations, fits.tolist()) if keep]
        on_chunk(conversations, encoded)
        parts.append(encoded)
    return Encoded.concat(parts), read


def run(ctx: StageContext) -> dict[str, Any]:
    started = time.perf_counter()
    data = ctx.profile.data
    tokenizer = load_tokenizer(ctx.inputs["download"].path)
    loaded = time.perf_counter()  # importing transformers alone takes seconds: keep it out of the throughput
    encoder = ChatEncoder(tokenizer, data.train_on_input)
    padding = pad_id(tokenizer)
    source = open_source(data.source, data.revision, data.train_split)
    available = source.splits()
    if data.train_split not in available:
        raise PermanentError(f"data.source {data.source} has no split {data.train_split!r} (data.train_split); "
                             f"it has {', '.join(available) or 'none'}")
    # Artifact split name -> source split name.
    splits = {"train": data.train_split}
    if (validation := validation_split(source)) is not None and validation != data.train_split:
        splits["validation"] = validation

    prompts = PromptSample()
    summary: dict[str, dict[str, Any]] = {}
    for number, (name, source_split) in enumerate(splits.items()):
        ctx.progress(number / len(splits), f"tokenizing {source_split}")
        bad = BadRecords(data.on_bad_record, ctx.log)
        encoded, read = encode_split(source.records(source_split), data, encoder, bad,
                                     prompts.offer if name == "train" else lambda c, e: None)
        if encoded.lengths.size == 0:
            raise PermanentError(f"split {source_split!r} of {data.source} has no usable records "
                                 f"({read} read, {bad.total} dropped: {dict(bad.counts)})")
        ctx.progress((number + 0.7) / len(splits), f"packing {source_split}")
        packed = build_packs(encoded.tokens, encoded.labels, encoded.lengths, data.max_seq_len, padding)
        write_split(ctx.workdir, name, packed)
        summary[name] = {"source_split": source_split, "samples": read, "dropped": bad.total,
                         "dropped_by_reason": dict(sorted(bad.counts.items())),
                         "dropped_examples": bad.examples, **packed.stats()}
        ctx.log(f"{name}: {read} records, {bad.total} dropped, {packed.stats()['packs']} packs, "
                f"density {packed.stats()['density']:.4f}")

    with atomic_file(ctx.workdir / PROMPTS_FILE, "w") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in prompts.rows())
    write_meta(ctx.workdir, data.max_seq_len, padding, summary,
               {"data_format": data.format, "train_on_input": data.train_on_input, "prompts": len(prompts.kept)})
    finished = time.perf_counter()
    ctx.tables["pack"] = [_table_row(name, stats) for name, stats in summary.items()]
    ctx.progress(1.0, "packed")
    train = summary["train"]
    total_tokens = sum(stats["tokens"] for stats in summary.values())
    return {
        **{k: train[k] for k in ("samples", "dropped", "dropped_by_reason", "tokens", "trainable_tokens", "packs",
                                 "padding_fraction", "density")},
        "splits": summary,
        "prompts": len(prompts.kept),
        "seconds": round(finished - started, 3),
        "tokenizer_load_seconds": round(loaded - started, 3),
        "tokens_per_s": round(total_tokens / (finished - loaded), 1),
    }


def _table_row(name: str, stats: dict[str, Any]) -> dict[str, Any]:
    reasons = ", ".join(f"{k} {v}" for k, v in stats["dropped_by_reason"].items())
    return {"split": name, "samples": stats["samples"],
            "dropped": f"{stats['dropped']} ({reasons})" if reasons else 0,
            "tokens": stats["tokens"], "trainable": stats["trainable_tokens"], "packs": stats["packs"],
            "density": f"{stats['density']:.2%}", "padding": f"{stats['padding_fraction']:.2%}"}


SPEC = StageSpec(name="pack", version="1", run=run, config=config, upstream=("download",), fingerprint=fingerprint)
