"""The tokenizer in GGUF terms (llama.cpp's BPE "gpt2" tokenizer model): tokens, types, merges,
pre-tokenizer, special ids and the chat template.

Written from the checkpoint's own Hugging Face tokenizer files, so llama.cpp tokenizes as the
checkpoint does. The one thing llama.cpp needs that the files do not say directly is the
pre-tokenizer name (``tokenizer.ggml.pre``): it is read off the tokenizer's pre-tokenizer
definition (``tokenizer.json``) for the shapes this project meets (GPT-2 byte-level; SmolLM's
digit split + byte-level; Llama-3's and Qwen2's split regexes), or carried over from the source GGUF when the
checkpoint was pruned from one (the built-in SmolLM2 alias is a GGUF whose metadata names it),
or given with ``--pre-tokenizer``.
"""

from __future__ import annotations

import json
from pathlib import Path

from gqaprune.errors import GQAPruneError

# llama.cpp's token types (llama_token_type)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
# Llama-3's split pattern starts like this (tokenizer.json pre_tokenizer Split regex)
_LLAMA3_REGEX_START = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"


def pre_tokenizer_name(tok_json: dict) -> str | None:
    """llama.cpp's name for the tokenizer.json pre-tokenizer, None when it is not one we recognise."""
    pre = tok_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    types = [p.get("type") for p in parts]
    if types == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"   # llama.cpp's name for the GPT-2 regex
    if types == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if types and types[0] == "Split":
        regex = (parts[0].get("pattern") or {}).get("Regex", "")
        if regex.startswith(_LLAMA3_REGEX_START):   # Llama-3 groups digits by 3, Qwen2 splits every digit
            return "llama-bpe" if r"\p{N}{1,3}" in regex else "qwen2" if r"|\p{N}|" in regex else None
    return None


def sentencepiece_style(tok_json: dict) -> bool:
    """A SentencePiece-style tokenizer (byte fallback, Metaspace): Gemma's, Phi-3's, Llama-2's. llama.cpp reads
    those as its "llama" tokenizer model with scores, which this exporter does not write."""
    model = tok_json.get("model") or {}
    return bool(model.get("byte_fallback")) or "Metaspace" in json.dumps(
        [tok_json.get("pre_tokenizer"), tok_json.get("normalizer"), tok_json.get("decoder")])


def source_pre_tokenizer(source_model: str | None) -> str | None:
    """``tokenizer.ggml.pre`` of the GGUF a checkpoint was pruned from, when it came from one."""
    if not source_model:
        return None
    from gqaprune.models.io import local_path

    p = local_path(source_model)
    if p is None or p.suffix != ".gguf" or not p.is_file():
        return None
    from gguf import GGUFReader

    field = GGUFReader(str(p)).fields.get("tokenizer.ggml.pre")
    return field.contents() if field is not None else None


def write_vocab(writer, folder: Path, vocab_size: int, *, pre: str | None = None,
                source_model: str | None = None) -> dict:
    """Add the tokenizer of checkpoint ``folder`` to ``writer``; returns what was written (for the summary)."""
    from transformers import AutoTokenizer

    tok_file = folder / "tokenizer.json"
    if not tok_file.is_file():
        raise GQAPruneError(f"export {folder}: no tokenizer.json; the GGUF export needs the fast (BPE) tokenizer "
                            "file in the checkpoint folder")
    tok_json = json.loads(tok_file.read_text())
    if (tok_json.get("model") or {}).get("type") != "BPE" or sentencepiece_style(tok_json):
        raise GQAPruneError(f"export {folder}: the tokenizer is SentencePiece-style or not BPE "
                            f"({tok_json.get('model', {}).get('type')}); the exporter writes byte-level BPE (GPT-2 "
                            "style) tokenizers such as SmolLM2's, Llama-3's and Qwen's. For Gemma, Phi-3 and other "
                            "SentencePiece models, export the checkpoint folder with llama.cpp's own "
                            "convert_hf_to_gguf.py (uniform layout)")
    pre = pre or source_pre_tokenizer(source_model) or pre_tokenizer_name(tok_json)
    if pre is None:
        raise GQAPruneError(f"export {folder}: the tokenizer's pre-tokenizer is not one gqaprune recognises "
                            f"({json.dumps(tok_json.get('pre_tokenizer'))[:200]}); pass --pre-tokenizer NAME "
                            "(llama.cpp's name, e.g. gpt-2, llama-bpe, smollm)")
    tok = AutoTokenizer.from_pretrained(str(folder))
    tokens, types = _tokens(tok, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_merges(tok_json))
    ids = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "unk": tok.unk_token_id, "pad": tok.pad_token_id}
    for kind, tid in ids.items():
        if tid is not None:
            getattr(writer, {"bos": "add_bos_token_id", "eos": "add_eos_token_id", "unk": "add_unk_token_id",
                             "pad": "add_pad_token_id"}[kind])(int(tid))
    probe = tok("a")["input_ids"]
    writer.add_add_bos_token(bool(probe) and tok.bos_token_id is not None and probe[0] == tok.bos_token_id)
    writer.add_add_eos_token(bool(probe) and tok.eos_token_id is not None and probe[-1] == tok.eos_token_id
                             and len(probe) > 1)
    if getattr(tok, "chat_template", None):
        writer.add_chat_template(tok.chat_template)
    return {"pre_tokenizer": pre, "tokens": len(tokens), **{f"{k}_id": v for k, v in ids.items()}}


def _tokens(tok, vocab_size: int) -> tuple[list[str], list[int]]:
    """Every id below ``vocab_size`` with its text and llama.cpp token type (padding ids are UNUSED)."""
    by_id = {i: t for t, i in tok.get_vocab().items()}
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(CONTROL if added[i].special else USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(NORMAL)
    return tokens, types


def _merges(tok_json: dict) -> list[str]:
    merges = (tok_json.get("model") or {}).get("merges") or []
    # tokenizers >= 0.20 writes pairs as lists; a space inside a part would be ambiguous in "a b", and byte-level
    # BPE never has one (spaces are mapped to "Ġ")
    return [" ".join(m) if isinstance(m, list) else m for m in merges]
