"""The traced plan calibrated on CPU: for each case, the peak the plan's trace gives for rank 0 of one training step
(finetune/plan/trace.py: fake tensors, fake process group, torch's memory tracker) against the peak the allocator saw
when rank 0 of that step ran for real over gloo (torch profiler's allocation events while the step ran, everything
allocated before it and still live included: finetune/plan/allocator.py). Both run the recipe's same builder,
sharding, expert placement, loss, clipping and AdamW, with the same planned tokens per expert.

    python bench/bench_plan.py [--cases NAME,...]

One line per case, ending in ``traced/measured = <ratio>``; only peaks of at least 1 GiB count as calibration (the
tiny model's are megabytes: printed, not counted).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GIB = 2**30
COUNTS_FROM_BYTES = GIB
# The reduced production shapes: 2 layers (Scout: one RoPE/chunked, one NoPE; Maverick: one dense, one MoE), the
# published hidden, head and expert widths, 4 routed experts instead of 16/128, a 32k vocabulary instead of 202k (the
# embeddings alone would be 3.9 GiB of this shared machine's RAM), 128 tokens.
REDUCED = {"num_hidden_layers": 2, "num_local_experts": 4, "vocab_size": 32768, "no_rope_layers": [1, 0]}
REDUCED_SEQ = ["data.max_seq_len=128"]


@dataclass(frozen=True)
class Case:
    name: str
    profile: str
    overrides: tuple[str, ...]
    shape: str  # "tiny", "scout" or "maverick"


def cases() -> list[Case]:
    out = []
    for world in (1, 2, 4):
        for method in ("full", "lora", "qlora"):
            out.append(Case(f"tiny {method} x{world}", "tiny-cpu",
                            (f"train.method={method}", f"train.nproc_per_node={world}"), "tiny"))
    for world in (2, 4):
        out.append(Case(f"tiny lora x{world} EP=2", "tiny-cpu",
                        ("train.method=lora", f"train.nproc_per_node={world}", "train.expert_parallel=2"), "tiny"))
    one = ("train.nnodes=1", "train.elastic=null", "train.nproc_per_node=1", "train.expert_parallel=1",
           "train.fsdp_cpu_offload=false", *REDUCED_SEQ)
    out.append(Case("reduced Scout lora x1", "scout-lora", one, "scout"))
    out.append(Case("reduced Maverick lora x1", "maverick-lora", one, "maverick"))
    return out


def text_config(profile: Any, shape: str) -> dict[str, Any]:
    from finetune.plan.model import model_config
    from llama4tune.models import MAVERICK_TEXT_CONFIG, SCOUT_TEXT_CONFIG

    if shape == "tiny":
        return dict(model_config(profile).text_config)
    published = SCOUT_TEXT_CONFIG if shape == "scout" else MAVERICK_TEXT_CONFIG
    return {**published, **REDUCED}


def traced_gib(case: Case) -> float:
    from finetune.plan.recipe import recipe_settings
    from finetune.plan.trace import trace
    from finetune.profile import load_profile

    profile = load_profile(case.profile, list(case.overrides))
    raw = trace(profile, text_config(profile, case.shape), recipe_settings(profile), profile.data.max_seq_len)
    return max(sum(terms.values()) for terms in raw["phases"].values()) / GIB


def measured_gib(case: Case, work: Path) -> float:
    """Runs the case's ranks (this script with --rank) over gloo; rank 0's measured peak."""
    from finetune.procs import free_port
    from finetune.profile import load_profile

    world = load_profile(case.profile, list(case.overrides)).train.world_size
    out = work / "rank0.json"
    env = os.environ | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world),
                        "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    procs = []
    for rank in range(world):
        with open(work / f"rank{rank}.log", "w") as log:
            procs.append(subprocess.Popen([sys.executable, __file__, "--rank", json.dumps(case.__dict__), str(out)],
                                          env=env | {"RANK": str(rank)}, stdout=subprocess.DEVNULL, stderr=log))
    codes = [proc.wait(timeout=900) for proc in procs]
    if any(codes):
        raise SystemExit(f"{case.name}: ranks exited {codes}; see {work}/rank*.log")
    return json.loads(out.read_text())["peak_bytes"] / GIB


def rank_main(case: Case, out: Path) -> None:
    """One rank of a measured case: the recipe's step on real tensors; rank 0 writes its allocator peak."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.profiler import record_function

    from finetune.plan.allocator import window_peak_bytes
    from finetune.plan.recipe import recipe_settings
    from finetune.plan.trace import run_step, step_parts
    from finetune.profile import load_profile
    from tunerecipes import expert_parallel

    profile = load_profile(case.profile, list(case.overrides))
    settings = recipe_settings(profile)
    world = profile.train.world_size
    mesh = ep_mesh = None
    if world > 1:
        dist.init_process_group("gloo")
        mesh = init_device_mesh("cpu", (world,))
        if settings.expert_parallel > 1:
            ep_mesh = expert_parallel.mesh("cpu", world, settings.expert_parallel)

    def build_and_step() -> None:
        parts = step_parts(profile, text_config(profile, case.shape), settings, profile.data.max_seq_len, mesh,
                           ep_mesh)
        with record_function("bench_plan.step"):
            run_step(parts, lambda phase: None)

    _, peak = window_peak_bytes(build_and_step, "bench_plan.step")
    if world == 1 or dist.get_rank() == 0:
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"peak_bytes": peak}))
        tmp.replace(out)
    if world > 1:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", help="comma-separated case names (default: all)")
    parser.add_argument("--rank", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank:
        rank_main(Case(**{**json.loads(args.rank[0]), "overrides": tuple(json.loads(args.rank[0])["overrides"])}),
                  Path(args.rank[1]))
        return
    wanted = set(args.cases.split(",")) if args.cases else None
    for case in cases():
        if wanted and case.name not in wanted:
            continue
        with tempfile.TemporaryDirectory(prefix="bench-plan-") as work:
            measured = measured_gib(case, Path(work))
        traced = traced_gib(case)
        counts = "counts" if max(traced, measured) * GIB >= COUNTS_FROM_BYTES else "< 1 GiB, not counted"
        print(f"{case.name}: traced {traced * 1024:.1f} MiB, measured {measured * 1024:.1f} MiB ({counts}); "
              f"traced/measured = {traced / measured:.3f}", flush=True)


if __name__ == "__main__":
    main()
