"""The prune / eval / check commands end to end on tiny models, and every bad input (exit 2)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import make_tiny_model, make_tokenizer, prune_args
from gqaprune.cli import main


def test_prune_cli_writes_loadable_checkpoint(tiny_dir, tmp_path, calib_file, capsys):
    out = tmp_path / "pruned"
    rc = main(prune_args(tiny_dir, out, calib_file, "--pruning-ratio", "0.3", "--layout", "per-layer"))
    assert rc == 0
    text = capsys.readouterr().out
    assert "parameters" in text and "Q:KV" in text and "peak RSS" in text
    for f in ("config.json", "model.safetensors", "prune_plan.json", "kept_units.png", "tokenizer.json",
              "generation_config.json"):
        assert (out / f).is_file(), f
    plan = json.loads((out / "prune_plan.json").read_text())
    prov = plan["provenance"]
    assert prov["criterion"] == "taylor" and prov["calibration_tokens"] == 64 and prov["seed"] == 0
    assert prov["params_before"] > prov["params_after"]
    assert (out / "kept_units.png").read_bytes()[:4] == b"\x89PNG"
    # replaying the saved plan on the original model gives the same weights
    out2 = tmp_path / "replayed"
    assert main(["prune", "--model", str(tiny_dir), "--plan", str(out / "prune_plan.json"), "--output", str(out2)]) == 0
    from safetensors.torch import load_file
    a, b = load_file(out / "model.safetensors"), load_file(out2 / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_prune_with_eval_ppl_prints_before_and_after(tiny_dir, tmp_path, calib_file, capsys):
    corpus = tmp_path / "eval.txt"
    corpus.write_text("Grouped query attention shares one key and value head. " * 40)
    rc = main(prune_args(tiny_dir, tmp_path / "o", calib_file, "--pruning-ratio", "0.2", "--eval-ppl", str(corpus),
                         "--ppl-seq-len", "32"))
    assert rc == 0
    text = capsys.readouterr().out
    assert "before" in text and "after" in text and "window 32" in text
    assert "recipe     fast" in text    # the summary names the recipe that ran


def test_prune_summary_prints_the_notes(tiny_dir, tmp_path, calib_file, capsys):
    rc = main(prune_args(tiny_dir, tmp_path / "o", calib_file, "--pruning-ratio", "0.3", "--layout", "per-layer",
                         "--allocation", "sensitivity", "--sensitivity-samples", "2", "--compensate"))
    assert rc == 0
    text = " ".join(capsys.readouterr().out.split())   # rich wraps long lines
    assert "note sensitivity allocation" in text and "compensation (layer" in text
    assert "recipe fast with --layout per-layer (given) over uniform" in text


def _bad(args, capsys, match):
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert match.lower() in err.lower(), err
    return err


def test_bad_inputs_exit_2_and_leave_nothing(tiny_dir, tmp_path, calib_file, capsys):
    out = tmp_path / "never"
    base = lambda *extra: prune_args(tiny_dir, out, calib_file, *extra)  # noqa: E731
    _bad(["prune", "--model", str(tmp_path / "missing"), "--pruning-ratio", "0.2", "--output", str(out)], capsys,
         "no such file")
    _bad(["prune", "--model", "smollm9-1t", "--pruning-ratio", "0.2", "--output", str(out)], capsys, "alias")
    for r in ("0", "1", "-0.5", "1.5"):
        _bad(base("--pruning-ratio", r), capsys, "between 0 and 1")
    _bad(base("--pruning-ratio", "0.97"), capsys, "at least one KV group")
    _bad(base("--pruning-ratio", "0.2", "--keep-first", "1", "--keep-last", "1"), capsys, "nothing would be left")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _bad(prune_args(tiny_dir, out, empty, "--pruning-ratio", "0.2"), capsys, "tokens")
    short = tmp_path / "short.txt"
    short.write_text("too short")
    _bad(prune_args(tiny_dir, out, short, "--pruning-ratio", "0.2"), capsys, "only")
    _bad(base("--pruning-ratio", "0.2", "--seq-len", "1"), capsys, "seq-len")
    assert not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    _bad(base("--pruning-ratio", "0.2"), capsys, "exists")
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    # a plan made for another model
    bad_plan = tmp_path / "plan.json"
    other = tmp_path / "other"
    m = make_tiny_model(num_hidden_layers=3)
    m.save_pretrained(other)
    make_tokenizer().save_pretrained(other)
    assert main(prune_args(other, tmp_path / "o3", calib_file, "--pruning-ratio", "0.2")) == 0
    bad_plan.write_text((tmp_path / "o3" / "prune_plan.json").read_text())
    _bad(["prune", "--model", str(tiny_dir), "--plan", str(bad_plan), "--output", str(tmp_path / "o4")], capsys,
         "does not match")
    assert not (tmp_path / "o4").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp folders left behind"


def test_non_llama_model_refused(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=320)).save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    _bad(["prune", "--model", str(d), "--pruning-ratio", "0.2", "--output", str(tmp_path / "o")], capsys, "gpt2")


def test_corrupt_safetensors_refused(tiny_dir, tmp_path, capsys):
    f = tiny_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    _bad(["eval", "--model", str(tiny_dir), "--ppl", str(f)], capsys, "corrupt")


def test_wrong_data_dir_fails_before_any_work(tmp_path, monkeypatch, capsys):
    """A $GQAPRUNE_DATA_DIR that is not a folder is reported at once (exit 2, resolved path),
    before the model is even looked for."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GQAPRUNE_DATA_DIR", "../no-such-data")
    err = _bad(["eval", "--model", str(tmp_path / "no-such-model")], capsys, "not a folder")
    assert str((tmp_path / "../no-such-data").resolve()) in err
    assert "no-such-model" not in err  # the data folder is checked first


def test_eval_ppl_protocol_on_known_model(tmp_path, tokenizer, capsys):
    """A model with a zero lm_head predicts uniformly: PPL must equal the vocabulary size exactly."""
    m = make_tiny_model()
    with torch.no_grad():
        m.lm_head.weight.zero_()
    d = tmp_path / "uniform"
    m.save_pretrained(d)
    tokenizer.save_pretrained(d)
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 30)
    n_ids = len(tokenizer(text.read_text())["input_ids"])
    out = tmp_path / "ev"
    assert main(["eval", "--model", str(d), "--ppl", str(text), "--seq-len", "16", "--output", str(out)]) == 0
    res = json.loads((out / "eval.json").read_text())["results"][0]["ppl"][0]
    assert res["seq_len"] == 16 and res["stride"] == 16
    assert res["n_tokens"] == (n_ids // 16) * 15          # non-overlapping windows, tail dropped
    assert math.isclose(res["ppl"], 320, rel_tol=1e-5)
    line = capsys.readouterr().out
    assert "window 16" in line and "stride 16" in line and "tokens" in line
    # sliding windows score every token after the first
    assert main(["eval", "--model", str(d), "--ppl", str(text), "--seq-len", "16", "--stride", "4",
                 "--output", str(out), "--overwrite"]) == 0
    res = json.loads((out / "eval.json").read_text())["results"][0]["ppl"][0]
    assert res["n_tokens"] == n_ids - 1 and res["stride"] == 4


def test_perplexity_matches_manual_nll(tiny_model, tokenizer):
    from gqaprune.evaluate.perplexity import perplexity_of_ids

    ids = torch.randint(3, 320, (70,), generator=torch.Generator().manual_seed(0))
    nll, n = perplexity_of_ids(tiny_model, ids, seq_len=32, progress=False)
    assert n == 2 * 31
    manual = []
    for b in (0, 32):
        x = ids[b:b + 32][None]
        lp = torch.log_softmax(tiny_model(x).logits[0, :-1].float(), -1)
        manual.append(-lp.gather(-1, x[0, 1:, None]).squeeze(-1))
    assert math.isclose(nll, torch.cat(manual).mean().item(), rel_tol=1e-5)


def _doctor_k_proj(folder):
    """Cut 8 rows (one head) from layer 1's k_proj: the Q:KV ratio breaks."""
    from safetensors.torch import load_file, save_file

    sd = load_file(folder / "model.safetensors")
    k = "model.layers.1.self_attn.k_proj.weight"
    sd[k] = sd[k][:-8].clone()
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})


def test_check_passes_good_and_fails_doctored(tiny_dir, tmp_path, calib_file, capsys, data_env):
    out = tmp_path / "pruned"
    assert main(prune_args(tiny_dir, out, calib_file, "--pruning-ratio", "0.3")) == 0
    args = ["check", str(out), "--max-ppl", "1e6", "--ppl-max-tokens", "2048"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "PASS" in text and "FAIL" not in text and "4:1" in text
    _doctor_k_proj(out)
    assert main(args) == 1
    text = capsys.readouterr().out
    assert "FAIL" in text and "BROKEN" in text


def test_calibration_format_text_drops_the_template(tmp_path, tokenizer):
    """Instruction records as calibration text: 'prompt' = Alpaca template + response; 'text' = the
    fields as plain lines. Same records, same order, only the formatting differs."""
    from gqaprune.data.calibration import calibration_texts
    from gqaprune.data.instructions import record_text
    from gqaprune.errors import GQAPruneError
    from gqaprune.data.calibration import calibration_batch

    recs = tmp_path / "instr.jsonl"
    recs.write_text("\n".join(json.dumps({"instruction": f"Name a colour number {i}.", "input": "" if i % 2 else
                                          f"context {i}", "output": f"Blue is colour {i}."}) for i in range(300)))
    prompt, d1 = calibration_texts(str(recs), 0, 10_000)
    text, d2 = calibration_texts(str(recs), 0, 10_000, fmt="text")
    assert "### Instruction:" in prompt[0] and "Below is an instruction" in prompt[0]
    assert all("###" not in t and "Below is an instruction" not in t for t in text)
    assert text[0].split("\n")[0] in prompt[0] and text[0].split("\n")[-1] in prompt[0]
    assert "plain text" in d2 and "alpaca-format" in d1
    assert record_text({"instruction": "a", "input": " ", "output": "b"}, "text") == "a\nb"
    ids, desc = calibration_batch(tokenizer, str(recs), 4, 16, 0, fmt="text")
    assert ids.shape == (4, 16) and "plain text" in desc
    with pytest.raises(GQAPruneError, match="calibration-format"):
        calibration_texts(str(recs), 0, 100, fmt="markdown")


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_prune_overwrite_never_replaces_its_own_input(tiny_dir, tmp_path, calib_file, capsys):
    """--output equal to, inside or around --model is refused even with --overwrite; the model is untouched."""
    before = _snapshot(tiny_dir)
    for out in (tiny_dir, tiny_dir / "pruned", tiny_dir.parent):
        _bad(prune_args(tiny_dir, out, calib_file, "--pruning-ratio", "0.2", "--overwrite"), capsys, "input --model")
    assert _snapshot(tiny_dir) == before


def test_prune_overwrite_replaces_only_what_gqaprune_wrote(tiny_dir, tmp_path, calib_file, capsys):
    out = tmp_path / "user_folder"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    (out / "tokenizer.json").write_text("{}")
    err = _bad(prune_args(tiny_dir, out, calib_file, "--pruning-ratio", "0.2", "--overwrite"), capsys, "README.md")
    assert "tokenizer.json" in err
    assert (out / "README.md").read_text() == "my notes" and (out / "tokenizer.json").read_text() == "{}"
    # a folder gqaprune wrote is replaced; once the user adds a file to it, it is not
    mine = tmp_path / "pruned"
    assert main(prune_args(tiny_dir, mine, calib_file, "--pruning-ratio", "0.2")) == 0
    assert main(prune_args(tiny_dir, mine, calib_file, "--pruning-ratio", "0.3", "--overwrite")) == 0
    (mine / "extra.txt").write_text("mine")
    _bad(prune_args(tiny_dir, mine, calib_file, "--pruning-ratio", "0.2", "--overwrite"), capsys, "extra.txt")
    assert (mine / "extra.txt").read_text() == "mine"


def _break_final_norm(folder, factor=40.0):
    """Shape-valid but broken: the final norm's gain times ``factor`` makes the logits confidently wrong."""
    from safetensors.torch import load_file, save_file

    sd = load_file(folder / "model.safetensors")
    sd["model.norm.weight"] = sd["model.norm.weight"] * factor
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})


def _ppl_row(folder, **kw):
    from gqaprune.check import CheckOptions, check

    return next(r for r in check(CheckOptions(checkpoint=str(folder), **kw)).rows if r.name.startswith("wikitext2"))


def test_check_scales_the_limit_by_the_dense_ppl_in_the_plan(tiny_dir, tmp_path, calib_file, capsys, data_env):
    """Issue 14 section 5: limit = 50 / 19.66 x the dense PPL the plan recorded, on the same tokens; a
    reasonable prune passes, a broken one (same shapes) fails on that row only; --max-ppl overrides."""
    out = tmp_path / "pruned"
    assert main(prune_args(tiny_dir, out, calib_file, "--pruning-ratio", "0.2", "--eval-ppl", "wikitext2",
                           "--ppl-max-tokens", "2048")) == 0
    dense = json.loads((out / "prune_plan.json").read_text())["provenance"]["ppl_before"][0]["ppl"]
    row = _ppl_row(out)
    assert row.ok and "50 / 19.66 x dense PPL" in row.detail and "prune_plan.json" in row.detail
    assert "first 2,048 tokens" in row.detail
    assert float(row.name.split("<")[1]) == pytest.approx(50 / 19.66 * dense, rel=1e-3)
    assert main(["check", str(out)]) == 0
    _break_final_norm(out)
    row = _ppl_row(out)
    assert not row.ok and "x dense" in row.detail
    capsys.readouterr()
    assert main(["check", str(out)]) == 1
    assert "BROKEN" not in capsys.readouterr().out       # shapes are fine: only the PPL row fails
    row = _ppl_row(out, max_ppl=1e300)
    assert row.ok and "--max-ppl 1e+300 (absolute)" in row.detail
    assert main(["check", str(out), "--max-ppl", "1e300"]) == 0


def test_check_base_model_measures_the_dense_ppl_and_refuses_another_vocabulary(tiny_dir, tmp_path, calib_file,
                                                                                 capsys, data_env):
    from transformers import PreTrainedTokenizerFast

    out = tmp_path / "pruned"
    assert main(prune_args(tiny_dir, out, calib_file, "--pruning-ratio", "0.2")) == 0   # no dense PPL recorded
    row = _ppl_row(out, ppl_max_tokens=2048)
    assert "unscaled" in row.detail and "--base-model" in row.detail and row.name == "wikitext2 PPL < 50"
    row = _ppl_row(out, ppl_max_tokens=2048, base_model=str(tiny_dir))
    assert row.ok and f"from --base-model {tiny_dir} on the same tokens" in row.detail
    other = tmp_path / "other_vocab"
    make_tiny_model().save_pretrained(other)
    tok = PreTrainedTokenizerFast.from_pretrained(tiny_dir)
    tok.add_tokens(["<extra_token>"])
    tok.save_pretrained(other)
    capsys.readouterr()
    assert main(["check", str(out), "--ppl-max-tokens", "2048", "--base-model", str(other)]) == 2
    err = capsys.readouterr().err
    assert "--base-model" in err and "tokenizer differs" in err
    assert main(["check", str(out), "--base-model", str(tmp_path / "nowhere")]) == 2
