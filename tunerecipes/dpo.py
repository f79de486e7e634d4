"""DPO in the project's recipe (tunerecipes/sft.py with a ``dpo:`` section): losses, packed pairs, the reference.

Data: packs of preference pairs (tasks/pack/preference.py), each pair's chosen then rejected sequence back to back in
one pack with its own positions and a block-causal mask, so every sequence is scored exactly as alone.
``collate_pairs`` adds each token's sequence number; ``sequence_logps`` sums the log-probabilities of each sequence's
learned tokens (not length-normalized, as torchtune's ``get_batch_log_probs``).

Losses: ``sigmoid`` is torchtune 0.6.1's ``DPOLoss`` (beta, label_smoothing); ``ipo`` is IPO (Azar et al. 2023,
"A General Theoretical Paradigm to Understand Learning from Human Preferences", eq. 17): the squared distance of the
log-ratio margin from 1 / (2 beta), on the same summed log-probabilities.

RPO (``rpo_alpha`` > 0): DPO plus alpha times the chosen response's NLL (mean over its learned tokens), as TRL's
``DPOConfig.rpo_alpha`` (the RPO paper: Pang et al. 2024, "Iterative Reasoning Preference Optimization", arXiv:2404.19733). DPO alone gives no
gradient to tokens the chosen and rejected responses share, so their likelihood drifts; the NLL term holds it. Per
pair, then averaged over pairs (TRL averages over the batch's chosen tokens; the same with equal lengths).

Reference, scored under no_grad before each policy pass: ``adapters_off`` is the policy's own forward with its
LoRA adapters disabled (torchtune's ``disable_adapter``; NF4 base included), so no second model is held;
``frozen_copy`` (full fine-tuning) is a second model the recipe built and loaded like the policy (same FSDP and
expert-parallel placement) and froze.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchtune.data import padded_collate_packed
from torchtune.modules.peft import disable_adapter
from torchtune.rlhf.loss import DPOLoss

IGNORE_INDEX = -100
REFERENCES = ("adapters_off", "frozen_copy")
# Per-step sums the recipe all-reduces and averages over the pairs of the step, in this order.
STATS = ("rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin", "logps_chosen", "logps_rejected")


class IPOLoss(nn.Module):
    """IPO: (h - 1 / (2 beta))^2 with h the policy's minus the reference's chosen-rejected log-ratio. Same inputs and
    outputs as torchtune's DPOLoss (losses per pair, chosen and rejected rewards)."""

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        self.beta = beta

    def forward(self, policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        margin = (policy_chosen_logps - policy_rejected_logps) - (reference_chosen_logps - reference_rejected_logps)
        losses = (margin - 1 / (2 * self.beta)) ** 2
        chosen_rewards = self.beta * (policy_chosen_logps - reference_chosen_logps).detach()
        rejected_rewards = self.beta * (policy_rejected_logps - reference_rejected_logps).detach()
        return losses, chosen_rewards, rejected_rewards


def make_loss(section: Any) -> nn.Module:
    """The loss a recipe config's ``dpo:`` section names."""
    if section["loss"] == "sigmoid":
        return DPOLoss(beta=float(section["beta"]), label_smoothing=float(section.get("label_smoothing") or 0.0))
    if section["loss"] == "ipo":
        return IPOLoss(beta=float(section["beta"]))
    raise ValueError(f"dpo.loss must be 'sigmoid' or 'ipo', got {section['loss']!r}")


def collate_pairs(batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """torchtune's packed collate plus ``seq_ids``: each token's sequence number within the micro-batch, chosen even
    and rejected odd (pair p: 2p, 2p + 1), -1 on padding."""
    collated = padded_collate_packed(batch)
    rows = []
    first = 0
    for item in batch:
        lengths = item["seq_lens"]
        real = len(lengths) - len(lengths) % 2  # an odd count: PackedDataset's padding, counted as a last sequence
        ids = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        rows.append(torch.where(ids < real, ids + first, -1))
        first += real
    collated["seq_ids"] = torch.stack(rows)
    return collated


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, seq_ids: torch.Tensor, sequences: int) -> torch.Tensor:
    """Summed log-probability of each sequence's learned tokens: logits [B, S, V] (position t predicts t + 1),
    unshifted labels and seq_ids [B, S] -> [sequences] in float32."""
    targets = labels[:, 1:]
    owner = seq_ids[:, 1:]
    logits = logits[:, :-1].float()
    learned = (targets != IGNORE_INDEX) & (owner >= 0)
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    sums = torch.zeros(sequences, dtype=picked.dtype, device=picked.device)
    return sums.index_add(0, owner[learned], picked[learned])


def sequence_tokens(labels: torch.Tensor, seq_ids: torch.Tensor, sequences: int) -> torch.Tensor:
    """How many learned tokens each sequence has (the tokens ``sequence_logps`` sums over) -> [sequences]."""
    learned = (labels[:, 1:] != IGNORE_INDEX) & (seq_ids[:, 1:] >= 0)
    owner = seq_ids[:, 1:][learned]
    return torch.zeros(sequences, dtype=torch.float32, device=labels.device).index_add(
        0, owner, torch.ones_like(owner, dtype=torch.float32))


class DPOObjective:
    """One micro-batch's DPO loss (summed over its pairs) and statistics, for the recipe's step."""

    def __init__(self, section: Any, model: nn.Module, reference: nn.Module | None = None) -> None:
        if section["reference"] not in REFERENCES:
            raise ValueError(f"dpo.reference must be one of {', '.join(REFERENCES)}, got {section['reference']!r}")
        if (section["reference"] == "frozen_copy") != (reference is not None):
            raise ValueError("dpo.reference frozen_copy, and only it, scores with a reference model of its own")
        self.loss = make_loss(section)
        self.rpo_alpha = float(section.get("rpo_alpha") or 0.0)
        self.model = model
        self.reference = reference

    def forward_logps(self, batch: dict[str, torch.Tensor], model: nn.Module | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) summed log-probs [pairs] of ``model`` (the policy unless given) as it is now."""
        sequences = int(batch["seq_ids"].max()) + 1
        logits = (model or self.model)(batch["tokens"], mask=batch.get("mask"), input_pos=batch.get("input_pos"))
        logps = sequence_logps(logits, batch["labels"], batch["seq_ids"], sequences)
        return logps[0::2], logps[1::2]

    def reference_logps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            if self.reference is not None:
                return self.forward_logps(batch, self.reference)
            with disable_adapter(self.model):
                return self.forward_logps(batch)

    def micro_batch(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, torch.Tensor]:
        """(loss summed over the pairs, pairs, STATS sums) of one micro-batch; the reference runs first."""
        reference = self.reference_logps(batch)
        chosen, rejected = self.forward_logps(batch)
        losses, chosen_rewards, rejected_rewards = self.loss(chosen, rejected, *reference)
        if self.rpo_alpha:
            tokens = sequence_tokens(batch["labels"], batch["seq_ids"], 2 * chosen.numel())[0::2]
            losses = losses + self.rpo_alpha * (-chosen / tokens.clamp(min=1))
        stats = torch.stack([chosen_rewards.sum(), rejected_rewards.sum(),
                             (chosen_rewards > rejected_rewards).float().sum(),
                             (chosen_rewards - rejected_rewards).sum(),
                             chosen.detach().sum(), rejected.detach().sum()]).double()
        return losses.sum(), int(chosen.numel()), stats
