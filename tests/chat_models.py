"""Builders for the chat tests: a real fast tokenizer (``tokenizers`` WordLevel wrapped in
transformers' ``PreTrainedTokenizerFast``) with Jinja chat templates, a tiny Llama folder
that holds it, and chat data in every supported form.

The data: user turns are random words, assistant turns one fixed sentence. A model can
drive its loss near zero on such data only if the user turns are masked out of the loss.
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path
from typing import Any

import torch

WORDS = ("apple river stone cloud green quick table music paper light house bread window dream "
         "garden silver storm candle forest mirror yellow ocean pencil rabbit winter summer violet "
         "marble copper thunder meadow lantern harbor feather crystal shadow velvet orchard basket").split()
ANSWER = "i always answer with this same short sentence"
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>"]
# No generation marks: the assistant spans are found by rendering prefix by prefix.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|> {% endif %}")
# The same rendering with the assistant's text inside {% generation %} marks.
MARKED_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|> "
                   "{% generation %}{{ m['content'] }} <|end|>{% endgeneration %} {% else %}"
                   "<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endif %}{% endfor %}"
                   "{% if add_generation_prompt %}<|assistant|> {% endif %}")


@functools.lru_cache(maxsize=None)
def chat_tokenizer(template: str = TEMPLATE) -> Any:
    """A WordLevel fast tokenizer over :data:`WORDS`, the answer's words and a few more."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [" ".join(WORDS), ANSWER, "you are a helpful assistant . ? !", "system user tool"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=SPECIALS))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", clean_up_tokenization_spaces=False)
    fast.chat_template = template
    return fast


def chat_llama_folder(folder: Path, *, hidden: int = 64, layers: int = 2, seed: int = 0,
                      template: str = TEMPLATE) -> Path:
    """Save a random tiny Llama (transformers' own) and the chat tokenizer into ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = chat_tokenizer(template)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                         max_position_embeddings=256, tie_word_embeddings=False,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # unit-scale embeddings and a wide head: a LoRA can reach confident logits
        model.model.embed_tokens.weight.normal_(0.0, 1.0)
        model.lm_head.weight.normal_(0.0, 0.3)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def conversations(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """``n`` conversations: a system turn, a user turn of 3-6 random words, the fixed answer."""
    rng = random.Random(seed)
    return [[{"role": "system", "content": "you are a helpful assistant"},
             {"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 6)))},
             {"role": "assistant", "content": ANSWER}] for _ in range(n)]


def write_chat_data(folder: Path, n: int = 40, seed: int = 0) -> dict[str, Path]:
    """The same conversations as ``messages`` JSONL, Parquet, ShareGPT JSONL and an Alpaca
    JSON array; returns ``{"messages": ..., "parquet": ..., "sharegpt": ..., "alpaca": ...}``."""
    folder.mkdir(parents=True, exist_ok=True)
    convs = conversations(n, seed)
    paths = {k: folder / name for k, name in [("messages", "chat.jsonl"), ("parquet", "chat.parquet"),
                                             ("sharegpt", "sharegpt.jsonl"), ("alpaca", "alpaca.json")]}
    paths["messages"].write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs), encoding="utf-8")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"messages": [c for c in convs]}), paths["parquet"])
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    paths["sharegpt"].write_text("".join(json.dumps({"conversations": [{"from": names[m["role"]], "value": m["content"]}
                                                                       for m in c]}) + "\n" for c in convs),
                                 encoding="utf-8")
    alpaca = [{"instruction": c[1]["content"], "input": "", "output": c[2]["content"]} for c in convs]
    paths["alpaca"].write_text(json.dumps(alpaca, indent=2), encoding="utf-8")
    return paths
