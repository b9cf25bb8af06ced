"""The RL trainer: rollouts, rewards, group advantages, per-sample accumulated updates.

One step (``Trainer.train_step``):

1. the step's ``batch_size`` prompts (each rank takes its contiguous share) are padded to one length
   (the longest over all ranks) and rolled out G times each with the block sampler, in chunks of
   ``rollout.batch_size`` prompts whose sampling seed depends only on (seed, step, first prompt), so a
   rollout does not depend on how prompts are spread over ranks;
2. the responses (up to and including their first EOS) are decoded and scored; group advantages;
3. for μ = ``policy.updates_per_batch`` > 1 the old policy's ELBO terms (or diffu-GRPO's token
   log-probs) are computed once without grad and kept as scalars;
4. μ times: ``accumulate_policy_gradient`` (per micro-batch and MC sample j: masks from
   ``random_mask`` seeded by (step, sequence id, j) — the same masks at every update — forward,
   ``fused_elbo_loss``, backward, free), one gradient reduction across ranks, a non-finite check,
   gradient clipping, AdamW and the LR schedule.

Around it: an optional supervised warm-up, held-out evaluation, metrics, checkpoints and exact
resume (``checkpoint``), and SIGINT/SIGTERM handling that finishes the step, checkpoints and stops
(``signals``).
"""
from __future__ import annotations

import contextlib
import functools
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data import PromptOrder, TASK_PROMPTS, encode_prompts, encode_responses, format_prompt, load_train_and_eval, \
    load_tokenizer
from ..data.tokenizer import check_tokenizer_matches
from ..estimators import group_advantages
from ..objectives import k3
from ..models import find_blocks
from ..packing import supports_packing
from ..policy_update import PolicyBatch, accumulate_policy_gradient, old_policy_elbos, old_policy_token_logprobs
from ..rewards import get_reward
from ..rollout import check_cache_offered, generate
from .checkpoint import check_base_weights, checkpoint_step, complete_checkpoints, load_checkpoint, resume_point, \
    save_checkpoint, save_weights
from .config import TrainConfig, config_to_dict
from .distributed import DistributedContext, all_reduce, all_reduce_gradients, broadcast_parameters, \
    check_same_on_every_rank, init_distributed, shard_model
from .metrics import METRICS_FILE, MetricsWriter, learning_signals, peak_memory_mib
from .modeling import DTYPES, adapters_disabled, apply_lora, build_model, resolve_device, weights_fingerprint
from .schedule import apply_optim_config, build_optimizer
from .scoring import code_reward_checked, score_completions, split_responses
from .seeds import derive_seed
from .sft import supervised_warmup
from .signals import StopSignals

__all__ = ["Trainer", "NonFiniteError"]

WARMUP_FILE = "warmup.safetensors"  # the supervised warm-up's weights, in output_dir


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient, or a step left non-finite weights."""


class Trainer:
    """Train a masked diffusion LM with ``config.policy.objective``; ``train()`` runs the whole job."""

    def __init__(self, config: TrainConfig, *, context: DistributedContext | None = None,
                 stop: StopSignals | None = None):
        """``stop``: signal handling installed by the caller before start-up (``bgpo train``); by default
        ``train()`` installs its own."""
        self.context = context or init_distributed(config.distributed)
        self.config = config.validate(self.context.world_size)
        self.reward_fn = code_reward_checked(config)  # before any slow work: refuse early without a sandbox
        self.output_dir = Path(config.output_dir)
        self.stop = stop or StopSignals()
        # Before any work: a refused resume costs nothing.
        self._resume_from = resume_point(self.checkpoint_dir, config_to_dict(config), say=self._say,
                                         is_main=self.context.is_main,
                                         run_files=(self.output_dir / METRICS_FILE, self.output_dir / WARMUP_FILE))
        self.device = resolve_device(config.model.device, self.context.local_rank)
        check_same_on_every_rank(  # each rank reads output_dir itself: on several nodes it must be shared
            -1 if self._resume_from is None else checkpoint_step(self._resume_from), self.context, self.device,
            f"checkpoint.resume: the ranks found different checkpoints to resume from in {self.checkpoint_dir} "
            "(step -1: none); output_dir must be one directory every rank reads (a shared filesystem across nodes)")
        self.tokenizer = load_tokenizer(config.model.tokenizer or config.model.path)
        self.model = build_model(config.model, seed=config.seed, device=self.device,
                                 mask_token_id=getattr(self.tokenizer, "mask_token_id", None),
                                 eos_token_id=getattr(self.tokenizer, "eos_token_id", None))
        check_tokenizer_matches(self.tokenizer, self.model)
        check_cache_offered("rollout.cache", self.model, config.rollout.cache)
        self.mask_id, self.eos_id = self.model.mask_token_id, self.model.eos_token_id
        self.pad_id = self.eos_id if self.eos_id is not None else self.mask_id
        # a LoRA checkpoint holds the adapters only: resume checks that they go back on the same base weights
        self.base_fingerprint = weights_fingerprint(self.model) if config.lora.enabled else None
        if config.lora.enabled:
            self.model = apply_lora(self.model, config.lora, seed=derive_seed(config.seed, -3))
        self.micro_batch_size, self.samples_per_forward = self._plan_update()
        self.pack_sequences = config.policy.pack_sequences and supports_packing(self.model)  # else padded
        if self.context.strategy == "ddp":
            broadcast_parameters(self.model)
        self.model = shard_model(self.model, find_blocks(self.model), self.context)
        self.parameters = [p for p in self.model.parameters() if p.requires_grad]
        total_updates = max(1, config.steps * config.policy.updates_per_batch)
        self.optimizer, self.scheduler = build_optimizer(self.parameters, config.optim, total_updates)
        self.reward_fn = self.reward_fn or get_reward(config.reward or config.data.task)
        self.template = config.data.prompt_template or TASK_PROMPTS[config.data.task]
        self.train_examples, self.eval_examples = self._load_data()
        self.order = PromptOrder(len(self.train_examples), config.seed)
        self.step, self.nonfinite_in_row, self.nonfinite_total, self.warmed_up = 0, 0, 0, config.sft.steps == 0
        self.metrics = MetricsWriter(self.output_dir, enabled=self.context.is_main, tensorboard=config.log.tensorboard)
        self._saved_step = None  # the step of the newest checkpoint of this run: never saved twice
        self._reference = None

    # ------------------------------------------------------------------------------------------ data
    def _load_data(self) -> tuple[list[dict], list[dict]]:
        return load_train_and_eval(self.config.data, seed=self.config.seed, template=self.template)

    def _encode_prompts(self, examples: list[dict], length: int | None = None):
        texts = [format_prompt(self.template, e) for e in examples]
        return encode_prompts(self.tokenizer, texts, pad_id=self.pad_id, length=length,
                              use_chat_template=self.config.data.chat_template)

    def _global_prompt_length(self, prompt_ids: torch.Tensor) -> int:
        fixed = self.config.data.max_prompt_length
        if fixed is not None:
            if prompt_ids.shape[1] > fixed:
                raise ValueError(f"data.max_prompt_length: a prompt has {prompt_ids.shape[1]} tokens (> {fixed})")
            return fixed
        return int(all_reduce(torch.tensor([prompt_ids.shape[1]]), self.context, op="max").item())

    # --------------------------------------------------------------------------------------- rollouts
    def _autocast(self):
        dtype = self.config.model.autocast
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[dtype])

    @torch.no_grad()
    def rollout(self, examples: list[dict], *, group_size: int, temperature: float, seed_parts: tuple,
                first_index: int, chunk: int | None) -> dict:
        """Sample ``group_size`` responses per example; return sequences, masks and decoded completions."""
        r = self.config.rollout
        prompts, attention = self._encode_prompts(examples)
        length = self._global_prompt_length(prompts)
        prompts, attention = self._encode_prompts(examples, length)
        chunk = chunk or len(examples)
        self.model.eval()
        pieces, forwards, parallel, seconds = [], 0.0, 0.0, 0.0
        with self._autocast():
            for start in range(0, len(examples), chunk):
                rows = slice(start, start + chunk)
                mask = attention[rows]
                out = generate(
                    self.model, prompts[rows].to(self.device),
                    attention_mask=None if bool(mask.all()) else mask.to(self.device),
                    gen_length=r.gen_length, block_length=r.block_length, steps=r.steps, temperature=temperature,
                    remasking=r.remasking, cfg_scale=r.cfg_scale, mask_id=self.mask_id, eos_id=self.eos_id,
                    seed=derive_seed(*seed_parts, first_index + start), group_size=group_size,
                    cache=r.cache, threshold=r.threshold,
                )
                pieces.append(out.sequences)
                answers = out.sequences.shape[0]
                forwards += out.forwards * answers
                parallel += out.parallel_fraction * answers
                seconds += answers * r.gen_length / out.tokens_per_second
        self.model.train()
        sequences = torch.cat(pieces)
        # This rank's sampler metrics, weighted by answers (see bgpo.rollout.GenerationOutput).
        sampler = {"rollout_forwards_per_answer": forwards / len(sequences),
                   "rollout_tokens_per_s": len(sequences) * r.gen_length / seconds,
                   "rollout_parallel_fraction": parallel / len(sequences)}
        return dict(sequences=sequences, prompt_length=length, sampler=sampler,
                    **split_responses(sequences, length, attention, group_size, self.eos_id, self.tokenizer))

    def score(self, completions: list[str], examples: list[dict]) -> tuple[torch.Tensor, list[str]]:
        """Rewards (N,) and reasons; completion k answers ``examples[k // (N / len(examples))]``."""
        return score_completions(self.reward_fn, completions, examples, parallel=self.config.data.task == "code")

    # ------------------------------------------------------------------------------------------ a step
    def _local_examples(self, step: int) -> tuple[list[dict], int]:
        """This rank's prompts of ``step`` and the global index of its first one."""
        local = self.config.batch_size // self.context.world_size
        indices = self.order.indices(step * self.config.batch_size, self.config.batch_size)
        first = self.context.rank * local
        return [self.train_examples[i] for i in indices[first : first + local]], first

    def train_step(self) -> dict:
        """One rollout batch and its μ optimizer updates; returns the step's metrics."""
        c, p = self.config, self.config.policy
        G = c.rollout.group_size
        started = time.perf_counter()
        examples, first = self._local_examples(self.step)
        rolled = self.rollout(examples, group_size=G, temperature=c.rollout.temperature,
                              seed_parts=(c.seed, self.step, 0), first_index=first, chunk=c.rollout.batch_size)
        rewards, _ = self.score(rolled["completions"], examples)
        advantages = group_advantages(rewards, G, std=p.advantage_std)
        N = len(rewards)
        batch = PolicyBatch(
            input_ids=rolled["sequences"], prompt_length=rolled["prompt_length"],
            response_mask=rolled["response_mask"].to(self.device), advantages=advantages.to(self.device),
            sequence_ids=torch.arange(first * G, first * G + N, device=self.device),
            attention_mask=rolled["attention_mask"], group_size=G,
        )
        mask_seed = derive_seed(c.seed, self.step, 1)
        autocast = DTYPES[c.model.autocast] if c.model.autocast else None
        common = dict(num_samples=p.num_samples, seed=mask_seed, micro_batch_size=self.micro_batch_size,
                      scheme=p.scheme, backend=p.backend, autocast=autocast,
                      samples_per_forward=self.samples_per_forward, pack_sequences=self.pack_sequences)
        old_elbos, ref_elbos = None, None
        old_logp, ref_logp = [None] * p.updates_per_batch, [None] * p.updates_per_batch
        token_logprobs = functools.partial(old_policy_token_logprobs, batch=batch, seed=mask_seed,
                                           micro_batch_size=self.micro_batch_size, autocast=autocast,
                                           prompt_mask_prob=p.diffu_grpo.get("prompt_mask_prob", 0.15))
        if p.updates_per_batch > 1 and p.objective in ("bgpo", "vrpo"):
            old_elbos = old_policy_elbos(self.model, batch, **common)
        if p.updates_per_batch > 1 and p.objective == "diffu_grpo":
            old_logp = [token_logprobs(self.model, iteration=u) for u in range(p.updates_per_batch)]
        if p.kl_beta > 0:
            with self._reference_policy() as reference:
                if p.objective == "diffu_grpo":
                    ref_logp = [token_logprobs(reference, iteration=u) for u in range(p.updates_per_batch)]
                else:
                    ref_elbos = old_policy_elbos(reference, batch, **common)
        kl = dict(beta=p.kl_beta, ref_elbos=ref_elbos) if ref_elbos is not None else {}

        def diffu_grpo_options(update: int) -> dict:
            options = {**p.diffu_grpo, "iteration": update, "old_logp": old_logp[update]}
            if p.kl_beta > 0:
                options.update(ref_logp=ref_logp[update], beta=p.kl_beta)
            return options

        losses, elbos, kls, grad_norms, skipped, rollout_elbo = [], [], [], [], 0, None
        for update in range(p.updates_per_batch):
            self.optimizer.zero_grad(set_to_none=True)
            out = accumulate_policy_gradient(
                self.model, batch, objective=p.objective, old_elbos=old_elbos,
                clip=tuple(p.clip) if p.clip else None, max_log_ratio=p.max_log_ratio,
                diffu_grpo_options=diffu_grpo_options(update) if p.objective == "diffu_grpo" else None,
                spg_options=p.spg if p.objective == "spg" else None,
                gradient_sync=self._gradient_sync(), **kl, **common,
            )
            all_reduce_gradients(self.model, self.context)
            loss = float(all_reduce(torch.tensor([out["loss"]], dtype=torch.float64), self.context).item())
            grad_norm = self._clip_gradients()
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                skipped += 1
                self._count_nonfinite(loss, grad_norm)
                self.optimizer.zero_grad(set_to_none=True)
                continue
            self.nonfinite_in_row = 0
            self.optimizer.step()
            self._check_parameters()
            self.scheduler.step()
            losses.append(loss / self.context.world_size)
            grad_norms.append(grad_norm)
            if out["elbo"] is not None:
                lengths = batch.response_mask.sum(dim=1).clamp_min(1).float()
                elbos.append((out["elbo"].float().mean(dim=0) / lengths).sum().item())  # this rank's sum
                rollout_elbo = out["elbo"] if rollout_elbo is None else rollout_elbo  # first update: on-policy
            if ref_elbos is not None:  # k3 of the ELBO log-ratio to the reference, per response
                kls.append(k3((ref_elbos - out["elbo"]).float()).mean(dim=0).sum().item())
        self.step += 1
        totals = all_reduce(torch.tensor([rewards.sum().item(), float(N), *elbos, *kls], dtype=torch.float64),
                            self.context).tolist()
        means = [v / totals[1] for v in totals[2:]]  # the updates' per-response sums over every rank: means
        elbos, kls = means[:len(elbos)], means[len(elbos):]
        lengths = all_reduce(batch.response_mask.sum().double().reshape(1).cpu(), self.context)
        return {
            "kind": "train", "step": self.step, "reward": float(totals[0] / totals[1]),
            "loss": _mean(losses), "elbo_per_token": _mean(elbos), "grad_norm": _mean(grad_norms),
            **learning_signals(rollout_elbo, batch.advantages, rewards, batch.response_mask.sum(dim=1), G,
                               self.context),
            **({"kl": _mean(kls)} if kls else {}),
            "response_length": float(lengths[0] / totals[1]), **rolled["sampler"], "lr": self.scheduler.get_last_lr()[0],
            "skipped_updates": skipped, "nonfinite_total": self.nonfinite_total,
            "step_time_s": time.perf_counter() - started, "peak_memory_mib": peak_memory_mib(self.device),
        }

    @contextlib.contextmanager
    def _reference_policy(self):
        """The KL's reference policy, frozen: with LoRA the policy itself with its adapters switched off (the
        base model, no second copy); otherwise a copy of the weights RL started from (built like the policy,
        then the warm-up's weights if a warm-up ran), made once and sharded like the policy."""
        if self.config.lora.enabled:
            with adapters_disabled(self.model):
                yield self.model
            return
        if self._reference is None:
            c = self.config
            reference = build_model(c.model, seed=c.seed, device=self.device, mask_token_id=self.mask_id,
                                    eos_token_id=self.eos_id)
            if c.sft.steps > 0:
                from safetensors.torch import load_file

                reference.load_state_dict(load_file(self.output_dir / WARMUP_FILE, device=str(self.device)))
            reference.requires_grad_(False).eval()
            self._reference = shard_model(reference, find_blocks(reference), self.context)
        yield self._reference

    def _gradient_sync(self):
        """FSDP2: reduce-scatter only in the last backward of an update."""
        if self.context.strategy == "fsdp":
            return self.model.set_requires_gradient_sync
        return None

    def _clip_gradients(self) -> float:
        max_norm = self.config.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(self.parameters, max_norm if max_norm is not None else float("inf"))
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
            norm = norm.full_tensor()
        return float(norm)

    def _check_parameters(self) -> None:
        """Stop (before any checkpoint of it) when an update left a non-finite weight, e.g. an overflowing LR."""
        local = [p.to_local() if hasattr(p, "to_local") else p for p in self.parameters]  # FSDP2: own shards
        bad = torch.stack([~torch.isfinite(p.detach()).all() for p in local]).any().double().reshape(1).cpu()
        if all_reduce(bad, self.context, op="max").item():
            newest = complete_checkpoints(self.checkpoint_dir)
            lr = self.optimizer.param_groups[0]["lr"]
            raise NonFiniteError(
                f"optim.lr: the update of step {self.step + 1} (lr={lr}) left non-finite parameters; it is not "
                f"checkpointed (newest checkpoint: {newest[-1][1] if newest else 'none'}); lower optim.lr"
            )

    def _count_nonfinite(self, loss: float, grad_norm: float) -> None:
        self.nonfinite_in_row += 1
        self.nonfinite_total += 1
        self.metrics.write({"kind": "nonfinite", "step": self.step + 1, "loss": loss, "grad_norm": grad_norm,
                            "in_a_row": self.nonfinite_in_row})
        limit = self.config.optim.max_nonfinite
        if self.nonfinite_in_row >= limit:
            raise NonFiniteError(
                f"optim.max_nonfinite: {self.nonfinite_in_row} updates in a row had a non-finite loss or gradient "
                f"(last: loss={loss}, grad_norm={grad_norm}) at step {self.step}; lower optim.lr, enable "
                "optim.grad_clip or check the rewards"
            )

    # ------------------------------------------------------------------------------------- evaluation
    def evaluate(self) -> dict:
        """Held-out reward and accuracy (reward >= 1) of ``log.eval_samples`` responses per prompt, decoded at
        ``log.eval_temperature`` (0 = greedy).  The sampling seed is fixed, so evaluations of successive
        checkpoints are paired (same noise), which makes their differences less noisy than each value."""
        examples, log = self.eval_examples, self.config.log
        if not examples:
            return {}
        world = self.context.world_size
        per_rank = -(-len(examples) // world)  # every rank runs the same number of forward passes
        indices = [i % len(examples) for i in range(self.context.rank * per_rank, (self.context.rank + 1) * per_rank)]
        valid = torch.tensor([self.context.rank * per_rank + k < len(examples) for k in range(per_rank)],
                             dtype=torch.float64).repeat_interleave(log.eval_samples)
        chosen = [examples[i] for i in indices]
        rolled = self.rollout(chosen, group_size=log.eval_samples, temperature=log.eval_temperature,
                              seed_parts=(self.config.seed, -1), first_index=self.context.rank * per_rank,
                              chunk=min(log.eval_batch_size, per_rank))
        rewards, _ = self.score(rolled["completions"], chosen)
        rewards = rewards.double()
        totals = all_reduce(torch.stack([(rewards * valid).sum(), ((rewards >= 1.0).double() * valid).sum(),
                                         valid.sum()]), self.context)
        return {"kind": "eval", "step": self.step, "reward": float(totals[0] / totals[2]),
                "accuracy": float(totals[1] / totals[2]), "prompts": int(totals[2]) // log.eval_samples,
                "samples_per_prompt": log.eval_samples, "temperature": log.eval_temperature,
                "example": rolled["completions"][0] if self.context.is_main else ""}

    # ----------------------------------------------------------------------------------- checkpoints
    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    def save_checkpoint(self) -> Path | None:
        """Checkpoint the current step, unless this run already did (the last step is saved once)."""
        if self._saved_step == self.step:
            return None
        state = {"step": self.step, "position": self.step * self.config.batch_size,
                 "nonfinite_total": self.nonfinite_total, "nonfinite_in_row": self.nonfinite_in_row,
                 "warmed_up": self.warmed_up, "scheduler": self.scheduler.state_dict(),
                 "base_fingerprint": self.base_fingerprint}
        path = save_checkpoint(self.checkpoint_dir, step=self.step, model=self.model, optimizer=self.optimizer,
                               trainer_state=state, config=config_to_dict(self.config), context=self.context,
                               keep=self.config.checkpoint.keep)
        self._saved_step = self.step
        return path

    def _plan_update(self) -> tuple[int | None, int]:
        """(micro_batch_size, samples_per_forward): the configured ones, or with ``policy.memory_budget_gib``
        those ``bgpo.plan`` chooses (it also turns activation checkpointing on when the plan needs it)."""
        p = self.config.policy
        if p.memory_budget_gib is None:
            return p.micro_batch_size, p.samples_per_forward
        from ..models import enable_activation_checkpointing
        from ..plan import format_plan, plan_update, workload_from_config

        work = workload_from_config(self.config, self.context.world_size, sharded=self.context.strategy == "fsdp",
                                    device=self.device)
        plan = plan_update(work, p.memory_budget_gib)
        self._say(format_plan(work, plan, p.memory_budget_gib))
        if plan.activation_checkpointing:
            enable_activation_checkpointing(self.model)
        return plan.micro_batch_size, plan.samples_per_forward

    def _say(self, text: str) -> None:
        if self.context.is_main:
            tqdm.write(f"bgpo train: {text}")

    def resume(self) -> bool:
        """Load the checkpoint chosen at start-up and drop ``metrics.jsonl`` records of later steps (those the
        run logs again); False when it starts from step 0 (then the records of an earlier attempt go)."""
        path = self._resume_from
        step = -1
        if path is not None:
            state = load_checkpoint(path, model=self.model, optimizer=self.optimizer, rank=self.context.rank)
            check_base_weights(state.get("base_fingerprint"), self.base_fingerprint, path,
                               force=self.config.checkpoint.force_resume, say=self._say)
            self.scheduler.load_state_dict(state["scheduler"])
            self.scheduler = apply_optim_config(self.optimizer, self.scheduler, self.config.optim)
            self.step, self.warmed_up = state["step"], state["warmed_up"]
            self.nonfinite_total, self.nonfinite_in_row = state["nonfinite_total"], state["nonfinite_in_row"]
            self._saved_step = step = self.step
        dropped = self.metrics.truncate(step)
        if dropped:
            self._say(f"dropped {dropped} records of steps after {max(step, 0)} from {self.metrics.path}")
        return path is not None

    # ------------------------------------------------------------------------------------------ a run
    def warm_up(self) -> None:
        """The supervised warm-up (``sft``), then its weights to ``output_dir/warmup.safetensors`` (a
        ``model.init`` to start other RL runs from)."""
        c = self.config

        def encode(examples):
            prompts, attention = self._encode_prompts(examples)
            answers = [str(e["answer"]) for e in examples]
            targets = encode_responses(self.tokenizer, answers, length=c.rollout.gen_length, eos_id=self.pad_id)
            return prompts, None if bool(attention.all()) else attention, targets

        losses = supervised_warmup(self.model, self.parameters, c.sft, encode=encode, examples=self.train_examples,
                                   seed=derive_seed(c.seed, -2), context=self.context, device=self.device,
                                   progress=c.log.progress, should_stop=self._stop_signal,
                                   pack_sequences=self.pack_sequences)
        if len(losses) < c.sft.steps:  # stopped by a signal: nothing of a partial warm-up is kept
            return
        self.warmed_up = True
        self.metrics.write({"kind": "warmup", "step": 0, "loss": losses[-1], "steps": len(losses)})
        save_weights(self.output_dir / WARMUP_FILE, self.model, self.context)

    def _stop_signal(self) -> int:
        """The signal that stops the run, agreed by all ranks (the largest number received); 0 if none."""
        flag = torch.tensor([float(self.stop.signum or 0)])
        return int(all_reduce(flag, self.context, op="max").item())

    def _log(self, record: dict, bar=None) -> None:
        if not record:
            return
        self.metrics.write(record)
        if bar is not None and record["kind"] == "train":
            bar.set_postfix(reward=f"{record['reward']:.3f}", loss=f"{record['loss']:.4f}",
                            elbo=f"{record['elbo_per_token']:.3f}", s=f"{record['step_time_s']:.1f}",
                            mem=f"{record['peak_memory_mib']:.0f}M")
        elif record["kind"] == "eval" and self.context.is_main:
            tqdm.write(f"eval step {record['step']}: reward {record['reward']:.3f} accuracy {record['accuracy']:.3f}")

    def train(self) -> dict:
        """Warm up, then RL until ``steps`` (or a stop signal); returns the last evaluation (or train) metrics,
        with ``stopped`` and ``signal`` set when a signal stopped it (``signals.signal_exit_code``)."""
        owned = not self.stop.installed
        if owned:
            self.stop.install()
        try:
            if self.resume():
                self._say(f"resumed from step {self.step} ({self._resume_from})")
            with self.stop.deferred():
                return self._run()
        finally:
            if owned:
                self.stop.restore()
            self.metrics.close()

    def _run(self) -> dict:
        c = self.config
        last: dict = {}
        if not self.warmed_up:
            self.warm_up()
            if not self.warmed_up:  # the warm-up is short and starts over: no checkpoint of it
                self._say("stopped by signal during the supervised warm-up; nothing saved (a new run starts the "
                          "warm-up over)")
                return {"kind": "warmup", "stopped": True, "signal": self._stop_signal()}
        if self.step == 0 and self._resume_from is None:  # (a step-0 checkpoint comes after this evaluation)
            self._log(last := self.evaluate())
        bar = tqdm(total=c.steps, initial=self.step, desc=f"{c.policy.objective}", dynamic_ncols=True,
                   disable=not (c.log.progress and self.context.is_main))
        while self.step < c.steps:
            record = self.train_step()
            self._log(record, bar)
            bar.update(1)
            last = record
            if c.log.eval_every and self.step % c.log.eval_every == 0 and self.step < c.steps:
                self._log(last := self.evaluate())
            stop = self._stop_signal()
            if stop or (c.checkpoint.every and self.step % c.checkpoint.every == 0):
                self.save_checkpoint()
            if stop:
                self._say(f"stopped by signal after step {self.step}; checkpoint saved (continue with --resume)")
                return {**last, "stopped": True, "signal": stop}
        bar.close()
        if c.steps > 0:
            self._log(last := self.evaluate())
        if c.checkpoint.save_final:
            self.save_checkpoint()
        return last


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
