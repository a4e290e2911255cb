"""The bad-input matrix: datasets, recipes, models and rewards. Every case is refused (or handled) with a message
that names the place, and a finished run directory used alongside is left byte-for-byte as it was."""

import hashlib
import json
import math
import os
import time

import pytest

from align.config import ConfigError, load_config
from align.run.data import DataError
from align.grpo.config import GRPOConfig
from align.grpo.loop import train_grpo
from align.recipe import run_recipe
from align.sft import SFTConfig, train_sft
from rewards import RewardError, RewardSpec, score

from .conftest import DATA, chat, write_jsonl


def _digest(folder) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def finished_run(tiny_dir, tmp_path_factory):
    """A finished SFT run that every case is pointed at: none may change it."""
    out = tmp_path_factory.mktemp("finished") / "sft"
    train_sft(load_config(SFTConfig, None, [f"model.path={tiny_dir}", f"output_dir={out}",
                                            f"train_data=[{DATA}/arith/train.jsonl]", "max_steps=2",
                                            "tensorboard=false"]))
    return out


def _sft(tiny_dir, out, data, *extra):
    return train_sft(load_config(SFTConfig, None, [f"model.path={tiny_dir}", f"output_dir={out}",
                                                   f"train_data=[{data}]", "max_steps=2", *extra]))


def _grpo(model, out, data, *extra):
    return train_grpo(load_config(GRPOConfig, None, [
        f"model.path={model}", f"output_dir={out}", f"train_data=[{data}]", "rewards=[{name: exact_answer}]",
        "group_size=2", "prompts_per_step=2", "steps=1", "sampling.max_new_tokens=4", *extra]))


def _rows(tmp, name, rows):
    return write_jsonl(tmp / name, rows)


OK = chat("What is 1 + 1?", "Answer: 2")


def case_empty_file(t, tiny, out):
    (t / "e.jsonl").write_text("")
    _sft(tiny, out, t / "e.jsonl")


def case_blank_lines_only(t, tiny, out):
    (t / "b.jsonl").write_text("\n\n")
    _sft(tiny, out, t / "b.jsonl")


def case_wrong_encoding(t, tiny, out):
    (t / "l.jsonl").write_bytes(json.dumps(OK).encode() + b"\n" + '{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    _sft(tiny, out, t / "l.jsonl")


def case_invalid_json(t, tiny, out):
    (t / "j.jsonl").write_text(json.dumps(OK) + "\n{not json}\n")
    _sft(tiny, out, t / "j.jsonl")


def case_not_an_object(t, tiny, out):
    (t / "a.jsonl").write_text("[1, 2]\n")
    _sft(tiny, out, t / "a.jsonl")


def case_missing_field(t, tiny, out):
    _sft(tiny, out, _rows(t, "m.jsonl", [OK, {"text": "x"}]))


def case_misspelt_field(t, tiny, out):
    _sft(tiny, out, _rows(t, "s.jsonl", [OK, {"mesages": OK["messages"]}]))


def case_wrong_role(t, tiny, out):
    _sft(tiny, out, _rows(t, "r.jsonl", [{"messages": [{"role": "human", "content": "x"},
                                                        {"role": "assistant", "content": "y"}]}]))


def case_empty_conversation(t, tiny, out):
    _sft(tiny, out, _rows(t, "c.jsonl", [OK, {"messages": []}]))


def case_empty_content(t, tiny, out):
    _sft(tiny, out, _rows(t, "c.jsonl", [chat("x", "   ")]))


def case_non_string_content(t, tiny, out):
    _sft(tiny, out, _rows(t, "n.jsonl", [{"messages": [{"role": "user", "content": ["x"]},
                                                        {"role": "assistant", "content": "y"}]}]))


def case_not_ending_with_assistant(t, tiny, out):
    _sft(tiny, out, _rows(t, "u.jsonl", [{"messages": [{"role": "user", "content": "x"}]}]))


def case_duplicate_ids(t, tiny, out):
    _sft(tiny, out, _rows(t, "d.jsonl", [{"id": "a", **OK}, {"id": "b", **OK}, {"id": "a", **OK}]))


def case_missing_data_file(t, tiny, out):
    _sft(tiny, out, t / "nowhere.jsonl")


def case_unsupported_format(t, tiny, out):
    (t / "d.csv").write_text("a,b\n")
    _sft(tiny, out, t / "d.csv")


def case_prompt_longer_than_context(t, tiny, out):
    _grpo(tiny, out, _rows(t, "p.jsonl", [{"prompt": "short", "answer": "1"},
                                          {"prompt": "seven " * 600, "answer": "1"}]))


def case_sft_length_beyond_context(t, tiny, out):
    _sft(tiny, out, _rows(t, "ok.jsonl", [OK]), "max_length=100000")


def case_prompt_row_lacks_reward_column(t, tiny, out):
    _grpo(tiny, out, _rows(t, "p.jsonl", [{"prompt": "1+1?", "answer": "2"}, {"prompt": "2+2?"}]))


def case_unknown_key(t, tiny, out):
    load_config(SFTConfig, None, [f"model.path={tiny}", f"output_dir={out}", "train_data=[a]", "lerning_rate=1"])


def case_wrong_type(t, tiny, out):
    load_config(SFTConfig, None, [f"model.path={tiny}", f"output_dir={out}", "train_data=[a]", "epochs=two"])


def case_negative_size(t, tiny, out):
    load_config(SFTConfig, None, [f"model.path={tiny}", f"output_dir={out}", "train_data=[a]", "batch_size=-4"])


def case_zero_size(t, tiny, out):
    load_config(GRPOConfig, None, [f"model.path={tiny}", f"output_dir={out}", "train_data=[a]",
                                   "rewards=[{name: math}]", "prompts_per_step=0"])


def case_group_of_one(t, tiny, out):
    load_config(GRPOConfig, None, [f"model.path={tiny}", f"output_dir={out}", "train_data=[a]",
                                   "rewards=[{name: math}]", "group_size=1"])


def case_weight_for_unknown_reward(t, tiny, out):
    load_config(GRPOConfig, None, [f"model.path={tiny}", f"output_dir={out}", "train_data=[a]",
                                   "rewards=[{name: helpfulness_rm, weight: 0.5}]"])


def case_recipe_unreachable_model(t, tiny, out):
    run_recipe("quickstart", [f"run_dir={t}/run", "stages.sft.model.path=/no/such/model"])


def case_recipe_later_stage_reference(t, tiny, out):
    run_recipe("quickstart", [f"run_dir={t}/run", "stages.rm_safety.model.path=@preference"])


def case_model_dir_missing(t, tiny, out):
    _sft(t / "no-model", out, _rows(t, "ok.jsonl", [OK]))


def case_model_dir_without_weights(t, tiny, out):
    (t / "m").mkdir()
    (t / "m" / "config.json").write_text(json.dumps({"model_type": "deepseek_v2"}))
    _sft(t / "m", out, _rows(t, "ok.jsonl", [OK]))


def case_model_dir_bad_config(t, tiny, out):
    (t / "m").mkdir()
    (t / "m" / "config.json").write_text("{truncated")
    _sft(t / "m", out, _rows(t, "ok.jsonl", [OK]))


def _llama(t, tiny):
    from transformers import LlamaConfig, LlamaForCausalLM

    from align.model.policy import load_tokenizer

    LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(t / "llama")
    load_tokenizer(tiny).save_pretrained(t / "llama")
    return t / "llama"


def case_non_deepseek_balance_loss(t, tiny, out):
    _sft(_llama(t, tiny), t / "out", _rows(t, "ok.jsonl", [OK]), "balance_alpha=0.01")


def case_non_deepseek_expert_lora(t, tiny, out):
    _sft(_llama(t, tiny), t / "out", _rows(t, "ok.jsonl", [OK]), "balance_alpha=0", "model.lora.enabled=true",
         "model.lora.experts=true")


def case_tokenizer_without_chat_template(t, tiny, out):
    import shutil

    shutil.copytree(tiny, t / "m")
    cfg = json.loads((t / "m" / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (t / "m" / "tokenizer_config.json").write_text(json.dumps(cfg))
    (t / "m" / "chat_template.jinja").unlink(missing_ok=True)
    _sft(t / "m", out, _rows(t, "ok.jsonl", [OK]))


def _score(fn_name, **spec):
    score([RewardSpec(f"tests.test_bad_input_matrix:{fn_name}", **spec)], ["p", "p"], ["a", "b"], {},
          ["d.jsonl:row 1", "d.jsonl:row 2"])


def raising(prompts, completions, **_):
    raise KeyError("no such judge")


def nan_scores(prompts, completions, **_):
    return [0.0, math.nan]


def inf_scores(prompts, completions, **_):
    return [math.inf, 0.0]


def short_scores(prompts, completions, **_):
    return [1.0]


def string_scores(prompts, completions, **_):
    return ["good", "bad"]


def hangs(prompts, completions, **_):
    time.sleep(60)
    return [0.0, 0.0]


def crashes(prompts, completions, **_):
    os._exit(3)


def case_reward_raises(t, tiny, out):
    _score("raising")


def case_reward_nan(t, tiny, out):
    _score("nan_scores")


def case_reward_inf(t, tiny, out):
    _score("inf_scores")


def case_reward_wrong_length(t, tiny, out):
    _score("short_scores")


def case_reward_not_numbers(t, tiny, out):
    _score("string_scores")


def case_reward_hangs_past_timeout(t, tiny, out):
    _score("hangs", timeout_s=2.0)


def case_reward_crashes_its_worker(t, tiny, out):
    _score("crashes", isolate=True)


def case_remote_reward_down(t, tiny, out):
    score([RewardSpec("http", label="judge", args={"url": "http://127.0.0.1:9/score", "retries": 1,
                                                   "backoff_s": 0.01, "timeout_s": 1})], ["p"], ["a"], {}, ["r"])


MATRIX = [  # (case, exception, message pattern naming the place)
    (case_empty_file, DataError, r"e.jsonl: no rows"),
    (case_blank_lines_only, DataError, r"b.jsonl: no rows"),
    (case_wrong_encoding, DataError, r"l.jsonl:2: not valid UTF-8"),
    (case_invalid_json, DataError, r"j.jsonl:2: invalid JSON"),
    (case_not_an_object, DataError, r"a.jsonl:1: expected a JSON object"),
    (case_missing_field, DataError, r"m.jsonl:row 2: missing field 'messages'"),
    (case_misspelt_field, DataError, r"s.jsonl:row 2: missing field 'messages'"),
    (case_wrong_role, DataError, r"r.jsonl:row 1: field 'messages\[0\].role' is 'human'"),
    (case_empty_conversation, DataError, r"c.jsonl:row 2: field 'messages' must be a non-empty list"),
    (case_empty_content, DataError, r"c.jsonl:row 1: field 'messages\[1\].content' is empty"),
    (case_non_string_content, DataError, r"n.jsonl:row 1: field 'messages\[0\].content' must be a string"),
    (case_not_ending_with_assistant, DataError, r"u.jsonl:row 1: field 'messages' must end with an assistant"),
    (case_duplicate_ids, DataError, r"d.jsonl:row 3: field 'id' 'a' repeats row 1"),
    (case_missing_data_file, DataError, r"nowhere.jsonl: data file not found"),
    (case_unsupported_format, DataError, r"d.csv: unsupported data format"),
    (case_prompt_longer_than_context, ConfigError, r"p.jsonl:row 2: prompt of \d+ tokens \+ sampling.max_new_tokens"),
    (case_sft_length_beyond_context, ConfigError, r"key 'max_length' is 100000, beyond the model's context"),
    (case_prompt_row_lacks_reward_column, ConfigError, r"needs column 'answer', which .*p.jsonl:row 2"),
    (case_unknown_key, ConfigError, r"unknown key 'lerning_rate'"),
    (case_wrong_type, ConfigError, r"key 'epochs' expects a number, got 'two'"),
    (case_negative_size, ConfigError, r"key 'batch_size' must be a positive integer, got -4"),
    (case_zero_size, ConfigError, r"key 'prompts_per_step' must be a positive integer, got 0"),
    (case_group_of_one, ConfigError, r"key 'group_size' must be >= 2"),
    (case_weight_for_unknown_reward, ConfigError, r"key 'rewards\[0\].name': unknown reward 'helpfulness_rm'"),
    (case_recipe_unreachable_model, ConfigError, r"key 'stages.sft.model.path': model directory /no/such/model"),
    (case_recipe_later_stage_reference, ConfigError, r"key 'stages.rm_safety.model.path' refers to '@preference'"),
    (case_model_dir_missing, ConfigError, r"model directory .*no-model does not exist"),
    (case_model_dir_without_weights, ConfigError, r"has no weights"),
    (case_model_dir_bad_config, ConfigError, r"config.json: unreadable"),
    (case_non_deepseek_balance_loss, ConfigError, r"balance_alpha=0.01 needs a DeepSeek-V2 MoE model"),
    (case_non_deepseek_expert_lora, ConfigError, r"lora.experts=true needs a DeepSeek-V2 model"),
    (case_tokenizer_without_chat_template, ConfigError, r"has no chat template"),
    (case_reward_raises, RewardError, r"reward '.*:raising' raised KeyError"),
    (case_reward_nan, RewardError, r"reward '.*:nan_scores' returned nan for d.jsonl:row 2"),
    (case_reward_inf, RewardError, r"reward '.*:inf_scores' returned inf for d.jsonl:row 1"),
    (case_reward_wrong_length, RewardError, r"reward '.*:short_scores' returned 1 scores for 2 completions"),
    (case_reward_not_numbers, RewardError, r"reward '.*:string_scores' returned 'good' \(not a number\)"),
    (case_reward_hangs_past_timeout, RewardError, r"reward '.*:hangs' timed out after 2.0 s .*d.jsonl:row 1"),
    (case_reward_crashes_its_worker, RewardError, r"reward '.*:crashes' crashed its worker process"),
    (case_remote_reward_down, RewardError, r"reward 'judge' raised HTTPRewardError: reward server "
                                           r"http://127.0.0.1:9/score is unreachable"),
]


def test_matrix_has_at_least_30_cases():
    assert len(MATRIX) >= 30


@pytest.mark.parametrize("case,error,pattern", MATRIX, ids=[c.__name__[5:] for c, _, _ in MATRIX])
def test_bad_input(case, error, pattern, tmp_path, tiny_dir, finished_run):
    before = _digest(finished_run)
    with pytest.raises(error, match=pattern):
        case(tmp_path, tiny_dir, finished_run)
    assert _digest(finished_run) == before  # nothing already written is damaged
