"""The weights a rollout engine receives: LoRA merged on the fly (policy untouched), checkpoint names and layout."""

import copy

import torch
from safetensors import safe_open

from align.model.policy import LoRAConfig, ModelConfig, load_policy
from align.rollout.weights import checkpoint_state_dict, merged_state_dict


def _adapted_policy(tiny_dir):
    """A LoRA policy (attention, MLP and routed experts) whose adapters change the weights."""
    torch.manual_seed(0)
    model = load_policy(ModelConfig(path=str(tiny_dir), lora=LoRAConfig(enabled=True, experts=True)))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    return model


def test_merged_state_dict_equals_merge_and_unload_and_leaves_the_policy_alone(tiny_dir):
    model = _adapted_policy(tiny_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = merged_state_dict(model)
    reference = copy.deepcopy(model).merge_and_unload().state_dict()
    assert sorted(merged) == sorted(reference)
    for k in reference:
        assert torch.allclose(merged[k], reference[k], atol=1e-6), k
    with model.disable_adapter():
        base = merged_state_dict(model)                                             # adapters off: the base
    moved = [k for k in reference if not torch.equal(merged[k], base[k])]
    assert any("experts" in k for k in moved) and any("kv_b_proj" in k for k in moved)  # LoRA really merged
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())      # the policy is untouched


def test_checkpoint_state_dict_has_the_checkpoint_names_and_shapes(tiny_dir):
    model = load_policy(ModelConfig(path=str(tiny_dir)))
    out = checkpoint_state_dict(model, merged_state_dict(model))
    with safe_open(str(tiny_dir / "model.safetensors"), "pt") as f:
        on_disk = {k: f.get_slice(k).get_shape() for k in f.keys()}
    assert {k: list(v.shape) for k, v in out.items()} == {k: list(s) for k, s in on_disk.items()}
    assert any(".mlp.experts.0.gate_proj.weight" in k for k in out)                 # per-expert, as vLLM loads


def test_the_sync_stream_is_lazy_and_equals_the_whole_dicts(tiny_dir, monkeypatch):
    """The vLLM sync streams weights: a tensor is gathered (`_full`: an FSDP2 all-gather) only when the consumer takes
    it, so one full tensor exists at a time; the stream holds exactly the whole-dict result."""
    import align.rollout.weights as w

    model = _adapted_policy(tiny_dir)
    whole = checkpoint_state_dict(model, merged_state_dict(model))
    gathered = []
    full = w._full
    monkeypatch.setattr(w, "_full", lambda t: gathered.append(1) or full(t))
    stream = w.iter_checkpoint_weights(model, w.iter_merged_weights(model))
    assert gathered == []                                                           # nothing before it is read
    next(stream)
    assert 1 <= len(gathered) <= 2                                                  # a weight (+ its LoRA delta)
    rest = dict(stream)
    assert len(rest) == len(whole) - 1
    for k, v in rest.items():
        assert torch.equal(v, whole[k]), k
