"""Model loading: offline tiny directory, LoRA targets, adapters-off equals the base, bad directories."""

import pytest
import torch

from align.config import ConfigError
from align.model.policy import LoRAConfig, ModelConfig, check_model_dir, load_policy, load_tokenizer


def test_tiny_dir_loads_with_auto_classes_offline(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert type(model).__name__ == "DeepseekV2ForCausalLM"
    assert tok.chat_template and tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                         add_generation_prompt=True).endswith("Assistant:")


def test_tiny_refuses_non_empty_dir(tmp_path):
    from align.tiny import build_tiny

    (tmp_path / "x").write_text("keep me")
    with pytest.raises(FileExistsError):
        build_tiny(tmp_path)
    assert (tmp_path / "x").read_text() == "keep me"


def test_lora_targets_mla_dense_mlp_shared_and_fused_experts(tiny_dir):
    model = load_policy(ModelConfig(path=str(tiny_dir), lora=LoRAConfig(enabled=True, experts=True)))
    adapted = {n.split(".lora_")[0].replace("base_model.model.", "") for n, _ in model.named_parameters()
               if "lora_" in n}
    for want in ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.kv_a_proj_with_mqa",
                 "model.layers.0.self_attn.kv_b_proj", "model.layers.0.self_attn.o_proj",
                 "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.down_proj",
                 "model.layers.1.mlp.shared_experts.up_proj", "model.layers.1.mlp.experts"]:
        assert want in adapted, want
    base_trainable = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert base_trainable == []


def test_adapters_off_is_the_base_model(tiny_dir):
    base = load_policy(ModelConfig(path=str(tiny_dir)), trainable=False)
    model = load_policy(ModelConfig(path=str(tiny_dir), lora=LoRAConfig(enabled=True)))
    for n, p in model.named_parameters():  # make the adapter non-trivial
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    ids = torch.randint(3, 1000, (2, 10))
    with torch.no_grad():
        with model.disable_adapter():
            off = model(input_ids=ids).logits
        on = model(input_ids=ids).logits
        assert torch.equal(off, base(input_ids=ids).logits)
        assert not torch.allclose(on, off)


def test_q_lora_preset_with_lora(tmp_path):
    from align.tiny import build_tiny

    build_tiny(tmp_path / "q", preset="tiny-q-lora")
    model = load_policy(ModelConfig(path=str(tmp_path / "q"), lora=LoRAConfig(enabled=True)))
    names = {n for n, _ in model.named_parameters() if "lora_A" in n}
    assert any("q_a_proj" in n for n in names) and any("q_b_proj" in n for n in names)


def test_bad_model_directories(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        check_model_dir(tmp_path / "nope")
    with pytest.raises(ConfigError, match="no config.json"):
        check_model_dir(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable"):
        check_model_dir(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="no weights"):
        check_model_dir(tmp_path)


def test_tokenizer_without_chat_template_refused(tiny_dir, tmp_path):
    tok = load_tokenizer(tiny_dir)
    tok.chat_template = None
    tok.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ConfigError, match="no chat template"):
        load_tokenizer(tmp_path)


def test_a_peft_that_remaps_targets_is_refused(tiny_dir, monkeypatch):
    """If a peft release maps gate/up/down_proj onto the fused experts again (in a way `_exact_targets` does not
    switch off), the dense MLP and shared experts would silently get no LoRA: refused, naming peft."""
    import contextlib

    import align.model.policy as policy
    from align.config import ConfigError

    monkeypatch.setattr(policy, "_exact_targets", contextlib.nullcontext)  # peft's conversion left on
    with pytest.raises(ConfigError, match=r"peft .* adapted other modules than model.lora asks for"):
        load_policy(ModelConfig(path=str(tiny_dir), lora=LoRAConfig(enabled=True)))
