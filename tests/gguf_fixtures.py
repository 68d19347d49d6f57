"""Fixtures for GGUF tests, made with the tools users get their files from: a SentencePiece model trained
with ``sentencepiece`` and loaded by transformers' LlamaTokenizer, a byte-level BPE trained with
``tokenizers`` using a pre-tokenizer llama.cpp knows, and a WordLevel one it does not; bases saved by
``save_pretrained`` with the tokenizer beside them, adapters by PEFT."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import torch
from helpers import build_adapter, build_model, save_base

VOCAB = 384
TEXT = (
    "the quick brown fox jumps over a lazy dog while models merge adapters into weights and tensors stream "
    "from disk to memory llama gemma qwen phi mistral 0 1 2 3 4 5 6 7 8 9 ! ? , ."
)
WORDS = TEXT.split(" ")
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def corpus(path: Path, lines: int = 3000) -> Path:
    rnd = random.Random(0)
    path.write_text("\n".join(" ".join(rnd.choice(WORDS) for _ in range(14)) for _ in range(lines)))
    return path


def spm_tokenizer(d: Path, vocab: int = VOCAB, chat_template: str | None = CHATML) -> Path:
    """tokenizer.model (sentencepiece BPE with byte fallback), plus the tokenizer.json and
    tokenizer_config.json transformers writes for it."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    d.mkdir(parents=True, exist_ok=True)
    work = d / "_spm"
    work.mkdir()
    spm.SentencePieceTrainer.train(
        input=str(corpus(work / "corpus.txt")), model_prefix=str(work / "sp"), vocab_size=vocab,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    shutil.copy(work / "sp.model", d / "tokenizer.model")
    shutil.rmtree(work)
    tok = LlamaTokenizer.from_pretrained(str(d))
    if chat_template:
        tok.chat_template = chat_template
    tok.save_pretrained(str(d))
    return d


def bpe_tokenizer(d: Path, vocab: int = VOCAB, split: str = LLAMA3_SPLIT, chat_template: str | None = CHATML):
    """A byte-level BPE tokenizer.json with the Llama-3 split rule (or ``split``) and special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    d.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab - 8, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train([str(corpus(d / "corpus.txt"))], trainer)
    (d / "corpus.txt").unlink()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(str(d))
    return d


def wordlevel_tokenizer(d: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    d.mkdir(parents=True, exist_ok=True)
    vocab = {w: i for i, w in enumerate(["<unk>", *dict.fromkeys(WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(str(d))
    return d


def gguf_pair(
    tmp: Path, arch: str, tokenizer: str | None = "spm", dtype=torch.bfloat16, vocab: int = VOCAB, **over
) -> tuple[Path, Path]:
    """A base of ``arch`` (``dtype``, ``vocab`` tokens) with its tokenizer files (None: none), and a
    LoRA adapter on all attention and MLP projections."""
    if arch == "phi3":
        over = {"bos_token_id": 1, "eos_token_id": 2, **over}
    if arch in ("gemma2", "gemma3"):  # llama.cpp scales queries by head_dim, as the real models' configs do
        over = {"head_dim": 256, "query_pre_attn_scalar": 256, **over}
    model = build_model(arch, dtype=torch.float32, vocab_size=vocab, **over)
    base = tmp / f"base-{arch}"
    save_base(model.to(dtype), base)
    if tokenizer is not None:
        {"spm": spm_tokenizer, "bpe": bpe_tokenizer, "wordlevel": wordlevel_tokenizer}[tokenizer](base)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if arch == "phi3":
        targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    adapter = build_adapter(model.float(), tmp / f"adapter-{arch}", r=4, lora_alpha=8, target_modules=targets)
    return base, adapter
