"""Packed sequences (issue 14 §2): the packed forward, ELBO and policy gradient equal the padded ones, the
CPU attention never builds a T x T mask, and bad packing inputs are refused by name."""
import pytest
import torch
import torch.nn.functional as F

import bgpo
from bgpo.models import LLaDAConfig, LLaDAModelLM
from bgpo.packing import pack
from bgpo.policy_update import PolicyBatch, accumulate_policy_gradient, old_policy_elbos


def _model():
    torch.manual_seed(0)
    return LLaDAModelLM(LLaDAConfig.preset("tiny"))


def _keep():
    keep = torch.ones(4, 12, dtype=torch.bool)
    keep[0, :3] = False  # left-padded prompt
    keep[1, 8:] = False  # hidden response padding
    keep[2, 5] = False  # a hole: positions must be the padded columns, not 0..len-1
    keep[3, :2] = keep[3, 10:] = False
    return keep


def test_packed_forward_equals_the_padded_forward_at_every_kept_token():
    model, keep = _model(), _keep()
    ids = torch.randint(0, 100, keep.shape)
    padded = model.hidden_states(ids, keep.long())
    packing = pack(keep)
    packed = model.hidden_states(packing.gather(ids).unsqueeze(0), **packing.model_inputs())[0]
    torch.testing.assert_close(packed, packing.gather(padded), rtol=1e-5, atol=1e-5)


def test_packed_positions_restart_at_zero_by_default():
    model = _model()
    a, b = torch.randint(0, 100, (1, 5)), torch.randint(0, 100, (1, 7))
    packed = model.hidden_states(torch.cat([a, b], dim=1), cu_seqlens=torch.tensor([0, 5, 12], dtype=torch.int32))
    torch.testing.assert_close(packed, torch.cat([model.hidden_states(a), model.hidden_states(b)], dim=1),
                               rtol=1e-5, atol=1e-5)


def test_cpu_packed_attention_builds_no_cross_sequence_scores(monkeypatch):
    """The earlier fallback ran SDPA on the whole packed row with a (T, T) block-diagonal mask."""
    calls = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, **kwargs):
        calls.append((q.shape[-2], k.shape[-2], attn_mask))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    model = _model()
    model.hidden_states(torch.randint(0, 100, (1, 12)), cu_seqlens=torch.tensor([0, 4, 4, 12]))
    assert calls and all(mask is None and q <= 8 and k <= 8 for q, k, mask in calls)


def _elbo_inputs(seed=0):
    torch.manual_seed(seed)
    keep = _keep()
    hidden = torch.randn(*keep.shape, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    targets = torch.randint(0, 40, keep.shape)
    masked = (torch.rand(keep.shape) < 0.5) & keep
    return keep, hidden, weight, targets, masked, torch.rand(4) + 0.5


def test_fused_elbo_loss_on_packed_rows_equals_the_padded_op():
    keep, hidden, weight, targets, masked, w = _elbo_inputs()
    advantages, old = torch.tensor([1.0, -0.5, 0.3, -1.2]), torch.full((4,), -20.0)
    padded = bgpo.fused_elbo_loss(hidden, weight, targets, masked, w, advantages, old, backend="torch")
    grads = torch.autograd.grad(padded.loss, (hidden, weight))
    p = pack(keep)
    packed = bgpo.fused_elbo_loss(p.gather(hidden), weight, p.gather(targets), p.gather(masked), w, advantages, old,
                                  backend="torch", cu_seqlens=p.cu_seqlens)
    torch.testing.assert_close(packed.elbo, padded.elbo, rtol=1e-6, atol=1e-5)
    packed_grads = torch.autograd.grad(packed.loss, (hidden, weight))
    for got, expected in zip(packed_grads, grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("change, match", [
    (dict(cu_seqlens=torch.tensor([1, 4, 8])), "cu_seqlens: expected non-decreasing offsets from 0 to 8"),
    (dict(cu_seqlens=torch.tensor([0, 5, 3, 8])), "cu_seqlens: expected non-decreasing offsets"),
    (dict(cu_seqlens=torch.tensor([0, 4, 7])), "cu_seqlens: expected non-decreasing offsets from 0 to 8"),
    (dict(cu_seqlens=torch.tensor([0.0, 8.0])), "cu_seqlens: expected an integer tensor"),
    (dict(cu_seqlens=torch.tensor([0])), "cu_seqlens: expected at least 2 entries"),
    (dict(hidden=torch.randn(1, 8, 16)), "hidden: expected a 2-D tensor"),
    (dict(targets=torch.zeros(2, 4, dtype=torch.long)), r"targets: expected a 1-D tensor"),
    (dict(masked=torch.ones(7, dtype=torch.bool)), r"masked: expected shape \(8,\)"),
    (dict(elbo_weight=torch.ones(3)), r"elbo_weight: expected shape \(2,\)"),
])
def test_packed_fused_elbo_rejects_bad_inputs(change, match):
    args = dict(hidden=torch.randn(8, 16), weight=torch.randn(40, 16), targets=torch.zeros(8, dtype=torch.long),
                masked=torch.ones(8, dtype=torch.bool), elbo_weight=torch.ones(2), cu_seqlens=torch.tensor([0, 4, 8]))
    args.update(change)
    with pytest.raises(ValueError, match=match):
        bgpo.fused_elbo(**args)


def test_model_rejects_bad_packing_arguments():
    model, ids = _model(), torch.randint(0, 100, (1, 6))
    with pytest.raises(ValueError, match="cu_seqlens: expected non-decreasing offsets from 0 to 6"):
        model.hidden_states(ids, cu_seqlens=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"position_ids: expected shape \(1, 6\)"):
        model.hidden_states(ids, cu_seqlens=torch.tensor([0, 6]), position_ids=torch.arange(5)[None])
    with pytest.raises(ValueError, match="position_ids: only taken with cu_seqlens"):
        model.hidden_states(ids, position_ids=torch.arange(6)[None])


def _batch():
    torch.manual_seed(1)
    ids = torch.randint(0, 100, (8, 16))
    response = torch.ones(8, 10, dtype=torch.bool)
    for row, length in enumerate([10, 3, 7, 5, 10, 2, 8, 6]):  # spread response lengths
        response[row, length:] = False
    attention = torch.cat([torch.ones(8, 6, dtype=torch.long), response.long()], dim=1)
    attention[1, :2] = attention[6, :4] = 0  # left-padded prompts
    return PolicyBatch(ids, 6, response, torch.randn(8), torch.arange(20, 28), attention_mask=attention,
                       group_size=4)


def _gradient(model, batch, **kwargs):
    model.zero_grad(set_to_none=True)
    out = accumulate_policy_gradient(model, batch, num_samples=3, seed=5, micro_batch_size=4, **kwargs)
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("objective, extra", [
    ("bgpo", {}), ("bgpo", dict(samples_per_forward=2)), ("wd1", {}), ("vrpo", {}), ("spg", {}),
    ("diffu_grpo", {}),  # runs padded either way
])
def test_packed_update_gives_the_padded_gradient(objective, extra):
    model, batch = _model(), _batch()
    off_policy = {}
    if objective in ("bgpo", "vrpo"):
        off_policy = dict(old_elbos=old_policy_elbos(model, batch, num_samples=3, seed=5) - 0.1)
    padded, expected = _gradient(model, batch, objective=objective, **off_policy, **extra)
    packed, got = _gradient(model, batch, objective=objective, pack_sequences=True, **off_policy, **extra)
    assert abs(packed["loss"] - padded["loss"]) <= 1e-5 * max(1.0, abs(padded["loss"]))
    if padded["elbo"] is not None:
        torch.testing.assert_close(packed["elbo"], padded["elbo"], rtol=1e-5, atol=1e-4)
    assert got.keys() == expected.keys()
    for name, grad in got.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_packed_old_policy_elbos_equal_the_padded_ones():
    model, batch = _model(), _batch()
    padded = old_policy_elbos(model, batch, num_samples=4, seed=2, micro_batch_size=3, samples_per_forward=3)
    packed = old_policy_elbos(model, batch, num_samples=4, seed=2, micro_batch_size=3, samples_per_forward=3,
                              pack_sequences=True)
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-4)


def test_packing_is_refused_where_it_would_not_be_exact():
    model, batch = _model(), _batch()
    hidden_scored = PolicyBatch(batch.input_ids, 6, torch.ones(8, 10, dtype=torch.bool), batch.advantages,
                                batch.sequence_ids, attention_mask=batch.attention_mask)
    with pytest.raises(ValueError, match="attention_mask: expected nonzero at every response token"):
        accumulate_policy_gradient(model, hidden_scored, num_samples=2, seed=0, pack_sequences=True)
    with pytest.raises(ValueError, match="pack_sequences: expected True or False"):
        accumulate_policy_gradient(model, batch, num_samples=2, seed=0, pack_sequences="yes")

    class Padded(torch.nn.Module):  # a model whose hidden_states takes no cu_seqlens (like the HF adapter)
        mask_token_id = model.mask_token_id

    with pytest.raises(ValueError, match="pack_sequences: Padded.hidden_states does not take cu_seqlens"):
        old_policy_elbos(Padded(), batch, num_samples=2, seed=0, pack_sequences=True)


def test_packed_supervised_warmup_follows_the_padded_one():
    from bgpo.train.config import SFTConfig
    from bgpo.train.distributed import DistributedContext
    from bgpo.train.sft import supervised_warmup

    torch.manual_seed(3)
    prompts, targets = torch.randint(0, 100, (4, 6)), torch.randint(0, 100, (4, 5))
    attention = torch.ones(4, 6, dtype=torch.long)
    attention[0, :3] = attention[2, :1] = 0

    def run(pack_sequences):
        model = _model()
        losses = supervised_warmup(
            model, list(model.parameters()), SFTConfig(steps=2, batch_size=4, lr=1e-2, warmup_steps=1),
            encode=lambda rows: (prompts, attention, targets), examples=[{}] * 4, seed=1,
            context=DistributedContext(), device=torch.device("cpu"), progress=False, pack_sequences=pack_sequences)
        return losses, {name: p.grad for name, p in model.named_parameters()}  # the last step's (clipped)

    (padded, padded_grads), (packed, packed_grads) = run(False), run(True)
    assert packed == pytest.approx(padded, rel=1e-5)
    for name, grad in packed_grads.items():
        torch.testing.assert_close(grad, padded_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_pack_sequences_config_is_validated_and_may_change_on_resume():
    from bgpo.train.checkpoint import RESUME_MAY_CHANGE
    from bgpo.train.config import load_config

    assert load_config(None, ["model.tokenizer=char"]).policy.pack_sequences is True
    assert load_config(None, ["model.tokenizer=char", "policy.pack_sequences=false"]).policy.pack_sequences is False
    with pytest.raises(ValueError, match="policy.pack_sequences: "):
        load_config(None, ["model.tokenizer=char", "policy.pack_sequences=sometimes"])
    assert "policy.pack_sequences" in RESUME_MAY_CHANGE


def test_trainer_step_packed_equals_padded(tmp_path):
    """Warm-up, old-policy ELBOs and μ = 2 updates, packed (the default) and padded: the same parameters."""
    from test_train_loop import tiny_config

    from bgpo.train import Trainer

    options = ("sft.steps=2", "sft.batch_size=2", "policy.updates_per_batch=2", "rollout.gen_length=32",
               "rollout.block_length=32")
    packed = Trainer(tiny_config(tmp_path / "a", *options))
    padded = Trainer(tiny_config(tmp_path / "b", *options, "policy.pack_sequences=false"))
    assert packed.pack_sequences and not padded.pack_sequences
    for trainer in (packed, padded):
        trainer.warm_up()
        trainer.train_step()
    for (name, a), (_, b) in zip(packed.model.named_parameters(), padded.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_rollout_attention_hides_the_tokens_after_the_first_eos():
    from bgpo.train.scoring import split_responses

    class Chars:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(97 + i) for i in ids)

    sequences = torch.tensor([[5, 1, 2, 9, 3, 9], [5, 5, 1, 2, 3, 4]])
    out = split_responses(sequences, 2, torch.tensor([[0, 1], [1, 1]]), 1, 9, Chars())
    assert out["attention_mask"].tolist() == [[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]
    assert out["response_mask"].tolist() == [[True, True, False, False], [True] * 4]


def test_packing_benchmark_runs_and_reports_the_same_gradient(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "packing.py"
    spec = importlib.util.spec_from_file_location("bench_packing", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--preset", "tiny", "--responses", "4", "--micro-batch", "2", "--nt", "2", "--prompt-length",
                       "8", "--response-length", "32", "--repeats", "1", "--out", str(tmp_path)])
    assert [row["packed"] for row in rows] == [False, True]
    summary = json.loads((tmp_path / "packing_cpu_tiny.json").read_text())["summary"]
    assert summary["max_relative_grad_difference"] < 1e-4 and summary["real_tokens"] < summary["padded_tokens"]
