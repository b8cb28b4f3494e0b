"""Tiny CLIP text models for tests (random weights, from config, nothing downloaded): a CLIP
tokenizer over single bytes and the matching text-config keywords. Needs transformers."""

import json


def byte_chars() -> list[str]:
    """GPT-2's byte → printable-character table (CLIP's byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def clip_tokenizer(folder):
    """(CLIPTokenizer, vocab): single bytes, no merges, so any text, a 514-token vocabulary;
    its files are written to `folder`."""
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {}
    for suffix in ("", "</w>"):
        for c in byte_chars():
            vocab[c + suffix] = len(vocab)
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    return tok, vocab


def text_config(vocab, **kw) -> dict:
    """CLIPTextConfig keywords: hidden 16, one layer, two heads, the tokenizer's special tokens."""
    return dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"], **kw)
