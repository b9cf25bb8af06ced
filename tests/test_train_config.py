"""The trainer's config: YAML + overrides, type checks and cross-checks naming the key, --help, presets."""
import dataclasses
import subprocess
import sys

import pytest

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
    ("optim.lr=-1", "optim.lr: expected a positive float"),
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
    for name in presets:
        load_config(preset=name)
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
