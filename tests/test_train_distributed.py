"""``torchrun --nproc_per_node 2 -m bgpo.train`` on the CPU (gloo): one step equals a single-process step.

Each rank rolls out its half of the prompts (rollout chunks are seeded by their first prompt, so the
responses do not depend on how prompts are spread over ranks), accumulates its gradient over all MC
samples without communication, and the gradients are reduced once; the parameters after the step must
match a single process that saw all the prompts.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bgpo.cli import train_main
from bgpo.models import LLaDAConfig, LLaDAModelLM

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = [
    "model.tokenizer=char", "data.prompt_template={puzzle}=", "data.train_size=32", "data.eval_size=3",
    "data.generator={min_empty: 8, max_empty: 10}", "rollout.group_size=4", "rollout.gen_length=16",
    "rollout.block_length=16", "rollout.steps=4", "rollout.batch_size=2", "policy.num_samples=3",
    "batch_size=4", "steps=1", "optim.lr=1e-4", "log.progress=false", "log.tensorboard=false", "sft.steps=0",
]


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "checkpoints" / "step-00000001" / "model.safetensors")


def _gradients(run: Path) -> dict:
    """AdamW's first moment after one step: (1 - beta1) * the reduced gradient."""
    state = torch.load(run / "checkpoints" / "step-00000001" / "optimizer.pt", weights_only=False)["state"]
    return {name: s["exp_avg"] for name, s in state.items()}


@pytest.mark.parametrize("strategy, extra", [
    ("fsdp", []), ("ddp", []), ("fsdp", ["lora.enabled=true", "lora.r=4"]),
    ("fsdp", ["policy.kl_beta=0.1"]),  # the reference model is sharded like the policy
], ids=["fsdp", "ddp", "fsdp-lora", "fsdp-kl"])
def test_two_ranks_match_one_process(tmp_path, strategy, extra, monkeypatch):
    # A reward that varies between the random model's responses, so the advantages are not all zero.
    (tmp_path / "variety.py").write_text("def distinct(completion, example):\n    return len(set(completion)) / 16\n")
    overrides = [*OVERRIDES, "reward=variety:distinct", *extra]
    path = os.pathsep.join([str(ROOT / "python"), str(ROOT), str(tmp_path)])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "bgpo.train", *overrides, f"distributed={strategy}", f"output_dir={tmp_path / 'two'}"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    monkeypatch.syspath_prepend(str(tmp_path))
    assert train_main([*overrides, f"output_dir={tmp_path / 'one'}"]) == 0
    for name, grad in _gradients(tmp_path / "one").items():
        # Ranks pack and sum their rows in another order than one process: fp32 rounding, relative to the scale.
        torch.testing.assert_close(_gradients(tmp_path / "two")[name], grad, rtol=1e-5,
                                   atol=1e-5 * float(grad.abs().max()) + 1e-12, msg=name)
    # the logged means are over every rank's responses (elbo_per_token was rank 0's own mean)
    logged = [[r for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
               if r["kind"] == "train"][0] for run in ("one", "two")]
    for key in ("reward", "elbo_per_token", "surrogate", "response_length", *(("kl",) if "kl" in logged[0] else ())):
        assert logged[1][key] == pytest.approx(logged[0][key], rel=1e-5, abs=1e-9), key
    # Adam divides by sqrt(v): float noise in a ~0 gradient moves a weight by a fraction of lr.
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=2e-6, msg=name)
    torch.manual_seed(0)
    initial = LLaDAModelLM(LLaDAConfig.preset("tiny")).state_dict()
    moved = [k for k in one if (not torch.equal(initial[k], one[k]) if k in initial else bool(one[k].any()))]
    assert moved, "the step did not move the parameters"  # (LoRA: only adapters are saved; lora_B starts at 0)
    assert "lora.enabled=true" not in extra or all("lora_" in k for k in one)


def test_warm_up_under_torchrun_saves_the_gathered_weights(tmp_path):
    path = os.pathsep.join([str(ROOT / "python"), str(ROOT)])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "bgpo.train", *OVERRIDES, "sft.steps=2", "sft.batch_size=4", "steps=0", "data.eval_size=0",
               "distributed=fsdp", f"output_dir={run}"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    from safetensors.torch import load_file

    weights = load_file(run / "warmup.safetensors")
    model = LLaDAModelLM(LLaDAConfig.preset("tiny"))
    assert {k: tuple(v.shape) for k, v in weights.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert train_main([*OVERRIDES, "steps=0", f"model.init={run / 'warmup.safetensors'}",
                       f"output_dir={tmp_path / 'from_warmup'}"]) == 0


def test_the_process_group_is_destroyed_by_whoever_created_it(tmp_path, monkeypatch):
    """``close_distributed`` destroys a group ``init_distributed`` created (a gloo group left to interpreter
    finalisation can abort a finished run: SIGABRT, "terminate called without an active exception") and
    leaves a group the caller created to the caller."""
    script = tmp_path / "group.py"
    script.write_text(
        "import sys\n"
        "import torch.distributed as dist\n"
        "from bgpo.train.distributed import close_distributed, init_distributed\n"
        "context = init_distributed('fsdp')\n"
        "assert context.owns_group and context.world_size == 2 and dist.is_initialized()\n"
        "close_distributed(context)\n"
        "assert not dist.is_initialized()\n"
        "open(f'{sys.argv[1]}/destroyed.{context.rank}', 'w').close()\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "python"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "destroyed.0").exists() and (tmp_path / "destroyed.1").exists()

    import torch.distributed as dist

    from bgpo.train.distributed import close_distributed, init_distributed

    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun's variables, but the caller made its own group first
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        context = init_distributed("ddp")
        assert not context.owns_group and context.world_size == 1
        close_distributed(context)
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


def test_ranks_that_find_different_checkpoints_refuse_to_resume(tmp_path):
    """Each rank reads output_dir itself: a rank whose node has no copy of the checkpoint (output_dir not on
    a shared filesystem) must not start from scratch while rank 0 resumes; every rank refuses, naming it."""
    run = tmp_path / "run"
    path = os.pathsep.join([str(ROOT / "python"), str(ROOT)])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    assert train_main([*OVERRIDES, f"output_dir={run}"]) == 0  # a checkpoint at step 1
    script = tmp_path / "local_disks.py"
    script.write_text(
        "import os, sys\n"
        "import bgpo.train.trainer as trainer\n"
        "from bgpo.cli import train_main\n"
        "found = trainer.resume_point\n"
        "# rank 1's node has no copy of output_dir\n"
        "trainer.resume_point = lambda *a, **k: found(*a, **k) if os.environ['RANK'] == '0' else None\n"
        "sys.exit(train_main(sys.argv[1:]))\n")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    resume = [*OVERRIDES, "steps=2", f"output_dir={run}", "--resume"]
    # (without the check: rank 0 loads the checkpoint in a collective rank 1 never joins, and hangs)
    result = subprocess.run([*launch, str(script), *resume], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.stderr.count("config error: checkpoint.resume: the ranks found different checkpoints") == 2, \
        result.stderr[-3000:]
    assert "this rank, 1: -1; over the ranks: from -1 to 1" in result.stderr
    assert not (run / "checkpoints" / "step-00000002").exists()
    # the same directory seen by both ranks resumes
    result = subprocess.run([*launch, "-m", "bgpo.train", *resume], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "checkpoints" / "step-00000002").is_dir()


def test_each_rank_works_on_its_own_gpu(monkeypatch):
    """Regression: the group was made without ``torch.cuda.set_device(LOCAL_RANK)``, so NCCL's barrier and
    FSDP2's device mesh put every rank of a node on cuda:0."""
    import torch.distributed as dist

    from bgpo.train.distributed import init_distributed

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: calls.append(("init", backend)))
    monkeypatch.setattr(dist, "get_rank", lambda: 3)
    monkeypatch.setattr(dist, "get_world_size", lambda: 4)
    context = init_distributed("auto")
    assert calls == [("set_device", 3), ("init", "nccl")]  # the device first: NCCL binds to it
    assert (context.rank, context.local_rank, context.world_size, context.strategy) == (3, 3, 4, "fsdp")


def test_every_rank_resumes_its_own_random_streams(tmp_path):
    """Regression: only rank 0's generators were saved, and every rank resumed with them (identical LoRA
    dropout masks on every rank after a resume, different before)."""
    script = tmp_path / "streams.py"
    script.write_text(
        "import sys, torch\n"
        "from bgpo.models import LLaDAConfig, LLaDAModelLM\n"
        "from bgpo.models.checkpointing import find_blocks\n"
        "from bgpo.train.checkpoint import load_checkpoint, save_checkpoint\n"
        "from bgpo.train.distributed import close_distributed, init_distributed, shard_model\n"
        "context = init_distributed('fsdp')\n"
        "torch.manual_seed(0)\n"
        "model = LLaDAModelLM(LLaDAConfig.preset('tiny'))\n"
        "model = shard_model(model, find_blocks(model), context)\n"
        "optimizer = torch.optim.AdamW(model.parameters())\n"
        "torch.manual_seed(100 + context.rank)\n"
        "path = save_checkpoint(sys.argv[1], step=1, model=model, optimizer=optimizer, trainer_state={}, config={},\n"
        "                       context=context, keep=2)\n"
        "after = torch.rand(4)\n"
        "torch.manual_seed(7)\n"
        "load_checkpoint(f'{sys.argv[1]}/step-00000001', model=model, optimizer=optimizer, rank=context.rank)\n"
        "assert torch.equal(torch.rand(4), after), 'this rank did not resume its own stream'\n"
        "torch.save(after, f'{sys.argv[1]}/../after.{context.rank}.pt')\n"
        "close_distributed(context)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "python"), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               str(tmp_path / "checkpoints")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not torch.equal(torch.load(tmp_path / "after.0.pt"), torch.load(tmp_path / "after.1.pt"))  # their own
