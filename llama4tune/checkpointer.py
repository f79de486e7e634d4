"""torchtune checkpointer for HF Llama 4 checkpoints (text-only or multimodal), safetensors only.

Same interface as torchtune's FullModelHFCheckpointer, so recipes use it unchanged:

    checkpointer:
      _component_: llama4tune.checkpointer.Llama4HFCheckpointer
      checkpoint_dir: /models/Llama-4-Scout-17B-16E-Instruct
      checkpoint_files: all            # or a list of shard names, or {filename_format, max_filename}
      output_dir: /store/train/<key>

load_checkpoint() -> {"model": tune state dict[, "adapter": ...][, recipe state...]}
save_checkpoint(state_dict, epoch, intermediate_checkpoint=False, adapter_only=False) writes
output_dir/epoch_<epoch>/: model-0000N-of-0000M.safetensors + model.safetensors.index.json,
config.json, tokenizer/generation files copied from checkpoint_dir, and for LoRA runs
adapter_model.pt (torchtune keys) + adapter_model.safetensors / adapter_config.json (PEFT).
A multimodal source (Llama4ForConditionalGeneration) is saved multimodal by default: text weights
under `language_model.` and the untouched vision/projector tensors streamed over from the source.
Each epoch folder is written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torchtune import training
from torchtune.training.checkpointing import FormattedCheckpointFiles, get_largest_iter_folder

from llama4tune.checkpoint_pickle import torch_load
from llama4tune.config import Llama4TextArgs, load_text_args, text_config_dict
from llama4tune.convert import hf_to_tune_key, is_multimodal_only_key, tune_to_hf_key, tune_to_peft_key
from llama4tune.peft import CONFIG_FILE as PEFT_CONFIG
from llama4tune.peft import WEIGHTS_FILE as PEFT_WEIGHTS
from llama4tune.peft import NoPeftForm, peft_adapter

log = logging.getLogger(__name__)

INDEX_FNAME = "model.safetensors.index.json"
RECIPE_STATE_DIRNAME = "recipe_state"
# Files never carried from checkpoint_dir into an epoch folder (weights are rewritten).
_NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")
_NOT_COPIED_NAMES = {PEFT_CONFIG, "original_repo_id.json"}


class Llama4HFCheckpointer:
    """Reads/writes HF Llama 4 safetensors checkpoints for llama4tune models.

    Args:
        checkpoint_dir: HF checkpoint folder (config.json, shards, optional index, tokenizer files).
        checkpoint_files: "all" (index or every *.safetensors), a list of file names, or torchtune's
            {"filename_format": ..., "max_filename": ...}.
        output_dir: where epoch_<n>/ and recipe_state/ are written; must not be inside checkpoint_dir.
        model_type: accepted for config compatibility; must be None or "LLAMA4".
        adapter_checkpoint, recipe_checkpoint: explicit resume files (relative to output_dir).
        resume_from_checkpoint: deprecated alias of should_load_recipe_state (as in torchtune).
        safe_serialization: must be True (only safetensors is written).
        should_load_recipe_state: resume: load recipe state (and adapter / latest full weights).
        max_shard_bytes: size cap of one written shard.
        save_multimodal: save a multimodal source as multimodal (default) or text-only (False).
    """

    def __init__(
        self,
        checkpoint_dir: str | Path,
        checkpoint_files: str | list[str] | Mapping[str, Any] = "all",
        output_dir: str | Path = "output",
        model_type: str | None = None,
        adapter_checkpoint: str | None = None,
        recipe_checkpoint: str | None = None,
        resume_from_checkpoint: bool = False,
        safe_serialization: bool = True,
        should_load_recipe_state: bool = False,
        max_shard_bytes: int = 5 * 1024**3,
        save_multimodal: bool = True,
    ) -> None:
        if model_type not in (None, "LLAMA4"):
            raise ValueError(f"model_type must be 'LLAMA4' (or omitted) for Llama4HFCheckpointer, got {model_type!r}")
        if not safe_serialization:
            raise ValueError("Llama4HFCheckpointer writes safetensors only; set safe_serialization: true")
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self._checkpoint_dir = Path(checkpoint_dir)
        self._output_dir = Path(output_dir)
        if self._output_dir.resolve().is_relative_to(self._checkpoint_dir.resolve()):
            raise ValueError(f"output_dir {self._output_dir} must not be inside checkpoint_dir {self._checkpoint_dir}")
        self._output_dir.mkdir(parents=True, exist_ok=True)
        self._should_load_recipe_state = should_load_recipe_state or resume_from_checkpoint
        self._max_shard_bytes = max_shard_bytes
        config_path = self._checkpoint_dir / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} not found: checkpoint_dir must hold the HF config.json")
        self._config: dict[str, Any] = json.loads(config_path.read_text())
        self._args: Llama4TextArgs = load_text_args(self._config)
        _, self._source_multimodal = text_config_dict(self._config)
        self._save_multimodal = self._source_multimodal and save_multimodal
        self._source_files = self._resolve_files(self._checkpoint_dir, checkpoint_files)
        self.repo_id = self._read_repo_id()
        self._adapter_checkpoint, self._recipe_checkpoint, self._model_files = self._resume_paths(
            adapter_checkpoint, recipe_checkpoint
        )

    # ---- loading -------------------------------------------------------------------------------

    @staticmethod
    def _resolve_files(folder: Path, checkpoint_files: str | list[str] | Mapping[str, Any]) -> list[Path]:
        if isinstance(checkpoint_files, Mapping):
            names = FormattedCheckpointFiles.from_dict(dict(checkpoint_files)).build_checkpoint_filenames()
        elif checkpoint_files == "all":
            index = folder / INDEX_FNAME
            if index.is_file():
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            else:
                names = sorted(p.name for p in folder.glob("*.safetensors") if not p.name.startswith("adapter_"))
        elif isinstance(checkpoint_files, str):
            raise ValueError(f"checkpoint_files: expected 'all', a list or a dict, got {checkpoint_files!r}")
        else:
            names = sorted(checkpoint_files)
        paths = [folder / name for name in names]
        missing = [str(p) for p in paths if not p.is_file()]
        if not paths or missing:
            raise FileNotFoundError(f"checkpoint_files: missing safetensors files {missing or ['<none found>']} in {folder}")
        bad = [p.name for p in paths if p.suffix != ".safetensors"]
        if bad:
            raise ValueError(f"checkpoint_files: only .safetensors is supported, got {bad}")
        return paths

    def _read_repo_id(self) -> str | None:
        path = self._checkpoint_dir / "original_repo_id.json"
        return json.loads(path.read_text()).get("repo_id") if path.is_file() else None

    def _resume_paths(
        self, adapter_checkpoint: str | None, recipe_checkpoint: str | None
    ) -> tuple[Path | None, Path | None, list[Path]]:
        if not self._should_load_recipe_state:
            return None, None, self._source_files
        recipe = self._output_dir / (recipe_checkpoint or f"{RECIPE_STATE_DIRNAME}/recipe_state.pt")
        if not recipe.is_file():
            raise FileNotFoundError(f"should_load_recipe_state is set but {recipe} does not exist")
        latest = get_largest_iter_folder(self._output_dir)
        adapter = self._output_dir / adapter_checkpoint if adapter_checkpoint else None
        if adapter is None and latest is not None and (self._output_dir / latest / "adapter_model.pt").is_file():
            adapter = self._output_dir / latest / "adapter_model.pt"
        if adapter is not None:
            return adapter, recipe, self._source_files  # LoRA resume: frozen base from checkpoint_dir
        if latest is None:
            raise FileNotFoundError(f"should_load_recipe_state is set but {self._output_dir} has no epoch_<n> folder")
        return None, recipe, self._resolve_files(self._output_dir / latest, "all")

    def tensor_index(self) -> dict[str, tuple[Path, str]]:
        """tune key -> (safetensors file, its key there) of every text-decoder tensor, from the file headers only:
        what a recipe needs to read each tensor (or only the rows of its shard) itself."""
        index: dict[str, tuple[Path, str]] = {}
        for path in self._model_files:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    tune_key = hf_to_tune_key(key, self._args)
                    if tune_key is not None:
                        index[tune_key] = (path, key)
        if not index:
            raise ValueError(f"no Llama 4 text-decoder tensors found in {[str(p) for p in self._model_files]}")
        return index

    def load_checkpoint(self) -> dict[str, Any]:
        """{"model": tune state dict} (+ "adapter" and recipe state when resuming)."""
        model: dict[str, torch.Tensor] = {}
        by_file: dict[Path, list[tuple[str, str]]] = {}
        for tune_key, (path, key) in self.tensor_index().items():
            by_file.setdefault(path, []).append((tune_key, key))
        for path, keys in by_file.items():
            with safe_open(str(path), framework="pt") as f:
                for tune_key, key in keys:
                    model[tune_key] = f.get_tensor(key)
        out: dict[str, Any] = {training.MODEL_KEY: model}
        # Tensors, python scalars and containers only: whoever can write output_dir must not run code here.
        if self._adapter_checkpoint is not None:
            out[training.ADAPTER_KEY] = torch_load(self._adapter_checkpoint)
        if self._recipe_checkpoint is not None:
            out.update(torch_load(self._recipe_checkpoint))
        return out

    # ---- saving --------------------------------------------------------------------------------

    def save_checkpoint(
        self,
        state_dict: dict[str, Any],
        epoch: int,
        intermediate_checkpoint: bool = False,
        adapter_only: bool = False,
    ) -> None:
        """Writes output_dir/epoch_<epoch>/ (and recipe_state/ when intermediate_checkpoint)."""
        if adapter_only and training.ADAPTER_KEY not in state_dict:
            raise ValueError("adapter_only=True but the state dict has no adapter weights")
        final = self._output_dir / f"epoch_{epoch}"
        tmp = Path(tempfile.mkdtemp(prefix=f".epoch_{epoch}.", dir=self._output_dir))
        try:
            if not adapter_only:
                self._write_model(state_dict[training.MODEL_KEY], tmp)
            if training.ADAPTER_KEY in state_dict:
                self._write_adapter(state_dict[training.ADAPTER_KEY], state_dict.get(training.ADAPTER_CONFIG), tmp)
            self._copy_side_files(tmp)
            _replace_dir(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("Saved Llama 4 checkpoint to %s", final)
        if intermediate_checkpoint:
            skip = {training.MODEL_KEY, training.ADAPTER_KEY, training.ADAPTER_CONFIG}
            recipe_state = {k: v for k, v in state_dict.items() if k not in skip}
            path = self._output_dir / RECIPE_STATE_DIRNAME / "recipe_state.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            part = path.with_suffix(".pt.partial")
            torch.save(recipe_state, part)
            os.replace(part, path)

    def _hf_tensors(self, model_state: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        prefix = self._save_multimodal
        for key, tensor in model_state.items():
            if key == "output.weight" and self._args.tie_word_embeddings:
                continue
            # Clone-free but contiguous: sharded `full_tensor()` results can be views.
            yield tune_to_hf_key(key, multimodal_prefix=prefix), tensor.detach().contiguous()
        if self._save_multimodal:
            for path in self._source_files:
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():
                        if is_multimodal_only_key(key):
                            yield key, f.get_tensor(key)

    def _write_model(self, model_state: Mapping[str, torch.Tensor], folder: Path) -> None:
        shards: list[list[str]] = []
        written: list[Path] = []
        current: dict[str, torch.Tensor] = {}
        current_bytes = total = 0

        def flush() -> None:
            nonlocal current, current_bytes
            if current:
                path = folder / f"shard-{len(written):05d}.safetensors"
                save_file(current, str(path), metadata={"format": "pt"})
                written.append(path)
                shards.append(list(current))
                current, current_bytes = {}, 0

        for key, tensor in self._hf_tensors(model_state):
            size = tensor.numel() * tensor.element_size()
            if current and current_bytes + size > self._max_shard_bytes:
                flush()
            current[key] = tensor
            current_bytes += size
            total += size
        flush()
        weight_map: dict[str, str] = {}
        for i, (path, keys) in enumerate(zip(written, shards)):
            name = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
            path.rename(folder / name)
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / INDEX_FNAME).write_text(json.dumps(index, indent=2))
        (folder / "config.json").write_text(json.dumps(self._output_config(), indent=2))

    def _output_config(self) -> dict[str, Any]:
        if self._save_multimodal or not self._source_multimodal:
            return self._config
        text, _ = text_config_dict(self._config)
        return {**text, "model_type": "llama4_text", "architectures": ["Llama4ForCausalLM"],
                "torch_dtype": self._config.get("torch_dtype", text.get("torch_dtype"))}  # fmt: skip

    def _write_adapter(self, adapter: Mapping[str, torch.Tensor], adapter_config: Mapping[str, Any] | None, folder: Path) -> None:
        torch.save(dict(adapter), folder / "adapter_model.pt")
        if adapter_config is None:
            return
        try:
            weights, config = peft_adapter(
                adapter, lambda key: tune_to_peft_key(key, self._save_multimodal), adapter_config["r"],
                adapter_config["lora_alpha"], dropout=adapter_config.get("lora_dropout", 0.0),
                base_model_name_or_path=self.repo_id)
        except NoPeftForm as exc:
            # Expert LoRA: only with convert.keep_peft_adapter off (profiles refuse the pair), so nothing reads it.
            log.info("Adapter not saved in PEFT format: %s", exc)
            return
        save_file(weights, str(folder / PEFT_WEIGHTS), metadata={"format": "pt"})
        (folder / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))

    def _copy_side_files(self, folder: Path) -> None:
        for path in self._checkpoint_dir.iterdir():
            if path.name in _NOT_COPIED_NAMES or path.name.endswith(_NOT_COPIED_SUFFIXES):
                continue
            if path.name == "config.json" and (folder / "config.json").exists():
                continue
            # Only top-level files: sub-folders (e.g. Meta's original/ weights) are not part of HF format.
            if path.is_file():
                shutil.copy2(path, folder / path.name)


def _replace_dir(src: Path, dst: Path) -> None:
    """Moves src to dst; an existing dst is swapped out first so readers never see a half folder."""
    if not dst.exists():
        os.replace(src, dst)
        return
    old = dst.with_name(f".{dst.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)
