"""The trainer's config: YAML + overrides, type checks and cross-checks naming the key, --help, presets."""
import dataclasses
import subprocess
import sys

import pytest
import torch

from bgpo.cli import main, train_main
from bgpo.train.config import PRESET_DIR, TrainConfig, apply_overrides, describe_options, load_config


def test_defaults_are_valid_and_overrides_are_typed():
    config = load_config(None, ["rollout.group_size=4", "optim.lr=1e-5", "policy.clip=[0.2, 0.3]",
                                "model.tokenizer=char", "policy.micro_batch_size=null"])
    assert config.rollout.group_size == 4 and config.optim.lr == 1e-5
    assert config.policy.clip == [0.2, 0.3] and config.policy.micro_batch_size is None
    assert config.policy.objective == "bgpo"


@pytest.mark.parametrize("override, message", [
    ("rollout.groupsize=4", "rollout.groupsize: unknown option; did you mean 'rollout.group_size'"),
    ("rollout.group_size=four", "rollout.group_size: expected int"),
    ("policy.objective=ppo", "policy.objective: expected one of"),
    ("rollout.gen_length=100", "rollout.gen_length: 100 is not a multiple of rollout.block_length=32"),
    ("rollout.steps=100", "rollout.steps: 100 is not a multiple of the number of blocks"),
    ("policy.num_samples=0", "policy.num_samples: expected an int >= 1"),
    ("model.dtype=float64", "model.dtype: expected one of"),
    ("optim.lr=-1", "optim.lr: expected a float > 0"),
    ("data.task=custom", "reward: data.task 'custom' needs reward"),
    ("model.init=/nonexistent.safetensors", "model.init: no such file"),
    ("rollout=3", "rollout: expected a mapping"),
    ("steps", "override: expected key=value"),
    ("log.eval_samples=4", "log.eval_samples: 4 samples per prompt need log.eval_temperature > 0"),
    ("log.eval_temperature=-1", "log.eval_temperature: expected a float >= 0"),
    ("policy.kl_beta=-0.1", "policy.kl_beta: expected a float >= 0"),
])
def test_bad_config_names_the_key(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_config(None, ["model.tokenizer=char", override])


# Each bad config (one or more overrides) and the key its error must start with: the list (zero
# lengths that divided by zero, a negative grad_clip that flipped the gradient, lr=inf, negative counts,
# clip out of order, options of the wrong objective...), wrong types (bools for ints, strings, NaN, inf,
# lists of the wrong length), and names of things that do not exist.
BAD_CONFIGS = [
    (["rollout.block_length=0"], "rollout.block_length"), (["rollout.gen_length=0"], "rollout.gen_length"),
    (["rollout.batch_size=0"], "rollout.batch_size"), (["batch_size=0"], "batch_size"),
    (["rollout.steps=0"], "rollout.steps"), (["rollout.group_size=1"], "rollout.group_size"),
    (["rollout.group_size=true"], "rollout.group_size"), (["rollout.gen_length=16.0"], "rollout.gen_length"),
    (["rollout.batch_size=3"], "rollout.batch_size"), (["rollout.temperature=-0.5"], "rollout.temperature"),
    (["rollout.temperature=nan"], "rollout.temperature"), (["rollout.cfg_scale=-1"], "rollout.cfg_scale"),
    (["rollout.cfg_scale=inf"], "rollout.cfg_scale"), (["rollout.remasking=greedy"], "rollout.remasking"),
    (["optim.grad_clip=-1"], "optim.grad_clip"), (["optim.grad_clip=0"], "optim.grad_clip"),
    (["optim.grad_clip=nan"], "optim.grad_clip"), (["optim.lr=inf"], "optim.lr"), (["optim.lr=nan"], "optim.lr"),
    (["optim.lr=0"], "optim.lr"), (["optim.lr=fast"], "optim.lr"), (["optim.lr=true"], "optim.lr"),
    (["optim.warmup_steps=-1"], "optim.warmup_steps"), (["optim.weight_decay=-0.1"], "optim.weight_decay"),
    (["optim.eps=0"], "optim.eps"), (["optim.betas=[0.9]"], "optim.betas"), (["optim.betas=[0.9, 1.0]"], "optim.betas"),
    (["optim.betas=[0.9, x]"], "optim.betas"), (["optim.betas=0.9"], "optim.betas"),
    (["optim.schedule=exp"], "optim.schedule"), (["optim.max_nonfinite=0"], "optim.max_nonfinite"),
    (["checkpoint.every=-1"], "checkpoint.every"), (["checkpoint.keep=0"], "checkpoint.keep"),
    (["checkpoint.resume=maybe"], "checkpoint.resume"), (["checkpoint.save_final=1"], "checkpoint.save_final"),
    (["log.eval_every=-5"], "log.eval_every"), (["log.eval_batch_size=0"], "log.eval_batch_size"),
    (["log.progress=no please"], "log.progress"),
    (["policy.clip=[0.3, 0.2, 0.1]"], "policy.clip"), (["policy.clip=[1.2, 0.8]"], "policy.clip"),
    (["policy.clip=[-0.1, 0.2]"], "policy.clip"), (["policy.clip=[0.2, .nan]"], "policy.clip"),
    (["policy.clip=0.2"], "policy.clip"), (["policy.objective=wd1", "policy.clip=[0.2, 0.2]"], "policy.clip"),
    (["policy.max_log_ratio=-1"], "policy.max_log_ratio"), (["policy.max_log_ratio=0"], "policy.max_log_ratio"),
    (["policy.num_samples=32769"], "policy.num_samples"), (["policy.num_samples=-2"], "policy.num_samples"),
    (["policy.num_samples=true"], "policy.num_samples"), (["policy.updates_per_batch=0"], "policy.updates_per_batch"),
    (["policy.micro_batch_size=0"], "policy.micro_batch_size"), (["policy.kl_beta=inf"], "policy.kl_beta"),
    (["policy.scheme=uniform"], "policy.scheme"), (["policy.advantage_std=max"], "policy.advantage_std"),
    (["policy.backend=gpu"], "policy.backend"), (["policy.spg={negative: elbo}"], "policy.spg"),
    (["policy.objective=spg", "policy.spg={negative: upper}"], "policy.spg.negative"),
    (["policy.objective=spg", "policy.spg={beta: 0}"], "policy.spg.beta"),
    (["policy.objective=spg", "policy.spg={mix_weight: 1.5}"], "policy.spg.mix_weight"),
    (["policy.objective=spg", "policy.spg={temperature: 1}"], "policy.spg.temperature"),
    (["policy.objective=diffu_grpo", "policy.diffu_grpo={clip_eps: 1.0}"], "policy.diffu_grpo.clip_eps"),
    (["policy.objective=diffu_grpo", "policy.diffu_grpo={prompt_mask_prob: -0.1}"],
     "policy.diffu_grpo.prompt_mask_prob"),
    (["policy.objective=diffu_grpo", "policy.diffu_grpo={beta: 0.1}"], "policy.diffu_grpo.beta"),
    (["policy.objective=spg", "policy.kl_beta=0.1"], "policy.kl_beta"),
    (["model.preset=huge"], "model.preset"), (["model.overrides={d_modle: 64}"], "model.overrides.d_modle"),
    (["model.overrides={n_heads: 3}"], "model.overrides"), (["model.overrides=[1]"], "model.overrides"),
    (["model.path=/nonexistent/llada"], "model.path"), (["model.hf=true"], "model.path"),
    (["model.device=gpu"], "model.device"), (["model.dtype=int8"], "model.dtype"),
    (["model.autocast=float32"], "model.autocast"), (["model.tokenizer="], "model.tokenizer"),
    (["model.tokenizer=''"], "model.tokenizer"), (["model.init=/nonexistent.safetensors"], "model.init"),
    (["lora.r=0"], "lora.r"), (["lora.dropout=1.0"], "lora.dropout"),
    (["lora.target_modules=[]"], "lora.target_modules"),
    (["lora.target_modules=q_proj"], "lora.target_modules"), (["data.task=poetry"], "data.task"),
    (["data.source=generate:chess"], "data.source"), (["data.source=/nonexistent.jsonl"], "data.source"),
    (["data.eval_source=/nonexistent.parquet"], "data.eval_source"), (["data.train_size=0"], "data.train_size"),
    (["data.train_size=null"], "data.train_size"), (["data.eval_size=-1"], "data.eval_size"),
    (["data.generator={min_empty: 0}"], "data.generator"), (["data.generator={size: 9}"], "data.generator"),
    (["data.field_map={a: 1}"], "data.field_map"), (["data.max_prompt_length=0"], "data.max_prompt_length"),
    (["sft.steps=-1"], "sft.steps"), (["sft.batch_size=0"], "sft.batch_size"), (["sft.lr=-1e-3"], "sft.lr"),
    (["sft.warmup_steps=-1"], "sft.warmup_steps"), (["steps=-1"], "steps"), (["steps=true"], "steps"),
    (["steps=1.5"], "steps"), (["seed=-1"], "seed"), (["seed=9223372036854775808"], "seed"),
    (["reward=sudoku_v2"], "reward"), (["output_dir="], "output_dir"), (["output_dir=' '"], "output_dir"),
    (["distributed=horovod"], "distributed"),
]


@pytest.mark.parametrize("overrides, key", BAD_CONFIGS, ids=[" ".join(o) for o, _ in BAD_CONFIGS])
def test_every_bad_config_is_refused_naming_its_key(overrides, key):
    with pytest.raises(ValueError) as error:
        load_config(None, ["model.tokenizer=char", *overrides])
    assert str(error.value).startswith(f"{key}: "), str(error.value)


def test_a_local_file_has_one_split_refused_before_anything_loads(tmp_path):
    """Regression: a local file ignored data.split (the held-out set was then its first training rows); the
    loader refuses another split, and config validation says so before the model is loaded."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"question": "1+1", "answer": "2"}\n')
    load_config(None, ["model.tokenizer=char", f"data.source={rows}", "data.split=train"])
    with pytest.raises(ValueError, match="^data.split: a local file has one split, 'train'"):
        load_config(None, ["model.tokenizer=char", f"data.source={rows}", "data.split=test"])


def test_at_least_sixty_bad_configs_are_tried():
    assert len(BAD_CONFIGS) >= 60


def test_a_config_built_in_python_is_checked_too():
    config = load_config(None, ["model.tokenizer=char"])
    config.optim.grad_clip = -1.0
    with pytest.raises(ValueError, match="optim.grad_clip: expected a float > 0"):
        config.validate()
    config.optim.grad_clip, config.rollout.block_length = 1.0, 0
    with pytest.raises(ValueError, match="rollout.block_length: expected an int >= 1"):
        config.validate()


def test_cli_config_error_names_the_key(capsys, tmp_path):
    assert train_main(["model.tokenizer=char", "optim.lr=inf", f"output_dir={tmp_path / 'run'}"]) == 2
    assert "bgpo train: config error: optim.lr: expected a finite float, got inf" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_config_constants_match_the_library():
    from bgpo import backends, objectives, policy_update
    from bgpo.ops import random_mask
    from bgpo.rewards import REWARDS
    from bgpo.train import config

    assert config.MAX_SAMPLES == random_mask.MAX_SAMPLES and config.SPG_NEGATIVE == objectives.SPG_NEGATIVE
    assert set(config.REWARD_TASKS) == set(REWARDS)
    assert config.LINEAR_OBJECTIVES == policy_update.LINEAR_OBJECTIVES
    with pytest.raises(ValueError, match="backend: expected one of"):
        backends.resolve_backend("fused_elbo_loss", "nope", torch.device("cpu"))
    for name in config.BACKENDS[1:]:  # each name is one resolve_backend knows (available here or not)
        try:
            backends.resolve_backend("fused_elbo_loss", name, torch.device("cpu"))
        except ValueError as error:
            assert "expected one of" not in str(error)


def test_wd1_micro_batch_must_hold_whole_groups_and_batch_must_split_over_ranks():
    with pytest.raises(ValueError, match="policy.micro_batch_size"):
        load_config(None, ["model.tokenizer=char", "policy.objective=wd1", "policy.micro_batch_size=6"])
    with pytest.raises(ValueError, match="batch_size: 16 prompts do not split evenly over 3 ranks"):
        load_config(None, ["model.tokenizer=char"], world_size=3)


def test_yaml_file_and_presets(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {tokenizer: char}\nrollout:\n  group_size: 2\n")
    assert load_config(path, ["rollout.group_size=3"]).rollout.group_size == 3
    presets = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    assert "tiny-sudoku" in presets
    for name in presets:  # the LLaDA-8B presets name a local checkpoint directory, which must exist
        load_config(preset=name, overrides=[f"model.path={tmp_path}"] if name.startswith("llada") else [])
    with pytest.raises(ValueError, match="model.path: no such directory 'checkpoints/LLaDA-8B-Instruct'"):
        load_config(preset="llada-8b-math")
    with pytest.raises(ValueError, match="preset: unknown preset"):
        load_config(preset="nope")


def test_apply_overrides_builds_sections():
    assert apply_overrides({}, ["a.b.c=1", "d=x y"]) == {"a": {"b": {"c": 1}}, "d": "x y"}
    with pytest.raises(ValueError, match="is an option, not a section"):
        apply_overrides({"a": 1}, ["a.b=2"])


def _leaves(cls, prefix=""):
    for f in dataclasses.fields(cls):
        default = getattr(cls(), f.name)
        if dataclasses.is_dataclass(default):
            yield from _leaves(type(default), f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


def test_every_option_is_described_with_its_default():
    rows = describe_options()
    assert [key for key, _, _ in rows] == list(_leaves(TrainConfig))
    assert all(help_text for _, _, help_text in rows)
    assert ("optim.betas", "[0.9, 0.999]") in [(k, d) for k, d, _ in rows]


def test_cli_help_lists_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "rollout.group_size = 8" in out and "policy.objective = bgpo" in out and "--resume" in out


def test_cli_bad_config_fails_before_any_work(capsys, tmp_path):
    assert train_main(["model.tokenizer=char", "rollout.gen_length=33", f"output_dir={tmp_path / 'run'}"]) == 2
    assert "rollout.gen_length" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main(["bogus"]) == 2


def test_print_config_and_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "bgpo.train", "--preset", "tiny-sudoku", "--print-config",
                          "steps=7"], capture_output=True, text=True, check=True).stdout
    assert "steps: 7" in out and "objective: bgpo" in out
