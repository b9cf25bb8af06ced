"""Bad inputs to every public entry point raise ValueError naming the argument (issue 13, section 4).

Each case is ``(argument, call)``: ``call()`` must raise ValueError (or a subclass) whose message names
``argument``.  The cases are generated: for each argument, the values a user or a hostile config could
pass (wrong type, bool for int, string for bool, negative, zero, inf, NaN, out of range, wrong shape).
``pytest tests/test_input_validation.py -q`` reports one test per case; ``test_enough_cases`` keeps the
count at 300 or more.
"""
from __future__ import annotations

import math
import re

import pytest
import torch

from bgpo import objectives
from bgpo.estimators import group_advantages, one_step_mask, token_logprobs
from bgpo.models import LLaDAConfig
from bgpo.ops.random_mask import random_mask
from bgpo.policy_update import PolicyBatch, accumulate_policy_gradient
from bgpo.rewards import countdown_reward, math_reward, sudoku_reward

INF, NAN = math.inf, math.nan
NOT_INTS = [True, False, 1.5, "2", None, 2.0]
NOT_BOOLS = ["false", "true", "False", 0, 1, None, 1.0, "yes"]
BAD_POSITIVE = [0, 0.0, -1, -1e-9, INF, -INF, NAN, True, "1", None]
BAD_NONNEGATIVE = [-1, -1e-6, INF, -INF, NAN, True, "0.1", None]

CASES: list[tuple[str, str, object]] = []  # (id, argument, call)


def case(group: str, argument: str, values, make):
    for value in values:
        CASES.append((f"{group}-{argument}={value!r}", argument, lambda make=make, value=value: make(value)))


# ----------------------------------------------------------------------------------------- estimators
REWARDS = torch.tensor([0.0, 1.0, 0.5, 0.5])
case("group_advantages", "group_size", NOT_INTS + [0, -1, 3], lambda v: group_advantages(REWARDS, v))
case("group_advantages", "std", ["biased", None, 1, True], lambda v: group_advantages(REWARDS, 2, std=v))
case("group_advantages", "eps", BAD_NONNEGATIVE, lambda v: group_advantages(REWARDS, 2, eps=v))
case("group_advantages", "rewards",
     [[0.0, 1.0], REWARDS.view(2, 2), torch.tensor([0.0, NAN]), torch.tensor([INF, 0.0]), None],
     lambda v: group_advantages(v, 2))

LOGITS, TARGETS = torch.randn(2, 3, 5), torch.randint(0, 5, (2, 3))
case("token_logprobs", "softcap", BAD_POSITIVE[:-1], lambda v: token_logprobs(LOGITS, TARGETS, softcap=v))
case("token_logprobs", "logits", [LOGITS.long(), None, [[1.0]]], lambda v: token_logprobs(v, TARGETS))
case("token_logprobs", "targets", [TARGETS.float(), TARGETS[:, :2], None], lambda v: token_logprobs(LOGITS, v))

IDS = torch.randint(0, 100, (2, 6))
PROMPT = torch.tensor([[True] * 3 + [False] * 3] * 2)
RESPONSE = ~PROMPT


def _one_step(**kw):
    return one_step_mask(IDS, PROMPT, RESPONSE, **{"mask_id": 127, "seed": 0, **kw})


case("one_step_mask", "mask_id", [-1, 2**63, True, 1.5, None, "127"], lambda v: _one_step(mask_id=v))
case("one_step_mask", "seed", [2**64, -(2**63) - 1, 1.5, None, "0"], lambda v: _one_step(seed=v))
case("one_step_mask", "iteration", [-1, 2**15, True, 1.0], lambda v: _one_step(iteration=v))
case("one_step_mask", "prompt_mask_prob", [-0.1, 1.5, NAN, INF, True, "0.15", None],
     lambda v: _one_step(prompt_mask_prob=v))
case("one_step_mask", "prompt_mask", [PROMPT.long(), PROMPT[:, :5]],
     lambda v: one_step_mask(IDS, v, RESPONSE, mask_id=127, seed=0))

# ----------------------------------------------------------------------------------------- random_mask
MASKABLE = torch.ones(2, 6, dtype=torch.bool)


def _mask(ids=IDS, maskable=MASKABLE, **kw):
    options = {"mask_id": 127, "seed": 0, "sample_index": 0, "num_samples": 2, "backend": "torch", **kw}
    return random_mask(ids, maskable, **options)


case("random_mask", "mask_id", [-1, -(2**31), 2**31, 2**32 + 7, 2**63, True, 1.5, None, "127"],
     lambda v: _mask(mask_id=v))
case("random_mask", "mask_id", [2**31 - 1 + 1, 2**40], lambda v: _mask(ids=IDS.int(), mask_id=v))
case("random_mask", "mask_id", [128, 255, 256], lambda v: _mask(ids=IDS.to(torch.int8), mask_id=v))
case("random_mask", "seed", [2**63, -(2**63) - 1, 1.5, None, "0", True], lambda v: _mask(seed=v))
case("random_mask", "num_samples", [0, -1, 2**15 + 1, True, 2.0, None], lambda v: _mask(num_samples=v))
case("random_mask", "sample_index", [-1, 2, 2.0, True, None, "0"], lambda v: _mask(sample_index=v))
case("random_mask", "scheme", ["uniform", None, 1], lambda v: _mask(scheme=v))
case("random_mask", "t_min", [-0.1, 1.0, 2.0, NAN, INF, True, "0.001", None], lambda v: _mask(t_min=v))
case("random_mask", "stratify_t", NOT_BOOLS, lambda v: _mask(scheme="bernoulli", stratify_t=v))
case("random_mask", "length_normalize", NOT_BOOLS, lambda v: _mask(length_normalize=v))
case("random_mask", "input_ids", [IDS.float(), IDS[0], None, IDS.tolist()], lambda v: _mask(ids=v))
case("random_mask", "maskable", [MASKABLE.long(), MASKABLE[:, :5], None], lambda v: _mask(maskable=v))
case("random_mask", "sequence_ids",
     [torch.tensor([-1, 0]), torch.tensor([0, 2**31]), torch.tensor([0.0, 1.0]), torch.tensor([0, 1, 2])],
     lambda v: _mask(sequence_ids=v))

# ----------------------------------------------------------------------------------------- objectives
ELBO, ADV = torch.randn(4, requires_grad=True), torch.tensor([1.0, -1.0, 0.5, -0.5])
BAD_VECTORS = [ADV[:3], ADV.long(), torch.tensor([NAN, 0.0, 0.0, 0.0]), torch.tensor([INF, 0.0, 0.0, 0.0]),
               ADV.tolist(), None]
BAD_CLIPS = [(0.2,), (1.0, 0.2), (-0.1, 0.2), (0.2, -0.1), (NAN, 0.2), (0.2, NAN), (0.2, INF), "ab", 0.2, (True, 0.2)]


def _bgpo(**kw):
    return objectives.bgpo_loss(**{"elbo": ELBO, "advantages": ADV, "num_samples": 2, **kw})


case("bgpo_loss", "num_samples", NOT_INTS + [0, -1], lambda v: _bgpo(num_samples=v))
case("bgpo_loss", "denom", BAD_POSITIVE[:-1], lambda v: _bgpo(denom=v))
case("bgpo_loss", "clip", BAD_CLIPS, lambda v: _bgpo(clip=v))
case("bgpo_loss", "max_log_ratio", [0, -1, NAN, INF, "10", True], lambda v: _bgpo(max_log_ratio=v))
case("bgpo_loss", "advantages", [v for v in BAD_VECTORS if v is not None], lambda v: _bgpo(advantages=v))
case("bgpo_loss", "old_elbo", [v for v in BAD_VECTORS if v is not None], lambda v: _bgpo(old_elbo=v))
case("bgpo_loss", "elbo", [ELBO.view(2, 2), torch.arange(4), [0.0] * 4, None], lambda v: _bgpo(elbo=v))


def _per_sample(**kw):
    return objectives.per_sample_loss(**{"elbo": ELBO, "advantages": ADV, "num_samples": 2, "objective": "bgpo",
                                         "ref_elbo": ELBO.detach(), **kw})


case("per_sample_loss", "beta", BAD_NONNEGATIVE[:-1], lambda v: _per_sample(beta=v))
case("per_sample_loss", "objective", ["vrpo", "grpo", None], lambda v: _per_sample(objective=v))
case("per_sample_loss", "ref_elbo", [ELBO.detach()[:3], torch.full((4,), NAN)],
     lambda v: _per_sample(ref_elbo=v, beta=0.1))
case("elbo_pg_loss", "denom", BAD_POSITIVE[:-1],
     lambda v: objectives.elbo_pg_loss(ELBO, ADV, num_samples=1, denom=v))
case("elbo_kl", "max_log_ratio", [0, -1, NAN, INF],
     lambda v: objectives.elbo_kl(ELBO, ELBO.detach(), num_samples=1, max_log_ratio=v))

STACKED = torch.randn(3, 4, requires_grad=True)


def _vrpo(**kw):
    return objectives.vrpo_loss(**{"elbos": STACKED, "advantages": ADV, "ref_elbos": STACKED.detach(), **kw})


case("vrpo_loss", "denom", BAD_POSITIVE[:-1], lambda v: _vrpo(denom=v))
case("vrpo_loss", "beta", BAD_NONNEGATIVE[:-1], lambda v: _vrpo(beta=v))
case("vrpo_loss", "clip", BAD_CLIPS[:5], lambda v: _vrpo(clip=v))
case("vrpo_loss", "elbos", [ELBO, torch.randn(2, 3, 4), None], lambda v: _vrpo(elbos=v))


def _spg(**kw):
    return objectives.spg_loss(**{"elbos": STACKED, "advantages": ADV, **kw})


case("spg_loss", "negative", ["upper", None, 1], lambda v: _spg(negative=v))
case("spg_loss", "beta", BAD_POSITIVE[:-1], lambda v: _spg(beta=v))
case("spg_loss", "mix_weight", [-0.1, 1.1, NAN, INF, True, "0.5"], lambda v: _spg(mix_weight=v))
case("spg_loss", "denom", [0, -2, INF, NAN], lambda v: _spg(denom=v))

LOGP, RMASK = torch.randn(4, 5), torch.ones(4, 5, dtype=torch.bool)


def _diffu(**kw):
    return objectives.diffu_grpo_loss(**{"logp": LOGP, "advantages": ADV, "response_mask": RMASK, "beta": 0.0, **kw})


case("diffu_grpo_loss", "clip_eps", [0, 1, -0.5, 1.5, NAN, INF, True, "0.2"], lambda v: _diffu(clip_eps=v))
case("diffu_grpo_loss", "beta", BAD_NONNEGATIVE[:-1], lambda v: _diffu(beta=v, ref_logp=LOGP))
case("diffu_grpo_loss", "denom", [0, -1, INF, NAN, True], lambda v: _diffu(denom=v))
case("diffu_grpo_loss", "logp", [LOGP[0], None], lambda v: _diffu(logp=v))
case("diffu_grpo_loss", "response_mask", [RMASK[:, :4], RMASK.float() * 0.5, RMASK.long(), None],
     lambda v: _diffu(response_mask=v))


def _wd1(**kw):
    return objectives.wd1_loss(**{"elbo": ELBO, "advantages": ADV, "group_size": 2, **kw})


case("wd1_loss", "elbo", [ELBO[:1], ELBO.view(2, 2), ELBO[:2], torch.arange(4), None], lambda v: _wd1(elbo=v))
case("wd1_loss", "group_size", NOT_INTS + [0, -1, 3, 1], lambda v: _wd1(group_size=v))  # 1: every weight 0
case("wd1_loss", "num_samples", NOT_INTS + [0], lambda v: _wd1(num_samples=v))
case("wd1_loss", "advantages", [ADV[:3], ADV.view(2, 2), torch.tensor([NAN] * 4), None], lambda v: _wd1(advantages=v))

# ----------------------------------------------------------------------------------------- policy update
_MODEL = []


def _model():
    if not _MODEL:
        from bgpo.models import LLaDAModelLM

        _MODEL.append(LLaDAModelLM(LLaDAConfig.preset("tiny")))
    return _MODEL[0]


def _batch(n=4):
    return PolicyBatch(torch.randint(0, 100, (n, 8)), 4, torch.ones(n, 4, dtype=torch.bool), torch.zeros(n),
                       torch.arange(n))


def _update(**kw):
    return accumulate_policy_gradient(**{"model": _model(), "batch": _batch(), "num_samples": 2, "seed": 0, **kw})


case("accumulate_policy_gradient", "num_samples", NOT_INTS + [0, -1, 2**15 + 1], lambda v: _update(num_samples=v))
case("accumulate_policy_gradient", "micro_batch_size", [-1, 0, True, 1.5, "2"], lambda v: _update(micro_batch_size=v))
case("accumulate_policy_gradient", "denom", BAD_POSITIVE[:-1], lambda v: _update(denom=v))
case("accumulate_policy_gradient", "seed", [1.5, None, 2**64, "0"], lambda v: _update(seed=v))
case("accumulate_policy_gradient", "beta", BAD_NONNEGATIVE[:-1], lambda v: _update(beta=v))
case("accumulate_policy_gradient", "objective", ["ppo", None], lambda v: _update(objective=v))
case("accumulate_policy_gradient", "batch", [_batch(0), None, "batch"], lambda v: _update(batch=v))
case("accumulate_policy_gradient", "old_elbos", [torch.zeros(2, 3), torch.zeros(4), [[0.0] * 4] * 2],
     lambda v: _update(old_elbos=v))

# ----------------------------------------------------------------------------------------- model config
for field in ("d_model", "n_layers", "n_heads", "mlp_hidden_size", "vocab_size", "max_sequence_length"):
    case("LLaDAConfig", field, NOT_INTS + [0, -1], lambda v, f=field: LLaDAConfig.preset("tiny", **{f: v}))
case("LLaDAConfig", "n_kv_heads", [True, 0, -1, 1.5, 3], lambda v: LLaDAConfig.preset("tiny", n_kv_heads=v))
case("LLaDAConfig", "embedding_size", [True, 0, 100, 1.5], lambda v: LLaDAConfig.preset("tiny", embedding_size=v))
for field in ("rms_norm_eps", "rope_theta", "init_std"):
    case("LLaDAConfig", field, BAD_POSITIVE, lambda v, f=field: LLaDAConfig.preset("tiny", **{f: v}))
for field in ("include_bias", "include_qkv_bias", "weight_tying"):
    case("LLaDAConfig", field, ["false", 0, 1, None], lambda v, f=field: LLaDAConfig.preset("tiny", **{f: v}))
for field in ("eos_token_id", "pad_token_id"):
    case("LLaDAConfig", field, [128, 126081, -1, True, 1.5, "126"],
         lambda v, f=field: LLaDAConfig.preset("tiny", **{f: v}))
case("LLaDAConfig", "mask_token_id", [128, -1, None, True, "127"],
     lambda v: LLaDAConfig.preset("tiny", mask_token_id=v))

# ----------------------------------------------------------------------------------------- rewards
SUDOKU = {"puzzle": "0104000214003041", "solution": "2134431214233241"}
case("sudoku_reward", "puzzle", ["0104", None, 104000214003041, "0104000214003041x", "a104000214003041"],
     lambda v: sudoku_reward("1234", {**SUDOKU, "puzzle": v}))
case("sudoku_reward", "solution", ["2134", None, "2134431214233240", "2134431214233245"],
     lambda v: sudoku_reward("1234", {**SUDOKU, "solution": v}))
case("countdown_reward", "numbers", [None, "1 2", [1.5, 2], ["1", "2"]],
     lambda v: countdown_reward("1 + 2", {"numbers": v, "target": 3}))
case("countdown_reward", "target", [None, "three", [3]],
     lambda v: countdown_reward("1 + 2", {"numbers": [1, 2], "target": v}))
case("math_reward", "timeout", [0, -1, INF, NAN, True, "5", None],
     lambda v: math_reward("\\boxed{1}", {"answer": "1"}, timeout=v))


# ----------------------------------------------------------------------------------------- the tests
def test_enough_cases():
    assert len(CASES) >= 300, len(CASES)


@pytest.mark.parametrize("argument, call", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_a_value_error_naming_the_argument(argument, call):
    with pytest.raises(ValueError) as error:
        call()
    assert re.search(rf"(?<![\w.]){re.escape(argument)}(?!\w)", str(error.value)), str(error.value)
