"""Text generation from a pruned / recovered model: one prompt, or an interactive session.

The prompt is wrapped in the tokenizer's chat template when it has one (SmolLM2-Instruct,
Llama-3-Instruct), otherwise in the Alpaca template that LoRA recovery trains on. Tokens are
streamed through a callback as they are decoded; the library never prints, the caller's
``on_text`` / ``write`` does. Works on a plain transformers model and on a PEFT model
(base plus LoRA adapter) alike.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass

from gqaprune.data.instructions import alpaca_prompt
from gqaprune.errors import GQAPruneError
from gqaprune.options import ModelArgs, opt

log = logging.getLogger(__name__)

EXIT_WORDS = ("exit", "quit")


@dataclass
class GenerateOptions(ModelArgs):
    """Options of ``gqaprune generate``."""

    model: str = opt("smollm2-135m", "model reference: merged or pruned folder, .gguf, alias, hub id",
                     aliases=("--base-model", "--base_model", "--pruned-model", "--pruned_model"))
    adapter: str | None = opt(None, "LoRA adapter folder (PEFT) to apply on top of --model",
                              aliases=("--lora-dir", "--lora_dir"))
    prompt: str | None = opt(None, "the prompt; omit it for an interactive session (empty line or 'exit' ends it)")
    max_new_tokens: int = opt(128, "tokens to generate at most")
    temperature: float = opt(0.7, "sampling temperature (0 = greedy)")
    top_p: float = opt(0.9, "nucleus sampling: keep the smallest token set with this probability mass")
    greedy: bool = opt(False, "greedy decoding (deterministic); ignores --temperature and --top-p")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_new_tokens < 1:
            raise GQAPruneError(f"--max-new-tokens {self.max_new_tokens}: must be at least 1.")
        if self.temperature < 0:
            raise GQAPruneError(f"--temperature {self.temperature}: must be >= 0 (0 = greedy, like --greedy)")
        if not 0 < self.top_p <= 1:
            raise GQAPruneError(f"--top-p {self.top_p}: must be in (0, 1].")
        if self.prompt is not None and not self.prompt.strip():
            raise GQAPruneError("--prompt: empty. Give some text, or omit --prompt for an interactive session.")


def prompt_template(tokenizer) -> str:
    """``"chat"`` when the tokenizer has a chat template, else ``"alpaca"``."""
    return "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"


def build_prompt(tokenizer, prompt: str) -> str:
    """The text the model sees: the user turn in the chat template, or the Alpaca template."""
    if prompt_template(tokenizer) == "chat":
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return alpaca_prompt(prompt)


def _callback_streamer(tokenizer, on_text: Callable[[str], object]):
    from transformers import TextStreamer

    class CallbackStreamer(TextStreamer):
        """TextStreamer's word-boundary buffering, but hands each piece to a callback instead of print."""

        def on_finalized_text(self, text: str, stream_end: bool = False):
            if text:
                on_text(text)

    return CallbackStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def _model_device(model):
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        return getattr(model, "device", "cpu")


def generate(model, tokenizer, prompt: str, *, max_new_tokens: int = 128, temperature: float = 0.7,
             top_p: float = 0.9, do_sample: bool = True, stream: bool = True,
             on_text: Callable[[str], object] | None = None) -> str:
    """Generate a reply to ``prompt`` and return it (without the prompt, special tokens removed).

    ``do_sample=False`` or ``temperature <= 0`` decodes greedily. With ``stream`` and ``on_text``,
    each piece of text is passed to ``on_text`` as soon as it is decoded; the pieces add up to
    the returned string.
    """
    import torch

    if not prompt or not prompt.strip():
        raise GQAPruneError("--prompt: empty. Give some text, or omit --prompt for an interactive session.")
    if max_new_tokens < 1:
        raise GQAPruneError(f"--max-new-tokens {max_new_tokens}: must be at least 1.")
    sample = do_sample and temperature > 0
    if sample and not 0 < top_p <= 1:
        raise GQAPruneError(f"--top-p {top_p}: must be in (0, 1].")

    template = prompt_template(tokenizer)
    text = build_prompt(tokenizer, prompt)
    # A chat template writes its own BOS where the model wants one; Alpaca text gets the
    # tokenizer's usual special tokens, as it did during LoRA fine-tuning.
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=(template != "chat"))
    device = _model_device(model)
    enc = {k: v.to(device) for k, v in enc.items()}
    n_prompt = enc["input_ids"].shape[1]
    log.debug("generate: %s template, %d prompt tokens", template, n_prompt)

    kw: dict = dict(max_new_tokens=max_new_tokens, do_sample=sample)
    if sample:
        kw.update(temperature=temperature, top_p=top_p)
    else:  # make greedy explicit even where generation_config.json asks for sampling
        kw.update(temperature=None, top_p=None, top_k=None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is not None:
        kw["pad_token_id"] = pad
    if stream and on_text is not None:
        kw["streamer"] = _callback_streamer(tokenizer, on_text)

    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with torch.inference_mode():
            out = model.generate(**enc, **kw)
    finally:
        if was_training:
            model.train()
    return tokenizer.decode(out[0, n_prompt:], skip_special_tokens=True)


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def interactive_loop(model, tokenizer, *, read: Callable[[str], str] = input,
                     write: Callable[[str], object] = _write_stdout, **generate_kwargs) -> list[str]:
    """Read a prompt, stream the reply, repeat; stop on an empty line, 'exit'/'quit', EOF or Ctrl-C.

    ``read(prompt_text) -> str`` works like ``input``; ``write(text)`` writes text as is (no newline
    added). ``generate_kwargs`` go to ``generate``. Returns the replies.
    """
    replies: list[str] = []
    while True:
        try:
            line = read(">>> ")
        except (EOFError, KeyboardInterrupt):
            write("\n")
            break
        line = line.strip()
        if not line or line.lower() in EXIT_WORDS:
            break
        try:
            reply = generate(model, tokenizer, line, on_text=write, stream=True, **generate_kwargs)
        except KeyboardInterrupt:  # stop this reply, keep the session
            write("\n[interrupted]\n")
            continue
        replies.append(reply)
        write("\n")
    return replies


def load_for_generation(opts: GenerateOptions):
    """``(model, tokenizer)`` from ``opts.model``, with ``opts.adapter`` (PEFT LoRA) on top when given."""
    from gqaprune.models.adapters import load_with_adapter

    return load_with_adapter(opts.model, opts.adapter, dtype=opts.dtype, device=opts.device,
                             allow_pickle=opts.allow_pickle)


def run_generate(opts: GenerateOptions, *, write: Callable[[str], object] = _write_stdout,
                 read: Callable[[str], str] = input) -> list[str]:
    """``gqaprune generate``: load the model (and adapter), then answer ``opts.prompt`` or run interactively.

    Streams the reply through ``write``; returns the replies (one for ``--prompt``).
    """
    model, tokenizer = load_for_generation(opts)
    log.info("generate: %s template%s", prompt_template(tokenizer),
             f", adapter {opts.adapter}" if opts.adapter else "")
    kw = dict(max_new_tokens=opts.max_new_tokens, temperature=opts.temperature, top_p=opts.top_p,
              do_sample=not opts.greedy)
    if opts.prompt is not None:
        reply = generate(model, tokenizer, opts.prompt, on_text=write, stream=True, **kw)
        write("\n")
        return [reply]
    return interactive_loop(model, tokenizer, read=read, write=write, **kw)
