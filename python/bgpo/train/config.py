"""The trainer's configuration: nested dataclasses, read from YAML and ``section.key=value`` overrides.

Every option has a default and a help text (``bgpo train --help`` lists them all).  ``load_config``
reads a YAML file (or a named preset from ``bgpo/configs``), applies overrides, checks each value's
type and the options that depend on each other, and fails before any work with a message naming the
key (``rollout.gen_length: 100 is not a multiple of rollout.block_length=32``).
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "TrainConfig", "ModelConfig", "LoraConfig", "DataConfig", "RolloutConfig", "PolicyConfig", "OptimConfig",
    "SFTConfig", "CheckpointConfig", "LogConfig", "load_config", "apply_overrides", "config_to_dict",
    "describe_options", "preset_path", "PRESET_DIR",
]

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"
TASKS = ("math", "countdown", "sudoku", "code", "custom")


def _opt(default, help: str, choices: tuple | None = None):
    """A field with a default, a help text and optionally the values it accepts."""
    metadata = {"help": help, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelConfig:
    path: str | None = _opt(None, "LLaDA checkpoint directory (config.json + safetensors); None = build from preset")
    preset: str = _opt("tiny", "LLaDAConfig preset when path is None: tiny, small, llada-8b (random init)")
    overrides: dict = _opt({}, "LLaDAConfig fields replacing the preset's (e.g. {d_model: 128, n_layers: 4})")
    hf: bool = _opt(False, "load path with transformers AutoModel (trust_remote_code) via HFMaskedDiffusionAdapter")
    init: str | None = _opt(None, "a safetensors state dict (e.g. a warm-up checkpoint) loaded after building")
    tokenizer: str | None = _opt(None, "'char' (CPU demos) or a Hugging Face tokenizer; None = the model path")
    dtype: str = _opt("float32", "parameter dtype", ("float32", "bfloat16", "float16"))
    autocast: str | None = _opt(None, "autocast dtype for forwards (weights stay in dtype)", (None, "bfloat16", "float16"))
    activation_checkpointing: bool = _opt(False, "recompute each transformer block in backward")
    device: str = _opt("auto", "'auto' (cuda:LOCAL_RANK if available, else cpu), 'cpu' or 'cuda'")


@dataclass
class LoraConfig:
    enabled: bool = _opt(False, "train LoRA adapters (peft) instead of all weights")
    r: int = _opt(16, "LoRA rank")
    alpha: int = _opt(32, "LoRA alpha")
    dropout: float = _opt(0.0, "LoRA dropout")
    target_modules: list = _opt(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                "module names that get adapters")


@dataclass
class DataConfig:
    task: str = _opt("sudoku", "the task: prompt template and reward defaults", TASKS)
    source: str = _opt("generate:sudoku", "generate:countdown|sudoku, a .jsonl/.json/.parquet file, or a hub dataset")
    subset: str | None = _opt(None, "hub dataset configuration (e.g. 'main' for openai/gsm8k)")
    split: str = _opt("train", "hub split for training")
    eval_source: str | None = _opt(None, "held-out prompts (same forms as source); None = generated, or eval_split")
    eval_split: str = _opt("test", "hub split for evaluation")
    train_size: int | None = _opt(10000, "examples to generate / read (None = all of a file or split)")
    eval_size: int = _opt(64, "held-out prompts evaluated")
    field_map: dict = _opt({}, "column renames, e.g. {problem: question, solution: answer}")
    prompt_template: str | None = _opt(None, "str.format template over the example's fields; None = the task's")
    chat_template: bool = _opt(True, "render prompts through the tokenizer's chat template when it has one")
    max_prompt_length: int | None = _opt(None, "pad prompts to this length (None = the longest of the step)")
    generator: dict = _opt({}, "options of the generator (e.g. {min_empty: 4, max_empty: 8})")


@dataclass
class RolloutConfig:
    group_size: int = _opt(8, "G: responses per prompt")
    gen_length: int = _opt(256, "response length in tokens")
    block_length: int = _opt(32, "semi-autoregressive block length")
    steps: int = _opt(128, "diffusion steps for the whole response")
    temperature: float = _opt(1.0, "sampling temperature for training rollouts (evaluation: log.eval_temperature)")
    remasking: str = _opt("low_confidence", "which predictions are kept at each step", ("low_confidence", "random"))
    cfg_scale: float = _opt(0.0, "classifier-free guidance scale")
    batch_size: int | None = _opt(None, "prompts per generate call (None = the rank's share); seeds per chunk")


@dataclass
class PolicyConfig:
    objective: str = _opt("bgpo", "the policy objective", ("bgpo", "vrpo", "diffu_grpo", "spg", "wd1"))
    num_samples: int = _opt(16, "n_t: Monte Carlo samples of the ELBO per response")
    scheme: str = _opt("stratified", "masking scheme of the MC samples", ("stratified", "bernoulli"))
    updates_per_batch: int = _opt(1, "mu: optimizer updates per rollout batch (> 1 = off-policy)")
    micro_batch_size: int | None = _opt(None, "responses per forward/backward (None = the rank's whole batch)")
    clip: list | None = _opt(None, "[eps_low, eps_high] PPO-style clip of the ratio (bgpo, vrpo); None = off")
    max_log_ratio: float | None = _opt(10.0, "clamp on d before an exponential (None = off)")
    kl_beta: float = _opt(0.0, "KL coefficient to the reference policy (the weights RL starts from; with LoRA the "
                                "base model); 0 = no KL and no reference model")
    advantage_std: str = _opt("unbiased", "group std in the advantage", ("unbiased", "population", "none"))
    spg: dict = _opt({}, "spg_loss options: negative, beta, mix_weight")
    diffu_grpo: dict = _opt({}, "diffu_grpo options: clip_eps, prompt_mask_prob")
    backend: str = _opt("auto", "fused_elbo_loss / random_mask backend")


@dataclass
class OptimConfig:
    lr: float = _opt(5e-7, "peak learning rate (AdamW)")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    betas: list = _opt([0.9, 0.999], "AdamW betas")
    eps: float = _opt(1e-8, "AdamW eps")
    grad_clip: float | None = _opt(1.0, "max global gradient norm (None = no clipping)")
    warmup_steps: int = _opt(0, "linear warm-up, in optimizer steps")
    schedule: str = _opt("constant", "LR after warm-up", ("constant", "linear", "cosine"))
    max_nonfinite: int = _opt(5, "consecutive non-finite losses/gradients tolerated before the run stops")


@dataclass
class SFTConfig:
    steps: int = _opt(0, "masked-diffusion supervised warm-up steps on the examples' 'answer' (0 = none)")
    batch_size: int = _opt(64, "examples per warm-up step")
    lr: float = _opt(1e-3, "warm-up learning rate (AdamW, cosine to 10%)")
    warmup_steps: int = _opt(20, "linear warm-up of the warm-up's learning rate")


@dataclass
class CheckpointConfig:
    every: int = _opt(0, "checkpoint every N steps (0 = only at the end and on SIGINT/SIGTERM)")
    keep: int = _opt(2, "checkpoints kept (older ones are deleted)")
    resume: bool = _opt(False, "continue from the latest checkpoint of output_dir")
    save_final: bool = _opt(True, "checkpoint after the last step")


@dataclass
class LogConfig:
    progress: bool = _opt(True, "tqdm progress bar (rank 0)")
    eval_every: int = _opt(0, "evaluate held-out prompts every N steps (0 = only before and after training)")
    eval_batch_size: int = _opt(64, "held-out prompts per generate call")
    eval_temperature: float = _opt(0.0, "sampling temperature of the held-out evaluation (0 = greedy)")
    eval_samples: int = _opt(1, "responses per held-out prompt; the reward is their mean (needs eval_temperature > 0 "
                                "when > 1)")
    tensorboard: bool = _opt(True, "also write TensorBoard scalars when tensorboard is installed")


@dataclass
class TrainConfig:
    output_dir: str = _opt("runs/bgpo", "metrics.jsonl, checkpoints/ and tensorboard/ go here")
    steps: int = _opt(100, "RL steps (rollout batches)")
    batch_size: int = _opt(16, "prompts per step, over all ranks")
    seed: int = _opt(0, "seeds the data order, rollouts and masks")
    reward: str | None = _opt(None, "reward: a task name or 'module:function'; None = the task's")
    distributed: str = _opt("auto", "under torchrun: 'fsdp' (fully_shard per block), 'ddp', or 'auto' (= fsdp)",
                            ("auto", "fsdp", "ddp"))
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self, world_size: int = 1) -> "TrainConfig":
        """Check the options that depend on each other; raise ValueError naming the key."""
        r, p = self.rollout, self.policy
        _require(r.gen_length % r.block_length == 0, "rollout.gen_length",
                 f"{r.gen_length} is not a multiple of rollout.block_length={r.block_length}")
        blocks = r.gen_length // r.block_length
        _require(r.steps % blocks == 0, "rollout.steps",
                 f"{r.steps} is not a multiple of the number of blocks (gen_length/block_length = {blocks})")
        _require(self.batch_size % world_size == 0, "batch_size",
                 f"{self.batch_size} prompts do not split evenly over {world_size} ranks")
        local = self.batch_size // world_size
        _require(r.batch_size is None or local % r.batch_size == 0, "rollout.batch_size",
                 f"{r.batch_size} does not divide the {local} prompts of a rank")
        _require(p.clip is None or (len(p.clip) == 2 and all(0 <= c for c in p.clip)), "policy.clip",
                 f"expected [eps_low, eps_high] >= 0 or null, got {p.clip!r}")
        _require(p.objective != "wd1" or not p.micro_batch_size or p.micro_batch_size % r.group_size == 0,
                 "policy.micro_batch_size", f"wd1 needs whole groups: a multiple of rollout.group_size={r.group_size}")
        _require(self.model.path is not None or not self.model.hf, "model.path", "model.hf needs a model path")
        _require(self.model.path is not None or self.model.tokenizer is not None, "model.tokenizer",
                 "a model built from a preset needs a tokenizer ('char' or a name)")
        _require(self.data.task != "custom" or self.reward is not None, "reward",
                 "data.task 'custom' needs reward: 'module:function'")
        _require(self.data.task != "custom" or self.data.prompt_template is not None, "data.prompt_template",
                 "data.task 'custom' needs a prompt template")
        _require(len(self.optim.betas) == 2, "optim.betas", f"expected two numbers, got {self.optim.betas!r}")
        for name, value, low in (
            ("steps", self.steps, 0), ("batch_size", self.batch_size, 1), ("rollout.group_size", r.group_size, 1),
            ("rollout.gen_length", r.gen_length, 1), ("rollout.block_length", r.block_length, 1),
            ("rollout.steps", r.steps, 1), ("policy.num_samples", p.num_samples, 1),
            ("policy.updates_per_batch", p.updates_per_batch, 1), ("data.eval_size", self.data.eval_size, 0),
            ("optim.max_nonfinite", self.optim.max_nonfinite, 1), ("checkpoint.keep", self.checkpoint.keep, 1),
            ("sft.steps", self.sft.steps, 0), ("log.eval_batch_size", self.log.eval_batch_size, 1),
            ("log.eval_samples", self.log.eval_samples, 1),
        ):
            _require(value >= low, name, f"expected an int >= {low}, got {value}")
        _require(self.log.eval_temperature >= 0, "log.eval_temperature",
                 f"expected a float >= 0, got {self.log.eval_temperature}")
        _require(self.log.eval_samples == 1 or self.log.eval_temperature > 0, "log.eval_samples",
                 f"{self.log.eval_samples} samples per prompt need log.eval_temperature > 0 (greedy repeats itself)")
        _require(p.kl_beta >= 0, "policy.kl_beta", f"expected a float >= 0, got {p.kl_beta}")
        _require(p.kl_beta == 0 or p.objective != "spg", "policy.kl_beta", "spg takes no KL term; set it to 0")
        _require(self.optim.lr > 0, "optim.lr", f"expected a positive float, got {self.optim.lr}")
        if self.model.init is not None:
            _require(Path(self.model.init).is_file(), "model.init", f"no such file {self.model.init!r}")
        return self


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{key}: {message}")


# ---------------------------------------------------------------------------------------------- parsing
def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp) -> bool:
    return dataclasses.is_dataclass(tp)


def _check_value(key: str, value, tp, choices):
    """``value`` converted to ``tp`` (int -> float allowed); ValueError naming ``key`` otherwise."""
    args = typing.get_args(tp)
    optional = isinstance(tp, types.UnionType) and type(None) in args
    if value is None:
        if optional:
            return None
        raise ValueError(f"{key}: may not be null")
    base = next(a for a in args if a is not type(None)) if optional else tp
    base = typing.get_origin(base) or base
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if base is float and isinstance(value, str):  # YAML reads 5e-7 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if base is int and isinstance(value, bool) or not isinstance(value, base):
        raise ValueError(f"{key}: expected {getattr(base, '__name__', base)}, got {value!r}")
    if choices is not None and value not in choices:
        raise ValueError(f"{key}: expected one of {[c for c in choices]}, got {value!r}")
    return value


def _build(cls, values: dict, prefix: str = ""):
    if not isinstance(values, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = _field_types(cls)
    kwargs = {}
    for name, value in values.items():
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            raise ValueError(f"{prefix}{name}: unknown option{hint}")
        tp = hints[name]
        if _is_section(tp):
            kwargs[name] = _build(tp, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_value(f"{prefix}{name}", value, tp, fields[name].metadata.get("choices"))
    return cls(**kwargs)


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """``["rollout.group_size=4", ...]`` applied to a nested dict (values parsed by ``_parse_scalar``)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override: expected key=value, got {item!r}")
        node = values
        *parents, leaf = key.strip().split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"{key}: {part!r} is an option, not a section")
            node = child
        node[leaf] = _parse_scalar(raw)
    return values


def _parse_scalar(raw: str):
    """An override's value read as YAML (``8``, ``1e-5``, ``null``, ``[a, b]``); text YAML rejects stays text."""
    if not raw.strip():
        return None
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def preset_path(name: str) -> Path:
    """The YAML file of a preset shipped in ``bgpo/configs``."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise ValueError(f"preset: unknown preset {name!r}; expected one of {names}")
    return path


def load_config(path: str | Path | None = None, overrides: list[str] = (), *, preset: str | None = None,
                world_size: int = 1) -> TrainConfig:
    """A validated ``TrainConfig`` from a YAML file or a preset (not both), then ``key=value`` overrides."""
    if path is not None and preset is not None:
        raise ValueError("config: give a config file or a preset, not both")
    values: dict = {}
    source = preset_path(preset) if preset is not None else path
    if source is not None:
        if not Path(source).is_file():
            raise ValueError(f"config: no such file {str(source)!r}")
        with open(source) as f:
            values = yaml.safe_load(f) or {}
    values = apply_overrides(values, list(overrides))
    return _build(TrainConfig, values).validate(world_size)


def _show(value) -> str:
    """A default as it would be written in YAML (``null``, ``[0.9, 0.999]``, ``{}``)."""
    return yaml.safe_dump(value, default_flow_style=True).split("\n...")[0].strip()


def describe_options(cls=TrainConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """``(key, default, help)`` for every option, sections flattened to ``section.key``."""
    rows = []
    hints = _field_types(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        if _is_section(hints[f.name]):
            rows.extend(describe_options(hints[f.name], f"{prefix}{f.name}."))
            continue
        help_text = f.metadata.get("help", "")
        if f.metadata.get("choices"):
            help_text += f" {{{', '.join(str(c) for c in f.metadata['choices'])}}}"
        rows.append((f"{prefix}{f.name}", _show(getattr(defaults, f.name)), help_text))
    return rows
