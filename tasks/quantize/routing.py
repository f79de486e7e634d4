"""Calibration tokens per routed expert: how many calibration tokens the router sent to each expert of each MoE layer.

Why: AWQ's scales for an expert come from the activations it sees. The stage calibrates every expert on every token
(``moe_calibrate_all_experts``), which keeps experts the router rarely picks from being skipped (llm-compressor
issue 2060, Maverick) or getting NaN scales (2101); what the router does with the calibration set is still the
evidence of whether it resembles the traffic an expert will serve. Experts under ``quantize.min_tokens_per_expert``
routed tokens are named in the artifact, the stage's table and its log.

Counting: a forward hook on each router reads its logits and takes the top-k. llm-compressor's sequential pipeline
runs a layer over the calibration batches first and only then its AWQ grid search and the propagation pass, so each
router counts the first ``samples x seq_len`` tokens it sees and ignores later calls (and fx tracing's proxies).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class _Router:
    top_k: int
    counts: torch.Tensor
    seen: int = 0


@dataclass
class RoutingCounter:
    """Hooks on every ``*.feed_forward.router`` of a transformers Llama 4 model; ``remove()`` when done."""

    tokens: int
    """Calibration tokens (samples x seq_len): each router counts this many, its calibration forward."""
    routers: dict[str, _Router] = field(default_factory=dict)
    handles: list[Any] = field(default_factory=list)

    @classmethod
    def attach(cls, model: torch.nn.Module, tokens: int) -> RoutingCounter:
        counter = cls(tokens)
        for name, module in model.named_modules():
            if name.endswith("feed_forward.router") and hasattr(module, "top_k"):
                counter.routers[name] = _Router(int(module.top_k), torch.zeros(int(module.out_features),
                                                                               dtype=torch.int64))
                counter.handles.append(module.register_forward_hook(counter._hook(name)))
        return counter

    def _hook(self, name: str) -> Any:
        state = self.routers[name]

        def count(module: torch.nn.Module, inputs: Any, output: Any) -> None:
            logits = output[1] if isinstance(output, tuple) else output  # Llama4Router: (scores, logits)
            if not isinstance(logits, torch.Tensor) or logits.device.type == "meta" or state.seen >= self.tokens:
                return
            logits = logits.reshape(-1, logits.shape[-1])[: self.tokens - state.seen]
            chosen = torch.topk(logits, state.top_k, dim=-1).indices.reshape(-1).cpu()
            state.counts += torch.bincount(chosen, minlength=state.counts.numel())
            state.seen += logits.shape[0]

        return count

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def report(self, floor: int) -> dict[str, Any]:
        """The artifact's ``calibration_routing``: tokens per expert per MoE layer and the experts under ``floor``."""
        layers = {name.removesuffix(".feed_forward.router"): state.counts.tolist()
                  for name, state in self.routers.items()}
        below = [{"layer": layer, "expert": expert, "tokens": tokens}
                 for layer, counts in layers.items() for expert, tokens in enumerate(counts) if tokens < floor]
        every = [tokens for counts in layers.values() for tokens in counts]
        return {
            "min_tokens_per_expert": floor,
            "tokens_per_expert": layers,
            "fewest_tokens": min(every) if every else None,
            "most_tokens": max(every) if every else None,
            "experts": len(every),
            "experts_below_floor": below,
            "all_experts_calibrated_on_every_token": True,  # moe_calibrate_all_experts
        }

    def table(self, floor: int) -> list[dict[str, Any]]:
        """One row per MoE layer for the UI."""
        rows = []
        for name, state in self.routers.items():
            counts = state.counts.tolist()
            rows.append({"layer": name.removesuffix(".feed_forward.router"), "experts": len(counts),
                         "fewest tokens": min(counts), "most tokens": max(counts),
                         f"experts under {floor}": sum(1 for tokens in counts if tokens < floor)})
        return rows
