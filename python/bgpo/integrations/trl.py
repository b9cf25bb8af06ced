"""TRL's ``GRPOTrainer`` for masked diffusion LMs (LLaDA, Dream, ...), trained with BGPO.

A d1-style script switches by changing the two classes and choosing n_t::

    from bgpo.integrations.trl import DiffusionGRPOConfig, DiffusionGRPOTrainer

    args = DiffusionGRPOConfig(output_dir="out", num_generations=8, max_completion_length=256,
                               block_length=32, diffusion_steps=128, num_mc_samples=16)
    trainer = DiffusionGRPOTrainer(model, reward_funcs=[correctness], args=args,
                                   train_dataset=dataset, processing_class=tokenizer)
    trainer.train()

What stays TRL's: the config class (and its CLI parsing), datasets and the sampler that repeats each
prompt G times, tokenisation, reward functions and weights, group advantages, the buffering of
``steps_per_generation`` batches and their reuse for ``num_iterations`` (μ) updates, callbacks,
logging, checkpoints, and the accelerate launch.

What bgpo replaces, at the level TRL structures it:

* ``_generate_single_turn``: responses come from LLaDA's block diffusion sampler
  (``bgpo.rollout.generate``), not from ``model.generate``.
* ``_generate_and_score_completions``: after TRL's scoring, each response gets the ids that seed its
  Monte Carlo masks; when the policy changes between rollout and update (μ > 1, or more generation
  steps than accumulation steps) the old policy's ELBO terms (n_t scalars per response) are computed
  once here, under ``no_grad``, the diffusion analogue of TRL's ``old_per_token_logps``.
* ``training_step``: TRL computes a loss and calls ``backward`` once; BGPO's memory saving needs one
  backward *per MC sample*, so the step runs ``bgpo.policy_update.accumulate_policy_gradient``.
  The loss of each micro-step is divided by the accumulation steps (as TRL does), and gradients are
  synchronised once per optimizer step.

KL (``beta`` > 0): the reference is the policy as passed in (a frozen copy; for a peft model, the
model with its adapters disabled). Its ELBO terms on the same masks (or, for diffu_grpo, its per-token
log-probs) are computed once per rollout and kept as scalars; the k3 penalty of
``bgpo.objectives.elbo_kl`` joins each per-sample loss. TRL itself is run with ``beta = 0`` (its
reference model scores autoregressive log-probs, which a diffusion LM does not have).

Distributed: single process, DDP and DeepSpeed ZeRO 1, 2 and 3 (``accelerate launch``, multi-GPU or
CPU). The forwards run on the unwrapped model. Under DDP its per-backward hooks stay idle and the
trainer averages the gradients across ranks itself, once, at the last micro-step of each optimizer
step. Under DeepSpeed every per-sample ``backward`` goes through the engine, and only the last one of
the micro-step that ends an accumulation is the engine's accumulation boundary (where it steps). Under
ZeRO-3 the LM head is gathered for the whole rollout and update (the sampler and the fused op read it
outside the head's forward; V x H more memory per rank). FSDP is not supported (``NotImplementedError``).
"""
from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from accelerate.utils import is_peft_model
from torch.nn.parallel import DistributedDataParallel

try:
    from trl import GRPOConfig, GRPOTrainer
except ImportError as error:  # pragma: no cover - exercised only without trl
    raise ImportError(
        "bgpo.integrations.trl needs TRL 1.16 (the release it is tested with), which is not installed: "
        "pip install 'trl>=1.16,<1.17'"
    ) from error

from ..models import HFMaskedDiffusionAdapter
from ..objectives import MAX_LOG_RATIO, SPG_NEGATIVE, k3
from ..ops._checks import check_real
from ..ops.random_mask import SCHEMES
from ..policy_update import OBJECTIVES, PolicyBatch, accumulate_policy_gradient, old_policy_elbos
from ..policy_update import old_policy_token_logprobs
from ..rollout import CACHES, REMASKING, check_cache_offered, generate

__all__ = ["DiffusionGRPOConfig", "DiffusionGRPOTrainer"]


@dataclass
class DiffusionGRPOConfig(GRPOConfig):
    """``GRPOConfig`` plus the diffusion sampler and the Monte Carlo ELBO estimator.

    Field names shared with d1's ``DiffuGRPOConfig`` (``block_length``, ``diffusion_steps``,
    ``remasking``, ``cfg_scale``, ``mask_id``, ``p_mask_prompt``) keep d1's meaning. ``epsilon`` is the
    clip range of ``diffu_grpo`` and, with ``clip_bound``, of the BGPO / VRPO ratios (upper bound
    ``epsilon_high`` when set). ``beta`` is the KL coefficient (default 0; not with ``spg``). TRL options
    that concern autoregressive log-probs (``loss_type``, ``importance_sampling_level``, entropy terms,
    ...) have no effect.
    """

    objective: str = field(default="bgpo", metadata={"help": f"Policy objective, one of {OBJECTIVES}."})
    num_mc_samples: int = field(
        default=16, metadata={"help": "n_t: Monte Carlo samples of the ELBO per response (BGPO paper: 16)."}
    )
    mask_scheme: str = field(default="stratified", metadata={"help": f"Masking scheme, one of {SCHEMES}."})
    mc_micro_batch_size: int | None = field(
        default=None, metadata={"help": "Responses per forward inside a step (default: the whole step)."}
    )
    clip_bound: bool = field(
        default=False, metadata={"help": "PPO-style clipping of the BGPO / VRPO ratio to [1-epsilon, 1+epsilon_high]."}
    )
    max_log_ratio: float | None = field(
        default=MAX_LOG_RATIO, metadata={"help": "Clamp on the log-ratio before an exponential (None: off)."}
    )
    spg_negative: str = field(default="mixture", metadata={"help": f"SPG bound for A <= 0, one of {SPG_NEGATIVE}."})
    spg_beta: float = field(default=1.0, metadata={"help": "SPG's EUBO temperature beta."})
    spg_mix_weight: float = field(default=0.5, metadata={"help": "SPG's mixture weight of the EUBO."})
    p_mask_prompt: float = field(
        default=0.15, metadata={"help": "diffu_grpo: probability of masking each prompt token."}
    )
    block_length: int = field(default=32, metadata={"help": "Sampler block length (divides max_completion_length)."})
    diffusion_steps: int = field(default=128, metadata={"help": "Sampler steps (a multiple of the number of blocks)."})
    remasking: str = field(default="low_confidence", metadata={"help": f"Sampler remasking, one of {REMASKING}."})
    cfg_scale: float = field(default=0.0, metadata={"help": "Classifier-free guidance scale of the sampler."})
    sampler_threshold: float | None = field(
        default=None, metadata={"help": "Unmask every block position whose confidence exceeds it, at least one per "
                                        "step (None: the diffusion_steps schedule)."}
    )
    sampler_cache: str | None = field(
        default=None, metadata={"help": "Fast-dLLM's approximate KV cache for the sampler: None (exact), 'prefix' "
                                        "or 'dual' (the latter when the model's forward takes position_ids)."}
    )
    mask_id: int | None = field(
        default=None, metadata={"help": "Mask token id (default: the model config's, else the tokenizer's)."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective: expected one of {OBJECTIVES}, got {self.objective!r}")
        if self.num_mc_samples < 1:
            raise ValueError(f"num_mc_samples: expected an int >= 1, got {self.num_mc_samples!r}")
        if self.mask_scheme not in SCHEMES:
            raise ValueError(f"mask_scheme: expected one of {SCHEMES}, got {self.mask_scheme!r}")
        if self.remasking not in REMASKING:
            raise ValueError(f"remasking: expected one of {REMASKING}, got {self.remasking!r}")
        check_real("sampler_threshold", self.sampler_threshold, interval=(0, 1), optional=True)  # a probability
        if self.sampler_threshold is not None and self.remasking != "low_confidence":
            raise ValueError(f"sampler_threshold: compares low_confidence probabilities; remasking={self.remasking!r}")
        if self.sampler_cache not in CACHES:  # whether the model offers it is known with the model (trainer)
            raise ValueError(f"sampler_cache: expected one of {CACHES}, got {self.sampler_cache!r}")
        if self.spg_negative not in SPG_NEGATIVE:
            raise ValueError(f"spg_negative: expected one of {SPG_NEGATIVE}, got {self.spg_negative!r}")
        if self.mc_micro_batch_size is not None and self.mc_micro_batch_size < 1:
            raise ValueError(f"mc_micro_batch_size: expected None or an int >= 1, got {self.mc_micro_batch_size!r}")
        if self.block_length < 1 or self.max_completion_length % self.block_length:
            raise ValueError(
                f"block_length: expected a divisor of max_completion_length ({self.max_completion_length}), "
                f"got {self.block_length!r}"
            )
        blocks = self.max_completion_length // self.block_length
        if self.diffusion_steps < 1 or self.diffusion_steps % blocks:
            raise ValueError(
                f"diffusion_steps: expected a multiple of the number of blocks ({blocks}), got {self.diffusion_steps!r}"
            )
        if self.beta < 0:
            raise ValueError(f"beta: expected a KL coefficient >= 0, got {self.beta!r}")
        if self.beta > 0 and self.objective == "spg":
            raise ValueError("beta: spg takes no KL term; set beta=0.0")
        if self.clip_bound and self.objective not in ("bgpo", "vrpo"):
            raise ValueError(f"clip_bound: clips the BGPO / VRPO ratio; objective {self.objective!r} has none "
                             "(diffu_grpo clips with epsilon itself)")
        if self.use_vllm:
            raise ValueError("use_vllm: vLLM samples autoregressively; diffusion rollouts use bgpo.rollout.generate")
        if self.fp16:
            raise ValueError("fp16: the per-sample backward bypasses the fp16 loss scaler; use bf16=True")


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 finaliser over their sequence)."""
    state = 0
    for value in values:
        state = (state + 0x9E3779B97F4A7C15 + value) & 0xFFFFFFFFFFFFFFFF
        state = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        state = ((state ^ (state >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 31
    return state >> 1


def _until_eos(tokens: list[int], eos_ids: list[int]) -> list[int]:
    """The response up to and including its first EOS (all of it when there is none), as TRL keeps it."""
    for position, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[: position + 1]
    return tokens


def _average_gradients(module: torch.nn.Module) -> None:
    """All-reduce every gradient and divide by the world size (DDP's result, computed once)."""
    world = dist.get_world_size()
    for param in module.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
            param.grad.div_(world)


class DiffusionGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose rollouts and policy update are those of a masked diffusion LM.

    Args: as ``trl.GRPOTrainer`` (without tools, environments and custom rollout functions), with
    ``args`` a ``DiffusionGRPOConfig``. ``model`` is a Hugging Face masked diffusion LM instance
    (LLaDA / Dream via ``AutoModel.from_pretrained(..., trust_remote_code=True)``, or any bidirectional
    transformers model with an ``nn.Linear`` head); it is driven through
    ``bgpo.models.HFMaskedDiffusionAdapter``, so the logits are never materialised in training.
    """

    _tag_names = ["trl", "grpo", "bgpo", "diffusion"]
    _name = "DiffusionGRPO"

    def __init__(self, model, reward_funcs=None, args: DiffusionGRPOConfig | None = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, reward_processing_classes=None, callbacks=None,
                 optimizers=(None, None), peft_config=None):
        if not isinstance(args, DiffusionGRPOConfig):
            raise ValueError(f"args: expected a DiffusionGRPOConfig, got {type(args).__name__}")
        if isinstance(model, str):
            raise ValueError(
                "model: pass a loaded model instance (e.g. AutoModel.from_pretrained(path, trust_remote_code=True)); "
                "TRL loads a model id as a causal LM"
            )
        # The KL's reference: a frozen copy of the policy as given (before TRL prepares it); with peft, the
        # policy with its adapters disabled.  TRL's own reference scores autoregressive log-probs: keep it off.
        peft = peft_config is not None or is_peft_model(model)
        reference = copy.deepcopy(model).requires_grad_(False).eval() if args.beta > 0 and not peft else None
        kl_beta, args.beta = args.beta, 0.0
        try:
            super().__init__(model, reward_funcs, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                             processing_class=processing_class, reward_processing_classes=reward_processing_classes,
                             callbacks=callbacks, optimizers=optimizers, peft_config=peft_config)
        finally:
            args.beta = kl_beta
        if self.is_fsdp_enabled:
            raise NotImplementedError(
                "DiffusionGRPOTrainer supports single process, DDP and DeepSpeed ZeRO-1/2/3; under FSDP the "
                "per-sample backward passes and the fused LM head are not wired to the sharded model"
            )
        self._zero3 = self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        self.policy = HFMaskedDiffusionAdapter(self.model, tokenizer=self._tokenizer, mask_token_id=args.mask_id)
        check_cache_offered("sampler_cache", self.policy, args.sampler_cache)
        self.kl_beta = kl_beta
        self.reference = None if reference is None else HFMaskedDiffusionAdapter(
            reference.to(self.accelerator.device), tokenizer=self._tokenizer, mask_token_id=args.mask_id)
        self._rollouts = 0
        self._rollout_seed = 0
        epsilon_high = args.epsilon if args.epsilon_high is None else args.epsilon_high
        self._clip = (args.epsilon, epsilon_high) if args.clip_bound else None

    # ------------------------------------------------------------------ rollouts
    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        """One response per (already repeated) prompt from the block diffusion sampler; no sampling log-probs."""
        if images is not None or multimodal_fields:
            raise ValueError("train_dataset: DiffusionGRPOTrainer generates text only, but the prompts carry images")
        width = max(len(tokens) for tokens in prompt_ids)
        ids = torch.full((len(prompt_ids), width), self._tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for row, tokens in enumerate(prompt_ids):  # left padding
            ids[row, width - len(tokens):] = torch.as_tensor(tokens, dtype=torch.long)
            attention[row, width - len(tokens):] = 1
        device = self.accelerator.device
        with torch.no_grad(), self._head_gathered():
            out = generate(self.policy, ids.to(device), attention_mask=attention.to(device),
                           gen_length=self.args.max_completion_length, block_length=self.args.block_length,
                           steps=self.args.diffusion_steps, temperature=self.temperature,
                           remasking=self.args.remasking, cfg_scale=self.args.cfg_scale,
                           threshold=self.args.sampler_threshold, cache=self.args.sampler_cache,
                           seed=_mix(self._rollout_seed, 0))
        metrics = self._metrics["train" if self.model.training else "eval"]
        metrics["rollout/forwards_per_answer"].append(float(out.forwards))
        metrics["rollout/tokens_per_s"].append(out.tokens_per_second)
        metrics["rollout/parallel_fraction"].append(out.parallel_fraction)
        responses = out.sequences[:, width:].tolist()
        return [_until_eos(tokens, self.eos_token_ids) for tokens in responses], None

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        """Autoregressive per-token log-probs do not exist for a diffusion LM: ``GRPOTrainer`` asks for them
        as old-policy statistics, which ``_generate_and_score_completions`` replaces by ELBO terms."""
        return None, None, None

    def _generate_and_score_completions(self, inputs):
        """TRL's rollout and scoring, plus the mask seed, the sequence ids and (off-policy) the old statistics."""
        self._rollouts += 1
        self._rollout_seed = _mix(self.args.seed, self.accelerator.process_index, self._rollouts)
        output = super()._generate_and_score_completions(inputs)
        rows = output["completion_ids"].shape[0]
        device = output["completion_ids"].device
        first = self.accelerator.process_index * rows  # rows are laid out rank-major, as TRL slices advantages
        output["sequence_ids"] = torch.arange(first, first + rows, device=device)
        output["mask_seed"] = torch.full((rows,), _mix(self._rollout_seed, 1), dtype=torch.long, device=device)
        generate_every = self.args.steps_per_generation * self.num_iterations
        if self.model.training and self.args.gradient_accumulation_steps % generate_every:
            self._add_old_policy_statistics(output)
        if self.model.training and self.kl_beta > 0:
            self._add_reference_statistics(output)
        return output

    def _add_old_policy_statistics(self, output: dict) -> None:
        """The old policy's ELBO terms ``old_elbos`` (N, n_t), or for diffu_grpo its per-token log-probs
        ``old_logps`` (N, μ, T) under each inner iteration's one-step mask; kept as scalars, masks regenerated."""
        with self._head_gathered():
            output.update(self._statistics(self.policy, output, "old"))

    def _add_reference_statistics(self, output: dict) -> None:
        """The same statistics under the KL's reference policy: ``ref_elbos`` or ``ref_logps``."""
        if self.reference is not None:
            output.update(self._statistics(self.reference, output, "ref"))
            return
        with self.accelerator.unwrap_model(self.model).disable_adapter(), self._head_gathered():
            output.update(self._statistics(self.policy, output, "ref"))

    def _statistics(self, model, output: dict, prefix: str) -> dict:
        """``{prefix}_elbos`` (N, n_t) or, for diffu_grpo, ``{prefix}_logps`` (N, μ, T) of ``model``, no grad."""
        batch = self._policy_batch(output)
        seed = int(output["mask_seed"][0])
        args = self.args
        if args.objective == "diffu_grpo":
            return {f"{prefix}_logps": torch.stack([
                old_policy_token_logprobs(model, batch, seed=seed, iteration=iteration,
                                          prompt_mask_prob=args.p_mask_prompt,
                                          micro_batch_size=args.mc_micro_batch_size)
                for iteration in range(self.num_iterations)
            ], dim=1)}
        return {f"{prefix}_elbos": old_policy_elbos(model, batch, num_samples=args.num_mc_samples, seed=seed,
                                                    scheme=args.mask_scheme,
                                                    micro_batch_size=args.mc_micro_batch_size).T.contiguous()}

    def _policy_batch(self, inputs: dict) -> PolicyBatch:
        """The step's responses as a ``PolicyBatch``: prompt + completion, valid completion tokens scored."""
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        return PolicyBatch(
            input_ids=torch.cat([prompt_ids, completion_ids], dim=1),
            prompt_length=prompt_ids.shape[1],
            response_mask=inputs["completion_mask"].bool(),
            advantages=inputs["advantages"].float(),
            sequence_ids=inputs["sequence_ids"],
            attention_mask=torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
            group_size=self.num_generations,
        )

    # ------------------------------------------------------------------ update
    def _grouped(self, inputs: dict) -> dict:
        """Rows sorted by sequence id, so that the G responses of a prompt are contiguous again (TRL shuffles
        its buffers); wd1, whose weights are a softmax over each group, also needs every group complete."""
        order = torch.argsort(inputs["sequence_ids"])
        inputs = {key: value[order] if isinstance(value, torch.Tensor) and value.ndim else value
                  for key, value in inputs.items()}
        if self.args.objective == "wd1":
            groups = torch.unique_consecutive(inputs["sequence_ids"] // self.num_generations, return_counts=True)[1]
            if (groups != self.num_generations).any():
                raise ValueError(
                    "objective: wd1 needs the G responses of each prompt in one step; set steps_per_generation=1 "
                    "and a per_device_train_batch_size that is a multiple of num_generations"
                )
        return inputs

    def training_step(self, model, inputs, num_items_in_batch=None):
        """One micro-step: rollout if due (TRL's buffer), then the per-MC-sample forward/backward loop."""
        start = time.perf_counter()
        model.train()
        inputs = self._grouped(self._prepare_inputs(inputs))
        args = self.args
        accumulation = getattr(self, "current_gradient_accumulation_steps", args.gradient_accumulation_steps)
        batch = self._policy_batch(inputs)
        old_elbos = inputs["old_elbos"].T if "old_elbos" in inputs else None
        ref_elbos = inputs["ref_elbos"].T if "ref_elbos" in inputs else None
        diffu_grpo_options = None
        if args.objective == "diffu_grpo":
            iteration = (self._step // args.steps_per_generation) % self.num_iterations
            old_logp = inputs["old_logps"][:, iteration] if "old_logps" in inputs else None
            diffu_grpo_options = dict(iteration=iteration, prompt_mask_prob=args.p_mask_prompt,
                                      clip_eps=args.epsilon, old_logp=old_logp)
            if "ref_logps" in inputs:
                diffu_grpo_options.update(ref_logp=inputs["ref_logps"][:, iteration], beta=self.kl_beta)
        sync, backward = self._deepspeed_backward() if self.is_deepspeed_enabled else (None, None)
        with self._head_gathered():
            result = accumulate_policy_gradient(
                self.policy, batch, objective=args.objective, num_samples=args.num_mc_samples,
                seed=int(inputs["mask_seed"][0]), old_elbos=old_elbos, micro_batch_size=args.mc_micro_batch_size,
                denom=len(batch) * accumulation, scheme=args.mask_scheme, clip=self._clip,
                max_log_ratio=args.max_log_ratio, diffu_grpo_options=diffu_grpo_options,
                spg_options=dict(negative=args.spg_negative, beta=args.spg_beta, mix_weight=args.spg_mix_weight)
                if args.objective == "spg" else None,
                ref_elbos=ref_elbos, beta=self.kl_beta if ref_elbos is not None else 0.0,
                gradient_sync=sync, backward=backward,
            )
        if isinstance(model, DistributedDataParallel) and self.accelerator.sync_gradients:
            _average_gradients(self.model)
        if result["elbo"] is not None:
            elbo = self.accelerator.gather(result["elbo"].mean(dim=0)).mean()
            self._metrics["train"]["elbo"].append(elbo.item())
            if ref_elbos is not None:  # TRL's "kl": here k3 of the ELBO log-ratio, per response
                kl = self.accelerator.gather(k3((ref_elbos - result["elbo"]).float()).mean(dim=0)).mean()
                self._metrics["train"]["kl"].append(kl.item())
        self._step += 1
        self._current_train_step_time += time.perf_counter() - start
        if self._step % accumulation == 0:
            self._metrics["train"]["step_time"].append(self._current_train_step_time)
            self._current_train_step_time = 0.0
        return torch.as_tensor(result["loss"], dtype=torch.float32, device=args.device)

    def _head_gathered(self):
        """Under ZeRO-3, the LM head gathered on every rank for the block: the sampler and the fused ELBO op
        read it outside the head's forward, where DeepSpeed's hooks would gather it. Its gradient still goes
        through DeepSpeed's reduce-scatter hooks, and the full copy is dropped on exit."""
        if not self._zero3:
            return contextlib.nullcontext()
        import deepspeed

        head = [p for p in (self.policy.lm_head_weight, self.policy.lm_head_bias) if p is not None]
        return deepspeed.zero.GatheredParameters(head, modifier_rank=None)

    def _deepspeed_backward(self):
        """``(gradient_sync, backward)`` hooks for ``accumulate_policy_gradient`` under DeepSpeed: every per-sample
        backward runs in the engine (its loss already divided by the accumulation steps, so ``scale_wrt_gas``
        is off, as in TRL); only the last backward of a micro-step that ends an accumulation is the engine's
        accumulation boundary, through ``accelerator.backward``, which then steps the engine."""
        engine = self.accelerator.deepspeed_engine_wrapped.engine
        last = [False]

        def gradient_sync(is_last: bool) -> None:
            last[0] = is_last

        def backward(loss: torch.Tensor) -> None:
            # What engine.forward does before each backward (our forwards bypass the engine): without it ZeRO
            # takes every backward of an accumulation for the first one and overwrites the gradient.
            if hasattr(engine.optimizer, "clear_backward_seen_flag"):
                engine.optimizer.clear_backward_seen_flag()
            if last[0]:
                self.accelerator.backward(loss, scale_wrt_gas=False)
            else:
                engine.set_gradient_accumulation_boundary(False)
                engine.backward(loss, scale_wrt_gas=False)

        return gradient_sync, backward

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation rolls out and scores completions (TRL logs the eval rewards); no loss is computed."""
        self._prepare_inputs(inputs)
        return None, None, None
