"""Tokenizer metadata for a GGUF file, derived from the model's tokenizer files the way llama.cpp's
``convert_hf_to_gguf.py`` derives it, so that llama.cpp tokenizes exactly as transformers does.

Two paths: SentencePiece (``tokenizer.model``, read with the ``sentencepiece`` library: pieces, scores
and types, then the added tokens) and byte-level BPE (``tokenizer.json``: vocabulary and added tokens;
the merges, special ids, add-bos/eos flags and chat template come from gguf-py's ``SpecialVocab``).
llama.cpp must also know the BPE *pre-tokenizer* (how text is split before the merges): the converter
recognises it by hashing a tokenization, which needs the tokenizer itself; here it is recognised by the
split rule in ``tokenizer.json``, for the pre-tokenizers listed in ``PRE_TOKENIZERS``. Anything else (a
WordLevel or WordPiece model, an unknown split rule) is refused, as the converter refuses it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ...errors import InputError

# llama.cpp's pre-tokenizer name -> the split regex a tokenizer.json of that family declares
# (the same rules transformers uses to rebuild these tokenizers from a GGUF file).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# (split regex, BPE ignore_merges) -> llama.cpp's name. Llama 3's tokenizer ignores merges for words in
# the vocabulary; the same split without that is what llama.cpp calls smaug-bpe.
PRE_TOKENIZERS = {
    (LLAMA3_SPLIT, True): "llama-bpe",
    (LLAMA3_SPLIT, False): "smaug-bpe",
    (QWEN2_SPLIT, False): "qwen2",
    (QWEN2_SPLIT, True): "qwen2",
}

# SentencePiece token types, as the converter numbers them (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPIECE_SPACE = "\u2581"


@dataclass
class Vocab:
    """What goes into the ``tokenizer.ggml.*`` keys (``scores`` only for SentencePiece)."""

    model: str  # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    pre: str
    tokens: list[bytes]
    types: list[int]
    scores: list[float] | None = None


def looks_special(token: str) -> bool:
    """Added tokens the converter marks CONTROL although their files do not say special."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not readable JSON ({e})") from e


def _sentencepiece(path: Path):
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        raise InputError(
            f"{path}: reading a SentencePiece tokenizer for GGUF needs the sentencepiece package",
            hint="pip install 'streammerge[gguf]'",
        ) from None
    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(path))
    return sp


def _pieces(d: Path, vocab_size: int | None) -> tuple[list[bytes], list[float], list[int]]:
    """Pieces, scores and types of ``tokenizer.model``, padded to ``vocab_size`` with ``[PADi]``."""
    sp = _sentencepiece(d / "tokenizer.model")
    n = vocab_size or sp.vocab_size()
    tokens = [f"[PAD{i}]".encode() for i in range(n)]
    scores, types = [-10000.0] * n, [UNUSED] * n
    for i in range(min(n, sp.vocab_size())):
        tokens[i], scores[i] = sp.IdToPiece(i).encode(), sp.GetScore(i)
        kinds = ((sp.IsUnknown, UNKNOWN), (sp.IsControl, CONTROL), (sp.IsUnused, UNUSED), (sp.IsByte, BYTE))
        types[i] = next((t for test, t in kinds if test(i)), NORMAL)
    for text, i in _json(d / "added_tokens.json").items():
        if i < n:
            tokens[i], scores[i], types[i] = text.encode(), -1000.0, USER_DEFINED
    return tokens, scores, types


def sentencepiece_vocab(d: Path, vocab_size: int | None) -> Vocab:
    """``tokenizer.model``'s pieces, then ``added_tokens.json`` and ``tokenizer_config.json``'s added
    tokens over them (CONTROL when special or looking special, else USER_DEFINED with spaces restored)."""
    tokens, scores, types = _pieces(d, vocab_size)
    for key, data in _json(d / "tokenizer_config.json").get("added_tokens_decoder", {}).items():
        i, text = int(key), data["content"]
        if i >= len(tokens):
            continue
        if data.get("special") or looks_special(text):
            types[i] = CONTROL
        else:
            text, types[i] = text.replace(SPIECE_SPACE, " "), USER_DEFINED
        tokens[i], scores[i] = text.encode(), -1000.0
    return Vocab("llama", "default", tokens, types, scores)


def phi3_vocab(d: Path, vocab_size: int | None) -> Vocab:
    """Phi-3's variant: every added token (tokenizer_config.json, then tokenizer.json) is USER_DEFINED,
    or CONTROL when special, without the space normalisation."""
    tokens, scores, types = _pieces(d, vocab_size)
    added = [(int(k), v) for k, v in _json(d / "tokenizer_config.json").get("added_tokens_decoder", {}).items()]
    added += [(int(v["id"]), v) for v in _json(d / "tokenizer.json").get("added_tokens", [])]
    for i, data in added:
        if i >= len(tokens):
            raise InputError(f"{d}: added token {data['content']!r} has id {i}, outside the vocab_size {len(tokens)}")
        tokens[i], scores[i] = data["content"].encode(), -1000.0
        types[i] = CONTROL if data.get("special") else USER_DEFINED
    return Vocab("llama", "default", tokens, types, scores)


def bpe_vocab(d: Path, vocab_size: int | None) -> Vocab:
    """Byte-level BPE from ``tokenizer.json``: ids missing up to ``vocab_size`` become ``[PADi]``
    (UNUSED); added tokens are CONTROL when special (or looking special), else USER_DEFINED."""
    path = d / "tokenizer.json"
    tj = _json(path)
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise InputError(
            f"{path}: a {model.get('type') or 'missing'} tokenizer model: llama.cpp's converter cannot write it "
            "to GGUF (it needs a SentencePiece tokenizer.model or a byte-level BPE tokenizer.json)",
            hint="merge with --save-method merged_16bit instead",
        )
    pre = pre_tokenizer(tj, path)
    vocab = dict(model.get("vocab") or {})
    added = {t["id"]: t for t in tj.get("added_tokens", [])}
    for t in added.values():
        vocab[t["content"]] = t["id"]
    n = vocab_size if vocab_size is not None else len(vocab)
    if max(vocab.values()) >= n:
        raise InputError(f"{path}: token id {max(vocab.values())} is outside the model's vocab_size {n}")
    reverse = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(n):
        if i not in reverse:
            tokens.append(f"[PAD{i}]".encode())
            types.append(UNUSED)
            continue
        text = reverse[i]
        if i in added and added[i]["content"] == text:
            if added[i].get("special") or looks_special(text):
                types.append(CONTROL)
            else:
                text = text.replace(SPIECE_SPACE, " ")
                types.append(USER_DEFINED)
        else:
            types.append(NORMAL)
        tokens.append(text.encode())
    return Vocab("gpt2", pre, tokens, types)


def pre_tokenizer(tj: dict, path: Path) -> str:
    """llama.cpp's name for the tokenizer's byte-level split rule, or a refusal naming it."""
    pt = tj.get("pre_tokenizer") or {}
    steps = pt.get("pretokenizers", []) if pt.get("type") == "Sequence" else [pt]
    splits = [s for s in steps if s.get("type") == "Split"]
    levels = [s for s in steps if s.get("type") == "ByteLevel"]
    pattern = (splits[0].get("pattern") or {}).get("Regex") if len(splits) == 1 else None
    key = (pattern, bool((tj.get("model") or {}).get("ignore_merges")))
    if key in PRE_TOKENIZERS and len(levels) == 1 and len(steps) == 2:
        return PRE_TOKENIZERS[key]
    raise InputError(
        f"{path}: llama.cpp does not know this BPE pre-tokenizer ({json.dumps(pt)[:200]}); a GGUF file written "
        "with a guessed one would tokenize differently from transformers",
        hint=f"known: {', '.join(sorted(set(PRE_TOKENIZERS.values())))}; use --save-method merged_16bit instead",
    )


def write_vocab(w, v: Vocab, d: Path, special: Callable | None = None) -> None:
    """The ``tokenizer.ggml.*`` keys, then gguf-py's ``SpecialVocab`` (merges for BPE, special ids,
    add-bos/eos, chat template) over ``d``."""
    import gguf

    w.add_tokenizer_model(v.model)
    w.add_tokenizer_pre(v.pre)
    w.add_token_list(v.tokens)
    if v.scores is not None:
        w.add_token_scores(v.scores)
    w.add_token_types(v.types)
    if v.model == "gpt2":
        gguf.SpecialVocab(d, load_merges=True).add_to_gguf(w, quiet=True)
    else:
        gguf.SpecialVocab(d, n_vocab=len(v.tokens)).add_to_gguf(w, quiet=True)


def _llama_style_json(d: Path) -> bool:
    """A SentencePiece tokenizer in tokenizer.json form (byte-fallback BPE), which the converter reads
    through transformers."""
    model = _json(d / "tokenizer.json").get("model") or {}
    return model.get("type") == "BPE" and bool(model.get("byte_fallback"))


def write_tokenizer(w, style: str, hp: dict, d: Path) -> None:
    """The tokenizer keys for a model of tokenizer ``style`` (see ``model.ARCHS``), from the
    tokenizer files in ``d``, as the converter writes them for that architecture."""
    import gguf

    spm = (d / "tokenizer.model").is_file()
    n = hp.get("vocab_size")
    if style == "llama":
        if (aps := _json(d / "tokenizer_config.json").get("add_prefix_space")) is not None:
            w.add_add_space_prefix(aps)
        if not spm and _llama_style_json(d):
            raise InputError(
                f"{d}: a SentencePiece-style tokenizer without tokenizer.model; llama.cpp's converter reads this "
                "one through transformers, and streammerge needs the tokenizer.model file",
                hint="put the base model's tokenizer.model beside its weights",
            )
        write_vocab(w, sentencepiece_vocab(d, n) if spm else bpe_vocab(d, n), d)
        if n == 32016:  # CodeLlama's infill tokens
            sv = gguf.SpecialVocab(d, load_merges=False, special_token_types=["prefix", "suffix", "middle", "eot"])
            for typ, tid in (("prefix", 32007), ("suffix", 32008), ("middle", 32009), ("eot", 32010)):
                sv._set_special_token(typ, tid)
            sv.add_to_gguf(w, quiet=True)
        if n == 49152:
            w.add_add_bos_token(False)
    elif style == "qwen2":
        write_vocab(w, sentencepiece_vocab(d, n) if spm else bpe_vocab(d, n), d)
    elif style == "phi3":
        if _json(d / "tokenizer_config.json").get("tokenizer_class") == "GPT2Tokenizer":
            write_vocab(w, bpe_vocab(d, n), d)
        else:
            _need_spm(d, spm)
            write_vocab(w, phi3_vocab(d, n), d)
    elif style == "gemma3" and not spm:
        write_vocab(w, bpe_vocab(d, n), d)
    else:  # gemma, gemma2, gemma3 with tokenizer.model
        _need_spm(d, spm)
        write_vocab(w, sentencepiece_vocab(d, n), d)
        if style == "gemma":  # CodeGemma's infill tokens, as the converter writes them for every Gemma
            types = ["prefix", "suffix", "middle", "fsep", "eot"]
            sv = gguf.SpecialVocab(d, load_merges=False, special_token_types=types)
            for typ, tid in zip(types, (67, 69, 68, 70, 107), strict=True):
                sv._set_special_token(typ, tid)
            sv.chat_template = None
            sv.add_to_gguf(w, quiet=True)
        w.add_add_space_prefix(False)


def _need_spm(d: Path, spm: bool) -> None:
    if not spm:
        raise InputError(
            f"{d}: no tokenizer.model; this architecture's GGUF tokenizer is built from the SentencePiece model",
            hint="put the base model's tokenizer.model beside its weights",
        )
