"""Llama 4 mixture-of-experts feed-forward: sigmoid top-k router, routed experts, shared expert.

Semantics follow transformers 5.17's Llama4TextMoe: the router takes the top-k logits per token,
their sigmoid is the score, the score multiplies the expert *input*, and the shared expert's output
is added to the routed outputs. Expert weights keep HF's fused layout (`gate_up_proj` [E, D, 2I],
gate first, and `down_proj` [E, I, D]) so conversion is a rename, bit-exact in both directions.

Experts run as grouped matrix products (`torch._grouped_mm`) over tokens sorted by expert where
the device/dtype/alignment supports it, and as a per-expert loop otherwise; both give the same maths.

Expert parallelism (tunerecipes/expert_parallel.py places the experts): each rank of an EP group holds E/N experts
whole (DTensor shards of the [E, ...] weights); routing stays local, and the routed tokens travel to their experts'
owners and back with two autograd-capable ``all_to_all_single`` exchanges (uneven splits), not the weights.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.nn.functional import all_to_all_single
from torch._subclasses.fake_tensor import is_fake
from torch.distributed.tensor import DTensor
from torchtune.modules.peft import AdapterModule


# Tokens per expert for a layer routing ``rows`` (token, expert) pairs over E experts, in place of counting them:
# `finetune plan` traces the step on fake tensors, which carry shapes, not routing decisions (finetune/plan/trace.py).
RoutingCounts = Callable[[int, int], list[int]]
_PLANNED_ROUTING: contextvars.ContextVar[RoutingCounts | None] = contextvars.ContextVar("routing", default=None)


@contextlib.contextmanager
def planned_routing(counts: RoutingCounts) -> Iterator[None]:
    """Every MoE layer run inside takes its tokens per expert from ``counts`` (E, rows) instead of its router's
    choices (the router still runs); under expert parallelism every rank is taken to route alike."""
    token = _PLANNED_ROUTING.set(counts)
    try:
        yield
    finally:
        _PLANNED_ROUTING.reset(token)


def split_sizes(counts: torch.Tensor) -> list[int]:
    """counts as Python ints: the planned ones a planned_routing layer attached (fake tensors hold no data)."""
    return getattr(counts, "planned", None) or counts.tolist()


def _planned(values: list[int], device: torch.device) -> torch.Tensor:
    counts = torch.tensor(values, device=device)
    counts.planned = values  # type: ignore[attr-defined]
    return counts


def grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether torch._grouped_mm can multiply x [T, K] by w [E, K, N] here.

    CPU runs fp32 and bf16; CUDA needs bf16 on sm90+. Every row stride must be a multiple of
    16 bytes (measured: a bf16 [E, 8, 12] weight fails with "strides should be multiple of 16 bytes").
    """
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cpu":
        # fp32 too, but not on fake tensors (finetune plan's trace): their shape rule is CUDA's, bf16 only.
        dtype_ok = x.dtype == torch.bfloat16 or (x.dtype == torch.float32 and not is_fake(x))
    elif x.device.type == "cuda":
        dtype_ok = x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)
    else:
        dtype_ok = False
    size = x.element_size()
    return dtype_ok and w.dtype == x.dtype and (x.shape[-1] * size) % 16 == 0 and (w.shape[-1] * size) % 16 == 0


def expert_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, use_grouped_mm: bool) -> torch.Tensor:
    """Row block e of x (counts[e] rows, blocks in expert order) times w[e]; returns [T, N]."""
    if use_grouped_mm and grouped_mm_supported(x, w):
        offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
        return torch._grouped_mm(x, w, offs=offs)
    blocks = torch.split(x, split_sizes(counts))
    return torch.cat([block @ w[e] for e, block in enumerate(blocks)], dim=0)


class GroupedExperts(nn.Module):
    """E SwiGLU experts in HF Llama 4 layout; forward takes tokens already grouped by expert.

    Under expert parallelism ``ep_group`` is set and each weight is a DTensor of which this rank holds E/N whole
    experts: forward then takes the tokens of its own experts only (counts has E/N entries)."""

    ep_group: dist.ProcessGroup | None = None

    def __init__(self, *, dim: int, hidden_dim: int, num_experts: int, use_grouped_mm: bool = True) -> None:
        super().__init__()
        self.dim = dim
        self.hidden_dim = hidden_dim
        self.num_experts = num_experts
        self.use_grouped_mm = use_grouped_mm
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, dim, 2 * hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # torch.empty would leave NaNs/garbage in untouched experts; HF initialises with N(0, 0.02).
        nn.init.normal_(self.gate_up_proj, std=0.02)
        nn.init.normal_(self.down_proj, std=0.02)

    def _weight(self, name: str) -> torch.Tensor:
        """This rank's experts of weight ``name`` (all of them without expert parallelism)."""
        weight = getattr(self, name)
        return weight.to_local() if isinstance(weight, DTensor) else weight

    def _base(self, x: torch.Tensor, which: str, counts: torch.Tensor) -> torch.Tensor:
        """x times the frozen-or-trained base weight ``which``; the NF4 experts (llama4tune/nf4.py) override it."""
        return expert_matmul(x, self._weight(which), counts, self.use_grouped_mm)

    def _project(self, x: torch.Tensor, which: str, counts: torch.Tensor) -> torch.Tensor:
        return self._base(x, which, counts)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [T, D] sorted by expert, counts [E] tokens per expert -> [T, D]."""
        gate, up = self._project(x, "gate_up_proj", counts).chunk(2, dim=-1)
        return self._project(F.silu(gate) * up, "down_proj", counts)


class LoRAGroupedExperts(GroupedExperts, AdapterModule):
    """GroupedExperts with a rank-r adapter per expert on gate_up_proj and down_proj.

    Delta for expert e: (alpha / rank) * lora_<w>_a[e] @ lora_<w>_b[e], same shape as <w>[e].
    """

    def __init__(
        self,
        *,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_grouped_mm: bool = True,
    ) -> None:
        super().__init__(dim=dim, hidden_dim=hidden_dim, num_experts=num_experts, use_grouped_mm=use_grouped_mm)
        self.rank = rank
        self.alpha = alpha
        self.dropout = nn.Dropout(p=dropout) if dropout > 0.0 else nn.Identity()
        self.lora_gate_up_a = nn.Parameter(torch.empty(num_experts, dim, rank))
        self.lora_gate_up_b = nn.Parameter(torch.empty(num_experts, rank, 2 * hidden_dim))
        self.lora_down_a = nn.Parameter(torch.empty(num_experts, hidden_dim, rank))
        self.lora_down_b = nn.Parameter(torch.empty(num_experts, rank, dim))
        self.disabled = False  # torchtune's disable_adapter sets it: the base experts alone (DPO's reference)
        self.initialize_parameters()

    def initialize_parameters(self) -> None:
        # Same scheme as torchtune's LoRALinear: A ~ kaiming-uniform(a=sqrt(5)) per expert, B = 0.
        for a in (self.lora_gate_up_a, self.lora_down_a):
            bound = 1.0 / math.sqrt(a.shape[1])
            nn.init.uniform_(a, -bound, bound)
        nn.init.zeros_(self.lora_gate_up_b)
        nn.init.zeros_(self.lora_down_b)

    def adapter_params(self) -> list[str]:
        return ["lora_gate_up_a", "lora_gate_up_b", "lora_down_a", "lora_down_b"]

    def _project(self, x: torch.Tensor, which: str, counts: torch.Tensor) -> torch.Tensor:
        base = self._base(x, which, counts)
        if self.disabled:
            return base
        name = which.removesuffix("_proj")
        a, b = self._weight(f"lora_{name}_a"), self._weight(f"lora_{name}_b")
        low = expert_matmul(self.dropout(x), a, counts, self.use_grouped_mm)
        return base + (self.alpha / self.rank) * expert_matmul(low, b, counts, self.use_grouped_mm)


class TrainableRouter(nn.Linear, AdapterModule):
    """Router whose weight counts as an adapter parameter, so LoRA recipes train (and save) it."""

    def adapter_params(self) -> list[str]:
        return ["weight"]


class Llama4MoE(nn.Module):
    """Token-choice MoE: sigmoid(top-k router logits) scales the input of each chosen expert."""

    def __init__(self, *, router: nn.Linear, experts: GroupedExperts, shared_expert: nn.Module, top_k: int = 1) -> None:
        super().__init__()
        if not 1 <= top_k <= experts.num_experts:
            raise ValueError(f"top_k must be in [1, {experts.num_experts}], got {top_k}")
        self.router = router
        self.experts = experts
        self.shared_expert = shared_expert
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.router(x)
        top_logits, top_experts = torch.topk(logits, self.top_k, dim=1)
        scores = torch.sigmoid(top_logits.float()).to(x.dtype)
        flat_experts = top_experts.reshape(-1)
        # Stable sort keeps token order inside each expert's block (deterministic outputs).
        order = torch.argsort(flat_experts, stable=True)
        token_idx = torch.div(order, self.top_k, rounding_mode="floor")
        routed_in = x[token_idx] * scores.reshape(-1)[order, None]
        planned = _PLANNED_ROUTING.get()
        split = planned(self.experts.num_experts, flat_experts.numel()) if planned else None
        # bincount, not histc: histc has no CPU kernel for integer tensors.
        counts = torch.bincount(flat_experts, minlength=self.experts.num_experts) if split is None \
            else _planned(split, x.device)
        if self.experts.ep_group is None:
            routed_out = self.experts(routed_in, counts)
        else:
            routed_out = run_on_owners(self.experts, routed_in, counts, self.experts.ep_group, split)
        out = self.shared_expert(x).index_add(0, token_idx, routed_out)
        return out.reshape(shape)


def _exchange(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    """Rows of x, in_splits[r] of them to rank r, swapped for out_splits[r] rows from each rank r (autograd: the
    backward sends the gradients back the same way)."""
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    return all_to_all_single(out, x, out_splits, in_splits, group=group)


def run_on_owners(experts: GroupedExperts, x: torch.Tensor, counts: torch.Tensor,
                  group: dist.ProcessGroup, planned: list[int] | None = None) -> torch.Tensor:
    """Expert parallelism: x [T, D] sorted by global expert with counts [E] -> the experts' outputs, same order.

    Rank r of the group owns experts [r*E/N, (r+1)*E/N): x's rows are already in destination order. The counts go
    first (each owner learns how many rows of each of its experts every rank sends), then the rows; the owner runs
    them grouped by expert (stable, so rows keep their source order) and sends the outputs back.

    ``planned``: counts as planned_routing gave them; every source is taken to route alike, so this rank receives
    its own experts' planned counts from each source."""
    n = dist.get_world_size(group)
    local = experts.num_experts // n
    if planned is None:
        received_counts = torch.empty_like(counts)  # [source, own expert], flattened
        dist.all_to_all_single(received_counts, counts, group=group)
        send = counts.view(n, local).sum(dim=1).tolist()
        receive = received_counts.view(n, local).sum(dim=1).tolist()
    else:
        own = planned[dist.get_rank(group) * local:][:local]
        received_counts = _planned(own * n, x.device)
        send = [sum(planned[source * local:(source + 1) * local]) for source in range(n)]
        receive = [sum(own)] * n
    by_source = received_counts.view(n, local)
    rows = _exchange(x, receive, send, group)
    expert_of_row = torch.repeat_interleave(torch.arange(local, device=x.device).repeat(n), received_counts,
                                            output_size=sum(receive))
    order = torch.argsort(expert_of_row, stable=True)
    mine = by_source.sum(dim=0) if planned is None else _planned([count * n for count in own], x.device)
    out = experts(rows[order], mine)
    return _exchange(out[torch.argsort(order)], send, receive, group)
