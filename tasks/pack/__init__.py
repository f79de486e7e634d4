"""pack: the user's data, tokenized with the model's chat template and packed into fixed-length rows.

Output (finetune/packed.py's format): ``train/`` and, when the source has one, ``validation/`` (always under these
names, whatever the source calls them), ``meta.json`` last, and ``prompts.jsonl``: up to 1000 training prompts with
their token counts, the prompt/length distribution for benchmark and the calibration text for quantize.

With ``data.sources`` the training split is a weighted mix of the sources (tasks/pack/mix.py) and the validation
split every source's validation split, whole. Keyed by the data's content (``fingerprint``: every source's) and the
data section of the profile (formats, weights, seed), so new data or a new weight repacks and a moved directory or an
edited comment does not.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from dataclasses import dataclass

import numpy as np

from finetune.data_sources import DataSource, Record, open_source, validation_split
from finetune.packed import build_packs, write_meta, write_split
from finetune.profile import DataConfig, DataFormat, Profile, ResolvedSource
from finetune.stage import PermanentError, StageContext, StageSpec
from finetune.store import atomic_file
from tasks.pack import mix, preference
from tasks.pack.chat import ChatEncoder, Encoded, Segment, load_tokenizer, pad_id
from tasks.pack.records import DROPS_FILE, TOO_LONG, BadRecord, BadRecords, Messages, drop_notice, to_messages

CHUNK = 4096  # records per tokenizer batch: large enough for the batch encoder, small enough to report progress
PROMPTS_FILE = "prompts.jsonl"
PROMPT_SAMPLE = 1000
PROMPT_SEED = 0


def config(profile: Profile) -> dict[str, Any]:
    # Where the data lives is keyed through its content (fingerprint), not its path.
    return profile.data.model_dump(mode="json", exclude={"source": True, "revision": True,
                                                         "sources": {"__all__": {"source", "revision"}}})


def fingerprint(profile: Profile) -> dict[str, Any]:
    prints = [open_source(entry.source, entry.revision, entry.train_split).fingerprint()
              for entry in profile.data.all_sources()]
    return prints[0] if profile.data.sources is None else {"kind": "mix", "sources": prints}


@dataclass
class Input:
    """One source as the stage reads it."""

    entry: ResolvedSource
    reader: DataSource

    @property
    def name(self) -> str:
        return f"{self.entry.field} {self.entry.source}"


def open_inputs(data: DataConfig) -> list[Input]:
    inputs = [Input(entry, open_source(entry.source, entry.revision, entry.train_split))
              for entry in data.all_sources()]
    for item in inputs:
        available = item.reader.splits()
        if item.entry.train_split not in available:
            raise PermanentError(f"{item.name} has no split {item.entry.train_split!r} (train_split); "
                                 f"it has {', '.join(available) or 'none'}")
    return inputs


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
    data_format: DataFormat,
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
        kept: list[Record] = []
        conversations: list[Messages] = []
        segments: list[list[Segment]] = []
        for record in chunk:
            try:
                if record.error is not None:
                    raise BadRecord(record.error_reason, record.error)
                messages = to_messages(record.value, data_format)
                segments.append(encoder.segments(messages, record.location))
            except BadRecord as problem:
                bad.report(record, problem)
                continue
            kept.append(record)
            conversations.append(messages)
        encoded = encoder.encode(segments)
        fits = encoded.lengths <= data.max_seq_len
        for index in np.flatnonzero(~fits).tolist():
            bad.report(kept[index], BadRecord(
                TOO_LONG, f"{encoded.lengths[index]} tokens exceed data.max_seq_len {data.max_seq_len}"))
        if not fits.all():
            encoded = encoded.take(np.flatnonzero(fits))
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
    inputs = open_inputs(data)
    # Artifact split name -> the (source, source split name) pairs it is made of.
    splits = {"train": [(item, item.entry.train_split) for item in inputs]}
    held_out = [(item, name) for item in inputs
                if (name := validation_split(item.reader)) is not None and name != item.entry.train_split]
    if held_out:
        splits["validation"] = held_out

    samples = [PromptSample() for _ in inputs]
    weights = [item.entry.weight for item in inputs]
    summary: dict[str, dict[str, Any]] = {}
    with atomic_file(ctx.workdir / DROPS_FILE, "w") as drops:  # every dropped record, one JSON line each
        for number, (name, parts) in enumerate(splits.items()):
            bad = BadRecords(data.on_bad_record, ctx.log, drops, name)
            documents, reads = _encode_parts(parts, data, encoder, bad, samples if name == "train" else None,
                                             lambda message: ctx.progress(number / len(splits), message))
            mixed: list[dict[str, Any]] = []
            if name == "train" and data.sources is not None:
                picks, shares = mix.plan([d.lengths.size for d in documents], weights, data.seed)
                documents = [d.take(pick) for d, pick in zip(documents, picks)]
                mixed = [{"source": item.entry.source, "format": item.entry.format, "read": read, **share}
                         for item, read, share in zip(inputs, reads, shares)]
                ctx.tables["mix"] = [_mix_row(row) for row in mixed]
            ctx.progress((number + 0.7) / len(splits), f"packing {name}")
            merged = Encoded.concat(documents)
            if inputs[0].entry.format == "preference":  # the profile allows preference data only on its own
                packed = preference.build_pair_packs(merged, data.max_seq_len, padding)
            else:
                packed = build_packs(merged.tokens, merged.labels, merged.lengths, data.max_seq_len, padding)
            write_split(ctx.workdir, name, packed)
            summary[name] = {"source_split": ", ".join(dict.fromkeys(split for _, split in parts)),
                             "samples": sum(reads), "dropped": bad.total,
                             "dropped_by_reason": dict(sorted(bad.counts.items())), "dropped_examples": bad.examples,
                             **({"mix": mixed} if mixed else {}), **packed.stats()}
            ctx.log(f"{name}: {sum(reads)} records, {bad.total} dropped, {packed.stats()['packs']} packs, "
                    f"density {packed.stats()['density']:.4f}")

    prompts = mix.sample_rows([sample.rows() for sample in samples], weights,
                              min(PROMPT_SAMPLE, summary["train"]["documents"]), PROMPT_SEED)
    with atomic_file(ctx.workdir / PROMPTS_FILE, "w") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in prompts)
    write_meta(ctx.workdir, data.max_seq_len, padding, summary,
               {"data_formats": [item.entry.format for item in inputs], "train_on_input": data.train_on_input,
                "prompts": len(prompts)})
    finished = time.perf_counter()
    ctx.tables["pack"] = [_table_row(name, stats) for name, stats in summary.items()]
    ctx.progress(1.0, "packed")
    train = summary["train"]
    dropped = sum(stats["dropped"] for stats in summary.values())
    notice = drop_notice(summary, ctx.workdir / DROPS_FILE) if dropped else ""
    if notice:
        ctx.log(notice)
    total_tokens = sum(stats["tokens"] for stats in summary.values())
    return {
        **{k: train[k] for k in ("samples", "dropped", "dropped_by_reason", "tokens", "trainable_tokens", "packs",
                                 "padding_fraction", "density")},
        **({"mix": train["mix"]} if "mix" in train else {}),
        "splits": summary,
        "dropped_file": DROPS_FILE,
        **({"notice": notice} if notice else {}),
        "prompts": len(prompts),
        "seconds": round(finished - started, 3),
        "tokenizer_load_seconds": round(loaded - started, 3),
        "tokens_per_s": round(total_tokens / (finished - loaded), 1),
    }


def _encode_parts(
    parts: list[tuple[Input, str]],
    data: DataConfig,
    encoder: ChatEncoder,
    bad: BadRecords,
    samples: list[PromptSample] | None,
    progress: Callable[[str], None],
) -> tuple[list[Encoded], list[int]]:
    """Each (source, split)'s usable documents and records read; prompts offered to the source's sample if given."""
    documents, reads = [], []
    for number, (item, split) in enumerate(parts):
        progress(f"tokenizing {split} of {item.name}")
        offer = samples[number].offer if samples is not None else lambda conversations, encoded: None
        if item.entry.format == "preference":
            encoded, read = preference.encode_pairs(item.reader.records(split), data, encoder, bad, offer)
        else:
            encoded, read = encode_split(item.reader.records(split), item.entry.format, data, encoder, bad, offer)
        if encoded.lengths.size == 0:
            first = "".join(f"; {example}" for example in bad.examples[:3])
            raise PermanentError(f"split {split!r} of {item.name} has no usable records "
                                 f"({read} read, {bad.total} dropped so far: {dict(bad.counts)}){first}")
        documents.append(encoded)
        reads.append(read)
    return documents, reads


def _mix_row(row: dict[str, Any]) -> dict[str, Any]:
    repeats = f"yes (up to {row['max_repeats']}x)" if row["with_replacement"] else "no"
    return {"source": row["source"], "format": row["format"], "weight": row["weight"], "share": f"{row['share']:.2%}",
            "records": row["read"], "usable": row["available"], "taken": row["taken"], "with replacement": repeats}


def _table_row(name: str, stats: dict[str, Any]) -> dict[str, Any]:
    reasons = ", ".join(f"{k} {v}" for k, v in stats["dropped_by_reason"].items())
    return {"split": name, "samples": stats["samples"],
            "dropped": f"{stats['dropped']} ({reasons})" if reasons else 0,
            "tokens": stats["tokens"], "trainable": stats["trainable_tokens"], "packs": stats["packs"],
            "density": f"{stats['density']:.2%}", "padding": f"{stats['padding_fraction']:.2%}"}


SPEC = StageSpec(name="pack", version="3", run=run, config=config, upstream=("download",), fingerprint=fingerprint)
