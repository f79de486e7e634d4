"""Conversion benchmark: our streaming convert vs `cp` of the same bytes vs the naive load-all-then-save path.

    python bench/bench_convert.py [--size-gb 4.3] [--repeats 3] [--shard-size 1GB] [--dir /tmp]

Builds a synthetic Llama-4-shaped bf16 checkpoint (real key names and MoE shapes, fewer layers) once in DCP and once
as HF safetensors shards, then times, each in a fresh process with its source out of the page cache (drop_caches
when allowed, else posix_fadvise DONTNEED on the source files):
- cp:     `cp -r` of the source directory, then `sync` of the copies (the same durability our fsyncs give);
- ours:   tasks.convert.checkpoint.convert_checkpoint (DCP -> HF and HF -> HF);
- naive:  load the whole state dict (dcp.load / safetensors load_file), then huggingface_hub.save_torch_state_dict,
          then `sync` of the outputs.
Peak RSS is GNU time's max resident set of each process (Python ones include the ~0.3 GB torch import, reported
separately). Medians over repeats; the ratio lines come last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Llama-4-shaped text decoder (Scout's vocab and MoE layout, narrower and shallower so it fits a laptop disk).
SHAPE = {"vocab": 202048, "hidden": 2048, "experts": 16, "expert_inter": 2048, "heads": 16, "kv_heads": 8,
         "head_dim": 128}


def tune_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    s = SHAPE
    d, e, i, hd = s["hidden"], s["experts"], s["expert_inter"], s["head_dim"]
    out: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (s["vocab"], d)}
    for n in range(layers):
        p = f"layers.{n}."
        out |= {
            p + "sa_norm.scale": (d,), p + "mlp_norm.scale": (d,),
            p + "attn.q_proj.weight": (s["heads"] * hd, d), p + "attn.k_proj.weight": (s["kv_heads"] * hd, d),
            p + "attn.v_proj.weight": (s["kv_heads"] * hd, d), p + "attn.output_proj.weight": (d, s["heads"] * hd),
            p + "mlp.router.weight": (e, d),
            p + "mlp.experts.gate_up_proj": (e, d, 2 * i), p + "mlp.experts.down_proj": (e, i, d),
            p + "mlp.shared_expert.w1.weight": (i, d), p + "mlp.shared_expert.w3.weight": (i, d),
            p + "mlp.shared_expert.w2.weight": (d, i),
        }
    return out | {"norm.scale": (d,), "output.weight": (s["vocab"], d)}


def layers_for(size_gb: float) -> int:
    def nbytes(layers: int) -> int:
        total = 0
        for shape in tune_shapes(layers).values():
            n = 2
            for x in shape:
                n *= x
            total += n
        return total

    layers = 1
    while nbytes(layers) < size_gb * 1e9:
        layers += 1
    return layers


# -- child processes ---------------------------------------------------------------------------------------------

def _vmrss_mb() -> float:
    line = next(line for line in open("/proc/self/status") if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def make(dst: Path, layers: int) -> None:
    import torch
    import torch.distributed.checkpoint as dcp
    from huggingface_hub import save_torch_state_dict

    from llama4tune.convert import tune_to_hf_key

    torch.set_num_threads(1)
    # Distinct constant per tensor: nothing on the I/O path compresses, so values only need to tell tensors apart.
    state = {k: torch.full(shape, (n % 97) / 97, dtype=torch.bfloat16)
             for n, (k, shape) in enumerate(tune_shapes(layers).items())}
    dcp.save(state, checkpoint_id=dst / "dcp", no_dist=True)
    # HF-format source in the trainer's default 5GB-shard layout, named as HF names them.
    (dst / "hf").mkdir()
    save_torch_state_dict({tune_to_hf_key(k): v for k, v in state.items()}, dst / "hf", max_shard_size="5GB")
    print(json.dumps({"bytes": sum(t.numel() * 2 for t in state.values()), "tensors": len(state)}))


def ours(src: Path, dst: Path, shard_size: str) -> None:
    import torch

    from llama4tune.convert import tune_to_hf_key
    from tasks.convert.checkpoint import convert_checkpoint
    from tasks.convert.shards import parse_size
    from tasks.convert.sources import open_source

    source = open_source(src)
    baseline = _vmrss_mb()
    dcp_layout = (src / ".metadata").is_file()
    started = time.perf_counter()
    result = convert_checkpoint(source, dst, key_map=tune_to_hf_key if dcp_layout else (lambda k: k),
                                dtype=torch.bfloat16, max_shard_bytes=parse_size(shard_size))
    print(json.dumps({"seconds": time.perf_counter() - started, "baseline_mb": baseline,
                      "bytes": result.bytes_written}))


def naive(src: Path, dst: Path, shard_size: str) -> None:
    import torch
    from huggingface_hub import save_torch_state_dict

    from llama4tune.convert import tune_to_hf_key

    baseline = _vmrss_mb()
    started = time.perf_counter()
    if (src / ".metadata").is_file():
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemReader

        metadata = FileSystemReader(src).read_metadata()
        state = {k: torch.empty(md.size, dtype=md.properties.dtype) for k, md in metadata.state_dict_metadata.items()}
        dcp.load(state, checkpoint_id=src, no_dist=True)
        state = {tune_to_hf_key(k): v for k, v in state.items()}
    else:
        from safetensors.torch import load_file

        state = {}
        for shard in sorted(src.glob("*.safetensors")):
            state.update(load_file(shard))
    dst.mkdir()
    save_torch_state_dict(state, dst, max_shard_size=shard_size)
    subprocess.run(["sync", *map(str, sorted(dst.iterdir()))], check=True)
    print(json.dumps({"seconds": time.perf_counter() - started, "baseline_mb": baseline,
                      "bytes": sum(t.numel() * t.element_size() for t in state.values())}))


# -- driver ------------------------------------------------------------------------------------------------------

def _drop_caches(sources: list[Path]) -> bool:
    """Every run starts with its source out of the page cache. Without root (containers) drop_caches is refused:
    then each source file's clean pages are evicted with posix_fadvise(DONTNEED), which needs no privilege. Without
    either, what a run finds cached depends on what ran before it (measured with fincore in a repeat: the DCP source
    wholly cached, the HF source not at all), and a method's throughput swung 2x between repeats with it."""
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        pass
    for path in (p for source in sources for p in sorted(source.rglob("*")) if p.is_file()):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def _timed(cmd: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MB, stdout) of cmd run under GNU time."""
    with tempfile.NamedTemporaryFile("r") as report:
        started = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", report.name, *cmd], cwd=REPO,
                              capture_output=True, text=True)
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            raise RuntimeError(f"{cmd[:4]} failed: {proc.stderr[-2000:]}")
        return wall, int(report.read().strip().splitlines()[-1]) / 1024, proc.stdout


def _run_cp(src: Path, dst: Path) -> dict[str, float]:
    wall, rss, _ = _timed(["cp", "-r", str(src), str(dst)])
    started = time.perf_counter()
    subprocess.run(["sync", *map(str, sorted(dst.iterdir()))], check=True)
    return {"seconds": wall + time.perf_counter() - started, "seconds_no_sync": wall, "peak_mb": rss,
            "baseline_mb": 0.0}


def _run_py(kind: str, src: Path, dst: Path, shard_size: str) -> dict[str, float]:
    wall, rss, out = _timed([sys.executable, __file__, kind, str(src), str(dst), "--shard-size", shard_size])
    report = json.loads(out.strip().splitlines()[-1])
    return {"seconds": report["seconds"], "process_seconds": wall, "peak_mb": rss, "baseline_mb": report["baseline_mb"]}


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", nargs="?", choices=["make", "ours", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("src", nargs="?", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("dst", nargs="?", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--size-gb", type=float, default=4.3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shard-size", default="1GB")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--layers", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.kind == "make":
        return make(args.src, args.layers)
    if args.kind == "ours":
        return ours(args.src, args.dst, args.shard_size)
    if args.kind == "naive":
        return naive(args.src, args.dst, args.shard_size)

    work = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=args.dir))
    try:
        layers = layers_for(args.size_gb)
        print(f"building a {args.size_gb} GB synthetic Llama-4-shaped bf16 checkpoint ({layers} layers) in {work}",
              flush=True)
        subprocess.run([sys.executable, __file__, "make", str(work), "--layers", str(layers)], cwd=REPO, check=True,
                       stdout=subprocess.DEVNULL)
        sizes = {"dcp": _dir_bytes(work / "dcp"), "hf": _dir_bytes(work / "hf")}
        runs: dict[str, list[dict[str, float]]] = {}
        cold = True
        for repeat in range(args.repeats):
            for name, src in (("cp (dcp files)", "dcp"), ("ours dcp->hf", "dcp"), ("naive dcp->hf", "dcp"),
                              ("cp (hf files)", "hf"), ("ours hf->hf", "hf"), ("naive hf->hf", "hf")):
                out = work / "out"
                cold = _drop_caches([work / "dcp", work / "hf"]) and cold
                if name.startswith("cp"):
                    stats = _run_cp(work / src, out)
                else:
                    stats = _run_py(name.split()[0], work / src, out, args.shard_size)
                stats["mb_per_s"] = sizes[src] / 1e6 / stats["seconds"]
                runs.setdefault(name, []).append(stats)
                print(f"  repeat {repeat + 1} {name:15s} {stats['seconds']:7.2f} s {stats['mb_per_s']:8.1f} MB/s "
                      f"peak RSS {stats['peak_mb']:8.1f} MB", flush=True)
                shutil.rmtree(out)
        _report(runs, sizes, args, cold)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _report(runs: dict[str, list[dict[str, float]]], sizes: dict[str, int], args: argparse.Namespace,
            cold: bool) -> None:
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    print(f"\ncheckpoint: DCP {sizes['dcp'] / 1e9:.2f} GB, HF {sizes['hf'] / 1e9:.2f} GB; output shards "
          f"{args.shard_size}; medians of {args.repeats}; page cache "
          f"{'dropped (or the sources evicted)' if cold else 'NOT dropped'} before each run")
    print(f"{'method':16s} {'seconds':>8s} {'MB/s':>8s} {'peak RSS MB':>12s} {'above import MB':>16s}")
    for name, m in med.items():
        above = m["peak_mb"] - m["baseline_mb"]
        print(f"{name:16s} {m['seconds']:8.2f} {m['mb_per_s']:8.1f} {m['peak_mb']:12.1f} {above:16.1f}")
    from tasks.convert.shards import parse_size

    shard_mb = parse_size(args.shard_size) / 2**20
    for src in ("dcp", "hf"):
        cp, ours_m, naive_m = med[f"cp ({src} files)"], med[f"ours {src}->hf"], med[f"naive {src}->hf"]
        print(f"cp without sync ({src} files): {sizes[src] / 1e6 / cp['seconds_no_sync']:.1f} MB/s")
        print(f"ratio {src}: ours/cp throughput = {ours_m['mb_per_s'] / cp['mb_per_s']:.2f}x (goal >= 0.7); "
              f"ours/naive throughput = {ours_m['mb_per_s'] / naive_m['mb_per_s']:.2f}x; peak RSS above import "
              f"ours {ours_m['peak_mb'] - ours_m['baseline_mb']:.0f} MB = "
              f"{(ours_m['peak_mb'] - ours_m['baseline_mb']) / shard_mb:.2f} shards (goal <= 2) vs naive "
              f"{naive_m['peak_mb'] - naive_m['baseline_mb']:.0f} MB")


if __name__ == "__main__":
    main()
