"""Bring your own loop: one BGPO step on a Hugging Face model with only random_mask + fused_elbo_loss.

The model is a tiny transformers Llama made bidirectional (built from a config, no download); with
LLaDA or Dream, take the hidden states from ``bgpo.models.HFMaskedDiffusionAdapter`` instead.
Run: python examples/own_loop.py
"""
import torch
import transformers

import bgpo

torch.manual_seed(0)
config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
model = transformers.LlamaForCausalLM(config)
for module in model.modules():  # a masked diffusion LM attends both ways
    if hasattr(module, "is_causal"):
        module.is_causal = False
MASK_ID = 63
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

# Your rollout: 2 prompts x G = 4 responses (prompt 6 tokens, response 10) and their rewards.
G, P, T = 4, 6, 10
ids = torch.randint(0, 60, (2 * G, P + T))
maskable = torch.zeros_like(ids, dtype=torch.bool)
maskable[:, P:] = True  # the prompt is never masked
rewards = (ids[:, P:] == 7).float().mean(dim=1)  # a synthetic verifier
grouped = rewards.view(-1, G)
advantages = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-6)).flatten()

# The update: each MC sample is masked, forwarded, turned into its bound term and back-propagated alone.
n_t, seed = 8, 1234  # peak memory is that of one sample, whatever n_t
before = model.lm_head.weight.detach().clone()
total = 0.0
for j in range(n_t):
    sample = bgpo.random_mask(ids, maskable, mask_id=MASK_ID, seed=seed, sample_index=j, num_samples=n_t)
    hidden = model.model(input_ids=sample.noisy_ids).last_hidden_state[:, P:]  # final hidden states, no logits
    out = bgpo.fused_elbo_loss(hidden, model.lm_head.weight, ids[:, P:], sample.masked[:, P:],
                               sample.elbo_weight, advantages, num_samples=n_t)
    out.loss.backward()  # sample j's graph is freed here
    total += out.loss.item()
optimizer.step()
optimizer.zero_grad()
# Off-policy (several updates per rollout): keep each sample's out.elbo from the first pass (no grad) and
# pass it as old_elbo=... on the same seed and j in later passes; the masks are regenerated, not stored.

assert torch.isfinite(torch.tensor(total)) and not torch.equal(before, model.lm_head.weight)
print(f"loss {total:.4f} over {n_t} MC samples (on-policy: -mean A = 0, not its gradient); parameters updated")
