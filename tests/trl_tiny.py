"""A tiny masked diffusion LM, tokenizer, prompts and reward for the TRL integration's tests, built without a
download; run as a script (``torchrun ... tests/trl_tiny.py OUT.pt [key=value ...]``) it trains a few steps
with ``DiffusionGRPOTrainer`` and saves the final parameters, for the multi-process tests."""
import contextlib
import sys

import datasets
import tokenizers
import torch
import transformers

CHARS = "abcdefghij+=?"
VOCAB = {"<pad>": 0, "<eos>": 1, "<mask>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(CHARS)}}
TARGET = VOCAB["a"]
PROMPTS = ["a+b=", "c+d=", "e+f=", "g+h="]


def tokenizer():
    """A character-level fast tokenizer with pad, EOS and mask tokens."""
    model = tokenizers.models.WordLevel(VOCAB, unk_token="<unk>")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex("."), behavior="isolated")
    tok.decoder = tokenizers.decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                mask_token="<mask>", unk_token="<unk>")


def model(hidden=32):
    """A tiny transformers Llama made bidirectional: a masked diffusion LM in all but its weights."""
    config = transformers.LlamaConfig(vocab_size=len(VOCAB), hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(config)
    lm.config.is_causal = False
    for module in lm.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = False
    return lm


def count_a(completion_ids, **kwargs):
    """Synthetic reward: the fraction of the response that is the letter 'a'."""
    return [sum(token == TARGET for token in ids) / max(len(ids), 1) for ids in completion_ids]


def trainer(output_dir, lm=None, peft_config=None, **overrides):
    """``DiffusionGRPOTrainer`` on the tiny model; ``overrides`` are ``DiffusionGRPOConfig`` fields."""
    from bgpo.integrations.trl import DiffusionGRPOConfig, DiffusionGRPOTrainer

    options = dict(output_dir=str(output_dir), per_device_train_batch_size=4, num_generations=4,
                   max_completion_length=8, block_length=4, diffusion_steps=4, num_mc_samples=2, max_steps=2,
                   learning_rate=1e-2, logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                   gradient_checkpointing=False, seed=0)
    options.update(overrides)
    dataset = datasets.Dataset.from_dict({"prompt": PROMPTS})
    return DiffusionGRPOTrainer(lm or model(), reward_funcs=count_a, args=DiffusionGRPOConfig(**options),
                                train_dataset=dataset, processing_class=tokenizer(), peft_config=peft_config)


def main(argv: list[str]) -> None:
    """``OUT [key=value ...]``: train, then save each rank's {name: parameter} to ``OUT.rank{r}.pt``."""
    import yaml

    overrides = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in argv[1:])}
    run = trainer(argv[0] + ".run", **overrides)
    run.train()
    parameters = dict(run.accelerator.unwrap_model(run.model_wrapped).named_parameters())
    gathered = contextlib.nullcontext()
    if run.is_deepspeed_enabled:  # ZeRO-3 partitions the parameters: gather them to save them whole
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(list(parameters.values()))
    with gathered:
        torch.save({name: p.detach().float().cpu().clone() for name, p in parameters.items()},
                   f"{argv[0]}.rank{run.accelerator.process_index}.pt")
    # Leave the process group before exit: a rank that exits while the other still talks to it aborts.
    run.accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
