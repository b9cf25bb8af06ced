"""Data: generators (unique 4x4 Sudoku, reachable Countdown), loading, prompt order, tokenizers."""
import itertools
import json
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from bgpo.data import (CharTokenizer, PromptOrder, countdown_examples, encode_prompts, encode_responses,
                       format_prompt, load_examples, load_train_and_eval, render_prompt, sudoku_examples,
                       sudoku_solutions)
from bgpo.data.generators import SUDOKU_MAX_EMPTY, _draw
from bgpo.rewards import countdown_reward, sudoku_reward


def test_sudoku_puzzles_have_one_solution_matching_the_grid():
    examples = sudoku_examples(40, seed=3, min_empty=4, max_empty=10)
    for e in examples:
        puzzle = [int(c) for c in e["puzzle"]]
        assert sudoku_solutions(puzzle, limit=2) == [[int(c) for c in e["solution"]]]
        assert 4 <= puzzle.count(0) <= 10
        assert sudoku_reward(e["answer"], e).score == 1.0
    assert examples == sudoku_examples(40, seed=3, min_empty=4, max_empty=10)
    assert examples != sudoku_examples(40, seed=4, min_empty=4, max_empty=10)


def test_countdown_answers_reach_the_target_with_the_numbers():
    examples = countdown_examples(50, seed=1, num_numbers=3, max_number=9)
    for e in examples:
        assert len(e["numbers"]) == 3 and 0 < e["target"] <= 99
        assert countdown_reward(e["answer"], e).score == 1.0
    assert examples == countdown_examples(50, seed=1, num_numbers=3, max_number=9)


def test_generator_options_are_checked():
    with pytest.raises(ValueError, match="min_empty"):
        sudoku_examples(1, seed=0, min_empty=0)
    with pytest.raises(ValueError, match="data.source"):
        load_examples("generate:chess", count=1)


def test_local_jsonl_and_field_map(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps({"problem": f"{i}+{i}", "solution": f"\\boxed{{{2 * i}}}"})
                              for i in range(5)))
    rows = load_examples(str(path), field_map={"problem": "question", "solution": "answer"}, count=3)
    assert rows == [{"question": f"{i}+{i}", "answer": f"\\boxed{{{2 * i}}}"} for i in range(3)]
    with pytest.raises(ValueError, match="data.source"):
        load_examples(str(tmp_path / "missing.jsonl"))


def test_impossible_generator_options_are_refused_not_looped_on():
    with pytest.raises(ValueError, match="max_empty.*12"):
        sudoku_examples(1, seed=0, min_empty=13, max_empty=13)
    assert sudoku_examples(3, seed=0, min_empty=12, max_empty=12)[0]["puzzle"].count("0") == 12
    for option in ("max_target", "max_number"):
        with pytest.raises(ValueError, match=option):
            countdown_examples(1, seed=0, **{option: 0})
    with pytest.raises(ValueError, match="hint: 5 candidates in a row were rejected .1 of 2"):
        answers = iter([{"x": 1}])
        _draw(2, lambda: next(answers, None), patience=5, hint="hint")
    from bgpo.train.config import load_config

    with pytest.raises(ValueError, match="data.generator: max_empty"):  # config validation used to hang
        load_config(None, ["model.tokenizer=char", "data.generator={min_empty: 13, max_empty: 13}"])


def test_a_unique_4x4_sudoku_keeps_at_least_four_givens():
    """The bound behind SUDOKU_MAX_EMPTY, exhaustively: no 3 cells of any of the 288 grids determine it."""
    grids = sudoku_solutions([0] * 16, limit=1000)
    assert len(grids) == 288

    def determined(givens: int) -> bool:
        return any(1 in Counter(tuple(g[i] for i in cells) for g in grids).values()
                   for cells in itertools.combinations(range(16), givens))

    assert not determined(3) and determined(4) and SUDOKU_MAX_EMPTY == 16 - 4


def _rows_file(tmp_path, questions):
    path = tmp_path / f"rows-{len(questions)}.jsonl"
    path.write_text("\n".join(json.dumps({"question": q, "answer": str(i)}) for i, q in enumerate(questions)))
    return str(path)


def _data(source, **changes):
    return SimpleNamespace(**{**dict(source=source, split="train", subset=None, train_size=None, eval_size=3,
                                     eval_source=None, eval_split="test", field_map={}, generator={}), **changes})


def test_a_local_file_holds_out_its_last_rows_never_trained_on(tmp_path):
    path = _rows_file(tmp_path, [f"q{i}" for i in range(10)])
    with pytest.raises(ValueError, match="data.split.*'test'"):
        load_examples(path, split="test")
    train, held_out = load_train_and_eval(_data(path), seed=0, template="{question}")
    assert [e["question"] for e in held_out] == ["q7", "q8", "q9"]
    assert [e["question"] for e in train] == [f"q{i}" for i in range(7)]
    train, _ = load_train_and_eval(_data(path, train_size=2), seed=0, template="{question}")
    assert [e["question"] for e in train] == ["q0", "q1"]
    with pytest.raises(ValueError, match="data.eval_size.*10 rows"):
        load_train_and_eval(_data(path, eval_size=10), seed=0, template="{question}")
    # a training row that repeats a held-out prompt is dropped from training
    repeated = _rows_file(tmp_path, ["a", "b", "c", "b"])
    train, held_out = load_train_and_eval(_data(repeated, eval_size=1), seed=0, template="{question}")
    assert [e["question"] for e in train] == ["a", "c"] and held_out[0]["question"] == "b"
    # a local eval_source is held out whole (data.eval_split is for hub datasets); the trainer uses all this
    eval_path = tmp_path / "eval.jsonl"
    eval_path.write_text(json.dumps({"question": "e0", "answer": "0"}))
    from bgpo.train.trainer import Trainer

    trainer = SimpleNamespace(config=SimpleNamespace(data=_data(path, eval_source=str(eval_path)), seed=0),
                              template="{question}")
    train, held_out = Trainer._load_data(trainer)
    assert len(train) == 10 and held_out == [{"question": "e0", "answer": "0"}]


def test_field_map_refuses_to_overwrite_a_column(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"problem": "2+2?", "answer": "4", "question": "other", "hint": "h"}))
    with pytest.raises(ValueError, match="data.field_map.*'problem'.*'question'"):
        load_examples(str(path), field_map={"problem": "question"})
    with pytest.raises(ValueError, match="data.field_map.*'problem' and 'hint'.*'text'"):
        load_examples(str(path), field_map={"problem": "text", "hint": "text"})
    swapped = load_examples(str(path), field_map={"problem": "question", "question": "problem"})
    assert swapped == [{"question": "2+2?", "answer": "4", "problem": "other", "hint": "h"}]


def test_local_parquet(tmp_path):
    import pandas as pd

    path = tmp_path / "rows.parquet"
    pd.DataFrame({"question": ["a", "b"], "answer": ["1", "2"]}).to_parquet(path)
    assert load_examples(str(path))[1] == {"question": "b", "answer": "2"}


def test_format_prompt_names_a_missing_field():
    assert format_prompt("{numbers} -> {target}", {"numbers": [1, 2], "target": 3}) == "1, 2 -> 3"
    with pytest.raises(ValueError, match="data.prompt_template.*'puzzle'"):
        format_prompt("{puzzle}", {"question": "x"})


def test_format_prompt_indexes_lists_and_names_the_failing_field():
    example = {"numbers": [13, 5], "target": 8, "puzzle": "1234"}
    assert format_prompt("first={numbers[0]} second={numbers[1]}", example) == "first=13 second=5"
    assert format_prompt("[{numbers:>8}] {numbers!s} {target:03d}", example) == "[   13, 5] 13, 5 008"
    for template, message in [("{0}", "positional field '{0}'"), ("{}", "positional field '{}'"),
                              ("{numbers[2]}", "'{numbers\\[2\\]}': IndexError"),
                              ("{target.real.x}", "'{target.real.x}': AttributeError"),
                              ("{puzzle:d}", "'{puzzle:d}': ValueError"), ("{target[0]}", "'{target\\[0\\]}': TypeError"),
                              ("{numbers", "expected '}'"), ("{nope[0]}", "field 'nope' is not in the example")]:
        with pytest.raises(ValueError, match="data.prompt_template: .*" + message):
            format_prompt(template, example)


def test_prompt_order_is_a_permutation_per_epoch_and_resumable():
    order = PromptOrder(10, seed=5)
    first_epoch = order.indices(0, 10)
    assert sorted(first_epoch) == list(range(10))
    assert order.indices(10, 10) != first_epoch and sorted(order.indices(10, 10)) == list(range(10))
    assert PromptOrder(10, seed=5).indices(7, 6) == order.indices(0, 13)[7:]


def test_char_tokenizer_round_trip_and_padding():
    tok = CharTokenizer()
    assert tok.decode(tok.encode("12=3")) == "12=3"
    assert tok.decode([49, 126, 127, 50], skip_special_tokens=False) == "1|_2"
    with pytest.raises(ValueError, match="alphabet"):
        tok.encode("é")
    ids, mask = encode_prompts(tok, ["ab", "abcd"], pad_id=126)
    assert ids.tolist() == [[126, 126, 97, 98], [97, 98, 99, 100]]
    assert mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert encode_prompts(tok, ["ab"], pad_id=126, length=3)[0].tolist() == [[126, 97, 98]]
    with pytest.raises(ValueError, match="length"):
        encode_prompts(tok, ["abcd"], pad_id=126, length=2)
    assert encode_responses(tok, ["12", "12345"], length=4, eos_id=126).tolist() == [
        [49, 50, 126, 126], [49, 50, 51, 52]]


class _ChatTokenizer:
    chat_template = "x"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert not tokenize and add_generation_prompt
        return f"<user>{messages[0]['content']}<assistant>"

    def __call__(self, text, add_special_tokens):
        assert not add_special_tokens
        return {"input_ids": [ord(c) for c in text]}


def test_chat_template_is_used_when_present():
    tok = _ChatTokenizer()
    assert render_prompt(tok, "hi") == "<user>hi<assistant>"
    assert render_prompt(tok, "hi", use_chat_template=False) == "hi"
    ids, _ = encode_prompts(tok, ["hi"], pad_id=0)
    assert "".join(map(chr, ids[0].tolist())) == "<user>hi<assistant>"
    assert isinstance(ids, torch.Tensor)


class _HFLikeTokenizer:
    """The attributes of a Hugging Face tokenizer that ``check_tokenizer_matches`` reads."""

    def __init__(self, size, *, mask=None, eos=None, special=()):
        self.size, self.mask_token_id, self.eos_token_id, self.all_special_ids = size, mask, eos, list(special)

    def __len__(self):
        return self.size


def test_tokenizer_matching_the_model_passes_and_a_mismatch_says_what_differs():
    from bgpo.data.tokenizer import check_tokenizer_matches
    from bgpo.models import LLaDAConfig, LLaDAModelLM

    tiny = LLaDAModelLM(LLaDAConfig.preset("tiny"))  # 128 rows, EOS 126, mask 127: CharTokenizer's ids
    check_tokenizer_matches(CharTokenizer(), tiny)
    check_tokenizer_matches(_HFLikeTokenizer(128, eos=2, special=[2, 126]), tiny)  # EOS 126 is a special token
    small = LLaDAModelLM(LLaDAConfig.preset("tiny", vocab_size=256, mask_token_id=255, eos_token_id=254,
                                            pad_token_id=254))
    with pytest.raises(ValueError, match="model.tokenizer") as error:
        check_tokenizer_matches(CharTokenizer(), small)
    message = str(error.value)
    assert "mask id 255 is not an id of the tokenizer" in message
    assert "EOS: the tokenizer's is 126, the model's 254" in message
    with pytest.raises(ValueError, match="the tokenizer has 300 ids but the model's embedding only 128 rows"):
        check_tokenizer_matches(_HFLikeTokenizer(300), tiny)
    with pytest.raises(ValueError, match="mask token: the tokenizer's is 5, the model's 127"):
        check_tokenizer_matches(_HFLikeTokenizer(128, mask=5), tiny)
    with pytest.raises(ValueError, match="EOS: the tokenizer's is 2, the model's 126 \\(not a special token"):
        check_tokenizer_matches(_HFLikeTokenizer(128, eos=2), tiny)


def test_trainer_refuses_a_tokenizer_that_does_not_match_the_model(tmp_path):
    from bgpo.train import Trainer, load_config

    config = load_config(None, ["model.tokenizer=char", "model.overrides={vocab_size: 256, mask_token_id: 255}",
                                "data.eval_size=0", "data.train_size=8", "log.progress=false",
                                "log.tensorboard=false", f"output_dir={tmp_path}"])
    with pytest.raises(ValueError, match="mask id 255 is not an id of the tokenizer"):
        Trainer(config)
