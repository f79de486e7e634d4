"""The accelerators a plan can be made for, and the constants every estimate rests on.

One table, so that a measurement on a real GPU can calibrate it in one place. Figures are the vendors' published
numbers (dense bf16, no sparsity) and typical 8-GPU cloud nodes; the names say where each comes from.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

GIB = 2**30
GB = 1e9


@dataclass(frozen=True)
class Accelerator:
    name: str
    hbm_gib: float
    """Memory a process can allocate (nvidia-smi's total less what the driver keeps)."""
    bf16_dense_tflops: float
    intra_node_gbps: float
    """GB/s per GPU, one direction, inside a node (NVLink)."""
    inter_node_gbps: float
    """GB/s per GPU, one direction, between nodes (the node's NICs divided by its GPUs)."""
    host_to_device_gbps: float
    """GB/s per GPU between host RAM and HBM (PCIe), what FSDP CPU offload moves through."""
    host_ram_gib_per_node: float
    """Host RAM of the usual 8-GPU node of this type."""
    hbm_gbps: float = 0.0
    """GB/s of HBM bandwidth, what QLoRA's dequantization streams through."""
    skypilot_name: str = ""
    """SkyPilot's accelerator name for it (``A100`` alone is the 40 GB one)."""
    gpus_per_node: int = 8
    source: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


CATALOG: dict[str, Accelerator] = {
    accelerator.name: accelerator
    for accelerator in (
        Accelerator(
            name="H100-80GB", hbm_gib=79.6, bf16_dense_tflops=989.0, intra_node_gbps=450.0, inter_node_gbps=50.0,
            host_to_device_gbps=50.0, host_ram_gib_per_node=1800.0, skypilot_name="H100",
            hbm_gbps=3350.0,
            source="H100 SXM5 datasheet (989 TFLOPS dense bf16, 3.35 TB/s HBM3, NVLink 4 900 GB/s bidirectional); 8x400 Gb/s "
                   "InfiniBand/EFA per node; PCIe Gen5 x16; host RAM of AWS p5 (2048 GiB), GCP a3-highgpu "
                   "(1872 GB), Azure ND H100 v5 (1900 GiB), rounded down",
        ),
        Accelerator(
            name="H200-141GB", hbm_gib=139.8, bf16_dense_tflops=989.0, intra_node_gbps=450.0, inter_node_gbps=50.0,
            host_to_device_gbps=50.0, host_ram_gib_per_node=1800.0, skypilot_name="H200",
            hbm_gbps=4800.0,
            source="H200 SXM datasheet (141 GB HBM3e at 4.8 TB/s, same compute as H100, NVLink 4); 8x400 Gb/s per node; "
                   "host RAM of AWS p5en (2048 GiB), Azure ND H200 v5 (1850 GiB), rounded down",
        ),
        Accelerator(
            name="A100-80GB", hbm_gib=79.2, bf16_dense_tflops=312.0, intra_node_gbps=300.0, inter_node_gbps=25.0,
            host_to_device_gbps=25.0, host_ram_gib_per_node=1100.0, skypilot_name="A100-80GB",
            hbm_gbps=2039.0,
            source="A100 SXM4 80GB datasheet (312 TFLOPS bf16, 2.04 TB/s HBM2e, NVLink 3 600 GB/s bidirectional); 8x200 Gb/s per "
                   "node; PCIe Gen4; host RAM of AWS p4de (1152 GiB)",
        ),
    )
}


# What a CUDA profile without train.gpu_type is sized for (the plan, the SkyPilot task, the pool's job).
DEFAULT_GPU_TYPE = "H100-80GB"


@dataclass(frozen=True)
class Constants:
    """Every assumption an estimate makes, reported with the estimate."""

    mfu: float = 0.35
    """Model FLOPs utilisation of a step's compute (tuned MoE training reaches 0.3-0.45 on H100)."""
    collective_efficiency: float = 0.7
    hbm_efficiency: float = 0.7
    """Share of the HBM bandwidth the elementwise and gather kernels of NF4 dequantization achieve."""
    """Share of the link bandwidth NCCL's ring collectives achieve (bus bandwidth / link bandwidth)."""
    cuda_context_gib: float = 1.0
    """CUDA context, cuBLAS/cuDNN workspaces per process."""
    nccl_buffers_gib: float = 1.0
    """NCCL's own channel buffers per process."""
    fragmentation: float = 0.05
    """Caching-allocator fragmentation, as a share of what the step allocates."""
    host_process_gib: float = 4.0
    """Host RAM of one trainer process besides tensors (Python, torch, CUDA host runtime, dataloader)."""
    host_process_gib_cpu: float = 1.0
    """The same for a CPU trainer process (no CUDA runtime): a 16-process gloo run of the maverick-shaped embedded
    model (LoRA, expert parallel 16) peaked at 11.7 GiB RSS in all, ~0.7 GiB per process with its tensors."""
    host_optimizer_gbps: float = 20.0
    """Bytes/s one trainer process streams through the CPU optimizer step under FSDP CPU offload. The recipe gives
    each process cores / processes torch threads (torchrun's OMP_NUM_THREADS=1 would leave it one core, ~8 GB/s);
    a 96-192-core GPU node's ~300 GB/s of DRAM bandwidth shared by 8 processes bounds it at ~35 GB/s."""
    checkpoint_write_gbps_per_node: float = 2.0
    """GB/s one node writes a DCP checkpoint to the shared store (network filesystem or object store)."""
    checkpoint_read_gbps_per_node: float = 2.0
    """GB/s one node reads the base checkpoint from the store."""
    spot_reclaim_mtbf_h: float = 24.0
    """Mean hours between spot reclaims of one GPU node (plan.spot_reclaim_mtbf_h), for the checkpoint interval
    (finetune/plan/preemption.py). An assumption, to be replaced by a pool's own history: AWS's Spot Instance Advisor
    only says most GPU types lose more than 20% of instances a month (an MTBF of weeks if taken as a rate), but GPU
    spot capacity is reclaimed in bursts when it runs short, so a day per node is the pessimistic planning figure.
    The interval grows with its square root: 4x this doubles it."""
    vllm_activation_reserve_gib: float = 6.0
    """vLLM's profiling-run peak (max_num_batched_tokens 8192: activations, sampler logits) and CUDA graphs."""
    awq_cached_activation_copies: float = 3.0
    """Copies of a layer's calibration inputs AWQ keeps on the GPU while it searches scales (inputs, fp
    reference outputs, the candidate's outputs)."""
    quantize_host_overhead: float = 1.1
    """Host RAM of llm-compressor over the bf16 weights it holds (unpacked expert copies of one layer, calibration
    cache, Python)."""
    logits_chunks: int = 8
    """CEWithChunkedOutputLoss's num_output_chunks (profiles/recipes/sft.yaml's loss)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def unknown(gpu_type: str) -> str | None:
    """Why ``gpu_type`` cannot be planned for (listing the known ones), else None."""
    return None if gpu_type in CATALOG else f"unknown GPU type {gpu_type!r}; known: {', '.join(CATALOG)}"


def lookup(gpu_type: str | None) -> Accelerator:
    """The catalog entry for ``train.gpu_type`` (DEFAULT_GPU_TYPE when unset); an unknown type lists the known
    ones. (A plain ValueError: finetune.profile checks the type with this module, so it imports nothing of ours.)"""
    name = gpu_type or DEFAULT_GPU_TYPE
    if reason := unknown(name):  # profiles are checked when they load; a profile built in code may not be
        raise ValueError(f"train.gpu_type: {reason}")
    return CATALOG[name]


def this_machine() -> Accelerator:
    """CPU profiles run in this machine's RAM: the 'accelerator' is the host itself."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    return Accelerator(name="cpu (this machine)", hbm_gib=round(ram, 1), bf16_dense_tflops=0.0, intra_node_gbps=0.0,
                       inter_node_gbps=0.0, host_to_device_gbps=0.0, host_ram_gib_per_node=round(ram, 1),
                       gpus_per_node=1, source="os.sysconf(SC_PHYS_PAGES)")
