"""SFT end to end on the tiny model: loss falls, resume equals an uninterrupted run, bad input writes nothing."""

import math

import pytest

from align.run.checkpoint import list_checkpoints
from align.cli import main
from align.config import ConfigError, load_config
from align.run.data import DataError
from align.run.metrics import read_metrics
from align.run.data import batch_indices
from align.sft import SFTConfig, train_sft

from .conftest import DATA, chat, interrupted_copy, write_jsonl


def _cfg(tiny_dir, out, *extra):
    return load_config(SFTConfig, None, [f"model.path={tiny_dir}", f"output_dir={out}",
                                         f"train_data=[{DATA}/arith/train.jsonl]",
                                         f"eval_data=[{DATA}/arith/heldout.jsonl]", "lr=2e-3", "max_steps=6",
                                         "batch_size=8", "save_every=3", "keep_last=0", "eval_every=0",
                                         "warmup_ratio=0.2", *extra])


def test_sft_lowers_heldout_loss_and_writes_hf_dirs(tiny_dir, tmp_path):
    summary = train_sft(_cfg(tiny_dir, tmp_path / "run", "max_steps=12"))
    assert summary["heldout_end"] < summary["heldout_start"] * 0.75
    final = tmp_path / "run" / "final"
    assert (final / "config.json").is_file() and (final / "model.safetensors").is_file()
    assert (final / "tokenizer_config.json").is_file()
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-0000003", "step-0000006",
                                                                      "step-0000009", "step-0000012"]
    rows = read_metrics(tmp_path / "run")
    assert {"loss/sft", "loss/balance", "moe/load_max", "train/lr"} <= set(rows[1])


def test_resume_gives_the_same_next_losses(tiny_dir, tmp_path):
    full = tmp_path / "full"
    train_sft(_cfg(tiny_dir, full))
    cut = interrupted_copy(full, tmp_path / "cut", last_step=3)
    train_sft(_cfg(tiny_dir, cut))
    a = {r["step"]: r for r in read_metrics(full) if "loss/sft" in r}
    b = {r["step"]: r for r in read_metrics(cut) if "loss/sft" in r}
    for step in (4, 5, 6):
        assert b[step]["loss/sft"] == pytest.approx(a[step]["loss/sft"], rel=1e-5, abs=1e-6), step


def test_lora_sft_checkpoint_is_adapter_only_and_final_is_merged(tiny_dir, tmp_path):
    train_sft(_cfg(tiny_dir, tmp_path / "lora", "model.lora.enabled=true", "max_steps=3"))
    ck = tmp_path / "lora" / "checkpoints" / "step-0000003"
    assert (ck / "adapter_config.json").is_file() and not (ck / "model.safetensors").exists()
    final = tmp_path / "lora" / "final"
    assert (final / "model.safetensors").is_file() and (final / "adapter" / "adapter_config.json").is_file()


def test_batch_order_is_a_function_of_step():
    seen = [i for s in range(5) for i in batch_indices(10, 4, s, seed=3)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert batch_indices(10, 4, 3, 3) == batch_indices(10, 4, 3, 3)


def test_malformed_row_stops_before_anything_is_written(tiny_dir, tmp_path):
    rows = [chat(f"q{i}", f"a{i}") for i in range(1000)]
    rows[411] = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "out"
    cfg = load_config(SFTConfig, None, [f"model.path={tiny_dir}", f"output_dir={out}", f"train_data=[{data}]"])
    with pytest.raises(DataError, match=r"d.jsonl:row 412: field 'messages\[1\].content' is empty"):
        train_sft(cfg)
    assert not out.exists()


def test_cli_refuses_bad_input_with_exit_2_and_writes_nothing(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["sft", f"model.path={tiny_dir}", f"output_dir={out}", f"train_data=[{DATA}/arith/train.jsonl]",
                 "learning_rate=1"]) == 2
    assert "unknown key 'learning_rate'" in capsys.readouterr().err
    assert main(["sft", f"model.path={tmp_path}/missing", f"output_dir={out}",
                 f"train_data=[{DATA}/arith/train.jsonl]"]) == 2
    assert "model directory" in capsys.readouterr().err
    (tmp_path / "unreadable").mkdir()
    (tmp_path / "unreadable" / "config.json").write_text("{")
    assert main(["sft", f"model.path={tmp_path}/unreadable", f"output_dir={out}",
                 f"train_data=[{DATA}/arith/train.jsonl]"]) == 2
    assert "unreadable" in capsys.readouterr().err
    assert not out.exists()


def test_balance_loss_refused_for_a_dense_model(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from align.model.policy import load_tokenizer
    from align.tiny import build_tiny

    build_tiny(tmp_path / "t")
    LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / "llama")
    load_tokenizer(tmp_path / "t").save_pretrained(tmp_path / "llama")
    cfg = _cfg(tmp_path / "llama", tmp_path / "out", "balance_alpha=0.01")
    with pytest.raises(ConfigError, match="needs a DeepSeek-V2 MoE model"):
        train_sft(cfg)


@pytest.mark.parametrize("chunk", [5, 4096])
def test_chunked_sft_loss_equals_full_logits_cross_entropy(tiny_dir, chunk):
    """The SFT loss from chunked log-probs (never all logits at once) = cross-entropy on the model's full logits,
    value and gradient."""
    import torch

    from align.model.policy import ModelConfig, load_policy
    from align.sft import IGNORE, _nll_sum

    model = load_policy(ModelConfig(path=str(tiny_dir)))
    torch.manual_seed(0)
    ids = torch.randint(3, 1000, (3, 17))
    labels = ids.clone()
    labels[:, :6] = IGNORE                                                         # prompt tokens carry no loss
    labels[2, 12:] = IGNORE
    cfg = _cfg(tiny_dir, "unused", f"logprob_chunk={chunk}")
    nll, count, _, _ = _nll_sum(model, {"input_ids": ids, "labels": labels}, cfg, None)
    (nll / count).backward()
    chunked_grad = model.lm_head.weight.grad.clone()
    model.zero_grad()
    logits = model(input_ids=ids).logits[:, :-1]                                   # [B, T-1, V]
    full = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=IGNORE)
    full.backward()
    assert (nll / count).item() == pytest.approx(full.item(), rel=1e-5)
    assert torch.allclose(chunked_grad, model.lm_head.weight.grad, atol=1e-6)


def test_metrics_file_is_strict_json(tmp_path):
    import json

    from align.run.metrics import MetricsLogger

    log = MetricsLogger(tmp_path, tensorboard=False)
    log.log(1, {"reward/judge": float("nan"), "loss/kl": float("inf"), "reward/total": 0.5}, echo=False)
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    row = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl"))
    assert row["reward/judge"] is None and row["reward/total"] == 0.5
    back = read_metrics(tmp_path)[0]
    assert math.isnan(back["reward/judge"]) and math.isnan(back["loss/kl"])
