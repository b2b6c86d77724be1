"""Generation: streaming adds up to the reply, chat vs Alpaca template, PEFT adapters, CLI options."""

import pytest
import torch

from gqaprune.errors import GQAPruneError
from gqaprune.generate import (
    GenerateOptions,
    build_prompt,
    generate,
    interactive_loop,
    prompt_template,
    run_generate,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


class Spy:
    """Wraps a model and records the token ids passed to generate()."""

    def __init__(self, model):
        self.model = model
        self.input_ids = None

    def __getattr__(self, name):
        return getattr(self.model, name)

    def generate(self, **kw):
        self.input_ids = kw["input_ids"]
        return self.model.generate(**kw)


def test_greedy_stream_chunks_add_up_to_reply(tiny_model, tokenizer):
    chunks = []
    text = generate(tiny_model, tokenizer, "The quick brown fox", max_new_tokens=24, do_sample=False,
                    on_text=chunks.append)
    assert len(chunks) >= 2  # streamed in pieces, not once at the end
    assert "".join(chunks) == text
    assert text  # the random tiny model never emits EOS first with this seed (see next assert)
    # greedy is deterministic, and streaming does not change the result
    assert generate(tiny_model, tokenizer, "The quick brown fox", max_new_tokens=24, do_sample=False,
                    stream=False) == text


def test_reply_excludes_prompt_and_matches_plain_generate(tiny_model, tokenizer):
    text = generate(tiny_model, tokenizer, "Pruning removes groups", max_new_tokens=12, do_sample=False)
    ids = tokenizer(build_prompt(tokenizer, "Pruning removes groups"), return_tensors="pt")
    out = tiny_model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert text == tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_alpaca_template_without_chat_template(tiny_model, tokenizer):
    assert prompt_template(tokenizer) == "alpaca"
    spy = Spy(tiny_model)
    generate(spy, tokenizer, "Name a colour.", max_new_tokens=2, do_sample=False)
    seen = tokenizer.decode(spy.input_ids[0], skip_special_tokens=True)
    assert seen.startswith("Below is an instruction that describes a task.")
    assert "### Instruction:\nName a colour.\n\n### Response:\n" in seen
    assert seen.endswith("### Response:\n")


def test_chat_template_when_present(tiny_model, tokenizer):
    tokenizer.chat_template = CHAT_TEMPLATE
    assert prompt_template(tokenizer) == "chat"
    spy = Spy(tiny_model)
    generate(spy, tokenizer, "Name a colour.", max_new_tokens=2, do_sample=False)
    seen = tokenizer.decode(spy.input_ids[0], skip_special_tokens=False)
    assert seen == "<s>user: Name a colour.</s><s>assistant:"  # one BOS: the template's, none added
    assert "### Instruction" not in seen


def test_sampling_runs_and_respects_seed(tiny_model, tokenizer):
    torch.manual_seed(0)
    a = generate(tiny_model, tokenizer, "Hello", max_new_tokens=8, temperature=0.7, top_p=0.9)
    torch.manual_seed(0)
    b = generate(tiny_model, tokenizer, "Hello", max_new_tokens=8, temperature=0.7, top_p=0.9)
    assert a == b


def test_peft_lora_model(tiny_model, tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    peft_model = get_peft_model(tiny_model, cfg)
    with torch.no_grad():  # LoRA B starts at zero: make the adapter change the output
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.eval()
    chunks = []
    text = generate(peft_model, tokenizer, "Grouped query attention", max_new_tokens=16, do_sample=False,
                    on_text=chunks.append)
    assert "".join(chunks) == text
    # the same adapter, merged, gives the same greedy text
    merged = peft_model.merge_and_unload()
    assert generate(merged, tokenizer, "Grouped query attention", max_new_tokens=16, do_sample=False) == text


def test_interactive_loop_ends_on_empty_exit_and_eof(tiny_model, tokenizer):
    out = []
    lines = iter(["first prompt", "second", "exit", "never read"])
    replies = interactive_loop(tiny_model, tokenizer, read=lambda p: next(lines), write=out.append,
                               max_new_tokens=4, do_sample=False)
    assert len(replies) == 2
    assert next(lines) == "never read"
    assert "".join(out) == replies[0] + "\n" + replies[1] + "\n"

    lines = iter(["one", ""])
    assert len(interactive_loop(tiny_model, tokenizer, read=lambda p: next(lines), write=out.append,
                                max_new_tokens=2, do_sample=False)) == 1

    def eof(prompt):
        raise EOFError

    assert interactive_loop(tiny_model, tokenizer, read=eof, write=out.append) == []


def test_bad_inputs(tiny_model, tokenizer):
    with pytest.raises(GQAPruneError, match="empty"):
        generate(tiny_model, tokenizer, "   ")
    with pytest.raises(GQAPruneError, match="max-new-tokens"):
        generate(tiny_model, tokenizer, "hi", max_new_tokens=0)
    with pytest.raises(GQAPruneError, match="top-p"):
        generate(tiny_model, tokenizer, "hi", top_p=0.0)


def test_generate_options_flags():
    import argparse

    from gqaprune.options import add_options, options_from_args

    parser = argparse.ArgumentParser()
    add_options(parser, GenerateOptions)
    ns = parser.parse_args(["--model", "m", "--lora_dir", "a", "--prompt", "p", "--greedy",
                            "--max-new-tokens", "5"])
    opts = options_from_args(GenerateOptions, ns)
    assert (opts.model, opts.adapter, opts.prompt, opts.greedy, opts.max_new_tokens) == ("m", "a", "p", True, 5)
    assert GenerateOptions().temperature == 0.7 and GenerateOptions().top_p == 0.9


def test_run_generate_folder_and_adapter(tiny_dir, tiny_model, tokenizer, tmp_path, monkeypatch):
    pytest.importorskip("gqaprune.models.io")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from peft import LoraConfig, get_peft_model

    out = []
    base = run_generate(GenerateOptions(model=str(tiny_dir), prompt="Hello", max_new_tokens=6, greedy=True,
                                        device="cpu", dtype="float32"), write=out.append)
    assert len(base) == 1 and "".join(out) == base[0] + "\n"

    peft_model = get_peft_model(tiny_model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    adapter = tmp_path / "lora"
    peft_model.save_pretrained(adapter)
    out = []
    with_adapter = run_generate(GenerateOptions(model=str(tiny_dir), adapter=str(adapter), prompt="Hello",
                                                max_new_tokens=6, greedy=True, device="cpu", dtype="float32"),
                                write=out.append)
    expected = generate(peft_model.eval(), tokenizer, "Hello", max_new_tokens=6, do_sample=False)
    assert with_adapter == [expected]
    assert with_adapter != base  # the adapter was applied, not ignored

    with pytest.raises(GQAPruneError, match="--adapter .*missing: no such folder"):
        run_generate(GenerateOptions(model=str(tiny_dir), adapter=str(tmp_path / "missing"), prompt="x",
                                     device="cpu", dtype="float32"))


def test_adapter_for_another_base_is_a_clear_error(tiny_dir, tmp_path, monkeypatch):
    pytest.importorskip("gqaprune.models.io")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from peft import LoraConfig, get_peft_model

    from helpers import make_tiny_model

    other = make_tiny_model(hidden_size=32, num_attention_heads=4, head_dim=8)  # different shapes
    adapter = tmp_path / "other_lora"
    get_peft_model(other, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(adapter)
    with pytest.raises(GQAPruneError, match="does not fit"):
        run_generate(GenerateOptions(model=str(tiny_dir), adapter=str(adapter), prompt="x",
                                     device="cpu", dtype="float32"))
