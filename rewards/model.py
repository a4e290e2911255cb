"""Learned rewards: a local sequence-classification reward model, and a remote HTTP scorer.

`classifier` (RM_helpful / RM_safety as in the paper): an HF `*ForSequenceClassification` directory with one output
(as `align rm` writes), or a hub id `owner/name[@revision]` of one (from the hub cache through huggingface_hub;
offline under HF_HUB_OFFLINE=1).
Each (prompt, completion) is rendered with the reward model's chat template and scored in batches on `device`; with
`offload=true` the model waits on CPU between uses.

`http`: POST {"prompts", "completions", "columns"} as JSON to `url`, expect {"scores": [...]}. Timeouts and retries
with backoff; a server that stays down is a clear error naming the URL (the run's fail / skip policy applies).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

from .registry import reward_factory


def _as_messages(prompt) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def render_pairs(tokenizer, prompts, completions) -> list[str]:
    """Chat-template text of each (prompt, completion) as one conversation."""
    return [tokenizer.apply_chat_template(_as_messages(p) + [{"role": "assistant", "content": c}], tokenize=False)
            for p, c in zip(prompts, completions)]


def local_model_dir(path: str) -> Path:
    """`path` itself when it is a directory, else the hub snapshot of `owner/name[@revision]` (downloaded unless
    huggingface_hub is offline); FileNotFoundError naming `path` when neither."""
    local = Path(path).expanduser()
    if local.is_dir() or str(path).startswith(("/", ".", "~")) or str(path).count("/") != 1 or \
            Path(str(path).split("/")[0]).exists():  # a local path that does not exist: named by the caller
        return local
    import huggingface_hub
    from huggingface_hub import snapshot_download

    repo_id, _, revision = str(path).partition("@")
    try:
        return Path(snapshot_download(repo_id, revision=revision or None,
                                      local_files_only=huggingface_hub.is_offline_mode()))
    except Exception as e:  # noqa: BLE001 - every way a hub lookup fails ends the same: name the model
        raise FileNotFoundError(f"reward model {path!r} is not a local directory, and the hub cache / hub gave no "
                                f"snapshot of it ({type(e).__name__}: {e})") from None


class ClassifierReward:
    def __init__(self, path: str, batch_size: int = 32, device: str = "auto", offload: bool = False,
                 max_length: int = 1024, dtype: str = "auto"):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        local = local_model_dir(path)
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"reward model directory {path} does not exist or has no config.json")
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if device == "auto" else device))
        self.offload = offload and self.device.type != "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(str(local))
        self.tokenizer.padding_side = "right"
        if dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype {dtype!r}: expected auto, float32, bfloat16 or float16")
        self.dtype = (torch.bfloat16 if self.device.type == "cuda" else torch.float32) if dtype == "auto" else \
            getattr(torch, dtype)  # auto: bf16 on a GPU, fp32 on CPU (as the policy)
        self.model = AutoModelForSequenceClassification.from_pretrained(str(local), dtype=self.dtype)
        self.model.eval().requires_grad_(False)
        if self.model.config.num_labels != 1:
            raise ValueError(f"reward model {path} has {self.model.config.num_labels} outputs; expected 1")
        self.model.to("cpu" if self.offload else self.device)
        self.batch_size, self.max_length = batch_size, max_length

    @torch.no_grad()
    def scores(self, texts: list[str]) -> list[float]:
        if self.offload:
            self.model.to(self.device)
        try:
            out = []
            for s in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[s:s + self.batch_size], padding=True, truncation=True,
                                     max_length=self.max_length, add_special_tokens=False, return_tensors="pt")
                out += self.model(**enc.to(self.device)).logits[:, 0].float().cpu().tolist()
            return out
        finally:
            if self.offload:
                self.model.to("cpu")

    def __call__(self, prompts, completions, **_) -> list[float]:
        return self.scores(render_pairs(self.tokenizer, prompts, completions))


@reward_factory("classifier")
def classifier(path: str, batch_size: int = 32, device: str = "auto", offload: bool = False,
               max_length: int = 1024, dtype: str = "auto"):
    """Score with a sequence-classification reward model: a directory (e.g. one `align rm` wrote) or a hub id;
    on `device` (auto: the GPU when there is one) in `dtype` (auto: bf16 on a GPU, fp32 on CPU)."""
    return ClassifierReward(path, batch_size, device, offload, max_length, dtype)


class HTTPRewardError(RuntimeError):
    pass


@reward_factory("http")
def http(url: str, timeout_s: float = 15.0, retries: int = 2, backoff_s: float = 0.5, headers: dict | None = None):
    """Score with a remote server: POST JSON {prompts, completions, columns} -> {"scores": [...]}. The defaults
    notice a server that accepts and never answers within a step: 3 attempts of 15 s, ~47 s in all (they were
    4 x 30 s, 130 s a call)."""

    def score(prompts, completions, **columns) -> list:
        body = json.dumps({"prompts": prompts, "completions": completions,
                           "columns": {k: v for k, v in columns.items() if _jsonable(v)}}).encode()
        last = None
        for attempt in range(retries + 1):
            req = urllib.request.Request(url, data=body, method="POST",
                                         headers={"Content-Type": "application/json", **(headers or {})})
            try:
                with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                    payload = json.loads(resp.read())
                if not isinstance(payload, dict) or "scores" not in payload:
                    raise HTTPRewardError(f"reward server {url} answered without a 'scores' list")
                return payload["scores"]
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}"
                if e.code < 500:
                    break  # a client error will not go away by retrying
            except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError) as e:
                last = str(getattr(e, "reason", e))
            if attempt < retries:
                time.sleep(backoff_s * 2 ** attempt)
        raise HTTPRewardError(f"reward server {url} is unreachable or failing after {retries + 1} attempts ({last})")

    return score


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False
