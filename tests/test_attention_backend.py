"""The vLLM MLA backend align names for each device, dtype and CPU kind (align/rollout/vllm.py), and the refusals
before any work; no vLLM needed."""

import pytest
import torch

from align.config import ConfigError, load_config
from align.rollout.vllm import choose_attention_backend

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


@pytest.mark.parametrize("requested, device, dtype, amx, expected", [
    ("auto", "cpu", F32, False, "CPU_MLA"),
    ("auto", "cpu", F32, True, "CPU_MLA"),       # vLLM alone would take AMX_MLA here, which refuses fp32
    ("auto", "cpu", BF16, True, "CPU_MLA"),      # the same kernel on every CPU kind
    ("CPU_MLA", "cpu", BF16, True, "CPU_MLA"),
    ("AMX_MLA", "cpu", BF16, True, "AMX_MLA"),
    ("AMX_MLA", "cpu", F16, True, "AMX_MLA"),
    ("auto", "cuda", BF16, False, None),          # vLLM's own choice on GPU
    ("FLASHMLA", "cuda", BF16, False, "FLASHMLA"),
])
def test_backend_choice(requested, device, dtype, amx, expected):
    assert choose_attention_backend(requested, device, dtype, amx=amx) == expected


@pytest.mark.parametrize("requested, device, dtype, amx, message", [
    ("AMX_MLA", "cpu", F32, True, "refuses float32: set model.dtype=bfloat16"),
    ("AMX_MLA", "cpu", BF16, False, "needs a CPU with AMX"),
    ("FLASHMLA", "cpu", BF16, False, "must be auto, CPU_MLA or AMX_MLA on CPU"),
    ("CPU_MLA", "cuda", BF16, False, "is a CPU backend"),
])
def test_backend_refusals_name_the_combination(requested, device, dtype, amx, message):
    with pytest.raises(ConfigError, match=message):
        choose_attention_backend(requested, device, dtype, amx=amx)


def test_grpo_config_refuses_amx_with_fp32_before_any_work(tiny_dir, tmp_path, monkeypatch):
    from align.grpo.config import GRPOConfig
    import align.rollout.vllm as v

    monkeypatch.setattr(v, "vllm_missing", lambda: None)        # validation runs whether vLLM is installed or not
    monkeypatch.setattr(v, "cpu_has_amx", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="rollout.attention_backend.*AMX_MLA.*float32"):
        load_config(GRPOConfig, None, [f"model.path={tiny_dir}", f"output_dir={tmp_path / 'r'}",
                                       "train_data=[x.jsonl]", "rewards=[{name: exact_answer}]",
                                       "rollout.engine=vllm", "rollout.attention_backend=AMX_MLA"])
    assert not (tmp_path / "r").exists()
