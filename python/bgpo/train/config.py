"""The trainer's configuration: nested dataclasses, read from YAML and ``section.key=value`` overrides.

Every option has a default and a help text (``bgpo train --help`` lists them all).  ``load_config``
reads a YAML file (or a named preset from ``bgpo/configs``), applies overrides, checks each value's
type and the options that depend on each other, and fails before any work with a message naming the
key (``rollout.gen_length: 100 is not a multiple of rollout.block_length=32``).
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import re
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
REWARD_TASKS = ("math", "countdown", "sudoku", "code")  # = bgpo.rewards.REWARDS (tested)
TASKS = (*REWARD_TASKS, "custom")
BACKENDS = ("auto", "torch", "triton", "cuda", "cpu")  # = those bgpo.backends.resolve_backend knows (tested)
MAX_SAMPLES = 2**15  # = bgpo.ops.random_mask.MAX_SAMPLES: the Philox counter holds the sample index in 15 bits
MAX_SEED = 2**63 - 1
SPG_NEGATIVE = ("eubo", "mixture", "elbo")  # = bgpo.objectives.SPG_NEGATIVE (tested)
LINEAR_OBJECTIVES = ("bgpo", "wd1")  # = bgpo.policy_update.LINEAR_OBJECTIVES (tested)


def _opt(default, help: str, choices: tuple | None = None, *, ge=None, gt=None, le=None, lt=None):
    """A field with a default, a help text, optionally the values it accepts and bounds on a number
    (``ge``: >=, ``gt``: >, ``le``: <=, ``lt``: <; every float must also be finite)."""
    metadata = {"help": help, "choices": choices, "bounds": {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le),
                                                                            ("lt", lt)) if v is not None}}
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
    r: int = _opt(16, "LoRA rank", ge=1)
    alpha: int = _opt(32, "LoRA alpha", ge=1)
    dropout: float = _opt(0.0, "LoRA dropout", ge=0, lt=1)
    target_modules: list = _opt(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                "module names that get adapters")


@dataclass
class DataConfig:
    task: str = _opt("sudoku", "the task: prompt template and reward defaults", TASKS)
    source: str = _opt("generate:sudoku", "generate:countdown|sudoku, a .jsonl/.json/.parquet file, or a hub dataset")
    subset: str | None = _opt(None, "hub dataset configuration (e.g. 'main' for openai/gsm8k)")
    split: str = _opt("train", "hub split for training")
    eval_source: str | None = _opt(None, "held-out prompts (same forms as source); None = generated, eval_split, "
                                         "or a local source's last eval_size rows")
    eval_split: str = _opt("test", "hub split for evaluation")
    train_size: int | None = _opt(10000, "examples to generate / read (None = all of a file or split)", ge=1)
    eval_size: int = _opt(64, "held-out prompts evaluated", ge=0)
    field_map: dict = _opt({}, "column renames, e.g. {problem: question, solution: answer}")
    prompt_template: str | None = _opt(None, "str.format template over the example's fields; None = the task's")
    chat_template: bool = _opt(True, "render prompts through the tokenizer's chat template when it has one")
    max_prompt_length: int | None = _opt(None, "pad prompts to this length (None = the longest of the step)", ge=1)
    generator: dict = _opt({}, "options of the generator (e.g. {min_empty: 4, max_empty: 8})")


@dataclass
class RolloutConfig:
    group_size: int = _opt(8, "G: responses per prompt", ge=2)
    gen_length: int = _opt(256, "response length in tokens", ge=1)
    block_length: int = _opt(32, "semi-autoregressive block length", ge=1)
    steps: int = _opt(128, "diffusion steps for the whole response", ge=1)
    temperature: float = _opt(1.0, "sampling temperature for training rollouts (evaluation: log.eval_temperature)",
                              ge=0)
    remasking: str = _opt("low_confidence", "which predictions are kept at each step", ("low_confidence", "random"))
    cfg_scale: float = _opt(0.0, "classifier-free guidance scale", ge=0)
    batch_size: int | None = _opt(None, "prompts per generate call (None = the rank's share); seeds per chunk", ge=1)
    cache: str | None = _opt(None, "Fast-dLLM approximate KV cache (None = the exact sampler)", (None, "prefix", "dual"))
    threshold: float | None = _opt(None, "unmask every block position whose confidence exceeds it, >= 1 per step "
                                   "(None = the steps schedule)", ge=0, le=1)


@dataclass
class PolicyConfig:
    objective: str = _opt("bgpo", "the policy objective", ("bgpo", "vrpo", "diffu_grpo", "spg", "wd1"))
    num_samples: int = _opt(16, "n_t: Monte Carlo samples of the ELBO per response", ge=1, le=MAX_SAMPLES)
    scheme: str = _opt("stratified", "masking scheme of the MC samples", ("stratified", "bernoulli"))
    updates_per_batch: int = _opt(1, "mu: optimizer updates per rollout batch (> 1 = off-policy)", ge=1)
    micro_batch_size: int | None = _opt(None, "responses per forward/backward (None = the rank's whole batch)", ge=1)
    samples_per_forward: int = _opt(1, "MC samples sharing one forward/backward (bgpo, wd1; same gradient, memory "
                                       "grows with it)", ge=1)
    pack_sequences: bool = _opt(True, "forward each micro-batch's real tokens packed in one row (cu_seqlens), no "
                                      "compute on padding; the same gradient (bgpo's LLaDA with bgpo, wd1, vrpo, "
                                      "spg; diffu_grpo and model.hf run padded)")
    memory_budget_gib: float | None = _opt(None, "GPU memory budget, GiB: bgpo.plan chooses micro_batch_size, "
                                                 "samples_per_forward and activation checkpointing (None = off)", gt=0)
    clip: list | None = _opt(None, "[eps_low, eps_high] PPO-style clip of the ratio (bgpo, vrpo); None = off")
    max_log_ratio: float | None = _opt(10.0, "clamp on d before an exponential (None = off)", gt=0)
    kl_beta: float = _opt(0.0, "KL coefficient to the reference policy (the weights RL starts from; with LoRA the "
                                "base model); 0 = no KL and no reference model", ge=0)
    advantage_std: str = _opt("unbiased", "group std in the advantage", ("unbiased", "population", "none"))
    spg: dict = _opt({}, "spg_loss options: negative, beta, mix_weight")
    diffu_grpo: dict = _opt({}, "diffu_grpo options: clip_eps, prompt_mask_prob")
    backend: str = _opt("auto", "fused_elbo_loss / random_mask backend", BACKENDS)


@dataclass
class OptimConfig:
    lr: float = _opt(5e-7, "peak learning rate (AdamW)", gt=0)
    weight_decay: float = _opt(0.0, "AdamW weight decay", ge=0)
    betas: list = _opt([0.9, 0.999], "AdamW betas")
    eps: float = _opt(1e-8, "AdamW eps", gt=0)
    grad_clip: float | None = _opt(1.0, "max global gradient norm (None = no clipping)", gt=0)
    warmup_steps: int = _opt(0, "linear warm-up, in optimizer steps", ge=0)
    schedule: str = _opt("constant", "LR after warm-up", ("constant", "linear", "cosine"))
    max_nonfinite: int = _opt(5, "consecutive non-finite losses/gradients tolerated before the run stops", ge=1)


@dataclass
class SFTConfig:
    steps: int = _opt(0, "masked-diffusion supervised warm-up steps on the examples' 'answer' (0 = none)", ge=0)
    batch_size: int = _opt(64, "examples per warm-up step", ge=1)
    lr: float = _opt(1e-3, "warm-up learning rate (AdamW, cosine to 10%)", gt=0)
    warmup_steps: int = _opt(20, "linear warm-up of the warm-up's learning rate", ge=0)


@dataclass
class CheckpointConfig:
    every: int = _opt(0, "checkpoint every N steps (0 = only at the end and on SIGINT/SIGTERM)", ge=0)
    keep: int = _opt(2, "checkpoints kept (older ones are deleted)", ge=1)
    resume: bool = _opt(False, "continue from the newest complete checkpoint of output_dir (refused if the config "
                               "differs from the checkpoint's, see force_resume)")
    force_resume: bool = _opt(False, "resume even though the config differs from the checkpoint's (the keys are "
                                     "printed)")
    save_final: bool = _opt(True, "checkpoint after the last step")


@dataclass
class LogConfig:
    progress: bool = _opt(True, "tqdm progress bar (rank 0)")
    eval_every: int = _opt(0, "evaluate held-out prompts every N steps (0 = only before and after training)", ge=0)
    eval_batch_size: int = _opt(64, "held-out prompts per generate call", ge=1)
    eval_temperature: float = _opt(0.0, "sampling temperature of the held-out evaluation (0 = greedy)", ge=0)
    eval_samples: int = _opt(1, "responses per held-out prompt; the reward is their mean (needs eval_temperature > 0 "
                                "when > 1)", ge=1)
    tensorboard: bool = _opt(True, "also write TensorBoard scalars when tensorboard is installed")


@dataclass
class TrainConfig:
    output_dir: str = _opt("runs/bgpo", "metrics.jsonl, checkpoints/ and tensorboard/ go here")
    steps: int = _opt(100, "RL steps (rollout batches)", ge=0)
    batch_size: int = _opt(16, "prompts per step, over all ranks", ge=1)
    seed: int = _opt(0, "seeds the data order, rollouts and masks", ge=0, le=MAX_SEED)
    reward: str | None = _opt(None, "reward: a task name or 'module:function'; None = the task's")
    allow_unsandboxed_code: bool = _opt(False, "score code without the bubblewrap sandbox when it does not work "
                                               "here (runs model-written code as your user: trusted models only)")
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
        """Check every option (type, bounds, finiteness, also of a config built in Python), the lists and
        mappings, and the options that depend on each other; raise ValueError naming the key.  Loads nothing
        (one generated example for data.generator), so it runs before any work."""
        _check_fields(self)
        _check_containers(self)
        _check_sources(self)
        r, p = self.rollout, self.policy
        _require(r.gen_length % r.block_length == 0, "rollout.gen_length",
                 f"{r.gen_length} is not a multiple of rollout.block_length={r.block_length}")
        blocks = r.gen_length // r.block_length
        _require(r.steps % blocks == 0, "rollout.steps",
                 f"{r.steps} is not a multiple of the number of blocks (gen_length/block_length = {blocks})")
        _require(self.batch_size % world_size == 0, "batch_size",
                 f"{self.batch_size} prompts do not split evenly over {world_size} ranks")
        local = self.batch_size // world_size
        _require(r.threshold is None or r.remasking == "low_confidence", "rollout.threshold",
                 f"compares low_confidence probabilities; rollout.remasking={r.remasking!r} has none")
        _require(r.batch_size is None or local % r.batch_size == 0, "rollout.batch_size",
                 f"{r.batch_size} does not divide the {local} prompts of a rank")
        _require(p.memory_budget_gib is None or (p.micro_batch_size is None and p.samples_per_forward == 1),
                 "policy.memory_budget_gib", "chooses policy.micro_batch_size and policy.samples_per_forward: leave "
                 "them unset (null and 1)")
        _require(p.memory_budget_gib is None or (not self.model.hf and self.data.max_prompt_length is not None),
                 "policy.memory_budget_gib", "plans bgpo's LLaDA models (not model.hf) and needs "
                 "data.max_prompt_length (the longest prompt the plan must hold)")
        _require(p.samples_per_forward == 1 or p.objective in LINEAR_OBJECTIVES, "policy.samples_per_forward",
                 f"objective {p.objective!r} is not linear in the MC samples; use 1 (only bgpo and wd1 share a "
                 "forward between samples)")
        _require(p.objective != "wd1" or not p.micro_batch_size or p.micro_batch_size % r.group_size == 0,
                 "policy.micro_batch_size", f"wd1 needs whole groups: a multiple of rollout.group_size={r.group_size}")
        _require(self.model.path is not None or not self.model.hf, "model.path", "model.hf needs a model path")
        _require(self.model.path is not None or self.model.tokenizer is not None, "model.tokenizer",
                 "a model built from a preset needs a tokenizer ('char' or a name)")
        _require(self.data.task != "custom" or self.reward is not None, "reward",
                 "data.task 'custom' needs reward: 'module:function'")
        _require(self.data.task != "custom" or self.data.prompt_template is not None, "data.prompt_template",
                 "data.task 'custom' needs a prompt template")
        _require(self.log.eval_samples == 1 or self.log.eval_temperature > 0, "log.eval_samples",
                 f"{self.log.eval_samples} samples per prompt need log.eval_temperature > 0 (greedy repeats itself)")
        _require(p.kl_beta == 0 or p.objective != "spg", "policy.kl_beta", "spg takes no KL term; set it to 0")
        return self


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{key}: {message}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_fields(section, prefix: str = "") -> None:
    """Every option of ``section`` through ``_check_value`` (converted values written back)."""
    hints = _field_types(type(section))
    for f in dataclasses.fields(section):
        key, value = f"{prefix}{f.name}", getattr(section, f.name)
        if _is_section(hints[f.name]):
            _require(isinstance(value, hints[f.name]), key, f"expected a section, got {value!r}")
            _check_fields(value, f"{key}.")
        else:
            setattr(section, f.name, _check_value(key, value, hints[f.name], f.metadata))


def _check_options(key: str, options: dict, objective: str, chosen: str, rules: dict) -> None:
    """An objective's options: only with that objective, known names, each value passing its rule."""
    if not options:
        return
    _require(chosen == objective, key, f"options of objective {objective!r}, but policy.objective is {chosen!r}")
    for name, value in options.items():
        _require(name in rules, f"{key}.{name}", f"unknown option; expected one of {sorted(rules)}")
        expected, ok = rules[name]
        _require(ok(value), f"{key}.{name}", f"expected {expected}, got {value!r}")


def _check_containers(c: "TrainConfig") -> None:
    """The lists and mappings: lengths, element types and ranges."""
    betas, clip, modules = c.optim.betas, c.policy.clip, c.lora.target_modules
    _require(len(betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in betas), "optim.betas",
             f"expected two numbers in [0, 1), got {betas!r}")
    if clip is not None:
        _require(len(clip) == 2 and all(_is_number(x) for x in clip) and 0 <= clip[0] < 1 and clip[1] >= 0,
                 "policy.clip", "expected [eps_low, eps_high] with 0 <= eps_low < 1 and eps_high >= 0 (the ratio is "
                 f"clipped to [1 - eps_low, 1 + eps_high]), got {clip!r}")
        _require(c.policy.objective in ("bgpo", "vrpo"), "policy.clip",
                 f"only bgpo and vrpo clip the ratio, not {c.policy.objective!r} (diffu_grpo: "
                 "policy.diffu_grpo.clip_eps)")
    _require(bool(modules) and all(isinstance(m, str) and m for m in modules), "lora.target_modules",
             f"expected a non-empty list of module names, got {modules!r}")
    _require(all(isinstance(k, str) and isinstance(v, str) and v for k, v in c.data.field_map.items()),
             "data.field_map", f"expected {{column: new name}} strings, got {c.data.field_map!r}")
    unit = ("a float in [0, 1]", lambda v: _is_number(v) and 0 <= v <= 1)
    _check_options("policy.spg", c.policy.spg, "spg", c.policy.objective, {
        "negative": (f"one of {list(SPG_NEGATIVE)}", lambda v: v in SPG_NEGATIVE),
        "beta": ("a float > 0", lambda v: _is_number(v) and v > 0), "mix_weight": unit})
    _check_options("policy.diffu_grpo", c.policy.diffu_grpo, "diffu_grpo", c.policy.objective, {
        "clip_eps": ("a float in (0, 1)", lambda v: _is_number(v) and 0 < v < 1), "prompt_mask_prob": unit})


def _check_sources(c: "TrainConfig") -> None:
    """What names things to load: model, device, reward, data source and generator, LoRA's dependency."""
    m, d = c.model, c.data
    _require(re.fullmatch(r"auto|cpu|cuda(:\d+)?", m.device) is not None, "model.device",
             f"expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {m.device!r}")
    if m.path is None:
        from ..models.config import LLaDAConfig

        try:
            LLaDAConfig.preset(m.preset)
        except ValueError as error:
            raise ValueError(f"model.preset: {str(error).removeprefix('name: ')}") from None
        known = [f.name for f in dataclasses.fields(LLaDAConfig)]
        for name in m.overrides:
            _require(name in known, f"model.overrides.{name}", f"not a LLaDAConfig field; expected one of {known}")
        try:
            LLaDAConfig.preset(m.preset, **m.overrides)
        except (TypeError, ValueError) as error:
            raise ValueError(f"model.overrides: {error}") from None
    else:
        _require(not m.overrides, "model.overrides", "only for a model built from model.preset (model.path is set)")
        _require(m.hf or Path(m.path).is_dir(), "model.path", f"no such directory {m.path!r}")
    if m.init is not None:
        _require(Path(m.init).is_file(), "model.init", f"no such file {m.init!r}")
    _require(c.reward is None or c.reward in REWARD_TASKS or re.fullmatch(r"[\w.]+:\w+", c.reward) is not None,
             "reward", f"expected one of {list(REWARD_TASKS)} or 'module:function', got {c.reward!r}")
    _require(not c.lora.enabled or importlib.util.find_spec("peft") is not None, "lora.enabled",
             "needs peft (pip install -e '.[train]')")
    for key, source in (("data.source", d.source), ("data.eval_source", d.eval_source)):
        if source is not None and Path(source).suffix in (".jsonl", ".json", ".parquet"):
            _require(Path(source).is_file(), key, f"no such file {source!r}")
    _require(Path(d.source).suffix not in (".jsonl", ".json", ".parquet") or d.split == "train", "data.split",
             f"a local file has one split, 'train' (all its rows), not {d.split!r}; give held-out rows as another "
             "file in data.eval_source")  # (before the model loads; the loader refuses it too)
    if not d.source.startswith("generate:"):
        _require(not d.generator, "data.generator", f"options of a generated source, but data.source is {d.source!r}")
        return
    from ..data.loading import GENERATORS

    name = d.source.split(":", 1)[1]
    _require(name in GENERATORS, "data.source", f"unknown generator {name!r}; expected one of {sorted(GENERATORS)}")
    _require(d.train_size is not None, "data.train_size", "a generated dataset needs a size")
    try:
        GENERATORS[name](1, seed=0, **d.generator)
    except (TypeError, ValueError) as error:
        raise ValueError(f"data.generator: {error}") from None


# ---------------------------------------------------------------------------------------------- parsing
def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp) -> bool:
    return dataclasses.is_dataclass(tp)


def _check_value(key: str, value, tp, metadata):
    """``value`` converted to ``tp`` (int -> float allowed) and checked against the field's ``metadata``
    (choices, bounds; floats finite, strings non-empty); ValueError naming ``key`` otherwise."""
    args = typing.get_args(tp)
    optional = isinstance(tp, types.UnionType) and type(None) in args
    if value is None:
        if optional:
            return None
        raise ValueError(f"{key}: may not be null")
    base = next(a for a in args if a is not type(None)) if optional else tp
    base = typing.get_origin(base) or base
    if base is float and isinstance(value, int) and not isinstance(value, bool) and abs(value) <= 2**1023:
        value = float(value)
    if base is float and isinstance(value, str):  # YAML reads 5e-7 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if base is int and isinstance(value, bool) or not isinstance(value, base):
        raise ValueError(f"{key}: expected {getattr(base, '__name__', base)}, got {value!r}")
    choices = metadata.get("choices")
    if choices is not None and value not in choices:
        raise ValueError(f"{key}: expected one of {[c for c in choices]}, got {value!r}")
    _require(base is not float or math.isfinite(value), key, f"expected a finite float, got {value!r}")
    _require(base is not str or value.strip() != "", key, "expected a non-empty string")
    bounds = metadata.get("bounds", {})
    signs = {"ge": (">=", lambda b: value >= b), "gt": (">", lambda b: value > b), "le": ("<=", lambda b: value <= b),
             "lt": ("<", lambda b: value < b)}
    _require(all(signs[op][1](b) for op, b in bounds.items()), key,
             f"expected {'an int' if base is int else 'a float'} "
             f"{' and '.join(f'{signs[op][0]} {b}' for op, b in bounds.items())}, got {value!r}")
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
            kwargs[name] = value  # checked with every other option by TrainConfig.validate
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
