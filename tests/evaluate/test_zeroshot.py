"""Zero-shot through lm-eval on the local validation files: offline, stock task definitions, stated split."""

import json
import socket

import pytest

from gqaprune.errors import GQAPruneError

pytest.importorskip("lm_eval")

from gqaprune.evaluate import zeroshot as zs  # noqa: E402

LIMIT = 4


@pytest.fixture
def no_network(monkeypatch):
    """Offline: the HF variables set, and any socket connection fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_zeroshot_local_files_offline(tiny_model, tokenizer, data_env, no_network):
    tasks = ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]
    res = zs.zeroshot(tiny_model, tokenizer, tasks, limit=LIMIT, batch_size=8)
    assert list(res.tasks) == tasks
    assert res.offline and res.limit == LIMIT and res.data_dir == str(data_env)
    for name in tasks:
        r = res[name]
        assert 0.0 <= r.acc <= 1.0, name
        assert r.split == "validation", name
        assert r.n == LIMIT and r.limit == LIMIT, name
        assert r.n_available > LIMIT, name
        assert r.source == str(data_env / "zeroshot" / zs.TASKS[name][1])
    # acc_norm where lm-eval defines it, not elsewhere
    assert res["piqa"].acc_norm is not None and res["hellaswag"].acc_norm is not None
    assert res["boolq"].acc_norm is None and res["winogrande"].acc_norm is None
    # ARC and OpenBookQA are test-split tasks on the Hub: the result must say it is validation here
    for name in ("arc_easy", "arc_challenge", "openbookqa"):
        assert "test" in res[name].note and "validation" in res[name].note
    for name in ("boolq", "piqa", "hellaswag", "winogrande"):
        assert res[name].note == ""
    assert res["boolq"].n_available == 3270 and res["openbookqa"].n_available == 500
    d = json.loads(json.dumps(res.to_dict()))
    assert d["tasks"]["piqa"]["split"] == "validation" and 0 <= d["mean_acc"] <= 1
    md = res.markdown()
    assert "| piqa |" in md and "validation" in md and "arc_easy" in md and "test split" in md
    assert any("limit 4" in line for line in res.lines())


def test_local_config_keeps_stock_prompt_and_swaps_only_data(shared_data):
    path = shared_data / "zeroshot" / "arc_easy.validation.jsonl"
    stock = zs.task_config("arc_easy")
    local = zs.task_config("arc_easy", path)
    assert stock["dataset_path"] == "allenai/ai2_arc" and stock["test_split"] == "test"
    assert local["dataset_path"] == "json" and local["test_split"] is None
    assert local["dataset_kwargs"] == {"data_files": {"validation": str(path)}}
    for key in ("doc_to_text", "doc_to_target", "doc_to_choice", "metric_list", "output_type"):
        assert local[key] == stock[key], key
    assert zs.stock_split("arc_easy") == "test" and zs.stock_split("piqa") == "validation"


def test_boolq_answer_becomes_lm_eval_label(shared_data, no_network):
    """The boolq Hub schema has `answer` (bool); lm-eval's super_glue task reads `label` (1 = yes)."""
    from lm_eval.api.task import ConfigurableTask

    with zs.hf_offline():
        task = ConfigurableTask(config=zs.task_config("boolq", shared_data / "zeroshot" / "boolq.validation.jsonl"))
    docs = list(task.eval_docs)[:20]
    assert {d["answer"] for d in docs} == {True, False}
    for d in docs:
        assert task.doc_to_choice(d)[task.doc_to_target(d)] == ("yes" if d["answer"] else "no")


def test_unknown_task_lists_supported(tiny_model, tokenizer, data_env):
    with pytest.raises(GQAPruneError) as e:
        zs.zeroshot(tiny_model, tokenizer, ["piqa", "mmlu"], limit=2)
    msg = str(e.value)
    assert "mmlu" in msg and all(t in msg for t in zs.SUPPORTED_TASKS)
    assert zs.parse_tasks("all") == list(zs.SUPPORTED_TASKS)
    assert zs.parse_tasks("piqa, boolq,piqa") == ["piqa", "boolq"]


def test_missing_local_file_names_the_path(tiny_model, tokenizer, tmp_path, no_network):
    (tmp_path / "zeroshot").mkdir()
    (tmp_path / "zeroshot" / "piqa.validation.jsonl").write_text("")
    with pytest.raises(GQAPruneError) as e:
        zs.zeroshot(tiny_model, tokenizer, ["piqa", "hellaswag"], limit=2, data_dir=tmp_path)
    assert str(tmp_path / "zeroshot" / "hellaswag.validation.jsonl.gz") in str(e.value)
    with pytest.raises(GQAPruneError, match="not a folder"):
        zs.zeroshot(tiny_model, tokenizer, ["piqa"], data_dir=tmp_path / "nope")


def test_bad_limit(tiny_model, tokenizer, data_env):
    with pytest.raises(GQAPruneError, match="limit"):
        zs.zeroshot(tiny_model, tokenizer, ["piqa"], limit=0)


def test_hf_offline_restores_environment(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    import datasets.config

    before = datasets.config.HF_HUB_OFFLINE
    with zs.hf_offline():
        import os

        assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_DATASETS_OFFLINE"] == "1"
        assert datasets.config.HF_HUB_OFFLINE is True
    import os

    assert "HF_HUB_OFFLINE" not in os.environ and os.environ["HF_DATASETS_OFFLINE"] == "0"
    assert datasets.config.HF_HUB_OFFLINE == before


def test_peft_model_is_accepted(tiny_model, tokenizer, data_env, no_network):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    res = zs.zeroshot(model, tokenizer, "piqa", limit=2)
    assert res["piqa"].n == 2 and 0 <= res["piqa"].acc <= 1


def test_no_lm_eval_noise_outside_a_git_repository(tiny_model, tokenizer, data_env, no_network, tmp_path,
                                                    monkeypatch, capfd, caplog):
    """Run from a folder that is not a git repository: git's "fatal: not a git repository" and
    lm-eval's warnings about how it is handed the model must not reach the user."""
    import logging

    import lm_eval.evaluator as ev

    from gqaprune.compat.lm_eval import EXPECTED_WARNINGS

    monkeypatch.setenv("GQAPRUNE_DATA_DIR", str(data_env.resolve()))
    monkeypatch.chdir(tmp_path)
    orig = ev.get_git_commit_hash
    with caplog.at_level(logging.WARNING):
        res = zs.zeroshot(tiny_model, tokenizer, ["boolq"], limit=2, batch_size=2)
    assert res["boolq"].n == 2
    err = capfd.readouterr().err
    assert "not a git repository" not in err
    noise = [r.getMessage() for r in caplog.records if any(w in r.getMessage() for w in EXPECTED_WARNINGS)]
    assert noise == []
    assert ev.get_git_commit_hash is orig  # restored afterwards


def test_mean_and_its_standard_error_and_round_trip():
    def task(name, acc, se):
        return zs.TaskResult(task=name, acc=acc, acc_norm=None, acc_stderr=se, acc_norm_stderr=None,
                             split="validation", n=100, n_available=100, limit=None, source="x")

    res = zs.ZeroShotResult(tasks={"a": task("a", 0.2, 0.03), "b": task("b", 0.6, 0.04), "boolq": task("boolq", 0.7, 0.0)},
                            limit=None, batch_size=8)
    mean, se = res.mean()
    assert mean == pytest.approx(0.5) and se == pytest.approx(0.05 / 3)   # sqrt(0.03^2 + 0.04^2) / 3
    mean, se = res.mean(exclude=("boolq",))
    assert mean == pytest.approx(0.4) and se == pytest.approx(0.025)
    d = json.loads(json.dumps(res.to_dict()))
    assert d["mean_acc"] == pytest.approx(0.5) and d["mean_acc_stderr"] == pytest.approx(0.05 / 3)
    back = zs.ZeroShotResult.from_dict(d)
    assert back == res
    res.tasks["a"].acc_stderr = None   # a task without a standard error: the mean has none
    assert res.mean()[1] is None
