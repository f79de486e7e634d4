"""DPO: the losses, packed pairs scored like torchtune's padded concatenated_forward, the adapters_off reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchtune import rlhf
from torchtune.modules.peft import disable_adapter
from torchtune.rlhf.loss import DPOLoss

from finetune.packed import IGNORE_INDEX, PackedSplit, write_meta, write_split
from finetune.packed_dataset import PackedDataset
from llama4tune.reference import random_text_config
from tasks.pack.chat import Encoded
from tasks.pack.preference import build_pair_packs
from tests.test_llama4_lora import _lora_model
from tunerecipes.dpo import DPOObjective, IPOLoss, collate_pairs, make_loss, sequence_logps

torch.set_num_threads(2)


def _logps(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [-20 * torch.rand(6, generator=gen) for _ in range(4)]


def test_sigmoid_is_torchtunes_dpo_loss_and_ipo_follows_its_formula() -> None:
    policy_c, policy_r, ref_c, ref_r = _logps(0)
    sigmoid = make_loss({"loss": "sigmoid", "beta": 0.2, "label_smoothing": 0.1})
    assert isinstance(sigmoid, DPOLoss) and (sigmoid.beta, sigmoid.label_smoothing) == (0.2, 0.1)
    ipo = make_loss({"loss": "ipo", "beta": 0.2})
    assert isinstance(ipo, IPOLoss)
    losses, chosen, rejected = ipo(policy_c, policy_r, ref_c, ref_r)
    # IPO (Azar et al. 2023, eq. 17): (log-ratio margin - 1 / (2 tau))^2.
    margin = (policy_c - ref_c) - (policy_r - ref_r)
    torch.testing.assert_close(losses, (margin - 1 / (2 * 0.2)) ** 2)
    torch.testing.assert_close(chosen, 0.2 * (policy_c - ref_c))
    torch.testing.assert_close(rejected, 0.2 * (policy_r - ref_r))
    # Its minimum sits at margin 1 / (2 beta): the loss does not push the margin further, unlike the sigmoid's.
    at_target = ipo(ref_c + 2.5, ref_r, ref_c, ref_r)[0]
    assert torch.allclose(at_target, torch.zeros(6), atol=1e-5)
    with pytest.raises(ValueError, match="sigmoid' or 'ipo'"):
        make_loss({"loss": "hinge", "beta": 0.1})


def test_sequence_logps_sum_each_sequences_learned_tokens_only() -> None:
    logits = torch.randn(1, 6, 5, generator=torch.Generator().manual_seed(1))
    tokens = torch.tensor([[0, 1, 2, 3, 4, 0]])
    labels = torch.tensor([[IGNORE_INDEX, 1, 2, IGNORE_INDEX, 4, IGNORE_INDEX]])
    seq_ids = torch.tensor([[0, 0, 0, 1, 1, -1]])
    logp = F.log_softmax(logits[0], -1)
    expected = torch.stack([logp[0, 1] + logp[1, 2], logp[3, 4]])
    torch.testing.assert_close(sequence_logps(logits, labels, seq_ids, 2), expected)
    assert tokens.shape == labels.shape


def _pairs(vocab: int, count: int, seed: int) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen response, rejected response) token ids of random lengths."""
    rng = np.random.default_rng(seed)
    return [tuple(rng.integers(1, vocab, size=int(rng.integers(low, high))).tolist()
                  for low, high in ((3, 9), (2, 8), (2, 8))) for _ in range(count)]


def _encoded(pairs: list[tuple[list[int], list[int], list[int]]]) -> Encoded:
    docs = [(prompt, response) for prompt, chosen, rejected in pairs for response in (chosen, rejected)]
    tokens = np.array([t for prompt, response in docs for t in prompt + response], dtype=np.int32)
    labels = np.array([t for prompt, response in docs for t in [IGNORE_INDEX] * len(prompt) + response],
                      dtype=np.int32)
    lengths = np.array([len(p) + len(r) for p, r in docs], dtype=np.int64)
    counts = np.array([len(p) for p, _ in docs], dtype=np.int32)
    return Encoded(tokens, labels, lengths, counts, np.array([len(r) for _, r in docs], dtype=np.int32))


def _padded_concatenated(pairs: list[tuple[list[int], list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """torchtune's padded_collate_dpo layout: every chosen sequence, then every rejected one, right-padded."""
    sequences = [(p + c, [IGNORE_INDEX] * len(p) + c) for p, c, _ in pairs]
    sequences += [(p + r, [IGNORE_INDEX] * len(p) + r) for p, _, r in pairs]
    width = max(len(tokens) for tokens, _ in sequences)
    ids = torch.tensor([tokens + [0] * (width - len(tokens)) for tokens, _ in sequences])
    labels = torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for _, lab in sequences])
    return ids, labels


def _pair_batch(tmp_path: Path, vocab: int) -> tuple[dict[str, torch.Tensor], list, PackedSplit]:
    """7 random pairs packed and collated as the recipe gets them: (batch, the pairs, the packs)."""
    pairs = _pairs(vocab, 7, seed=3)
    packed = build_pair_packs(_encoded(pairs), max_seq_len=40, pad_id=0)
    assert packed.tokens.shape[0] > 1 and (np.diff(packed.pack_offsets) % 2 == 0).all()  # no pair split
    write_split(tmp_path, "train", packed)
    write_meta(tmp_path, 40, 0, {"train": {}})
    dataset = PackedDataset(tmp_path, "train")
    return collate_pairs([dataset[i] for i in range(len(dataset))]), pairs, packed


def _packed_and_padded(tmp_path: Path, section: dict) -> tuple[tuple[torch.Tensor, int, torch.Tensor], torch.Tensor,
                                                                  torch.Tensor, list[int]]:
    """A LoRA model's DPOObjective on 7 random pairs packed, and torchtune's LoRA DPO recipe's summed log-probs of
    the same pairs (concatenated_forward on the padded batch; reference with adapters disabled): (micro_batch's
    result, policy log-probs [chosen..., rejected...], reference log-probs, each pair's chosen length)."""
    cfg = random_text_config("scout", 5)
    model, _ = _lora_model(cfg, 5, lora_attn_modules=["q_proj", "v_proj"], apply_lora_to_mlp=True,
                           apply_lora_to_output=True)
    batch, pairs, packed = _pair_batch(tmp_path, cfg["vocab_size"])
    result = DPOObjective(section, model).micro_batch(batch)

    ordered = [pairs[i] for i in packed.doc_order.tolist()]
    ids, labels = _padded_concatenated(ordered)
    logps = rlhf.get_batch_log_probs(model(ids), labels)
    with torch.no_grad(), disable_adapter(model):
        reference = rlhf.get_batch_log_probs(model(ids), labels)
    return result, logps, reference, [len(chosen) for _, chosen, _ in ordered]


def test_packed_pairs_give_the_padded_concatenated_forward_loss(tmp_path: Path) -> None:
    section = {"loss": "sigmoid", "beta": 0.1, "label_smoothing": 0.0, "reference": "adapters_off"}
    (loss, count, stats), logps, reference, _ = _packed_and_padded(tmp_path, section)
    half = count
    losses, _, _ = DPOLoss(beta=0.1)(logps[:half], logps[half:], reference[:half], reference[half:])
    assert count == 7
    assert abs(float(loss) - float(losses.sum())) < 1e-6
    assert abs(float(stats[4]) - float(logps[:half].sum())) < 1e-3  # summed chosen log-probs agree too


def test_rpo_adds_alpha_times_the_chosen_responses_mean_token_nll(tmp_path: Path) -> None:
    section = {"loss": "sigmoid", "beta": 0.1, "label_smoothing": 0.0, "rpo_alpha": 0.5, "reference": "adapters_off"}
    (loss, count, _), logps, reference, chosen_lengths = _packed_and_padded(tmp_path, section)
    half = count
    dpo_losses, _, _ = DPOLoss(beta=0.1)(logps[:half], logps[half:], reference[:half], reference[half:])
    nll = -logps[:half] / torch.tensor(chosen_lengths, dtype=logps.dtype)  # per pair: mean over its chosen tokens
    assert float(nll.min()) > 0
    assert abs(float(loss) - float((dpo_losses + 0.5 * nll).sum())) < 1e-5


def test_adapters_off_reference_is_the_base_model_experts_included() -> None:
    cfg = random_text_config("maverick", 7)
    model, base = _lora_model(cfg, 7, lora_attn_modules=["q_proj", "v_proj"], apply_lora_to_mlp=True,
                              apply_lora_to_experts=True)
    from llama4tune import llama4_from_hf_config

    plain = llama4_from_hf_config(cfg).eval()
    plain.load_state_dict(base, strict=True)
    tokens = torch.randint(0, cfg["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = model(tokens)
        with disable_adapter(model):
            off = model(tokens)
        torch.testing.assert_close(off, plain(tokens), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(adapted, off, atol=1e-3)


def test_frozen_copy_reference_scores_the_copy_while_the_whole_policy_trains(tmp_path: Path) -> None:
    """Full fine-tuning's reference: a frozen copy of the base. At the start policy and reference agree (every
    sigmoid loss is log 2); every policy weight gets a gradient, the copy none, and after a step only the policy's
    log-probabilities moved."""
    from llama4tune import llama4_from_hf_config

    cfg = random_text_config("scout", 5)
    torch.manual_seed(5)
    policy = llama4_from_hf_config(cfg)
    reference = llama4_from_hf_config(cfg).requires_grad_(False)
    reference.load_state_dict(policy.state_dict())
    section = {"loss": "sigmoid", "beta": 0.1, "label_smoothing": 0.0, "reference": "frozen_copy"}
    objective = DPOObjective(section, policy, reference)
    batch, _, _ = _pair_batch(tmp_path, cfg["vocab_size"])
    before = objective.reference_logps(batch)
    loss, count, _ = objective.micro_batch(batch)
    assert abs(float(loss) - count * float(np.log(2))) < 1e-5
    loss.backward()
    assert all(p.grad is not None for p in policy.parameters() if p.requires_grad)
    assert all(p.grad is None for p in reference.parameters())
    torch.optim.SGD(policy.parameters(), lr=1.0).step()
    with torch.no_grad():
        moved = objective.forward_logps(batch)
    for still, then, now in zip(objective.reference_logps(batch), before, moved):
        torch.testing.assert_close(still, then)
        assert not torch.allclose(now, then, atol=1e-3)


def test_dpo_objective_refuses_a_reference_it_does_not_have() -> None:
    with pytest.raises(ValueError, match="dpo.reference must be one of adapters_off, frozen_copy"):
        DPOObjective({"loss": "sigmoid", "beta": 0.1, "reference": "precomputed"}, torch.nn.Linear(1, 1))
    with pytest.raises(ValueError, match="frozen_copy, and only it"):
        DPOObjective({"loss": "sigmoid", "beta": 0.1, "reference": "frozen_copy"}, torch.nn.Linear(1, 1))


DPO_PROFILE = ["train.method=dpo", "data.source=embedded/preferences", "data.format=preference"]


@pytest.mark.parametrize("overrides, reason", [
    (["train.dpo.tuning=full"], "reference adapters_off needs tuning lora or qlora"),
    (["train.dpo.tuning=full", "train.dpo.reference=adapters_off"], "full fine-tuning has no adapters"),
    (["train.dpo.reference=frozen_copy"], "frozen_copy with tuning lora holds a second copy"),
    (["train.dpo.tuning=qlora", "train.dpo.reference=frozen_copy"], "use adapters_off"),
    (["train.dpo.tuning=qlora", "train.nproc_per_node=2", "train.expert_parallel=2"], "with method 'qlora'"),
    (["train.dpo.reference=precomputed"], "Input should be 'adapters_off' or 'frozen_copy'"),
])
def test_a_reference_the_tuning_cannot_have_is_refused_at_profile_load(overrides: list[str], reason: str) -> None:
    from finetune.profile import ProfileError, load_profile

    with pytest.raises(ProfileError, match=reason):
        load_profile("tiny-cpu", [*DPO_PROFILE, *overrides])


def test_dpo_tuning_picks_which_weights_train() -> None:
    from finetune.plan.recipe import train_section
    from finetune.profile import load_profile

    full = load_profile("tiny-cpu", [*DPO_PROFILE, "train.dpo.tuning=full", "train.dpo.reference=frozen_copy"]).train
    qlora = load_profile("tiny-cpu", [*DPO_PROFILE, "train.dpo.tuning=qlora"]).train
    assert (full.tuning, full.adapters_only, qlora.tuning, qlora.adapters_only) == ("full", False, "qlora", True)
    assert train_section(full)["method"] == "full" and train_section(full)["dpo"]["reference"] == "frozen_copy"
    assert train_section(qlora)["method"] == "qlora"
