"""Published shapes on the meta device; the tiny presets' constraints; both query paths build and run."""

import pytest
import torch
from transformers import DeepseekV2ForCausalLM

from align.model.presets import parameter_counts, preset_config


# Exact counts of the published configs (total: all parameters; activated: per token, input embedding excluded).
EXACT = {"deepseek-v2-lite": (15_706_484_224, 2_451_435_008), "deepseek-v2": (235_741_434_880, 20_851_512_320)}


@pytest.mark.parametrize("name,total,active", [("deepseek-v2-lite", 15.7e9, 2.4e9), ("deepseek-v2", 236e9, 21e9)])
def test_published_parameter_counts(name, total, active):
    with torch.device("meta"):
        model = DeepseekV2ForCausalLM(preset_config(name))
    t, a = parameter_counts(model)
    assert (t, a) == EXACT[name]
    assert abs(t - total) / total < 0.02, t
    # the paper's "2.4B" for Lite is 2.45B rounded down (2.1% off); the others are within 2%
    assert abs(a - active) / active < (0.022 if name == "deepseek-v2-lite" else 0.02), a


@pytest.mark.parametrize("name", ["tiny", "tiny-q-lora"])
def test_tiny_presets_have_the_real_structure(name):
    c = preset_config(name)
    assert c.num_hidden_layers >= 2 and c.first_k_dense_replace == 1
    assert c.n_routed_experts >= 4 and c.num_experts_per_tok == 2 and c.n_shared_experts >= 1
    assert c.kv_lora_rank + c.qk_rope_head_dim == 576  # vLLM's CPU MLA kernel width
    assert c.n_group == 1 and c.topk_group == 1
    model = DeepseekV2ForCausalLM(c)
    names = {n for n, _ in model.named_parameters()}
    assert ("model.layers.0.self_attn.q_a_proj.weight" in names) == (c.q_lora_rank is not None)
    assert "model.layers.0.mlp.gate_proj.weight" in names  # dense first layer
    assert "model.layers.1.mlp.experts.gate_up_proj" in names and "model.layers.1.mlp.shared_experts.up_proj.weight" in names
    out = model(input_ids=torch.randint(0, 100, (2, 8)))
    assert out.logits.shape == (2, 8, c.vocab_size)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        preset_config("huge")
