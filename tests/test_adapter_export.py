"""`final/adapter` loads in plain peft (fresh process, no align) as the same model as align's merged `final/`.

peft 0.21 remaps `gate_proj` / `up_proj` / `down_proj` targets of a DeepSeek-V2 onto the fused routed experts when it
loads an adapter; `checkpoint.save_portable_adapter` writes the config in the form that conversion leaves alone.
"""

import json
import os
import re
import subprocess
import sys

import torch

from align.run.checkpoint import _base_model_ref
from align.config import load_config
from align.model.policy import LoRAConfig, ModelConfig, load_policy
from align.sft import SFTConfig, train_sft

from .conftest import DATA

# only transformers + peft: how a user (or a serving stack) takes the adapter
PLAIN_PEFT = r"""
import json, sys, torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM
final = sys.argv[1]
cfg = json.load(open(final + "/adapter/adapter_config.json"))
ids = torch.arange(3, 43).reshape(2, 20)
base = AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"], revision=cfg["revision"]).eval()
with torch.no_grad():
    base_logits = base(input_ids=ids).logits
peft = PeftModel.from_pretrained(base, final + "/adapter").eval()
merged = AutoModelForCausalLM.from_pretrained(final).eval()
with torch.no_grad():
    a, m = peft(input_ids=ids).logits, merged(input_ids=ids).logits
adapted = sorted(n for n, x in peft.get_base_model().named_modules() if isinstance(x, LoraLayer))
print(json.dumps({"diff": (a - m).abs().max().item(), "vs_base": (m - base_logits).abs().max().item(),
                  "adapted": adapted}))
"""

IDS = torch.arange(3, 43).reshape(2, 20)


def plain_peft(final, cwd) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    out = subprocess.run([sys.executable, "-c", PLAIN_PEFT, str(final)], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def mlp_modules(names) -> set:
    return {n for n in names if re.search(r"\.mlp\.(shared_experts\.)?(gate|up|down)_proj$", n)}


def test_sft_lora_adapter_loads_exactly_in_plain_peft(tiny_dir, tmp_path, monkeypatch):
    run = tmp_path / "work" / "run"
    run.parent.mkdir()
    (run.parent / "tiny").symlink_to(tiny_dir)
    monkeypatch.chdir(run.parent)  # model.path relative to the training cwd
    train_sft(load_config(SFTConfig, None, ["model.path=tiny", "output_dir=run", "model.lora.enabled=true",
                                            f"train_data=[{DATA}/arith/train.jsonl]", "lr=3e-2", "max_steps=2",
                                            "batch_size=4", "save_every=0", "eval_every=0", "warmup_ratio=0", "tensorboard=false"]))
    final = run / "final"
    cfg = json.loads((final / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_dir.resolve())
    assert f"base_model: {tiny_dir.resolve()}\n" in (final / "adapter" / "README.md").read_text()
    assert not any(t.endswith(("gate_proj", "up_proj", "down_proj")) for t in cfg["target_modules"])

    from safetensors import safe_open

    with safe_open(str(final / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
        mlp_b = [f.get_tensor(k) for k in keys if re.search(r"mlp\..*_proj\.lora_B", k)]
    # standard peft key names (vLLM --enable-lora, peft, transformers all read these)
    assert all(re.fullmatch(r"base_model\.model\.model\.layers\.\d+\.[\w.]+\.lora_[AB]\.weight", k) for k in keys)
    saved = {k.removeprefix("base_model.model.").split(".lora_")[0] for k in keys}
    assert {"model.layers.0.mlp.gate_proj", "model.layers.0.mlp.down_proj",
            "model.layers.1.mlp.shared_experts.up_proj"} <= saved
    assert mlp_b and all(b.abs().max() > 0 for b in mlp_b)  # trained: the MLP adapters matter

    got = plain_peft(final, cwd=tmp_path)  # a fresh process elsewhere: the base path is absolute
    assert mlp_modules(got["adapted"]) == mlp_modules(saved)
    assert not any(n.endswith(".mlp.experts") for n in got["adapted"])
    assert got["vs_base"] > 1e-3
    print(f"plain peft vs merged final/: max abs logit diff {got['diff']:.3g} (peft vs base {got['vs_base']:.3g})")
    assert got["diff"] <= 1e-5, got["diff"]

    # align's own loader takes the exported form, its target check included
    model = load_policy(ModelConfig(path=str(tiny_dir), lora=LoRAConfig(enabled=True)), trainable=False,
                        adapter=final / "adapter")
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        diff = (model(input_ids=IDS).logits - AutoModelForCausalLM.from_pretrained(final)(input_ids=IDS).logits)
    assert diff.abs().max() <= 1e-5


def test_adapter_with_routed_experts_loads_exactly_in_plain_peft(tiny_dir, tmp_path):
    from accelerate import Accelerator

    from align.run.checkpoint import export_final
    from align.model.policy import load_tokenizer

    model = load_policy(ModelConfig(path=str(tiny_dir), lora=LoRAConfig(enabled=True, experts=True)))
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    export_final(Accelerator(cpu=True), model, load_tokenizer(tiny_dir), tmp_path / "final")
    got = plain_peft(tmp_path / "final", cwd=tmp_path)
    assert {"model.layers.1.mlp.experts", "model.layers.0.mlp.up_proj",
            "model.layers.2.mlp.shared_experts.down_proj"} <= set(got["adapted"])
    assert got["vs_base"] > 1e-3
    assert got["diff"] <= 1e-5, got["diff"]


def test_base_model_ref(tmp_path):
    snap = tmp_path / "hub" / "models--deepseek-ai--DeepSeek-V2-Lite" / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    assert _base_model_ref(str(snap)) == ("deepseek-ai/DeepSeek-V2-Lite", "0123abc")
    assert _base_model_ref(str(tmp_path / "hub")) == (str((tmp_path / "hub").resolve()), None)
    assert _base_model_ref("deepseek-ai/DeepSeek-V2-Lite") == ("deepseek-ai/DeepSeek-V2-Lite", None)
