"""The quickstart's reward models rank an answer of the right kind above junk.

The quickstart's own tiny, sft, rm_helpful and rm_safety stages (conftest's `quickstart_models`: its data and
settings) train the reward models the run uses. On held-out pairs they put the right answer above the junk a broken
policy writes (gibberish, repetition loops, near-empty and off-topic answers), and RM_safety puts a refusal above
compliance; on the held-out eval prompts they score the random-weight model's own greedy answers below the SFT
model's.
"""

import json

import pytest

from align.run.data import load_prompts
from rewards.model import ClassifierReward

from .conftest import DATA

JUNK = ("gibberish", "repetition", "near_empty", "off_topic")


def _pairs(name: str) -> list[dict]:
    return [json.loads(x) for x in (DATA / name / "heldout.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("rm,data", [("helpful", "helpful_pref"), ("safety", "safety_pref")])
def test_held_out_junk_ranks_below_the_right_answer(quickstart_models, rm, data):
    score = ClassifierReward(quickstart_models[rm], device="cpu")
    pairs = _pairs(data)
    chosen = score([p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
    rejected = score([p["prompt"] for p in pairs], [p["rejected"] for p in pairs])
    kinds = JUNK + (("comply",) if rm == "safety" else ())
    for kind in kinds:
        wins = [c > r for p, c, r in zip(pairs, chosen, rejected) if p["rejected_kind"] == kind]
        assert len(wins) >= 8, (rm, kind)
        assert sum(wins) / len(wins) >= 0.85, f"RM_{rm}: right answer above {kind} in {sum(wins)} of {len(wins)}"


@pytest.mark.parametrize("rm", ["helpful", "safety"])
def test_random_model_answers_score_below_the_sft_models(quickstart_models, rm):
    from align.model.policy import ModelConfig, load_policy, load_tokenizer
    from align.rollout.hf import HFEngine
    from align.rollout.protocol import SamplingConfig

    prompts = [r.messages for r in load_prompts(str(DATA / rm / "heldout.jsonl"))]
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=48, batch_size=64)
    answers = {}
    for model in ("tiny", "sft"):
        path = quickstart_models[model]
        engine = HFEngine(load_policy(ModelConfig(path=path), "cpu", trainable=False), load_tokenizer(path))
        answers[model] = engine.generate(prompts, n=1, sampling=greedy).completions
    score = ClassifierReward(quickstart_models[rm], device="cpu")
    junk, good = score(prompts, answers["tiny"]), score(prompts, answers["sft"])
    below = sum(j < g for j, g in zip(junk, good))
    print(f"RM_{rm}: random-weight model {sum(junk) / len(junk):.2f}, SFT model {sum(good) / len(good):.2f} "
          f"(mean over {len(prompts)} held-out prompts); below on {below}")
    assert below / len(prompts) >= 0.9, f"RM_{rm}: random-model answer below the SFT model's in {below} of {len(prompts)}"
    assert sum(junk) / len(junk) < sum(good) / len(good) - 1.0
