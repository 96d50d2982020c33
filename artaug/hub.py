"""Model weights from the Hugging Face hub: staged into a cache ahead of a run, then read offline.

    artaug models prefetch --preset flux-dev --set hub.cache_dir=/mnt/shared/hf   # the config's models
    artaug models prefetch black-forest-labs/FLUX.1-dev --set hub.cache_dir=/mnt/shared/hf

The cache is any folder: shared storage mounted on every node (fetched once), or each node's local disk
(fetched on each node, e.g. in a setup command). Runs with `hub.offline: true` read only from it. The
token for gated models (FLUX.1-dev) is read by huggingface_hub from HF_TOKEN in the environment of
the process that downloads (or from `hf auth login`); artaug never takes it as config, passes it
through Ray, prints or writes it.
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

from artaug.config import HubConfig, RunConfig
from artaug.errors import ArtaugError

DEFAULT_ENDPOINT = "https://huggingface.co"
# Formats the loaders never read (TensorFlow, Flax, ONNX, single-file checkpoints): not worth the bytes.
_UNUSED = [
    "*.h5",
    "*.msgpack",
    "*.onnx",
    "*.onnx_data",
    "*.ckpt",
    "*.gguf",
    "*.ot",
    "flax_model*",
    "tf_model*",
]


# Model sources artaug builds itself (models/tiny.py, models/world_flux.py, models/flux_shapes.py):
# never fetched.
BUILT_IN_MODELS = ("tiny", "world", "flux-dev-shapes")


def looks_local(source: str) -> bool:
    """A path (absolute, relative with ./ or ../, ~, existing, or deeper than owner/name), not a hub id."""
    return (
        source.startswith(("/", "./", "../", "~"))
        or os.path.exists(os.path.expanduser(source))
        or source.count("/") > 1
    )


class HubError(ArtaugError, RuntimeError):
    """The hub cannot be reached, a model is gated or missing, or offline mode forbids fetching."""


@dataclass(frozen=True)
class Fetch:
    """One hub repository to stage, and which of its files."""

    field: str
    repo: str
    revision: str | None = None
    allow: tuple[str, ...] | None = None


def env(hub: HubConfig) -> dict[str, str]:
    """The environment variables that carry `hub.*` to a process that loads weights."""
    values = {"HF_HUB_CACHE": os.path.expanduser(hub.cache_dir)} if hub.cache_dir else {}
    return values | ({"HF_HUB_OFFLINE": "1"} if hub.offline else {})


def apply(hub: HubConfig) -> None:
    """Point this process (and, through artaug.cluster, its Ray workers) at the configured cache.

    Every entry point that loads weights calls it: `artaug run` (and --resume), `artaug serve`, the
    Serve app builder, and each model replica. huggingface_hub reads these variables once, when it
    is imported, so its copies are set too: this process honours them even after the import.
    """
    values = env(hub)
    os.environ.update(values)
    if "HF_HUB_CACHE" in values:
        constants.HF_HUB_CACHE = values["HF_HUB_CACHE"]
    if "HF_HUB_OFFLINE" in values:
        constants.HF_HUB_OFFLINE = True


def settings() -> dict:
    """Where this process reads hub weights from, as huggingface_hub sees it."""
    return {"cache_dir": constants.HF_HUB_CACHE, "offline": constants.is_offline_mode()}


def models_of(cfg: RunConfig) -> list[Fetch]:
    """Every hub repository the configuration loads (local folders and "tiny" are left out)."""
    # A diffusers pipeline's weights live in component folders; the top-level files of FLUX.1-dev are
    # a second, single-file copy of the same weights (~24 GB) that from_pretrained never reads.
    wanted = [
        Fetch("model.source", cfg.model.source, cfg.model.revision or None, ("model_index.json", "*/*"))
    ]
    if cfg.critique.backend in ("vllm", "openai"):
        wanted.append(Fetch("critique.model", cfg.critique.model))
    wanted += [
        Fetch(f"scorers.{name}", getattr(cfg.scorers, name)) for name in ("clip", "siglip", "preference")
    ]
    # Only the tokenizer and image processor are read from preference_processor.
    wanted.append(
        Fetch("scorers.preference_processor", cfg.scorers.preference_processor, allow=("*.json", "*.txt"))
    )
    wanted.append(Fetch("safety.model", cfg.safety.model))
    if cfg.evaluate.judge:
        wanted.append(Fetch("evaluate.judge_model", cfg.evaluate.judge_model))
    unique, seen = [], set()
    for item in wanted:
        if (
            item.repo
            and item.repo not in BUILT_IN_MODELS
            and not looks_local(item.repo)
            and item.repo not in seen
        ):
            seen.add(item.repo)
            unique.append(item)
    return unique


def check_reachable(timeout_s: float) -> str:
    """The hub endpoint, once it answers; HubError at once when it cannot be reached in time."""
    endpoint = os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout_s).close()
    except urllib.error.HTTPError:
        pass  # it answered
    except (OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or type(err).__name__
        raise HubError(
            f"cannot reach {endpoint} within {timeout_s:g} s ({reason}): prefetch needs network access"
            " to the hub; on a machine without it, copy a cache prefetched elsewhere into hub.cache_dir"
        ) from None
    return endpoint


def ensure_online(hub: HubConfig) -> None:
    """HubError unless fetching is allowed and the hub answers within hub.connect_timeout_s."""
    if hub.offline or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        raise HubError("offline mode is on (hub.offline or HF_HUB_OFFLINE): prefetch needs the network")
    check_reachable(hub.connect_timeout_s)


def prefetch(items: list[Fetch], hub: HubConfig) -> list[dict]:
    """Download each repository's files into the cache (resuming partial downloads); one dict per repo."""
    ensure_online(hub)
    cache = os.path.expanduser(hub.cache_dir) if hub.cache_dir else None
    done = []
    for item in items:
        start = time.perf_counter()
        try:
            path = snapshot_download(
                item.repo,
                revision=item.revision,
                cache_dir=cache,
                allow_patterns=list(item.allow) if item.allow else None,
                ignore_patterns=_UNUSED,
                etag_timeout=hub.connect_timeout_s,
            )
        except GatedRepoError:
            raise HubError(
                f"{item.field}: {item.repo} is gated: accept its licence at {DEFAULT_ENDPOINT}/{item.repo}"
                " with your account, then put a read token in HF_TOKEN in this node's environment"
            ) from None
        except RepositoryNotFoundError:
            raise HubError(f"{item.field}: {item.repo} is not a hub repository (or needs a token)") from None
        except (HfHubHTTPError, OSError) as err:
            raise HubError(f"{item.field}: fetching {item.repo} failed: {type(err).__name__}") from None
        size = sum(f.stat().st_size for f in _files(path))
        done.append({"field": item.field, "repo": item.repo, "path": path, "bytes": size,
                     "seconds": round(time.perf_counter() - start, 1)})  # fmt: skip
    return done


def _files(folder: str):
    return [p for p in Path(folder).rglob("*") if p.is_file()]
