"""download: the base model as a local Hugging Face checkpoint directory, verified file by file.

Sources:
- ``hub``: ``huggingface_hub.snapshot_download`` at a pinned commit (resumable: partial files survive a retry in the
  stage's working directory); every file is checked against the hub's own size and hash (LFS sha256, git blob sha1).
- ``local``: a directory or any fsspec URL (``s3://bucket/model``), copied with a hash computed on the way and checked.
- ``embedded``: the tiny Llama 4 the project builds itself, then taken through the ``local`` path exactly like a
  user's own checkpoint.

``HF_TOKEN`` is read from the environment at call time and handed to huggingface_hub only: it never enters a log line,
the profile, the key or the artifact.

Read as published: every file lands byte for byte and is verified against its source hash. Hub configs were written by
older transformers (``attn_temperature_tuning: 4``) and the pinned one rejects some of their values, so the artifact's
``config.json`` is the normalized config (``llama4tune.config.normalize_hf_config``) that every later stage and every
library reads through the artifact path, and the published bytes stay in ``as-published/config.json``. Why not a
separate "view" directory of links: the store hashes every file it lists (hard links would hash 800 GB twice) and
object stores keep no links; a sub-folder is also what checkpoint copiers skip (only top-level files are HF format).
Each rewritten value is recorded, with the library call that needed it, in the metrics and a UI table.

The checkpoint is checked before later stages pay for it: a known quantized repo id (the FP8 Maverick) is refused by
the profile itself (``finetune.quantized_bases``), any other quantized base from its config before any weight is
fetched; a config transformers or our model cannot read, an architecture other than Llama 4, or a missing
tokenizer fails at once (``PermanentError``) naming the file and the field.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from finetune import model_artifact
from finetune.hashing import hash_json, hash_tree, sha256_file
from finetune.jsonfile import json_object
from finetune.profile import COMMIT_SHA, ModelConfig, Profile, resolve_repo_path
from finetune.quantized_bases import bf16_hint
from finetune.safetensors_check import file_problems
from finetune.stage import PermanentError, StageContext, StageSpec
from finetune.store import atomic_file, scratch_root

REQUIRED_FILES = ("config.json",)
PUBLISHED_DIR = "as-published"
"""Where the verbatim published config.json is kept when normalization rewrote the top-level one."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
"""pack tokenizes with the model's fast tokenizer and the chat template in its tokenizer_config.json."""
ARCHITECTURES = ("Llama4ForCausalLM", "Llama4ForConditionalGeneration")


def embedded_model_dir(seed: int, family: str = "tiny") -> Path:
    """Build (once per seed, family shape and builder source) the embedded tiny model and return its directory."""
    import embedded
    import llama4tune

    # The build is deterministic in the builder's code, its config's (llama4tune/models.py) and the data its tokenizer
    # is trained on.
    sources = Path(embedded.__file__).parent
    builder = hash_json([sha256_file(sources / name) for name in (
        "tiny_model.py", "tokenizer.py", "dataset.py", "data/train.jsonl")]
        + [sha256_file(Path(llama4tune.__file__).parent / "models.py")])
    shape = "" if family == "tiny" else f"{family}-shaped-"
    target = scratch_root() / "embedded" / f"{shape}tiny-llama4-{builder[:12]}-seed{seed}"
    if not (target / "config.json").is_file():
        # Imported only to build: it pulls in torch and transformers, ~10 s a cached rerun need not pay.
        from embedded.tiny_model import build_tiny_model

        try:
            build_tiny_model(target, seed=seed, family=family)
        except OSError:
            # Another run built it at the same moment and renamed first (two runs starting on an empty scratch
            # dir): the build is deterministic in its key, so theirs is the one this run would have written.
            if not (target / "config.json").is_file():
                raise
    return target


def resolve_revision(model: ModelConfig) -> str:
    assert model.repo_id and model.revision
    if COMMIT_SHA.match(model.revision):
        return model.revision
    from huggingface_hub import HfApi

    return HfApi().model_info(model.repo_id, revision=model.revision, token=os.environ.get("HF_TOKEN") or None).sha


def _local_source(model: ModelConfig) -> str:
    if model.source == "embedded":
        return str(embedded_model_dir(model.seed, model.family))
    if model.source == "artifact":
        assert model.path is not None
        return model_artifact.resolve(model.path)[0]
    assert model.path is not None
    return model.path if "://" in model.path else str(resolve_repo_path(model.path))


def fingerprint(profile: Profile) -> dict[str, Any]:
    model = profile.model
    if model.source == "hub":
        # A commit names exact content, so the key needs no file reads; a branch or tag is resolved to the commit it
        # points at now, so a moved branch means a new key instead of a stale cache hit.
        return {"repo_id": model.repo_id, "revision": resolve_revision(model)}
    if model.source == "artifact":
        assert model.path is not None
        return model_artifact.resolve(model.path)[1]
    source = _local_source(model)
    if "://" not in source:
        return {"content": hash_tree(Path(source))}
    fs, root = fsspec.core.url_to_fs(source)
    # Object stores give a content tag (ETag/md5) per object: key by those rather than downloading to hash.
    listing = {str(p)[len(root):]: {k: v for k, v in info.items() if k in ("size", "ETag", "etag", "md5", "mtime")}
               for p, info in fs.find(root, detail=True).items()}
    return {"url": source, "objects": listing}


def _git_blob_sha1(path: Path) -> str:
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def refuse_quantized_config(config: dict[str, Any], where: str, repo_id: str | None) -> None:
    """A config with a quantization_config (fbgemm_fp8, fp8, compressed-tensors, ...) is no base to fine-tune."""
    for prefix, section in (("", config), ("text_config.", config.get("text_config"))):
        quant = section.get("quantization_config") if isinstance(section, dict) else None
        if quant:
            method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
            raise PermanentError(f"{where}: field '{prefix}quantization_config' (quant_method {method!r}): the "
                                 f"checkpoint is quantized and training needs bf16 weights; {bf16_hint(repo_id)}")


def verify_safetensors(fs: fsspec.AbstractFileSystem, root: str, sizes: dict[str, int | None],
                       config: dict[str, Any] | None) -> int:
    """Every ``*.safetensors`` among ``sizes`` (name -> bytes, under ``root``) parsed from its header and checked
    against the config's dimensions; the number checked, or PermanentError naming the first bad file and its faults."""
    from llama4tune.config import load_text_args

    try:
        args = load_text_args(config) if config is not None else None
    except ValueError:
        args = None  # normalize_config / check_readable name what is wrong with the config itself
    names = sorted(name for name in sizes if name.endswith(".safetensors"))
    for name in names:
        url = f"{root.rstrip('/')}/{name}"
        with fs.open(url, "rb") as handle:
            problems = file_problems(handle, sizes[name] if sizes[name] is not None else fs.size(url), args)
        if problems:
            shown = url if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(url)
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise PermanentError(f"{shown}: not a usable safetensors file: {'; '.join(problems[:3])}{more}")
    return len(names)


def _download_hub(ctx: StageContext) -> dict[str, Any]:
    from huggingface_hub import HfApi, snapshot_download

    model = ctx.profile.model
    token = os.environ.get("HF_TOKEN") or None
    revision = resolve_revision(model)
    info = HfApi().model_info(model.repo_id, revision=revision, files_metadata=True, token=token)
    expected = {s.rfilename: s for s in info.siblings or [] if s.rfilename in model.selected_files(
        [s.rfilename for s in info.siblings or []])}
    # The config alone first: a quantized base is refused before any weight is fetched.
    from huggingface_hub import hf_hub_download

    config_path = hf_hub_download(model.repo_id, "config.json", revision=revision, local_dir=ctx.workdir, token=token)
    refuse_quantized_config(json_object(Path(config_path).read_text(), config_path),
                            f"{model.repo_id}@{revision}/config.json", model.repo_id)
    ctx.log(f"downloading {len(expected)} files of {model.repo_id}@{revision}")
    snapshot_download(
        model.repo_id, revision=revision, local_dir=ctx.workdir, token=token,
        allow_patterns=model.allow_patterns, ignore_patterns=model.ignore_patterns,
    )
    shutil.rmtree(ctx.workdir / ".cache", ignore_errors=True)  # hub bookkeeping, not part of the model
    for done, (name, sibling) in enumerate(sorted(expected.items()), 1):
        path = ctx.workdir / name
        if not path.is_file() or (sibling.size is not None and path.stat().st_size != sibling.size):
            raise RuntimeError(f"{name}: size {path.stat().st_size if path.exists() else 'missing'} "
                               f"!= hub size {sibling.size}; the download was truncated, retrying")
        if sibling.lfs is not None:
            if sha256_file(path) != sibling.lfs.sha256:
                raise RuntimeError(f"{name}: sha256 differs from the hub's LFS hash; the file was altered")
        elif sibling.blob_id and _git_blob_sha1(path) != sibling.blob_id:
            raise RuntimeError(f"{name}: git blob hash differs from the hub's; the file was altered")
        ctx.progress(done / max(len(expected), 1), f"verified {name}")
    # The hub's hashes prove the bytes are the published ones, not that the published file is whole.
    checked = verify_safetensors(fsspec.filesystem("file"), str(ctx.workdir),
                                 {name: (ctx.workdir / name).stat().st_size for name in expected},
                                 json_object(Path(config_path).read_text(), config_path))
    return {"source": "hub", "repo_id": model.repo_id, "revision": revision, "safetensors_checked": checked}


def _copy_verified(fs: fsspec.AbstractFileSystem, src: str, dst: Path, size: int | None) -> None:
    digest = hashlib.sha256()
    with fs.open(src, "rb") as reader, atomic_file(dst, "wb") as writer:
        while chunk := reader.read(8 << 20):
            digest.update(chunk)
            writer.write(chunk)
    if size is not None and dst.stat().st_size != size:
        raise RuntimeError(f"{src}: copied {dst.stat().st_size} bytes but the source has {size}; retrying")
    if sha256_file(dst) != digest.hexdigest():
        raise RuntimeError(f"{dst}: content changed while copying from {src}")


def _download_local(ctx: StageContext) -> dict[str, Any]:
    model = ctx.profile.model
    source = _local_source(model)
    fs, root = fsspec.core.url_to_fs(source)
    if not fs.isdir(root):
        raise PermanentError(f"model.path: {source} is not a directory")
    found = fs.find(root, detail=True)
    names = {str(path)[len(root.rstrip('/')) + 1:]: info for path, info in found.items()}
    config = None
    if "config.json" in names:  # read before copying anything: a quantized base is refused before its weights move
        config_url = f"{root.rstrip('/')}/config.json"
        config = json_object(fs.cat_file(config_url).decode(), config_url)
        refuse_quantized_config(config, config_url, None)
    wanted = model.selected_files(
        sorted(set(names) - set(model_artifact.BOOKKEEPING if model.source == "artifact" else ())))
    # Headers only, at the source: a truncated or mislabelled checkpoint is refused before its weights are copied.
    checked = verify_safetensors(fs, root, {name: names[name].get("size") for name in wanted}, config)
    for done, name in enumerate(wanted, 1):
        _copy_verified(fs, f"{root.rstrip('/')}/{name}", ctx.workdir / name, names[name].get("size"))
        ctx.progress(done / len(wanted), f"copied {name}")
    return {"source": model.source, "path": source, "safetensors_checked": checked}


def normalize_config(workdir: Path) -> list[dict[str, Any]]:
    """Check config.json as published and rewrite what the libraries we call reject; returns the changes made.

    The published bytes move to ``as-published/config.json``, so the artifact still holds (and hashes) them.
    """
    from llama4tune.config import normalize_hf_config

    path = workdir / "config.json"
    published_path = workdir / PUBLISHED_DIR / "config.json"
    if published_path.is_file():  # a resumed attempt normalized already: start again from the published bytes
        os.replace(published_path, path)
    config = json_object(path.read_text(), str(path))
    refuse_quantized_config(config, str(path), None)
    architectures = config.get("architectures")
    if not (isinstance(architectures, list) and architectures and set(architectures) <= set(ARCHITECTURES)):
        raise PermanentError(f"{path}: field 'architectures' is {architectures!r}; this pipeline fine-tunes Llama 4 "
                             f"checkpoints ({' or '.join(ARCHITECTURES)})")
    normalized, changes = normalize_hf_config(config)
    if changes:
        published_path.parent.mkdir(exist_ok=True)
        os.replace(path, published_path)
        with atomic_file(path, "w") as handle:
            json.dump(normalized, handle, indent=2)
            handle.write("\n")
    return [{"field": c.field, "published": c.published, "normalized": c.normalized, "needed by": c.needed_by}
            for c in changes]


def ensure_chat_template(workdir: Path) -> list[dict[str, Any]]:
    """A base repo ships no chat template (transformers' convert script writes one only for instruct repos), yet chat
    data is packed and served with one: give it Llama 4's chat format (the embedded template: Llama 4's headers and
    tokens, tool calls as llama4tune.tool_calls renders them). The published file moves to ``as-published/``."""
    path = workdir / "tokenizer_config.json"
    if not path.is_file():
        return []  # check_readable names the missing tokenizer
    published_path = workdir / PUBLISHED_DIR / path.name
    if published_path.is_file():  # a resumed attempt added it already: start again from the published bytes
        os.replace(published_path, path)
    config = json_object(path.read_text(), str(path))
    if config.get("chat_template"):
        return []
    from embedded.tokenizer import CHAT_TEMPLATE

    published_path.parent.mkdir(exist_ok=True)
    os.replace(path, published_path)
    with atomic_file(path, "w") as handle:
        json.dump({**config, "chat_template": CHAT_TEMPLATE}, handle, indent=2, ensure_ascii=False)
        handle.write("\n")
    return [{"field": "tokenizer_config.json: chat_template", "published": None,
             "normalized": "Llama 4 chat format (embedded/tokenizer.py CHAT_TEMPLATE)",
             "needed by": "pack (chat records) and vllm serve (chat requests)"}]


def check_readable(workdir: Path) -> None:
    """The normalized checkpoint loads in transformers and in our model; its tokenizer is there and loads."""
    import transformers

    from llama4tune.config import load_text_args

    path = workdir / "config.json"
    try:
        transformers.AutoConfig.from_pretrained(workdir)
    except Exception as exc:  # noqa: BLE001 - any failure to read the config is permanent; its message names the field
        raise PermanentError(f"{path}: transformers {transformers.__version__} AutoConfig.from_pretrained cannot "
                             f"read it: {exc}") from None
    try:
        load_text_args(path)
    except ValueError as exc:
        raise PermanentError(str(exc)) from None
    for name in TOKENIZER_FILES:
        if not (workdir / name).is_file():
            raise PermanentError(f"{workdir / name}: missing; packing needs the model's fast tokenizer "
                                 f"({' and '.join(TOKENIZER_FILES)}, with its chat_template)")
    json_object((workdir / "tokenizer_config.json").read_text(), str(workdir / "tokenizer_config.json"))
    try:
        transformers.AutoTokenizer.from_pretrained(workdir)
    except Exception as exc:  # noqa: BLE001 - as above: a tokenizer that does not load now never will
        raise PermanentError(f"{workdir}: transformers AutoTokenizer.from_pretrained cannot load "
                             f"{' / '.join(TOKENIZER_FILES)}: {exc}") from None


def run(ctx: StageContext) -> dict[str, Any]:
    model = ctx.profile.model
    metrics = _download_hub(ctx) if model.source == "hub" else _download_local(ctx)
    for required in REQUIRED_FILES:
        if not (ctx.workdir / required).is_file():
            raise PermanentError(f"model source has no {required}: not a Hugging Face checkpoint directory")
    changes = normalize_config(ctx.workdir) + ensure_chat_template(ctx.workdir)
    check_readable(ctx.workdir)
    files = sorted(p for p in ctx.workdir.rglob("*") if p.is_file())
    metrics.update(files=len(files), bytes=sum(p.stat().st_size for p in files), config_normalized=changes)
    ctx.tables["model_files"] = [
        {"file": str(p.relative_to(ctx.workdir)), "MB": round(p.stat().st_size / 1e6, 3)} for p in files]
    ctx.tables["config_normalized"] = changes
    return metrics


def config(profile: Profile) -> dict[str, Any]:
    # The seed and path are covered by the fingerprint; the token is deliberately absent.
    model = profile.model
    return {"source": model.source, "allow": model.allow_patterns, "ignore": model.ignore_patterns}


SPEC = StageSpec(name="download", version="3", run=run, config=config, fingerprint=fingerprint, resumable=True)
