"""Profiles: what to tune, on what, where. Validated completely before any work starts.

A profile is a YAML file in ``profiles/`` (or any path). It may ``extends:`` another profile; mappings merge
recursively, lists and scalars replace. Dotted overrides (``train.lr=1e-4``) apply last. Every error names the
profile file, the field path and, where we can tell, the fix.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, PositiveInt, ValidationError, field_validator, model_validator

from finetune.quantized_bases import quantized_repo_error
from tunerecipes.ep_degree import ROUTED_EXPERTS
from tunerecipes.ep_degree import refusal as expert_parallel_refusal

REPO_ROOT = Path(__file__).resolve().parents[1]
PROFILES_DIR = REPO_ROOT / "profiles"
COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
# Seconds a pod gets beyond train.preemption_grace_s: the stage's engine reports and exits after the trainer saved.
ENGINE_EXIT_MARGIN_S = 30


class ProfileError(ValueError):
    """A profile that cannot run. The message names the file, the field path and the fix."""


class Section(BaseModel):
    # Unknown keys are typos until proven otherwise: fail instead of silently ignoring them.
    model_config = ConfigDict(extra="forbid", frozen=True)


DataFormat = Literal["chat", "sharegpt", "alpaca", "preference"]


def _check_hub_revision(source: str, revision: str | None) -> None:
    if source.startswith("hf://datasets/") and not (revision and COMMIT_SHA.match(revision)):
        raise ValueError(
            f"hub dataset {source} needs revision: a 40-hex commit sha (a branch moves, and the pack "
            "stage would reuse a stale pack); see the dataset's 'Files and versions' tab"
        )


class DataSourceConfig(Section):
    """One source of a weighted mix (``data.sources``)."""

    source: str = Field(description="Local file/dir (jsonl/json/parquet), 'hf://datasets/<name>', or an fsspec URL.")
    revision: str | None = Field(None, description="Dataset revision for hub datasets.")
    format: DataFormat | None = Field(None, description="Record shape of this source; data.format when unset.")
    weight: float = Field(gt=0, description="Share of the packed training documents per epoch, relative to the "
                                            "other sources' weights.")
    train_split: str | None = Field(None, description="This source's training split; data.train_split when unset.")

    @model_validator(mode="after")
    def _hub_revision(self) -> DataSourceConfig:
        _check_hub_revision(self.source, self.revision)
        return self


class ResolvedSource(NamedTuple):
    """A source of the data section, its format and split filled in from the section where it leaves them."""

    field: str
    """The profile field naming it, for messages."""
    source: str
    revision: str | None
    format: DataFormat
    train_split: str
    weight: float


class DataConfig(Section):
    source: str | None = Field(None, description="Local file/dir (jsonl/json/parquet), 'hf://datasets/<name>', or "
                                                 "an fsspec URL. Exclusive with sources.")
    sources: list[DataSourceConfig] | None = Field(
        None, min_length=1, description="A weighted mix of sources instead of source (README: Bring your own data).")
    revision: str | None = Field(None, description="Dataset revision for hub datasets.")
    format: DataFormat = "chat"
    train_split: str = "train"
    seed: int = Field(0, description="Seed of the weighted mix's sampling (data.sources).")
    max_seq_len: int = Field(256, gt=8)
    on_bad_record: Literal["drop", "fail"] = "drop"
    train_on_input: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if self.source is not None and self.sources is not None:
            raise ValueError(
                "data.source and data.sources are exclusive: give one dataset as data.source or a weighted mix as "
                "data.sources (a profile that extends one setting data.source needs `source: null` beside sources)"
            )
        if self.source is None and self.sources is None:
            raise ValueError("no data: set data.source (one dataset) or data.sources (a weighted mix)")
        if self.sources is not None and self.revision is not None:
            raise ValueError("data.revision pins data.source; with data.sources give each source its own revision")
        if self.source is not None:
            _check_hub_revision(self.source, self.revision)
        return self

    def all_sources(self) -> list[ResolvedSource]:
        """Every source with its format and split filled in; data.source as a mix of one."""
        if self.source is not None:
            return [ResolvedSource("data.source", self.source, self.revision, self.format, self.train_split, 1.0)]
        return [ResolvedSource(f"data.sources.{index}.source", entry.source, entry.revision,
                               entry.format or self.format, entry.train_split or self.train_split, entry.weight)
                for index, entry in enumerate(self.sources or [])]


class ModelConfig(Section):
    source: Literal["hub", "local", "embedded", "artifact"] = Field(
        description="Where the base model comes from. 'embedded' builds the tiny model locally from seed; source "
                    "embedded with family scout/maverick builds the tiny model in that family's shape (experts, MoE "
                    "interleave) for rehearsals.")
    repo_id: str | None = None
    revision: str | None = Field(None, description="A 40-hex commit sha, or a branch/tag resolved to one at key time.")
    path: str | None = Field(None, description="Local directory or fsspec URL (source: local); <stage>/<key> of "
                                               "this store, e.g. convert/<key> of an SFT run (source: artifact).")
    allow_patterns: list[str] | None = None
    ignore_patterns: list[str] | None = None
    family: Literal["tiny", "scout", "maverick"]
    multimodal: bool = Field(False, description="Checkpoint is Llama4ForConditionalGeneration (language_model.* keys).")
    seed: int = Field(0, description="Seed of the embedded tiny model.")

    def selected_files(self, names: list[str]) -> list[str]:
        """The files of a checkpoint this model takes: allow_patterns / ignore_patterns, as the hub client reads them."""
        from huggingface_hub.utils import filter_repo_objects

        return list(filter_repo_objects(names, allow_patterns=self.allow_patterns, ignore_patterns=self.ignore_patterns))

    @model_validator(mode="after")
    def _source_fields(self) -> ModelConfig:
        if self.source == "hub":
            if not self.repo_id:
                raise ValueError("source 'hub' needs repo_id (e.g. meta-llama/Llama-4-Scout-17B-16E-Instruct)")
            if refusal := quantized_repo_error(self.repo_id):  # refused here, before any stage or network call
                raise ValueError(f"repo_id: {refusal}")
            if not self.revision:
                raise ValueError(
                    "source 'hub' needs a revision: a 40-hex commit sha (reproducible), or a branch/tag that the "
                    "download stage resolves to its current commit and records"
                )
        if self.source == "local" and not self.path:
            raise ValueError("source 'local' needs path (a directory or fsspec URL of a HF checkpoint)")
        if self.source == "artifact" and not self.path:
            raise ValueError("source 'artifact' needs path: <stage>/<key> of a checkpoint in this store (convert/<key>)")
        return self


class LoraConfig(Section):
    rank: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    attn_modules: list[Literal["q_proj", "k_proj", "v_proj", "output_proj"]] = ["q_proj", "v_proj", "output_proj"]
    apply_to_mlp: bool = True
    apply_to_experts: bool = False
    apply_to_output: bool = Field(False, description="An adapter on the output projection (lm_head) too.")


class ElasticConfig(Section):
    min_nodes: int = Field(1, ge=1)
    max_nodes: int = Field(1, ge=1)
    max_restarts: int = Field(3, ge=0)
    join_timeout_s: int = Field(
        1800, ge=30,
        description="How long the surviving nodes wait in the rendezvous for a lost node to come back (a preempted "
                    "spot node must be re-provisioned; torchrun's own default is 600 s) before the stage fails.")


Launcher = Literal["process", "local-nodes", "prefect-pool", "skypilot", "jobset"]
# Launchers that can place torchrun node processes on more than one node (or, for tests, more than one process).
MULTI_NODE_LAUNCHERS: frozenset[str] = frozenset({"local-nodes", "prefect-pool", "skypilot", "jobset"})
# Launchers whose trainers run on other machines than the stage's own process.
REMOTE_LAUNCHERS: frozenset[str] = MULTI_NODE_LAUNCHERS - {"local-nodes"}


class DpoConfig(Section):
    """Direct Preference Optimization (train.method dpo) on preference pairs (data.format preference)."""

    beta: float = Field(0.1, gt=0, description="Strength of the pull towards the reference model (DPO's beta; "
                                               "IPO's tau).")
    loss: Literal["sigmoid", "ipo"] = Field(
        "sigmoid", description="sigmoid: DPO's logistic loss (torchtune's DPOLoss); ipo: IPO's squared loss "
                               "(Azar et al. 2023), which does not push the margin to infinity.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Conservative DPO: the share of pairs assumed "
                                                                  "mislabelled (sigmoid loss only).")
    rpo_alpha: float = Field(0.0, ge=0, description="RPO: adds this times the chosen response's mean token NLL "
                                                    "to the loss (TRL's rpo_alpha), so the likelihood of what both "
                                                    "responses share does not drift; 0: plain DPO / IPO.")
    tuning: Literal["lora", "qlora", "full"] = Field(
        "lora", description="Which weights the policy trains, as train.method's SFT values: lora (adapters on the "
                            "bf16 base), qlora (adapters on an NF4 base), full (every weight).")
    reference: Literal["adapters_off", "frozen_copy"] = Field(
        "adapters_off", description="The reference policy: adapters_off (tuning lora or qlora) scores it with the "
                                    "adapters disabled, so no second model is held in memory; frozen_copy (tuning "
                                    "full) holds a frozen second copy of the base, sharded like the policy "
                                    "(expert-parallel too).")

    @model_validator(mode="after")
    def _combinations(self) -> DpoConfig:
        if self.loss == "ipo" and self.label_smoothing:
            raise ValueError("label_smoothing is a sigmoid-loss setting; IPO has none (set it to 0)")
        if self.reference == "adapters_off" and self.tuning == "full":
            raise ValueError("reference adapters_off needs tuning lora or qlora: the reference is the base with the "
                             "adapters disabled, and full fine-tuning has no adapters (use reference frozen_copy)")
        if self.reference == "frozen_copy" and self.tuning != "full":
            raise ValueError(f"reference frozen_copy with tuning {self.tuning} holds a second copy of the base that "
                             "adapters_off gives without one (the base under the adapters): use adapters_off")
        return self


class TrainConfig(Section):
    method: Literal["lora", "qlora", "full", "dpo"] = Field(
        description="full: every weight trains; lora: adapters on a frozen base; qlora: adapters on a frozen NF4 "
                    "base (routed experts included), merged into the bf16 base by convert; dpo: preference tuning "
                    "(train.dpo) on data.format preference.")
    device: Literal["cpu", "cuda"] = "cuda"
    dtype: Literal["fp32", "bf16"] = "bf16"
    nnodes: int = Field(1, ge=1)
    nproc_per_node: int = Field(1, ge=1)
    launcher: Launcher = "process"
    gpu_type: str | None = Field(
        None, description="Accelerator a cuda run is planned for and launched on (SkyPilot's accelerator), a name of "
                          "finetune/plan/catalog.py's CATALOG; unset: its DEFAULT_GPU_TYPE (H100-80GB).")
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, gt=0)
    batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    lr: float = Field(2e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    checkpoint_every_steps: int = Field(100, ge=1)
    checkpoint_every_minutes: float | None = Field(
        None, gt=0,
        description="Also checkpoint once this many minutes have passed since the last checkpoint (or the start), "
                    "whichever trigger comes first; all ranks agree on it every step. At real size a step takes "
                    "minutes, so a step interval alone can leave hours of work to a preemption.")
    preemption_grace_s: float = Field(
        120, ge=0,
        description="Seconds the machines give between SIGTERM (a spot notice) and SIGKILL: Kubernetes' default is "
                    "30, AWS spot about 120, GCP and Azure spot 30. The cloud's notice is fixed: a larger value buys "
                    "no time it does not give (`finetune plan` says where a notice save fits). On SIGTERM the trainer finishes its step and saves a checkpoint when "
                    "the step and the plan's estimated save time fit in it (else it exits at once); the launcher "
                    "waits this long before killing the trainer, and the Kubernetes GPU pool's pods get it plus a "
                    "margin as terminationGracePeriodSeconds.")
    spot_notice: Literal["none", "aws", "gcp", "azure"] = Field(
        "none",
        description="Poll this cloud's instance metadata for the spot notice while training (AWS IMDSv2 "
                    "spot/instance-action, GCP instance/preempted, Azure Scheduled Events Preempt) and save and stop "
                    "on it as on SIGTERM: for VMs (SkyPilot), where AWS gives no signal until the end. none: rely on "
                    "the platform's SIGTERM (Kubernetes with a node termination handler).")
    spot_notice_url: str | None = Field(
        None, description="Base URL of the metadata service (default: the cloud's own, e.g. http://169.254.169.254).")
    seed: int = 0
    fsdp_cpu_offload: bool = False
    enable_dcp: bool = True
    async_checkpoint: bool = False
    activation_checkpointing: bool = False
    compile: bool = False
    expert_parallel: int = Field(
        1, ge=1,
        description="Expert parallelism degree N: each group of N consecutive processes (one node's GPUs when N <= "
                    "nproc_per_node) holds the routed experts whole, E/N per process, and sends each token to its "
                    "expert's owner and back (all_to_all) instead of all-gathering every MoE layer's experts per "
                    "micro-batch (~30 GiB per Maverick layer); groups replicate the experts. 1: FSDP shards the "
                    "experts like every other weight. Must divide the routed-expert count and the world size; not "
                    "with method qlora.")
    lora: LoraConfig | None = None
    dpo: DpoConfig = DpoConfig()
    elastic: ElasticConfig | None = None
    recipe_overrides: dict[str, Any] = Field(default_factory=dict, description="Raw torchtune config overrides.")

    @field_validator("gpu_type")
    @classmethod
    def _known_gpu(cls, gpu_type: str | None) -> str | None:
        from finetune.plan.catalog import unknown  # imported here: finetune.plan imports this module

        if gpu_type is not None and (reason := unknown(gpu_type)):
            raise ValueError(reason)
        return gpu_type

    @model_validator(mode="after")
    def _combinations(self) -> TrainConfig:
        # A `lora:` section beside method 'full' is kept for `train.method=lora|qlora` overrides (tiny-cpu has one).
        if self.tuning in ("lora", "qlora") and self.lora is None:
            raise ValueError(f"method '{self.method}' needs a 'lora:' section (rank, alpha, ...)"
                             + (" for its adapters_off reference" if self.method == "dpo" else ""))
        if self.tuning == "qlora" and not self.enable_dcp:
            raise ValueError("method 'qlora' saves the adapters only, as DCP: set enable_dcp: true (convert merges "
                             "them into the download stage's bf16 base)")
        if self.nnodes > 1 and self.launcher not in MULTI_NODE_LAUNCHERS:
            raise ValueError(
                f"nnodes {self.nnodes} needs a launcher that spans nodes ({', '.join(sorted(MULTI_NODE_LAUNCHERS))}); "
                f"launcher '{self.launcher}' starts one node only"
            )
        if self.device == "cpu" and self.async_checkpoint:
            raise ValueError("async_checkpoint needs device 'cuda' (it overlaps GPU work with the save)")
        if self.device == "cpu" and self.fsdp_cpu_offload:
            raise ValueError("fsdp_cpu_offload only makes sense with device 'cuda'")
        if self.elastic is not None and not (self.elastic.min_nodes <= self.nnodes <= self.elastic.max_nodes):
            raise ValueError(
                f"elastic.min_nodes <= nnodes <= elastic.max_nodes must hold "
                f"({self.elastic.min_nodes} <= {self.nnodes} <= {self.elastic.max_nodes})"
            )
        return self

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    @property
    def tuning(self) -> Literal["lora", "qlora", "full"]:
        """Which weights train: the method's, and for DPO train.dpo.tuning."""
        return self.dpo.tuning if self.method == "dpo" else self.method

    @property
    def adapters_only(self) -> bool:
        """LoRA and QLoRA: only the adapters train (and are checkpointed); the base stays frozen."""
        return self.tuning in ("lora", "qlora")


class ConvertConfig(Section):
    max_shard_size: str = Field("5GB", pattern=r"^\d+(\.\d+)?\s*(B|KB|MB|GB)$")
    dtype: Literal["bf16", "fp32"] = "bf16"
    keep_peft_adapter: bool = True


class RequireRise(Section):
    task: str
    metric: str | None = Field(None, description="Defaults to the task's first metric.")
    by: float = Field(gt=0, description="Points (0-100 scale) the tuned model must gain over its base.")


class GateRules(Section):
    max_drop: float | None = Field(None, ge=0, description="Fail if any task drops more than this many points.")
    require_rise: RequireRise | None = None


class GateConfig(GateRules):
    dpo: GateRules | None = Field(
        None, description="The rules for a train.method dpo run in place of the ones above: preference data moves "
                          "the 'preference' task (metric preference_accuracy), not necessarily the SFT task.")

    def for_method(self, method: str) -> GateConfig:
        """The rules a run of ``method`` is judged by."""
        if method == "dpo" and self.dpo is not None:
            return GateConfig(**self.dpo.model_dump())
        return self


class EvaluateConfig(Section):
    backend: Literal["hf", "vllm"] = "hf"
    device: Literal["cpu", "cuda"] = "cuda"
    tasks: list[str] = Field(min_length=1)
    include_path: str | None = Field(None, description="Directory of local lm-eval task YAMLs (relative to the repo).")
    num_fewshot: int | None = None
    limit: int | None = Field(None, gt=0, description="Examples per task (None: all).")
    batch_size: int | str = 8
    max_gen_toks: int = Field(256, gt=0)
    weights: Literal["bf16", "w4a16"] = Field(
        "bf16", description="What evaluate scores and the gate compares: bf16 (the converted model against the "
                            "downloaded base) or w4a16 (both quantized the same way by the quantize stage, the "
                            "base's 4-bit artifact cached once) for a model too large to serve in bf16.")
    gate: GateConfig = GateConfig()


class QuantizeConfig(Section):
    scheme: Literal["W4A16"] = "W4A16"
    group_size: int = Field(128, gt=0)
    calibration_samples: int = Field(256, gt=0)
    calibration_seq_len: int = Field(2048, gt=0)
    min_tokens_per_expert: int = Field(
        64, ge=0, description="Routed calibration tokens below which an expert is reported by name (artifact "
                              "calibration_routing, the stage's log and table); every expert is still calibrated on "
                              "every token.")
    ignore: list[str] = Field(
        default_factory=lambda: ["lm_head", "re:.*router"],
        description="Modules kept in bf16: plain names also match as dotted suffixes, 're:' prefixes a regex. "
                    "Attention q/k/v always stay bf16 (vLLM's Llama 4 loader permutes q/k only for plain weights).")
    device: Literal["cpu", "cuda"] = "cuda"
    sequential_onloading: bool = True


class BenchmarkConfig(Section):
    engine: Literal["vllm", "transformers-serve"] = "vllm"
    concurrencies: list[int] = Field(default_factory=lambda: [1, 8, 32], min_length=1)
    num_prompts: int = Field(200, gt=0, description="Requests per concurrency level.")
    max_tokens: int = Field(256, gt=0)
    tensor_parallel_size: int = Field(1, ge=1)
    max_model_len: int = Field(8192, gt=0)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    port: int = Field(0, ge=0, le=65535, description="0 picks a free port.")
    startup_timeout_s: float = Field(900, gt=0)
    max_error_rate: float = Field(0.01, ge=0, le=1)
    use_vllm_bench: bool = Field(True, description="Use `vllm bench serve` as the load generator when installed.")
    weights: list[Literal["bf16", "w4a16"]] = Field(
        default_factory=lambda: ["bf16", "w4a16"], min_length=1,
        description="Which checkpoints are served in turn: the converted bf16 model and/or the quantized one.")


# The image role each GPU stage runs in (deploy.images; Dockerfile targets).
ROLE_OF_STAGE = {"train": "train", "quantize": "quantize", "evaluate": "serve", "benchmark": "serve"}


class DeployConfig(Section):
    work_pool: str = "cpu-pool"
    gpu_work_pool: str = "gpu-pool"
    gpu_stages: list[Literal["train", "evaluate", "quantize", "benchmark"]] = ["train"]
    image: str | None = None
    images: dict[Literal["train", "quantize", "serve"], str] = Field(
        default_factory=dict,
        description="One image per GPU role (the Dockerfile's targets), all three or none, instead of `image`: train "
                    "runs training (stage and node runs), quantize quantization, serve evaluate and benchmark (vLLM "
                    "in an environment of its own).")
    job_variables: dict[str, Any] = Field(default_factory=dict)
    stage_concurrency: dict[str, PositiveInt] = Field(
        default_factory=dict,
        description="Stages of one run working at once, per work pool. Default: 1 in the pool the flow runs in (its "
                    "stages share one machine), unbounded in the GPU pool when stages are dispatched there (each "
                    "stage flow run gets its own pod).")
    wait_for_workers_s: NonNegativeFloat = Field(
        0.0, description="How long the preflight waits for a ready worker in each GPU pool the run submits to (e.g. "
                         "one an autoscaler starts); 0 fails at once, naming the pool.")

    @model_validator(mode="after")
    def _images(self) -> DeployConfig:
        if self.images and (self.image or set(self.images) != set(ROLE_OF_STAGE.values())):
            raise ValueError("images names an image for each of train, quantize and serve, and replaces image: "
                             "set one or the other")
        return self

    @property
    def gate(self) -> GateConfig:
        """The quality gate this run is judged by (evaluate.gate, its dpo rules for a DPO run)."""
        return self.evaluate.gate.for_method(self.train.method)

    @property
    def gpu_job_variables(self) -> dict[str, Any]:
        """What a GPU run of this profile asks its pool for (image, GPUs, node selector, ...): job_variables with
        ``image`` (or the train role's image) on top. Every GPU launch path (stage dispatch, pool node runs, rendered
        JobSets) uses this; a dispatched stage then takes its own role's image (stage_image)."""
        image = self.image or self.images.get("train")
        return {**self.job_variables, **({"image": image} if image else {})}

    def stage_image(self, stage: str) -> dict[str, Any]:
        """The job variable that runs ``stage`` in its role's image (none when images is unset)."""
        image = self.images.get(ROLE_OF_STAGE[stage])
        return {"image": image} if image else {}


class RetriesConfig(Section):
    count: int = Field(2, ge=0, description="Retries per stage on transient failure or preemption.")
    lock_timeout_s: float | None = Field(
        86400, gt=0,
        description="How long a stage waits for another run that is computing the same stage key (it then takes "
                    "that run's artifact as a cache hit) before it fails; null waits as long as that run lives.")
    lock_lease_s: float = Field(
        120, ge=60, le=86400,
        description="Through a Prefect server: the lease on a stage key's global concurrency limit (the server "
                    "accepts 60 s to a day). A killed run's stage is taken over this long after its last renewal "
                    "(plus the server's repossessor loop); a run that cannot renew for half of it stops its trainers.")


class PlanConfig(Section):
    """``finetune plan``: the sizing check every run passes before its first stage, and the cost estimate."""

    enforce: bool = Field(True, description="Refuse to start a run whose plan does not fit its GPUs or hosts "
                                            "(exit code 2); false lets a user who knows better go on.")
    price_per_gpu_hour: float | None = Field(None, gt=0, description="Price of one GPU-hour, for the cost estimate.")
    dataset_tokens: int | None = Field(None, gt=0, description="Packed training tokens per epoch, for hours per "
                                                               "epoch (without it: hours per million tokens).")
    mfu: float = Field(0.35, gt=0, le=1, description="Assumed model FLOPs utilisation of the step time estimate.")
    host_ram_gib_per_node: float | None = Field(None, gt=0, description="Host RAM of a training node; the GPU "
                                                                        "catalog's usual node when unset.")
    spot_reclaim_mtbf_h: float = Field(24.0, gt=0, description="Mean hours between spot reclaims of one node, "
                                       "for the plan's checkpoint interval (see finetune/plan/catalog.py Constants).")
    trace: bool = Field(True, description="Trace one training step at full size on fake tensors for the peak per "
                                          "GPU (finetune/plan/trace.py, cuda profiles; about a minute); false: the "
                                          "formulas alone decide (seconds).")
    routing: Literal["uniform", "skewed"] = Field(
        "skewed", description="Tokens per expert in the traced step (finetune/plan/trace.py): uniform, or skewed: "
                              "the traced rank's experts get routing_imbalance times the mean.")
    routing_imbalance: float = Field(
        1.25, ge=1, description="Load of the hottest experts over the mean under routing 'skewed'. Default: the "
                                "capacity factor Switch Transformer trained with (Fedus et al. 2021, section 2.2), "
                                "the load an expert is commonly sized for; our routing drops no token, so a hotter "
                                "router needs a larger value (a GPU run's router statistics should replace it).")

    @property
    def imbalance(self) -> float:
        """The hottest experts' load over the mean that the trace uses."""
        return self.routing_imbalance if self.routing == "skewed" else 1.0


class PublishConfig(Section):
    """The last stage: where the chosen model goes, with a generated model card (tasks/publish)."""

    target: str | None = Field(None, description="A local directory, an fsspec URL (s3://..., memory://...) or "
                                                 "hf://<org>/<repo> (Hugging Face hub, token from HF_TOKEN); unset: "
                                                 "the publish stage is skipped.")
    model: Literal["w4a16", "bf16", "adapter"] = Field(
        "w4a16", description="w4a16: the quantized checkpoint; bf16: the converted one; adapter: the PEFT adapter "
                             "of a LoRA run.")
    name: str | None = Field(None, description="Model name in the card; the Llama 4 Community License asks "
                                               "derivatives to begin with 'Llama'. Default: Llama-4-<profile>-<model>.")
    private: bool = Field(True, description="hf:// targets: create the repo private.")

    @field_validator("name")
    @classmethod
    def _llama_name(cls, name: str | None) -> str | None:
        if name is not None and not name.startswith("Llama"):
            raise ValueError(f"'{name}' must begin with 'Llama' (Llama 4 Community License, section 1.b.i)")
        return name


class TrackingConfig(Section):
    """Experiment tracking, all off by default. Training curves go through torchtune's metric loggers; the flow adds
    the results (eval, quantize, benchmark), the resolved profile and the artifact keys to the same MLflow run.
    Credentials come from the environment only (MLFLOW_TRACKING_TOKEN / _USERNAME / _PASSWORD, WANDB_API_KEY)."""

    mlflow_uri: str | None = Field(None, description="MLflow tracking URI: http(s)://..., sqlite:///..., databricks.")
    experiment: str | None = Field(None, description="MLflow experiment and W&B group; default: the profile's name.")
    wandb_project: str | None = Field(None, description="Weights & Biases project for the training curves.")
    tensorboard_dir: str | None = Field(None, description="Directory (or URL TensorBoard writes to) for the curves.")


class Profile(Section):
    name: str
    description: str
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    convert: ConvertConfig = ConvertConfig()
    evaluate: EvaluateConfig
    quantize: QuantizeConfig = QuantizeConfig()
    benchmark: BenchmarkConfig = BenchmarkConfig()
    deploy: DeployConfig = DeployConfig()
    plan: PlanConfig = PlanConfig()
    publish: PublishConfig = PublishConfig()
    tracking: TrackingConfig = TrackingConfig()
    retries: RetriesConfig = RetriesConfig()

    @field_validator("retries", mode="before")
    @classmethod
    def _retries_count(cls, value: Any) -> Any:
        # `retries: 2` (the original form) still means two retries per stage.
        return {"count": value} if isinstance(value, int) and not isinstance(value, bool) else value

    @property
    def gate(self) -> GateConfig:
        """The quality gate this run is judged by (evaluate.gate, its dpo rules for a DPO run)."""
        return self.evaluate.gate.for_method(self.train.method)

    @property
    def gpu_job_variables(self) -> dict[str, Any]:
        """What a GPU run asks its pool for (deploy.gpu_job_variables), the pods' termination grace following
        train.preemption_grace_s unless job_variables sets it: the trainer's save on notice, then the engine's exit."""
        grace = {"termination_grace_period_seconds": int(self.train.preemption_grace_s) + ENGINE_EXIT_MARGIN_S}
        return grace | self.deploy.gpu_job_variables

    @model_validator(mode="after")
    def _cross_section(self) -> Profile:
        experts = ROUTED_EXPERTS[self.model.family]
        if refusal := expert_parallel_refusal(degree=self.train.expert_parallel, experts=experts,
                                              world_size=self.train.world_size, method=self.train.tuning,
                                              cpu_offload=self.train.fsdp_cpu_offload):
            raise ValueError(f"train.{refusal} (model.family {self.model.family})")
        master = self.train.recipe_overrides.get("master_dtype")
        if self.train.expert_parallel > 1 and master not in (None, self.train.dtype):
            raise ValueError(f"train.expert_parallel {self.train.expert_parallel} with "
                             f"train.recipe_overrides.master_dtype {master}: the experts live outside FSDP, whose "
                             "mixed-precision policy keeps the fp32 master weights; use expert_parallel 1 for it")
        preference = {entry.format == "preference" for entry in self.data.all_sources()}
        if (self.train.method == "dpo") != (preference == {True}):
            raise ValueError("train.method 'dpo' trains on preference pairs and only it does: every data source "
                             "needs data.format 'preference' with it, and none without it "
                             f"(method {self.train.method}, formats {sorted({e.format for e in self.data.all_sources()})})")
        if preference == {True} and (self.data.sources is not None or self.data.train_on_input):
            raise ValueError("data.format 'preference' takes one data.source (pairs are not mixed) and learns the "
                             "responses only (data.train_on_input: false)")
        if self.model.family == "tiny" and self.model.source == "hub":
            raise ValueError("model.family 'tiny' is the embedded model: use source 'embedded'")
        if (self.train.adapters_only and self.train.lora is not None and self.train.lora.apply_to_experts
                and self.convert.keep_peft_adapter):
            raise ValueError("train.lora.apply_to_experts adapts the fused routed-expert weights, which a PEFT LoRA "
                             "adapter cannot express, so convert.keep_peft_adapter cannot be kept: set "
                             "convert.keep_peft_adapter: false (the merged model carries every adapter)")
        return self


def profile_path(name_or_path: str) -> Path:
    """A profile name (``tiny-cpu``) or a path to a YAML file."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml"):
        if not candidate.is_file():
            raise ProfileError(f"profile file {candidate} does not exist")
        return candidate
    path = PROFILES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(list_profiles()) or "none"
        raise ProfileError(f"unknown profile '{name_or_path}' (known: {known}); or pass a path to a .yaml file")
    return path


def list_profiles() -> dict[str, str]:
    """Shipped profile names with their one-line descriptions."""
    out: dict[str, str] = {}
    for path in sorted(PROFILES_DIR.glob("*.yaml")):
        raw = _read_yaml(path)
        out[path.stem] = str(raw.get("description", "")).strip().splitlines()[0] if raw.get("description") else ""
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ProfileError(f"{path}: a profile must be a YAML mapping, got {type(raw).__name__}")
    return raw


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _resolve_raw(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if path in seen:
        chain = " -> ".join(p.stem for p in (*seen, path))
        raise ProfileError(f"{path}: extends forms a cycle: {chain}")
    raw = _read_yaml(path)
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str):
        raise ProfileError(f"{path}: extends: must be one profile name or path, got {parent!r}")
    parent_path = Path(parent) if parent.endswith((".yaml", ".yml")) else PROFILES_DIR / f"{parent}.yaml"
    if not parent_path.is_absolute() and not parent_path.is_file():
        parent_path = path.parent / parent_path
    if not parent_path.is_file():
        raise ProfileError(f"{path}: extends: profile '{parent}' not found (looked for {parent_path})")
    return deep_merge(_resolve_raw(parent_path, (*seen, path)), raw)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.lr=1e-4`` -> (['train', 'lr'], 0.0001). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ProfileError(f"override '{text}' must look like key.path=value (e.g. train.max_steps=20)")
    dotted, value = text.split("=", 1)
    parts = [p for p in dotted.strip().split(".") if p]
    if not parts:
        raise ProfileError(f"override '{text}' has an empty key path")
    return parts, yaml.safe_load(value) if value.strip() else None


def nested(parts: list[str], value: Any) -> dict[str, Any]:
    """``(['train', 'lr'], 1e-4)`` -> ``{'train': {'lr': 1e-4}}``: a dotted override as a patch for deep_merge."""
    patch: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        patch = {part: patch}
    return patch


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    result = raw
    for text in overrides:
        result = deep_merge(result, nested(*parse_override(text)))
    return result


def _format_validation_error(source: str, exc: ValidationError) -> str:
    lines = [f"profile {source} is invalid:"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = f"unknown key; {_spelling_hint(err['loc'])}"
        elif err["type"] == "missing":
            message = "required field is missing"
        got = err.get("input")
        hint = f" (got {got!r})" if err["type"] not in ("missing",) and not isinstance(got, dict) else ""
        lines.append(f"  {where}: {message}{hint}")
    return "\n".join(lines)


def _spelling_hint(loc: tuple[Any, ...]) -> str:
    """Suggest the closest valid key of the section the unknown key sits in."""
    model: type[BaseModel] = Profile
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        candidates = [a for a in (annotation, *getattr(annotation, "__args__", ())) if isinstance(a, type)
                      and issubclass(a, BaseModel)]
        if not candidates:
            break
        model = candidates[0]
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f"did you mean '{close[0]}'?" if close else f"valid keys here: {', '.join(model.model_fields)}"


def _check_files(profile: Profile, source: str) -> None:
    """Local paths named by the profile must exist now, not hours into a run."""
    missing: list[tuple[str, str]] = []
    for entry in profile.data.all_sources():
        if "://" not in entry.source and not entry.source.startswith("hf:"):
            if not resolve_repo_path(entry.source).exists():
                missing.append((entry.field, entry.source))
    if profile.model.source == "local" and profile.model.path and "://" not in profile.model.path:
        if not resolve_repo_path(profile.model.path).is_dir():
            missing.append(("model.path", profile.model.path))
    if profile.evaluate.include_path and not resolve_repo_path(profile.evaluate.include_path).is_dir():
        missing.append(("evaluate.include_path", profile.evaluate.include_path))
    if missing:
        lines = [f"profile {source} is invalid:"]
        lines += [f"  {field}: path {path!r} does not exist (relative paths are taken from {REPO_ROOT})"
                  for field, path in missing]
        raise ProfileError("\n".join(lines))


def resolve_repo_path(path: str) -> Path:
    """Relative paths in profiles are relative to the repository root, wherever the command runs."""
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else REPO_ROOT / candidate


def load_profile(name_or_path: str, overrides: list[str] | None = None) -> Profile:
    path = profile_path(name_or_path)
    raw = apply_overrides(_resolve_raw(path), overrides or [])
    raw.setdefault("name", path.stem)
    source = str(path) + (f" with overrides {overrides}" if overrides else "")
    try:
        profile = Profile.model_validate(raw)
    except ValidationError as exc:
        raise ProfileError(_format_validation_error(source, exc)) from None
    _check_files(profile, source)
    return profile


def resolved_yaml(profile: Profile) -> str:
    return yaml.safe_dump(profile.model_dump(mode="json"), sort_keys=False)
