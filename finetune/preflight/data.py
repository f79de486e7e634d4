"""Can the data sources be read, with their fsspec driver installed, and is nothing left a placeholder?
(finetune.preflight)"""

from __future__ import annotations

import re
from typing import Any

import fsspec

from finetune.profile import Profile, resolve_repo_path

PLACEHOLDER = re.compile(r"\byour-(bucket|org)\b")
"""What the shipped production profiles hold where the user's bucket or registry goes."""
EXTRA_OF_PROTOCOL = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure",
                     "abfss": "azure", "adl": "azure"}
"""pyproject.toml's extra that installs each object store's fsspec driver."""


def placeholders(profile: Profile, fields: tuple[str, ...] = ("data", "model", "deploy")) -> list[str]:
    """One line per shipped placeholder value left in these sections of the resolved profile."""
    found: list[str] = []

    def visit(value: Any, path: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                visit(item, f"{path}.{key}")
        elif isinstance(value, list):
            for index, item in enumerate(value):
                visit(item, f"{path}.{index}")
        elif isinstance(value, str) and PLACEHOLDER.search(value):
            found.append(path)

    dumped = profile.model_dump(mode="json")
    for section in fields:
        visit(dumped[section], section)
    lines = []
    if "data.source" in found:
        lines.append(f"data.source is the shipped placeholder {dumped['data']['source']}: give your data, e.g. "
                     f"`prefect deployment run finetune/{profile.name} --param data_source=s3://bucket/chats/` or "
                     "the override data.source=PATH")
    if images := [path for path in found if path.startswith("deploy.image")]:
        lines.append(f"{', '.join(images)} are the shipped placeholders (ghcr.io/your-org/...): build and push the "
                     "images (deployments/images.prefect.yaml) and set them to yours")
    if others := [path for path in found if path != "data.source" and path not in images]:
        lines.append(f"{', '.join(others)}: shipped placeholder values (your-bucket, your-org): set them to yours")
    return lines


def check_data(profile: Profile) -> list[str]:
    """One line per data source that cannot be read: driver missing, path absent, store unreachable."""
    problems = []
    for entry in profile.data.all_sources():
        if PLACEHOLDER.search(entry.source):
            continue  # placeholders() says what to do
        if "://" not in entry.source and not entry.source.startswith("hf:"):
            if not resolve_repo_path(entry.source).exists():
                problems.append(f"{entry.field} {entry.source} does not exist: give an existing file or directory")
            continue
        protocol = entry.source.split("://", 1)[0] if "://" in entry.source else "hf"
        try:
            fs, root = fsspec.core.url_to_fs(entry.source)
        except ImportError:
            extra = EXTRA_OF_PROTOCOL.get(protocol)
            how = f"pip install 'llama4-finetune[{extra}]'" if extra else f"install fsspec's driver for {protocol}://"
            problems.append(f"{entry.field} {entry.source}: the fsspec driver for {protocol}:// is not installed: "
                            f"{how}")
            continue
        except (ValueError, OSError) as exc:
            problems.append(f"{entry.field} {entry.source} is not a readable URL ({_first_line(exc)})")
            continue
        try:
            found = fs.exists(root)
        except Exception as exc:  # each driver raises its own errors for credentials and network
            problems.append(f"{entry.field} {entry.source} cannot be reached ({type(exc).__name__}: "
                            f"{_first_line(exc)}): check the network and the store's credentials")
            continue
        if not found:
            problems.append(f"{entry.field} {entry.source} does not exist (or these credentials cannot list it)")
    return problems


def _first_line(exc: BaseException, width: int = 160) -> str:
    return (str(exc).strip().split("\n", 1)[0] or type(exc).__name__)[:width]
