"""The checkout's ``kernels/`` folder is ``distillcse.kernels`` only: from the checkout's root
(``python -m ...`` puts it first on sys.path) the bare name ``kernels`` stays Hugging Face's,
which transformers imports, or, where that is not installed, an empty module with no
``__file__`` (what a folder without __init__.py gives; transformers then counts it absent)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = """
import os, sys
if HIDE_INSTALLED:
    sys.path = [p for p in sys.path if "-packages" not in p]
import kernels
empty = getattr(kernels, "__file__", None) is None and not hasattr(kernels, "__version__") and not hasattr(kernels, "utils")
print("empty" if empty else os.path.abspath(kernels.__file__))
"""


def _run(code):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("hide_installed", [False, True])
def test_bare_kernels_is_not_this_checkout(hide_installed):
    """Hugging Face's package where it is installed, else an empty module; never this folder."""
    found = _run(f"HIDE_INSTALLED = {hide_installed}" + PROBE)
    assert not found.startswith(os.path.join(ROOT, "kernels")), found
    if hide_installed:
        assert found == "empty"


@pytest.mark.parametrize("hide_installed", [False, True])
def test_bare_kernels_through_a_link_to_the_checkout(hide_installed, tmp_path):
    """The checkout reached through a symbolic link as well (it recursed without end)."""
    link = tmp_path / "checkout"
    link.symlink_to(ROOT)
    found = _run(f"HIDE_INSTALLED = {hide_installed}\nimport sys; sys.path.insert(0, {str(link)!r})" + PROBE)
    assert not found.startswith((os.path.join(ROOT, "kernels"), str(link))), found
    if hide_installed:
        assert found == "empty"


def test_distillcse_kernels_from_the_checkout_root():
    found = _run("import os, distillcse.kernels.contrastive as c; print(os.path.abspath(c.__file__))")
    assert found == os.path.join(ROOT, "kernels", "contrastive.py")


def test_transformers_imports_from_the_checkout_root():
    """transformers (>= 5.2x depends on Hugging Face's kernels) looks the name up and imports it."""
    pytest.importorskip("transformers")
    assert _run("from transformers import AutoModel; import transformers.integrations.hub_kernels; print('ok')") == "ok"
