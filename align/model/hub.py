"""Model paths that name a hub repository: `owner/name`, optionally `@revision` (a branch, a tag or a commit sha).

Every model path align takes (the policy's `model.path`, the reference, reward models) goes through `resolve_model`:
  * a local directory that exists always wins;
  * a path that looks local — it starts with `/`, `.` or `~`, has more than one `/`, or its first component exists
    here (`runs/sft/final` with `runs/` present) — is a local path; missing, it is refused as before
    (`policy.check_model_dir`: "model directory ... does not exist");
  * anything else that is a valid repo id is fetched with huggingface_hub's `snapshot_download` into the hub cache
    (HF_HUB_CACHE) and used from its snapshot directory, `models--owner--name/snapshots/<commit sha>/`: from the cache
    alone under HF_HUB_OFFLINE=1, otherwise downloading what is missing. An id neither cached nor reachable is a
    ConfigError naming the id and the revision and saying whether downloads were off.
The snapshot directory is named by the commit it holds: that sha is the model's resolved revision, which a run
records in its manifest (`rundir.identity`: model.revision). Resolution is memoised per process (id, revision, cache,
offline), so the config check, the tokenizer, the policy and the reference of one run read the same commit even if
the branch moves meanwhile.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError


@dataclass(frozen=True)
class HubRef:
    """A hub repository named by a model path."""

    repo_id: str          # owner/name
    revision: str | None  # branch, tag or commit sha as written after '@'; None: the default branch


@dataclass(frozen=True)
class ModelSource:
    """Where a configured model path's files are."""

    spec: str             # the path as configured
    path: Path            # the local directory holding config.json, weights, tokenizer
    hub: HubRef | None    # the repository, when `spec` names one
    commit: str | None    # its resolved revision (commit sha); None for a local directory

    def describe(self) -> str:
        """The directory, and for a hub model the repository and commit it is."""
        if self.hub is None:
            return str(self.path)
        return f"{self.path} (hub {self.hub.repo_id} at commit {self.commit})"


def hub_ref(spec: str | Path) -> HubRef | None:
    """The hub repository `spec` names, or None when it is a local path (see the module docstring). A `Path`
    object is always local."""
    if isinstance(spec, Path):
        return None
    text = str(spec)
    if not text or Path(text).expanduser().exists() or text.startswith(("/", ".", "~")) or "\\" in text:
        return None
    repo_id, at, revision = text.partition("@")
    if repo_id.count("/") > 1 or Path(Path(repo_id).parts[0]).exists():
        return None
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    if at and not revision:
        raise ConfigError(f"model {text!r}: nothing after '@'; write {repo_id}@<branch, tag or commit sha>, or "
                          f"{repo_id} for its default branch")
    return HubRef(repo_id, revision or None)


def resolve_model(spec: str | Path) -> ModelSource:
    """The local directory of model path `spec`: itself when local (missing ones are left to the caller's check),
    else the hub snapshot it names (ConfigError when neither cached nor downloadable)."""
    ref = hub_ref(spec)
    if ref is None:
        return ModelSource(str(spec), Path(spec).expanduser(), None, None)
    import huggingface_hub
    from huggingface_hub import constants

    offline = huggingface_hub.is_offline_mode()
    path = _snapshot(ref, str(constants.HF_HUB_CACHE), offline, str(spec))
    return ModelSource(str(spec), path, ref, path.name)


def model_dir(spec: str | Path) -> Path:
    """`resolve_model(spec).path`: what loaders (transformers, vLLM) are given."""
    return resolve_model(spec).path


@functools.lru_cache(maxsize=64)
def _snapshot(ref: HubRef, cache_dir: str, offline: bool, spec: str) -> Path:
    """`snapshot_download` of `ref` into `cache_dir`, errors turned into one ConfigError naming the id (memoised:
    one commit per id, revision and cache for the whole process)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    revision = ref.revision or "main"
    what = f"model {spec!r}: not a local directory, and hub repo {ref.repo_id} at revision {revision}"
    try:
        return Path(snapshot_download(ref.repo_id, revision=ref.revision, cache_dir=cache_dir,
                                      local_files_only=offline))
    except IncompleteSnapshotError as e:
        raise ConfigError(f"{what} is only partly in the hub cache {cache_dir} ({e})") from None
    except LocalEntryNotFoundError:
        if offline:
            raise ConfigError(f"{what} is not in the hub cache {cache_dir}, and HF_HUB_OFFLINE=1 forbids downloading "
                              f"it: download it where the hub is reachable (into that cache), unset HF_HUB_OFFLINE, "
                              f"or give a local directory") from None
        raise ConfigError(f"{what} is not in the hub cache {cache_dir} and the hub could not be reached (online "
                          f"mode)") from None
    except RevisionNotFoundError:
        raise ConfigError(f"{what}: the repository has no such revision (online mode)") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"{what}: no such repository on the hub, or it is private or gated and the current token "
                          f"has no access (online mode)") from None
    except (HfHubHTTPError, HFValidationError, OSError) as e:
        raise ConfigError(f"{what} could not be fetched ({'offline' if offline else 'online'} mode: "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def probe(ref: HubRef) -> tuple[str, str]:
    """What `align run --check` says of a hub model before any run: ("ok", ...) when its snapshot is in the hub cache;
    otherwise, under HF_HUB_OFFLINE=1 ("error", ...: the run would refuse it), online the hub is asked (no download):
    ("ok", ...) when it has the repository and revision (the run downloads it), ("error", ...) when it has not, and
    ("warning", ...) when it cannot be reached from here."""
    import huggingface_hub
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    revision, cache = ref.revision or "main", str(constants.HF_HUB_CACHE)
    what = f"hub model {ref.repo_id} at revision {revision}"
    try:
        path = snapshot_download(ref.repo_id, revision=ref.revision, cache_dir=cache, local_files_only=True)
        return "ok", f"{what}: in the hub cache ({Path(path).name})"
    except (LocalEntryNotFoundError, OSError, ValueError):
        pass
    if huggingface_hub.is_offline_mode():
        return "error", (f"{what} is not in the hub cache {cache}, and HF_HUB_OFFLINE=1 forbids downloading it: the "
                         f"run would stop there; download it where the hub is reachable, or unset HF_HUB_OFFLINE")
    try:
        HfApi().model_info(ref.repo_id, revision=ref.revision, timeout=10)
    except RevisionNotFoundError:
        return "error", f"{what}: the repository has no such revision"
    except RepositoryNotFoundError:
        return "error", f"{what}: no such repository on the hub, or it is private or gated without access"
    except Exception as e:  # noqa: BLE001 (connection errors of several kinds: the hub is not reachable from here)
        return "warning", (f"{what} is not in the hub cache {cache}, and the hub could not be reached from here "
                           f"({type(e).__name__}): the run downloads it, and stops if it cannot")
    return "ok", f"{what}: not in the hub cache; the run downloads it"
