"""A real CLIP BPE tokenizer for the closed toy vocabulary: every caption word is exactly one token.

Merges are learnt by plain BPE on the vocabulary until each word is a single symbol, so the stock
`CLIPTokenizer` (loaded with `from_pretrained(folder)`; in transformers 5 the `vocab_file=`
constructor silently ignores the files) reproduces one token per word. The end-of-text token gets
the largest id, like in OpenAI CLIP: HF CLIP pools the EOS position either by `argmax(ids)` (legacy
rule when `eos_token_id == 2`) or by the first `eos_token_id`; both agree here.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 16  # 1 + 8 caption words + 1, padded


def learn_merges(words: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """BPE on `words` (each frequency 1) until each is one symbol. Returns (symbols, merges in rank order)."""
    segs = {w: list(w[:-1]) + [w[-1] + "</w>"] for w in words}
    symbols = {s for seg in segs.values() for s in seg}
    merges: list[tuple[str, str]] = []
    while any(len(seg) > 1 for seg in segs.values()):
        pairs: Counter = Counter()
        for seg in segs.values():
            for a, b in zip(seg, seg[1:]):
                pairs[(a, b)] += 1
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]  # deterministic tie-break
        merges.append(best)
        symbols.add(best[0] + best[1])
        for w, seg in segs.items():
            out, i = [], 0
            while i < len(seg):
                if i + 1 < len(seg) and (seg[i], seg[i + 1]) == best:
                    out.append(seg[i] + seg[i + 1])
                    i += 2
                else:
                    out.append(seg[i])
                    i += 1
            segs[w] = out
    return sorted(symbols), merges


def build_tokenizer(folder: str | os.PathLike, words: list[str], max_length: int = MAX_LENGTH):
    """Write a CLIPTokenizer folder for `words` (atomically) and return the loaded tokenizer."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    symbols, merges = learn_merges(sorted(set(words)))
    letters = sorted({ch for w in words for ch in w})
    base = sorted(set(letters) | {c + "</w>" for c in letters})
    vocab_list = base + [s for s in symbols if s not in base]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)  # largest id: the pooled token under both HF pooling rules
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp"))
    try:
        (tmp / "vocab.json").write_text(json.dumps(vocab, indent=0))
        (tmp / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        tok = CLIPTokenizer.from_pretrained(str(tmp), model_max_length=max_length, local_files_only=True)
        tok.save_pretrained(str(tmp))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return load_tokenizer(folder)


def load_tokenizer(folder: str | os.PathLike):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def check_tokenizer(tok, words: list[str]) -> None:
    """Raise if a word is not exactly one token or if EOS is not the largest id."""
    for w in words:
        ids = tok(w, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or ids[0] == tok.unk_token_id:
            raise ValueError(f"word {w!r} tokenizes to {tok.convert_ids_to_tokens(ids)}")
    if tok.eos_token_id != len(tok) - 1:
        raise ValueError(f"eos id {tok.eos_token_id} is not the largest id {len(tok) - 1}")
