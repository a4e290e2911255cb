"""Absorbed MLA decode (align/model/mla.py) equals transformers' expand-the-cache attention."""

import pytest
import torch

from align.model.mla import absorbed_mla
from align.model.policy import LoRAConfig, ModelConfig, load_policy


def _decode(model, ids, mask, steps=6):
    """Greedy decode with a cache, returning the tokens and each step's log-softmax."""
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, top_k=None,
                         pad_token_id=2, output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, 1).log_softmax(-1)


@pytest.mark.parametrize("preset_lora", [False, True])
def test_absorbed_decode_equals_transformers(tiny_dir, preset_lora):
    torch.manual_seed(0)
    model = load_policy(ModelConfig(path=str(tiny_dir), lora=LoRAConfig(enabled=preset_lora)), trainable=False)
    if preset_lora:  # adapters with weight: the absorbed path must use kv_b_proj + its LoRA delta
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.2)
    ids = torch.randint(3, 1000, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0                                                                # left padding
    mask[2, :1] = 0
    ref_seq, ref_lp = _decode(model, ids, mask)
    calls = []
    attn = next(m for m in model.modules() if type(m).__name__ == "DeepseekV2Attention")
    with absorbed_mla(model):
        original = attn._align_original_forward
        attn._align_original_forward = lambda *a, **k: (calls.append(1), original(*a, **k))[1]
        seq, lp = _decode(model, ids, mask)
    assert len(calls) == 1                                  # only the prefill took the original path
    assert "forward" not in attn.__dict__                   # restored
    assert torch.equal(seq, ref_seq)
    assert (lp - ref_lp).abs().max() < 1e-5


def test_absorbed_decode_under_disabled_adapters_is_the_base_model(tiny_dir):
    model = load_policy(ModelConfig(path=str(tiny_dir), lora=LoRAConfig(enabled=True)), trainable=False)
    base = load_policy(ModelConfig(path=str(tiny_dir)), trainable=False)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    ids = torch.randint(3, 1000, (2, 7))
    with absorbed_mla(model), model.disable_adapter():
        seq, lp = _decode(model, ids, torch.ones_like(ids))
    ref_seq, ref_lp = _decode(base, ids, torch.ones_like(ids))
    assert torch.equal(seq, ref_seq) and (lp - ref_lp).abs().max() < 1e-5
