"""Preference pairs (``data.format: preference``) for DPO: records to chosen/rejected conversations, tokenized with
the chat template, packed two by two.

Record shapes (each field a string or a list of chat messages):
- explicit: ``{"prompt", "chosen", "rejected"}``; a string prompt is one user turn, a string response one assistant
  turn;
- implicit (TRL, UltraFeedback-binarized): ``chosen`` and ``rejected`` are whole conversations that share the prompt
  as their common first messages (a ``prompt`` field beside them, as UltraFeedback has, is that same prefix).

Only the assistant turns after the shared prompt are learned (labels); everything before is masked. A pair is packed
as a unit: chosen then rejected, back to back in the same pack, each its own sequence (``seq_lens`` alternate chosen,
rejected), so attention never crosses from one to the other and the trainer finds each pair by its position.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from finetune.data_sources import Record
from finetune.packed import IGNORE_INDEX, PackedSplit, build_packs
from finetune.profile import DataConfig
from tasks.pack.chat import ChatEncoder, Encoded, Segment
from tasks.pack.records import (
    EMPTY_TEXT,
    MISSING_FIELD,
    NO_ASSISTANT,
    TOO_LONG,
    WRONG_TYPE,
    BadRecord,
    BadRecords,
    Messages,
    _chat,
    _kind,
)

CHUNK = 4096
SAME_RESPONSES = "same_responses"
SHAPE = "preference format: {\"prompt\", \"chosen\", \"rejected\"} (strings or messages), or chosen/rejected " \
        "conversations sharing their prompt"


def _messages(value: Any, field: str, role: str) -> Messages:
    """A field as messages: a string is one ``role`` turn."""
    if isinstance(value, str):
        if not value.strip():
            raise BadRecord(EMPTY_TEXT, f"'{field}' is empty")
        return [{"role": role, "content": value}]
    if not isinstance(value, list):
        raise BadRecord(WRONG_TYPE, f"'{field}' is {_kind(value)}, expected a string or a list of messages")
    try:
        return _chat({"messages": value})
    except BadRecord as bad:
        raise BadRecord(bad.reason, bad.problem.replace("messages", field, 1)) from None


def to_pair(value: Any) -> tuple[Messages, Messages, int]:
    """(chosen conversation, rejected conversation, messages of the shared prompt), or BadRecord naming the field."""
    if not isinstance(value, dict):
        raise BadRecord(WRONG_TYPE, f"record is {_kind(value)}, expected a JSON object")
    for field in ("chosen", "rejected"):
        if value.get(field) is None:
            raise BadRecord(MISSING_FIELD, f"missing field '{field}' ({SHAPE})")
    chosen = _messages(value["chosen"], "chosen", "assistant")
    rejected = _messages(value["rejected"], "rejected", "assistant")
    prompt = _messages(value["prompt"], "prompt", "user") if value.get("prompt") is not None else []
    # Implicit shape: the responses already carry the prompt (UltraFeedback repeats it in 'prompt').
    if not (prompt and chosen[:len(prompt)] == prompt and rejected[:len(prompt)] == prompt):
        chosen, rejected = prompt + chosen, prompt + rejected
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if chosen == rejected:
        raise BadRecord(SAME_RESPONSES, "'chosen' and 'rejected' are the same conversation: nothing to prefer")
    # The shared prompt ends before the first message that differs; each response (what follows) needs an answer.
    if shared == 0:
        raise BadRecord(MISSING_FIELD, f"no prompt: 'chosen' and 'rejected' share no first message ({SHAPE})")
    for name, conversation in (("chosen", chosen), ("rejected", rejected)):
        if not any(m["role"] == "assistant" for m in conversation[shared:]):
            raise BadRecord(NO_ASSISTANT, f"'{name}' has no assistant message after the shared prompt")
    return chosen, rejected, shared


def _masked_prompt(segments: list[Segment], conversation: Messages, shared: int) -> list[Segment]:
    """The segments with the assistant turns inside the shared prompt no longer learned."""
    in_prompt = sum(1 for m in conversation[:shared] if m["role"] == "assistant")
    out = []
    for text, turn in segments:
        if turn and in_prompt:
            in_prompt -= 1
            turn = False
        out.append((text, turn))
    return out


def encode_pairs(
    records: Iterable[Record],
    data: DataConfig,
    encoder: ChatEncoder,
    bad: BadRecords,
    on_chunk: Callable[[list[Messages], Encoded], None] = lambda conversations, encoded: None,
) -> tuple[Encoded, int]:
    """Every usable pair as two documents, chosen then rejected (interleaved), and the records read. A pair longer
    than data.max_seq_len together is dropped (or fails) like a record that is too long."""
    parts: list[Encoded] = []
    read = 0
    chunk: list[Record] = []
    for record in [*records, None]:
        if record is not None:
            chunk.append(record)
            read += 1
            if len(chunk) < CHUNK:
                continue
        if chunk:
            parts.append(_encode_chunk(chunk, data, encoder, bad, on_chunk))
        chunk = []
    return Encoded.concat(parts), read


def _encode_chunk(chunk: list[Record], data: DataConfig, encoder: ChatEncoder, bad: BadRecords,
                  on_chunk: Callable[[list[Messages], Encoded], None]) -> Encoded:
    kept: list[Record] = []
    chosen_texts: list[list[Segment]] = []
    rejected_texts: list[list[Segment]] = []
    conversations: list[Messages] = []
    for record in chunk:
        try:
            if record.error is not None:
                raise BadRecord(record.error_reason, record.error)
            chosen, rejected, shared = to_pair(record.value)
            segments = [_masked_prompt(encoder.segments(c, record.location), c, shared) for c in (chosen, rejected)]
        except BadRecord as problem:
            bad.report(record, problem)
            continue
        kept.append(record)
        conversations.append(chosen)
        chosen_texts.append(segments[0])
        rejected_texts.append(segments[1])
    chosen_enc, rejected_enc = encoder.encode(chosen_texts), encoder.encode(rejected_texts)
    pair_lengths = chosen_enc.lengths + rejected_enc.lengths
    fits = pair_lengths <= data.max_seq_len
    for index in np.flatnonzero(~fits).tolist():
        bad.report(kept[index], BadRecord(
            TOO_LONG, f"chosen and rejected together are {pair_lengths[index]} tokens, more than data.max_seq_len "
                      f"{data.max_seq_len} (a pair is packed whole)"))
    fitting = np.flatnonzero(fits)
    chosen_enc, rejected_enc = chosen_enc.take(fitting), rejected_enc.take(fitting)
    on_chunk([conversations[i] for i in fitting.tolist()], chosen_enc)
    both = Encoded.concat([chosen_enc, rejected_enc])
    count = fitting.size
    return both.take(np.stack([np.arange(count), count + np.arange(count)], axis=1).reshape(-1))


def build_pair_packs(encoded: Encoded, max_seq_len: int, pad_id: int) -> PackedSplit:
    """Pack interleaved (chosen, rejected) documents pair by pair: best-fit on the pairs' total lengths, then each
    pair's two sequences recorded separately (``seq_lens`` chosen, rejected, chosen, ...)."""
    lengths = encoded.lengths.reshape(-1, 2)
    packed = build_packs(encoded.tokens, encoded.labels, lengths.sum(axis=1), max_seq_len, pad_id)
    order = packed.doc_order
    # The rejected response's first token is the prompt's first (masked: the chat template's BOS); keep it masked
    # even with train_on_input, so neither sequence predicts across the pair's boundary.
    rows, starts = _rejected_starts(packed, lengths[order, 0])
    packed.labels[rows, starts] = IGNORE_INDEX
    return PackedSplit(tokens=packed.tokens, labels=packed.labels,
                       seq_lens=lengths[order].reshape(-1).astype(np.int32),
                       pack_offsets=packed.pack_offsets * 2, doc_order=order)


def _rejected_starts(packed: PackedSplit, chosen_lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pack row and offset of every rejected sequence's first token (pairs in pack order)."""
    offsets = packed.pack_offsets
    pair_start = np.cumsum(packed.seq_lens) - packed.seq_lens
    row = np.repeat(np.arange(offsets.size - 1), np.diff(offsets))
    in_pack = pair_start - pair_start[offsets[:-1]][row]
    return row, in_pack + chosen_lengths
