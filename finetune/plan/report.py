"""A plan as rows a person reads: the terminal table of ``finetune plan`` and the markdown the flow posts."""

from __future__ import annotations

from typing import Any


def _gib(value: float) -> str:
    return f"{value:,.1f} GiB" if value >= 0.1 or value == 0 else f"{value * 1024:,.1f} MiB"


def rows(plan: dict[str, Any]) -> list[tuple[str, str]]:
    b = plan["breakdown"]
    out = [
        ("GPUs", f"{plan['nnodes']} x {plan['nproc_per_node']} {plan['gpu']} ({plan['gpu_memory_gib']:g} GiB each)"),
        ("parameters", f"{plan['total_params'] / 1e9:,.2f}B total, {plan['trainable_params'] / 1e6:,.1f}M trainable "
                       f"({plan['method']}, {plan['recipe']['dtype']})"),
        ("precision", plan["precision"]),
        ("FSDP", f"{plan['fsdp_units']} units, largest layer unit {_gib(plan['largest_gathered_unit_gib'])}, root "
                 f"(final norm) {_gib(plan['root_unit_gib'])}, embeddings and output units of their own" if plan["fsdp_units"] else "not sharded"),
        *([("experts", f"expert parallel {plan['expert_parallel']}: {plan['experts_per_gpu']} whole experts per MoE "
                         f"layer per GPU ({_gib(plan['expert_gib_per_gpu'])} in params), never gathered; tokens "
                         "travel to them (all_to_all)")] if plan["expert_parallel"] > 1 else []),
        ("per GPU: params / grads / optimizer",
         f"{_gib(b['params'])} / {_gib(b['grads'])} / {_gib(b['optimizer_states'])}"
         + (" (offloaded to host)" if plan["recipe"]["cpu_offload"] else "")),
        ("per GPU: gathered units + prefetch", f"{_gib(b['gathered_units_and_prefetch'])} (+ unsharded grads "
                                               f"{_gib(b['unsharded_grads_before_reduce_scatter'])})"),
        ("per GPU: activations", f"{_gib(b['activations_kept'])} kept + {_gib(b['activations_backward_working_set'])} "
                                 f"backward + {_gib(b['logits_and_loss'])} logits (seq {plan['recipe']['seq_len']}, "
                                 f"checkpointing {'on' if plan['recipe']['activation_checkpointing'] else 'off'})"),
    ]
    if "cuda_context" in b:
        out.append(("per GPU: NCCL + CUDA context + fragmentation",
                    f"{_gib(b['comm_buffers_nccl'])} + {_gib(b['cuda_context'])} + {_gib(b['allocator_fragmentation'])}"))
    if traced := plan.get("traced"):
        out.append(("traced step per GPU", ", ".join(f"{phase} {_gib(value)}" for phase, value in
                                                    traced["phases_gib"].items())
                    + f" (peak in {traced['peak_phase']}: " + ", ".join(
                        f"{term} {_gib(value)}" for term, value in traced["terms_gib_at_peak"].items() if value)
                    + "; + GPU-only " + ", ".join(f"{name} {_gib(value)}" for name, value in
                                                 traced["gpu_only_gib"].items())
                    + f"; routing {traced['routing']}; traced in {traced['trace_s']:g} s)"))
        out.append(("traced top modules", ", ".join(f"{name} {_gib(value)}"
                                                   for name, value in traced["top_modules_gib"].items())))
        out.append(("formula beside the trace", f"{_gib(plan['formula_peak_gib'])}"
                    + ("; differences over 10%: " + "; ".join(traced["differences_over_10pct"])
                       if traced["differences_over_10pct"] else "")))
    out += [
        ("peak per GPU (training)", f"{_gib(plan['per_gpu_peak_gib'])} of {plan['gpu_memory_gib']:g} GiB "
                                    f"(headroom {plan['headroom_pct']:g}%)"
                                    + (", traced" if plan.get("traced") else ", formula")),
        ("peak per GPU (loading base weights)", _gib(plan["base_weight_load_peak_gib"])),
        ("host RAM per node", f"{_gib(plan['host_memory_gib_per_node'])} of {plan['host_ram_gib_per_node']:g} GiB: "
         + ", ".join(f"{name} {_gib(value)}" for name, value in plan["host_breakdown"].items() if value)),
    ]
    ckpt = plan["checkpoint"]
    estimate = plan["estimate"]
    save = f"{_gib(ckpt['gib_per_save'])} per save every {ckpt['every_steps']} steps" + (
        f" or {ckpt['every_minutes']:g} min, whichever comes first" if ckpt.get("every_minutes") else "")
    if estimate:
        save += (f" (~{estimate['checkpoint_interval_min']:g} min), written in ~{estimate['checkpoint_save_s']:g} s, "
                 f"training stalls ~{estimate['checkpoint_training_stall_s']:g} s"
                 + (" (async)" if ckpt["async"] else ""))
    out.append(("checkpoint", save))
    if reclaim := plan.get("preemption"):
        out += [
            ("spot notice save", f"step + save ~{reclaim['notice_save_needs_s']:g} s vs preemption_grace_s "
                                 f"{reclaim['grace_s']:g} s: " + ("fits" if reclaim["notice_save_fits"] else
                                                                  "does NOT fit (no cloud notice is longer)")
                                 + (f" (fits {', '.join(reclaim['clouds_where_it_fits'])})"
                                    if reclaim["clouds_where_it_fits"] else "")),
            *((f"notice: {row['platform']}", f"{row['delivery']}; {row['notice_s']} s: save "
               + ("fits" if row["save_fits"] else "does NOT fit")
               + ("" if row["heard"] else f"; NOT heard without train.spot_notice={row['poller']}"))
              for row in reclaim["deliveries"]),
            ("per spot reclaim", f"one every ~{reclaim['job_mtbf_h']:g} h for the job: "
                                 f"~{reclaim['lost_per_reclaim_min']:g} min of training lost + "
                                 f"~{reclaim['resume_read_s']:g} s to read the checkpoint back; checkpoints every "
                                 f"~{reclaim['interval_min']:g} min cost {reclaim['save_cost_pct']:g}% in stalls, "
                                 f"{reclaim['overhead_pct']:g}% of wall time with the losses"),
            ("checkpoint interval (Young/Daly)", f"sqrt(2 x stall x MTBF) = {reclaim['young_daly_min']:g} min; "
                                                 f"at step ends{' and after the previous write' if ckpt['async'] else ''}: "
                                                 f"every {reclaim['recommended_interval_min']:g} min "
                                                 f"({reclaim['recommended_overhead_pct']:g}% overhead, "
                                                 f"~{reclaim['recommended_lost_per_reclaim_min']:g} min lost per reclaim)"),
        ]
    serve = plan["serving"]["evaluate_and_benchmark"]
    if serve.get("runs_on") != "cpu":
        for kind in ("bf16", "w4a16"):
            s = serve[kind]
            out.append((f"serving {kind} (vLLM, TP {s['tensor_parallel_size']})",
                        f"{_gib(s['weights_gib_per_gpu'])} weights + {_gib(s['activation_reserve_gib'])} reserve + "
                        f"{_gib(s['kv_cache_gib_per_sequence'])} KV per sequence vs {_gib(s['vllm_budget_gib'])}: "
                        + ("fits" if s["fits"] else "does NOT fit")
                        + ("" if kind in serve.get("served", (kind,)) else " (not served by this profile)")
                        + f", {s['max_sequences_at_max_model_len']} sequences at max_model_len"))
    else:
        out.append(("serving", f"{serve['engine']} on CPU: {_gib(serve['weights_gib'])} in host RAM"))
    quant = plan["serving"]["quantize"]
    out.append(("quantize (llm-compressor AWQ)", f"host {_gib(quant['host_ram_gib'])} of "
                f"{quant['host_ram_available_gib']:g} GiB, GPU per layer {_gib(quant['gpu_gib_per_layer'])}: "
                + ("fits" if quant["fits"] else "does NOT fit")))
    if estimate:
        cost = estimate["cost_per_million_tokens"]
        out += [
            ("step time", f"{estimate['step_s']:g} s ({estimate['bound']}-bound: compute {estimate['compute_s_per_step']:g}"
                          f" s at MFU {plan['constants']['mfu']:g}, communication {estimate['comm_s_per_step']:g} s "
                          f"for {estimate['comm_gib_per_step_per_gpu']:g} GiB per GPU over {estimate['interconnect']})"
                          + (f" + all_to_all {estimate['all_to_all_s_per_step']:g} s for "
                             f"{estimate['all_to_all_gib_per_step_per_gpu']:g} GiB per GPU over "
                             f"{estimate['all_to_all_interconnect']} + expert gradient all-reduce "
                             f"{estimate['expert_grad_all_reduce_s']:g} s" if plan["expert_parallel"] > 1 else "")
                          + (f" + NF4 dequantization {estimate['nf4_dequantize_s_per_step']:g} s for "
                             f"{estimate['nf4_dequantize_gib_per_step']:g} GiB of HBM traffic"
                             if estimate.get("nf4_dequantize_s_per_step") else "")),
            ("per million tokens", f"{estimate['hours_per_million_tokens']:g} h, "
                                   f"{estimate['gpu_hours_per_million_tokens']:g} GPU-h"
                                   + (f", {cost:g} per the profile's price" if cost is not None else "")),
        ]
        if "hours_per_epoch" in estimate:
            out.append(("per epoch", f"{estimate['hours_per_epoch']:g} h ({estimate['gpu_hours_total']:g} GPU-h for "
                                     f"all epochs)"))
    out.append(("fits", f"training {'yes' if plan['fits'] else 'NO'}, serving and quantization "
                        f"{'yes' if plan['serving_fits'] else 'NO'}"))
    return out


def table(plan: dict[str, Any]) -> str:
    """The terminal table, with the plan's notes, knobs and constants under it."""
    lines = [f"plan for profile {plan['profile']}"]
    width = max(len(name) for name, _ in rows(plan))
    lines += [f"  {name:<{width}}  {value}" for name, value in rows(plan)]
    if plan["knobs"]:
        lines.append("  single changes and where they get:")
        lines += [f"    {knob}" for knob in plan["knobs"]]
    lines += [f"  note: {note}" for note in plan["notes"]]
    lines.append("  constants: " + ", ".join(f"{k}={v}" for k, v in plan["constants"].items()))
    lines.append(f"  GPU: {plan['gpu_catalog_entry']['source']}")
    lines.append(f"  activations: {plan['activation_formula']}")
    if plan.get("traced"):
        lines.append("  not in the CPU trace (GPU-only): " + "; ".join(plan["traced"]["gpu_only_not_traced"]))
    return "\n".join(lines)


def markdown(plan: dict[str, Any]) -> str:
    """The same as a markdown table, for a Prefect artifact."""
    lines = [f"### Plan: {plan['profile']}", "", "| | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows(plan)]
    if plan["knobs"]:
        lines += ["", "**Single changes and where they get:**", ""] + [f"- {knob}" for knob in plan["knobs"]]
    lines += [""] + [f"- {note}" for note in plan["notes"]]
    lines += ["", "Constants: " + ", ".join(f"`{k}={v}`" for k, v in plan["constants"].items())]
    return "\n".join(lines) + "\n"
