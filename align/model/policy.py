"""Load a DeepSeek-V2 policy (any HF checkpoint directory) with transformers, optionally with LoRA through peft.

Routed experts are one fused module per layer in transformers (`DeepseekV2Experts`: 3-D parameters `gate_up_proj`
[E, 2I, H] and `down_proj` [E, H, I]); its kernel is chosen per device (`experts_impl`). Measured with
benchmarks/experts_impl.py on 2 CPU cores: forward+backward eager 0.213 s, grouped_mm 0.216 s, batched_mm 2.85 s;
sampled generation 1,570 / 1,810 / 1,421 tok/s. So "auto" is grouped_mm (on GPU it is the grouped GEMM kernel).

LoRA targets, by module name (peft `target_modules` as one regex, so nothing else is matched by accident):
  * MLA: q_proj (Lite) or q_a_proj / q_b_proj (V2), kv_a_proj_with_mqa, kv_b_proj, o_proj;
  * the dense first-layer MLP and the shared experts: gate_proj / up_proj / down_proj.
Routed experts can only be adapted through peft's `target_parameters` on the fused 3-D tensors (`lora.experts=true`):
peft then adds one low-rank pair per fused tensor (shared across all E experts of the layer, a rank-r update of the
whole [E*2I, H] matrix), not one adapter per expert. By default routed experts stay frozen.

peft (0.21) rewrites any target ending in `gate_proj` / `up_proj` / `down_proj` of a DeepSeek-V2 model onto the fused
routed experts (its conversion for adapters trained on transformers v4), even a full-name regex, so the dense MLP and
the shared experts would silently get no LoRA. `_exact_targets()` switches that conversion off while our adapter is
created or loaded; tests/test_policy.py checks which modules end up adapted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from pathlib import Path
from typing import Literal

import torch

from ..config import ConfigError, option, require
from .hub import model_dir, resolve_model
from .modelfiles import check_tokenizer_fits, check_weights_match_config

ATTN_TARGETS = ["q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
MLP_TARGETS = ["gate_proj", "up_proj", "down_proj"]


@dataclasses.dataclass
class LoRAConfig:
    enabled: bool = option(False, "Train LoRA adapters instead of all weights (the reference is then adapters-off).")
    r: int = option(16, "LoRA rank.")
    alpha: int = option(32, "LoRA alpha (scale = alpha / r).")
    dropout: float = option(0.0, "Dropout on the LoRA input.")
    attention: bool = option(True, "Adapt the MLA projections (q / q_a / q_b, kv_a_proj_with_mqa, kv_b_proj, o_proj).")
    mlp: bool = option(True, "Adapt the dense first-layer MLP and the shared experts (gate / up / down).")
    experts: bool = option(False, "Adapt the fused routed-expert tensors through peft target_parameters.")

    def validate(self) -> None:
        require(self.r > 0, "lora.r", "a positive integer", self.r)
        require(self.alpha > 0, "lora.alpha", "positive", self.alpha)
        require(0 <= self.dropout < 1, "lora.dropout", "in [0, 1)", self.dropout)
        require(self.attention or self.mlp or self.experts, "lora", "targeting something", "all targets off")


@dataclasses.dataclass
class ModelConfig:
    path: str = option(help="A DeepSeek-V2 checkpoint directory (config.json + weights + tokenizer), or a hub id "
                            "owner/name[@branch, tag or commit sha] fetched into the hub cache (align/model/hub.py).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", "Compute dtype: auto = bfloat16 on GPU, float32 on CPU. Full fine-tuning in bfloat16 / float16 "
        "keeps fp32 master weights and optimizer state (align/model/precision.py); LoRA keeps the frozen base in this "
        "dtype and its adapters in fp32.")
    experts_impl: Literal["auto", "eager", "grouped_mm", "batched_mm"] = option(
        "auto", "Routed-experts kernel: auto = measured once per device and shape on an accelerator (cached in "
        "~/.cache/align), grouped_mm on CPU (benchmarks/experts_impl.py).")
    gradient_checkpointing: bool = option(False, "Recompute activations in backward to save memory.")
    lora: LoRAConfig = option(factory=LoRAConfig, help="LoRA settings.")
    chat_template: str = option("", "A chat template replacing the tokenizer's: a file (e.g. template.jinja) or the "
                                    "Jinja text itself ('' = the tokenizer's own). Saved with the stage's tokenizer, so "
                                    "later stages and `align eval` of its output use it.")

    def validate(self) -> None:
        require(bool(self.path), "model.path", "a checkpoint directory or hub id", self.path)
        self.lora.validate()
        if self.chat_template:
            chat_template_text(self.chat_template)  # readable and valid Jinja, or refused by key


def chat_template_text(value: str) -> str:
    """The template of `model.chat_template`: the text itself when it holds Jinja tags, else the file it names;
    ConfigError naming the key when the file is missing or the Jinja does not compile."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if "{{" in value or "{%" in value:
        text, where = value, "the template text"
    else:
        path = Path(value).expanduser()
        require(path.is_file(), "model.chat_template", "a template file or Jinja text", value)
        text, where = path.read_text(encoding="utf-8"), str(path)
    try:
        ImmutableSandboxedEnvironment().parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"key 'model.chat_template': {where} is not valid Jinja (line {e.lineno}: {e.message})") \
            from None
    return text


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def resolve_experts_impl(name: str, device: torch.device) -> str:
    """The kernel to set before measuring: auto = grouped_mm (on CPU also the final choice: equal to eager in
    training, ~15% faster generating, benchmarks/experts_impl.py; kept fixed there so CPU runs are reproducible)."""
    return "grouped_mm" if name == "auto" else name


# config.json architectures whose head is not a language model's: such a directory given as a policy would be loaded
# by AutoModelForCausalLM with a new, random output layer (its own head dropped)
NOT_A_POLICY = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")


def check_model_dir(path: str | Path, policy: bool = False) -> dict:
    """Refuse an unusable model directory (or hub id, resolved by `hub.resolve_model`) with a clear message;
    returns its config.json. `policy`: it is to generate, so a classifier (a reward model `align rm` made, by its
    config.json architectures) is refused before any weight is loaded."""
    source = resolve_model(path)
    path, where = source.path, source.describe()
    if not path.is_dir():
        raise ConfigError(f"model directory {where} does not exist")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"model directory {where} has no config.json: not an HF checkpoint directory")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{cfg_file}: unreadable ({e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{cfg_file}: expected a JSON object of model settings (model_type, vocab_size, ...), got "
                          f"a {type(cfg).__name__}")
    weights = list(path.glob("*.safetensors")) + list(path.glob("*.bin")) + list(path.glob("*.safetensors.index.json"))
    if not weights and not (path / "adapter_config.json").is_file():
        raise ConfigError(f"model directory {where} has no weights (*.safetensors or *.bin)")
    heads = [a for a in cfg.get("architectures") or [] if isinstance(a, str) and a.endswith(NOT_A_POLICY)]
    if policy and heads:
        raise ConfigError(f"model directory {where} is a classifier ({heads[0]} in its config.json architectures), "
                          f"such as a reward model from align rm, not a policy: loaded as a causal LM it would have a "
                          f"random output layer. Give the policy's directory (an SFT stage's final/, a ...ForCausalLM "
                          f"checkpoint); a reward model is used through the classifier reward")
    check_weights_match_config(path, cfg, where)
    return cfg


def _config_json(path: Path) -> dict | None:
    """`path`/config.json as a mapping, None when there is none (a tokenizer-only directory) or it is not one
    (check_model_dir refuses that, naming it)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def is_deepseek_v2(config) -> bool:
    return getattr(config, "model_type", None) == "deepseek_v2"


def load_tokenizer(path: str | Path, chat_template: str = ""):
    """The tokenizer of model directory or hub id `path`, left-padded, with a pad token and a chat template
    (`chat_template`: model.chat_template's value, replacing the tokenizer's own; checked by rendering a short chat)."""
    from transformers import AutoTokenizer

    local = model_dir(path)  # outside the try: its ConfigError is a ValueError too
    try:
        tok = AutoTokenizer.from_pretrained(str(local))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load a tokenizer from {path}: {e}") from None
    if chat_template:
        tok.chat_template = chat_template_text(chat_template)
        chat = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
        try:
            tok.apply_chat_template(chat, tokenize=False)
            tok.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja2's errors, raise_exception() in the template
            raise ConfigError(f"key 'model.chat_template': rendering a user / assistant chat failed: "
                              f"{type(e).__name__}: {e}") from None
    if not tok.chat_template:
        raise ConfigError(f"tokenizer in {path} has no chat template; align renders chats with the tokenizer's own")
    config = _config_json(local)
    if config is not None:
        check_tokenizer_fits(path, tok, config)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def lora_target_regex(lora: LoRAConfig) -> str:
    parts = []
    if lora.attention:
        parts.append(rf"self_attn\.({'|'.join(ATTN_TARGETS)})")
    if lora.mlp:
        parts.append(rf"mlp\.({'|'.join(MLP_TARGETS)})")
        parts.append(rf"mlp\.shared_experts\.({'|'.join(MLP_TARGETS)})")
    return rf".*\.layers\.\d+\.({'|'.join(parts)})" if parts else r"^$"


@contextlib.contextmanager
def _exact_targets():
    """Create / load peft adapters with our target regex taken literally (see the module docstring). Where the
    installed peft has no such conversion there is nothing to switch off; either way `check_lora_targets` verifies
    the outcome."""
    try:
        import peft.utils.transformers_weight_conversion as conv
    except ImportError:  # older peft: no such conversion
        yield
        return
    if not hasattr(conv, "convert_peft_config_for_transformers"):
        yield
        return
    saved = conv.convert_peft_config_for_transformers
    conv.convert_peft_config_for_transformers = lambda *args, **kwargs: None
    try:
        yield
    finally:
        conv.convert_peft_config_for_transformers = saved


def apply_lora(model, lora: LoRAConfig):
    """Wrap `model` with peft LoRA on the configured DeepSeek-V2 modules / fused expert parameters."""
    from peft import LoraConfig, get_peft_model

    target_parameters = None
    if lora.experts:
        if not is_deepseek_v2(model.config):
            raise ConfigError("lora.experts=true needs a DeepSeek-V2 model (fused routed experts)")
        target_parameters = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    peft_cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=lora_target_regex(lora), target_parameters=target_parameters,
                          bias="none", task_type="CAUSAL_LM")
    expected = {name for name, _ in model.named_modules() if re.fullmatch(peft_cfg.target_modules, name)}
    with _exact_targets():
        model = get_peft_model(model, peft_cfg)
    check_lora_targets(model, expected, experts=lora.experts)
    return model


def lora_adapted(model) -> set[str]:
    """Names (in the base model) of the modules peft put LoRA on."""
    from peft.tuners.lora import LoraLayer

    return {name for name, m in causal_lm(model).named_modules() if isinstance(m, LoraLayer)}


def check_lora_targets(model, expected: set[str], experts: bool) -> None:
    """Refuse an adapter whose modules are not the ones asked for: a peft release that remaps targets again (as
    0.21's v4-compatibility conversion does for gate / up / down_proj) would otherwise leave the dense MLP and the
    shared experts silently without LoRA."""
    import peft

    adapted = lora_adapted(model)
    missing = sorted(expected - adapted)
    fused = re.compile(r".*\.mlp\.experts(\.base_layer)*")  # target_parameters: one nested wrapper per tensor
    extra = sorted(n for n in adapted - expected if not (experts and fused.fullmatch(n)))
    if missing or extra:
        raise ConfigError(f"peft {peft.__version__} adapted other modules than model.lora asks for (missing: "
                          f"{missing[:4]}{' ...' if len(missing) > 4 else ''}; unexpected: {extra[:4]}): this peft "
                          f"remaps LoRA targets in a way align does not know; install a peft in align's tested "
                          f"range (`align doctor` shows it)")


def load_policy(cfg: ModelConfig, device: torch.device | str = "cpu", trainable: bool = True,
                adapter: str | Path | None = None, dtype: torch.dtype | None = None):
    """Load the causal LM at `cfg.path` (a directory or hub id) on `device` with the configured dtype, experts
    kernel and LoRA.

    `adapter`: a saved LoRA adapter directory to resume from (loaded trainable). `dtype`: the weights' dtype
    instead of `cfg.dtype`'s (fp32 master weights for mixed-precision training, `align.model.precision`).
    """
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    check_model_dir(cfg.path)
    local, dtype = model_dir(cfg.path), dtype or resolve_dtype(cfg.dtype, device)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(local), dtype=dtype)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load a causal LM from {cfg.path}: {e}") from None
    if is_deepseek_v2(model.config) and hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(resolve_experts_impl(cfg.experts_impl, device))
    model.to(device)
    if cfg.experts_impl == "auto" and device.type != "cpu" and is_deepseek_v2(model.config) and trainable:
        from .moe import measure_experts_impl

        measure_experts_impl(model)  # per device by measurement, cached
    if cfg.gradient_checkpointing and trainable:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora.enabled:
        if adapter is not None:
            from peft import PeftModel

            with _exact_targets():
                model = PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable)
            peft_cfg = model.peft_config["default"]
            targets, params = peft_cfg.target_modules, list(peft_cfg.target_parameters or ())
            names = {n for n, _ in causal_lm(model).named_modules() if not n.endswith(".base_layer")}
            if isinstance(targets, str):  # align's checkpoints: one regex
                expected = {n for n in names if re.fullmatch(targets, n)}
            else:  # align's final/adapter (checkpoint.save_portable_adapter): full names, MLP as `<module>.weight`
                expected = set(targets or ()) | {p.removesuffix(".weight") for p in params if p.endswith(".weight")}
            if expected <= names:  # other adapters' short target names: not checked
                check_lora_targets(model, expected, experts=any(not p.endswith(".weight") for p in params))
        else:
            model = apply_lora(model, cfg.lora)
    if not trainable:
        model.requires_grad_(False)
        model.eval()
    return model


def causal_lm(model):
    """The underlying `*ForCausalLM` of a (peft- or accelerate-) wrapped model."""
    inner = getattr(model, "module", model)  # DDP
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return inner


def load_for_training(cfg: ModelConfig, device, resume_from=None, dtype: torch.dtype | None = None):
    """The trainable policy: from `cfg.path`, or from a training checkpoint (full weights, or base + adapter), its
    weights in `dtype` (default: cfg.dtype's)."""
    if resume_from is None:
        return load_policy(cfg, device, dtype=dtype)
    if cfg.lora.enabled:
        return load_policy(cfg, device, adapter=resume_from, dtype=dtype)
    return load_policy(dataclasses.replace(cfg, path=str(resume_from)), device, dtype=dtype)


def lora_delta(module) -> torch.Tensor | None:
    """The summed ΔW of a peft LoRA layer's active adapters (peft's own `get_delta_weight`); None when its adapters
    are disabled or already merged, or none is active on it."""
    if getattr(module, "merged", False) or getattr(module, "disable_adapters", False):
        return None
    deltas = [module.get_delta_weight(a) for a in module.active_adapters if a in module.lora_A]
    return sum(deltas[1:], deltas[0]) if deltas else None
