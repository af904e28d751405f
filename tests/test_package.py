"""The checkout's ``kernels/`` folder is ``distillcse.kernels`` only: from the checkout's root
(``python -m ...`` puts it first on sys.path) the bare name ``kernels`` stays Hugging Face's,
which transformers imports, or is missing."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = """
import os
try:
    import kernels
except ModuleNotFoundError:
    print("missing")
else:
    print(os.path.abspath(kernels.__file__))
"""


def _run(code):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_bare_kernels_is_not_this_checkout():
    found = _run(PROBE)
    assert found == "missing" or not found.startswith(os.path.join(ROOT, "kernels")), found


def test_distillcse_kernels_from_the_checkout_root():
    found = _run("import os, distillcse.kernels.contrastive as c; print(os.path.abspath(c.__file__))")
    assert found == os.path.join(ROOT, "kernels", "contrastive.py")


def test_transformers_imports_from_the_checkout_root():
    """transformers (>= 5.2x depends on Hugging Face's kernels) looks the name up and imports it."""
    pytest.importorskip("transformers")
    assert _run("from transformers import AutoModel; import transformers.integrations.hub_kernels; print('ok')") == "ok"
