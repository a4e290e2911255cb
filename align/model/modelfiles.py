"""A model directory's files agree with each other, checked from the files before any weight is loaded.

    config.json vs the weights   every tensor the config's architecture has and the safetensors files hold (their
                                 headers only: shapes, no data) must have the shape the config gives it; a LLaMA
                                 config.json over DeepSeek-V2 weights, or an edited `vocab_size`, is refused naming
                                 the tensor, both shapes and the config keys of that size (transformers would raise
                                 its `ignore_mismatched_sizes` RuntimeError only once the run had claimed its
                                 directory)
    the tokenizer vs config.json every token id the tokenizer can produce must have a row in the embedding
                                 (`vocab_size`); a larger tokenizer would end in an IndexError in the middle of a step

Tensors the architecture names differently from the files (transformers converts some checkpoint layouts when it
loads them, e.g. per-expert weights into fused ones) are not compared here; transformers checks those itself.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError


def _expected_shapes(path: Path) -> dict[str, tuple[int, ...]] | None:
    """Parameter name -> shape of the causal LM that `path`'s config.json describes, built on the meta device (no
    memory, no weights read); None when transformers has no causal LM for it (then nothing is compared)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path / 'config.json'}: transformers cannot read it as a model config ({e})") from None
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # no causal-LM class for this model type, or one that cannot be built on meta: not compared
        return None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _stored_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor name -> (shape, file) from the headers of the directory's safetensors files."""
    from safetensors import safe_open

    out = {}
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt") as f:
                for name in f.keys():
                    out[name] = (tuple(f.get_slice(name).get_shape()), file.name)
        except Exception as e:  # safetensors raises its own error type for a damaged header
            raise ConfigError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    return out


def _sized_keys(config: dict, sizes: set[int]) -> list[str]:
    """`key=value` for each integer setting of config.json whose value is one of `sizes`."""
    return [f"{k}={v}" for k, v in config.items() if isinstance(v, int) and not isinstance(v, bool) and v in sizes]


def check_weights_match_config(path: Path, config: dict, where: str) -> None:
    """Refuse (ConfigError) a model directory whose config.json gives a shared tensor another shape than its
    safetensors files hold; `where` names the model in the message."""
    stored = _stored_shapes(path)
    if not stored:
        return  # .bin weights or an adapter only: transformers checks them when it loads
    expected = _expected_shapes(path)
    if expected is None:
        return
    wrong = [(name, stored[name], shape) for name, shape in expected.items()
             if name in stored and stored[name][0] != shape]
    if not wrong:
        return
    name, (have, file), want = wrong[0]
    differing = {w for h, w in zip(have, want) if h != w} if len(have) == len(want) else set(want)
    suspects = _sized_keys(config, differing)
    kind = f"model_type {config.get('model_type')!r}" + (f", {config['architectures'][0]}" if isinstance(
        config.get("architectures"), list) and config["architectures"] else "")
    raise ConfigError(f"model directory {where}: config.json ({kind}) does not describe its weights: tensor {name} "
                      f"is {list(have)} in {file}, the config makes it {list(want)}"
                      + (f" ({len(wrong)} of the tensors differ)" if len(wrong) > 1 else "")
                      + (f"; config keys of that size: {', '.join(suspects)}" if suspects else "")
                      + ". Use the config.json these weights were saved with")


def check_tokenizer_fits(path, tokenizer, config: dict) -> None:
    """Refuse a tokenizer that produces token ids the model has no embedding row for (config.json's vocab_size)."""
    vocab = config.get("vocab_size")
    if not isinstance(vocab, int) or isinstance(vocab, bool):
        return
    ids = max(tokenizer.get_vocab().values(), default=-1) + 1
    if ids > vocab:
        raise ConfigError(f"tokenizer in {path} has {ids} token ids, more than the model's vocab_size={vocab} "
                          f"(config.json): ids {vocab}..{ids - 1} have no embedding row. Use the tokenizer the "
                          "model was trained with")
