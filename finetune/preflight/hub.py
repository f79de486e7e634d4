"""Can this machine reach the hub, read the (gated) repo with its token, and does the revision exist?
(finetune.preflight) Offline, no token, no access and a missing revision each get their own line."""

from __future__ import annotations

import os

import httpx

from finetune.profile import ModelConfig


def hub_endpoint() -> str:
    """HF_ENDPOINT read now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def check_hub(model: ModelConfig) -> tuple[str | None, int]:
    """(what is wrong and what to do, or None; bytes the download stage will fetch, 0 when unknown)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RevisionNotFoundError


    assert model.repo_id and model.revision
    endpoint = hub_endpoint()
    api = HfApi(endpoint=endpoint)
    token = os.environ.get("HF_TOKEN") or None
    page = f"{endpoint}/{model.repo_id}"
    try:
        api.auth_check(model.repo_id, token=token)
        info = api.model_info(model.repo_id, revision=model.revision, files_metadata=True, token=token)
    except RevisionNotFoundError:
        return (f"model.revision {model.revision} does not exist in {model.repo_id} (hub said 404): pin a commit "
                f"sha or branch listed at {page}/commits/main"), 0
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status == 401:
            return (f"the hub refused {model.repo_id} without a valid token (401): set HF_TOKEN to a read token of "
                    f"an account that accepted the license at {page}"), 0
        if status == 403:
            return (f"the account of HF_TOKEN has no access to the gated repo {model.repo_id} (403): accept the "
                    f"license at {page} with that account (approval can take hours), or use another token"), 0
        if status == 404:
            return (f"model.repo_id {model.repo_id} does not exist on {endpoint} (404), or is private to another "
                    "account: check the repo id"), 0
        return f"the hub answered {status} for {model.repo_id}: {str(exc).splitlines()[0]}", 0
    except (httpx.TransportError, OfflineModeIsEnabled, OSError) as exc:
        return (f"cannot reach the hub at {endpoint} ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}): "
                "check the network, proxy (HTTPS_PROXY) and HF_ENDPOINT, or use model.source local"), 0
    names = model.selected_files([s.rfilename for s in info.siblings or []])
    sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
    return None, sum(sizes[name] for name in names)
