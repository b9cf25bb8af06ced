"""Data for the trainer: loading (hub, local files, generators), prompt order, tokenizers and templates."""
from .generators import countdown_examples, solve_sudoku, sudoku_examples, sudoku_solutions
from .loading import GENERATORS, PromptOrder, format_prompt, load_examples, load_train_and_eval
from .prompts import TASK_PROMPTS
from .tokenizer import CharTokenizer, encode_prompts, encode_responses, load_tokenizer, render_prompt, tokenize

__all__ = [
    "countdown_examples", "sudoku_examples", "solve_sudoku", "sudoku_solutions", "GENERATORS", "PromptOrder",
    "format_prompt", "load_examples", "load_train_and_eval", "TASK_PROMPTS", "CharTokenizer", "encode_prompts",
    "encode_responses", "load_tokenizer", "render_prompt", "tokenize",
]
