"""Regenerate the result tables from benchmarks/results/*.json.

    python benchmarks/make_tables.py

Tables live between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` markers:

* ``docs/results.md``: every result table, in full (``accuracy``, ``zoo``, ``depth_sweep``,
  ``robustness``, ``throughput``, ``before_after``; ``seeds``: results over several seeds; ``pretrained``: the
  published weights, read from their records in ``torchcaps/models/weights/``);
* ``README.md``: the headline tables (``headline_mnist``: the best full-MNIST run of each
  classifier; ``headline_robustness``; ``headline_depth``; ``headline_seeds``;
  ``pretrained``), condensed from the same files;
* ``benchmarks/README.md``: ``models``, ``conv_caps``, ``capsnet_perf``.

Output paths in the recorded commands are shown relative to the repository root
(:func:`portable`), so the tables name no directory of the machine that ran them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from torchcaps.models import get_model_cfg

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

#: an absolute path up to its ``runs/`` directory, e.g. ``/srv/x/runs/zoo`` -> ``runs/zoo``
_ABSOLUTE_RUNS = re.compile(r"(?<![\w.~-])/(?:[\w.+-]+/)*?runs/")


def portable(text: str) -> str:
    """Show run directories in a recorded command or note relative to the repository root.

    Results record the command exactly as it ran; the tables show ``--out runs/zoo`` where
    the run wrote to ``/some/absolute/runs/zoo``, so no table names a machine's directories.
    """
    return _ABSOLUTE_RUNS.sub("runs/", text)


def _machine(m: dict) -> str:
    s = f"{m['cpu']}, {m['cores']} cores, torch {m['torch_version']}"
    return s + (f", {m['cuda_device']}" if "cuda_device" in m else "")


def _capability(r: dict) -> str:
    """``torch.backends.cpu.get_cpu_capability()`` of the row's machine, or its ``note``."""
    return r["machine"].get("cpu_capability") or r.get("cpu_capability_note", "not recorded")


def accuracy_table() -> str:
    rows = ["| result | test accuracy | epochs | minutes (train / wall) | best epoch (val acc) "
            "| command | machine | note |", "|---|---|---|---|---|---|---|---|"]
    for p in sorted(RESULTS.glob("*.json")):
        r = json.loads(p.read_text())
        if "test_accuracy" not in r:
            continue
        b = r["best"]
        wall = "-" if r.get("wall_minutes") is None else f"{r['wall_minutes']:.1f}"
        rows.append(f"| {r['name']} | {100 * r['test_accuracy']:.2f}% | {r['epochs']} | "
                    f"{r['train_minutes']:.1f} / {wall} | "
                    f"{b['epoch']} ({100 * b['val_accuracy']:.2f}%) | `{r['command']}` | "
                    f"{_machine(r['machine'])} | {r.get('note', '')} |")
    return portable("\n".join(rows))


def throughput_table() -> str:
    rows = ["| model | batch | train images/s | infer images/s | peak memory train / infer (MB) "
            "| command | machine | CPU capability |", "|---|---|---|---|---|---|---|---|"]
    for p in sorted(RESULTS.glob("throughput_*.json")):
        r = json.loads(p.read_text())
        rows.append(f"| {r['model']} | {r['batch_size']} | {r['train_images_per_s']:.1f} | "
                    f"{r['infer_images_per_s']:.1f} | {r['train']['peak_memory_mb']:.0f} / "
                    f"{r['infer']['peak_memory_mb']:.0f} | `{r['command']}` | "
                    f"{_machine(r['machine'])} | {_capability(r)} |")
    return portable("\n".join(rows))


#: The routing-zoo goals on a 2-core machine: (test accuracy, training minutes).
ZOO_TARGETS: dict[str, tuple[float, float | None]] = {"efficient_capsnet": (0.995, 60.0)}
ZOO_DEFAULT_TARGET: tuple[float, float | None] = (0.990, None)


def zoo_target(row: dict) -> str:
    """``"yes"`` / ``"no"`` against the model's goal, with the goal spelled out."""
    acc, minutes = ZOO_TARGETS.get(row["model"], ZOO_DEFAULT_TARGET)
    goal = f">= {100 * acc:.1f}%" + (f" in {minutes:.0f} min" if minutes else "")
    met = row["test_accuracy"] >= acc and (minutes is None or row["train_minutes"] <= minutes)
    return f"{'yes' if met else 'no'} ({goal})"


def _paper_mnist(model: str) -> str:
    """The MNIST figure registered with the model (the one ``benchmarks/zoo.py`` records)."""
    return get_model_cfg(model).paper.get("mnist", "")


def _settings(recipe: dict | str) -> str:
    return recipe if isinstance(recipe, str) else json.dumps(recipe)


def train_runs_as_zoo_rows() -> list[tuple[dict, dict]]:
    """Full-MNIST ``torchcaps train`` runs (the accuracy JSONs, e.g. capsnet) as zoo rows.

    They use the same trainer, data pipeline and validation-based selection as
    ``benchmarks/zoo.py``; parameters and images/s come from ``bench_models_fp32.json``
    (batch 128, fresh process per phase), which the settings column says.
    """
    bench = {}
    for p in sorted(RESULTS.glob("bench_models_fp32.json")):
        bench.update({r["model"]: r for r in json.loads(p.read_text())["rows"]})
    found = []
    for p in sorted(RESULTS.glob("*.json")):
        r = json.loads(p.read_text())
        if "test_accuracy" not in r or r.get("dataset") != "mnist" or r.get("model") not in bench:
            continue
        b = bench[r["model"]]
        row = {"model": r["model"], "parameters": b["parameters"],
               "paper_mnist": _paper_mnist(r["model"]),
               "test_accuracy": r["test_accuracy"], "epochs": r["epochs"],
               "train_minutes": r["train_minutes"], "train_images_per_s": b["train_images_per_s"],
               "infer_images_per_s": b["infer_images_per_s"],
               "recipe": f"{r.get('note', '')} (torchcaps train; images/s from bench_models at "
                         f"batch {b['batch_size']})"}
        found.append((row, r))
    return found


def zoo_rows() -> list[tuple[dict, dict]]:
    """Every full-MNIST classifier run: ``zoo_*.json`` rows and ``torchcaps train`` runs.

    Pairs ``(row, file)``, grouped by model and ordered by epochs, then training minutes.
    """
    found = []
    for p in sorted(RESULTS.glob("zoo_*.json")):
        z = json.loads(p.read_text())
        found += [(r, z) for r in z["rows"]]
    found += train_runs_as_zoo_rows()
    found.sort(key=lambda rz: (rz[0]["model"], rz[0]["epochs"], rz[0]["train_minutes"]))
    return found


def _paper_column(found: list[tuple[dict, dict]]) -> dict[str, str]:
    """The paper column as recorded by each model's longest run (older JSON may lack it)."""
    return {r["model"]: r["paper_mnist"] for r, _ in found if r.get("paper_mnist")}


def zoo_table() -> str:
    """Every ``zoo_*.json`` row, grouped by model and ordered by epochs."""
    rows = ["| model | parameters | test accuracy | goal met | paper (MNIST) | epochs "
            "| training minutes | train images/s | infer images/s | settings | command | machine |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    found = zoo_rows()
    paper = _paper_column(found)
    for r, z in found:
        rows.append(f"| {r['model']} | {r['parameters']:,} | {100 * r['test_accuracy']:.2f}% | "
                    f"{zoo_target(r)} | {paper.get(r['model'], '')} | {r['epochs']} | "
                    f"{r['train_minutes']:.1f} | {r['train_images_per_s']:.0f} | "
                    f"{r['infer_images_per_s']:.0f} | {_settings(r['recipe'])} | "
                    f"`{z['command']}` | {_machine(z['machine'])}"
                    f"{'; ' + z['note'] if z.get('note') else ''} |")
    return portable("\n".join(rows))


def models_table(paths: list[Path] | None = None) -> str:
    """Every registered model from ``bench_models_*.json`` (benchmarks/bench_models.py)."""
    paths = sorted(RESULTS.glob("bench_models_*.json")) if paths is None else paths
    rows = ["| model | precision | parameters | batch | train images/s | infer images/s "
            "| peak memory train / infer (MB) | training GFLOP per image "
            "| share of matmul rate train / infer | note |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    sweeps = []
    for p in paths:
        z = json.loads(Path(p).read_text())
        lim = z["machine_limits"]
        sweeps.append(f"* {z['precision']}: `{z['command']}`; {_machine(z['machine'])}; "
                      f"{z['warmup_steps']} warm-up steps, median of {z['repeats']} runs of "
                      f"{z['steps_per_repeat']} steps; matmul {lim['matmul_fp32_gflops']:.0f} "
                      f"GFLOP/s fp32, copy {lim['copy_bandwidth_gbs']:.1f} GB/s")
        for r in z["rows"]:
            if "error" in r:
                rows.append(f"| {r['model']} | {z['precision']} | - | {r['batch_size']} | - | - "
                            f"| - | - | - | failed: {r['error'].replace('|', '/')} {r['note']} |")
                continue
            rows.append(f"| {r['model']} | {z['precision']} | {r['parameters']:,} | "
                        f"{r['batch_size']} | {r['train_images_per_s']:.1f} | "
                        f"{r['infer_images_per_s']:.1f} | {r['train_peak_memory_mb']:.0f} / "
                        f"{r['infer_peak_memory_mb']:.0f} | "
                        f"{r['train_flops_per_image'] / 1e9:.3g} | "
                        f"{100 * r['train_fraction_of_matmul_rate']:.1f}% / "
                        f"{100 * r['infer_fraction_of_matmul_rate']:.1f}% | {r['note']} |")
    return portable("\n".join(rows + ([""] + sweeps if sweeps else [])))


def conv_caps_table(path: Path | None = None) -> str:
    """Convolutional capsule votes: GEMM vs loop vs plain conv (benchmarks/conv_caps.py)."""
    path = RESULTS / "conv_caps.json" if path is None else Path(path)
    rows = ["| layer (B, T, HxW, D_in -> C, D_out, K, stride, padding) | votes (MB) | pass "
            "| GEMM (ms) | loop (ms) | plain conv (ms) | GEMM vs loop | GEMM / conv |",
            "|---|---|---|---|---|---|---|---|"]
    if not path.exists():
        return "\n".join(rows)
    z = json.loads(path.read_text())
    for name, r in z["rows"].items():
        s = r["shape"]
        desc = (f"{name}: {s['B']}, {s['T']}, {s['H']}x{s['W']}, {s['D_in']} -> {s['C']}, "
                f"{s['D_out']}, {s['K']}, {s['stride']}, {s['padding']}")
        for ph, label in (("forward", "forward"), ("train", "forward + backward")):
            rows.append(f"| {desc if ph == 'forward' else ''} | "
                        f"{r['votes_mb']:.0f} | {label} | {r[f'gemm_{ph}_ms']:.1f} | "
                        f"{r[f'loop_{ph}_ms']:.1f} | {r[f'conv_{ph}_ms']:.1f} | "
                        f"{r[f'speedup_vs_loop_{ph}']:.1f}x | {r[f'ratio_to_conv_{ph}']:.2f}x |")
    rows += ["", f"`{z['command']}`; {_machine(z['machine'])}"]
    return portable("\n".join(rows))


def capsnet_perf_table() -> str:
    """capsnet before/after: results/before/bench_capsnet_*.json vs results/bench_capsnet_*.json."""
    def load(path: Path) -> dict | None:
        return json.loads(path.read_text()) if path.exists() else None

    runs = {(when, prec): load(RESULTS / sub / f"bench_capsnet_{prec}.json")
            for when, sub in (("before", "before"), ("after", ".")) for prec in ("fp32", "bf16")}
    compiled = load(RESULTS / "bench_capsnet_fp32_compiled.json")
    rows = ["| capsnet, batch 128 | before | after | target |", "|---|---|---|---|"]

    def cell(when, prec, key, fmt="{:.1f}"):
        r = runs[(when, prec)]
        return fmt.format(r[key]) if r else "-"

    rows.append(f"| training, float32 (images/s) | {cell('before', 'fp32', 'train_images_per_s')} | "
                f"{cell('after', 'fp32', 'train_images_per_s')} | >= 110 |")
    rows.append(f"| training, bf16 autocast (images/s) | {cell('before', 'bf16', 'train_images_per_s')} | "
                f"{cell('after', 'bf16', 'train_images_per_s')} | >= 150 |")
    rows.append(f"| inference, float32 (images/s) | {cell('before', 'fp32', 'infer_images_per_s')} | "
                f"{cell('after', 'fp32', 'infer_images_per_s')} | >= 350 |")
    rows.append(f"| inference, bf16 autocast (images/s) | {cell('before', 'bf16', 'infer_images_per_s')} | "
                f"{cell('after', 'bf16', 'infer_images_per_s')} | |")
    rows.append(f"| peak resident memory of training (MB) | "
                f"{cell('before', 'fp32', 'peak_memory_mb', '{:.0f}')} | "
                f"{cell('after', 'fp32', 'peak_memory_mb', '{:.0f}')} | |")

    def routing(r):
        if not r or "routing_alone" not in r:
            return "-"
        ra = r["routing_alone"]
        return f"{ra['ms']:.1f} ms = {ra['reads_equivalent']:.1f} reads"

    after = routing(runs[("after", "fp32")])
    if compiled:
        after += f" (eager); {routing(compiled)} (`--compile`)"
    rows.append(f"| dynamic routing alone, votes (128, 1152, 10, 16), 3 iterations | "
                f"{routing(runs[('before', 'fp32')])} | {after} | <= 4.5 reads (1.5 x 3) |")
    machines = {_machine(r["machine"]) for r in runs.values() if r}
    rows += ["", "Commands: `torchcaps bench --model capsnet --batch-size 128 [--precision bf16] "
             "[--compile] --json ...`; machine: " + "; ".join(sorted(machines))]
    return "\n".join(rows)


def _write_marked(readme: Path, name: str, table: str) -> None:
    text = readme.read_text()
    pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{readme} has no {name} markers")
    readme.write_text(pattern.sub(lambda m: m.group(1) + table + "\n" + m.group(2), text))


def write_models_table(readme: Path | None = None, paths: list[Path] | None = None) -> None:
    """Put models_table() between the models markers of benchmarks/README.md."""
    readme = ROOT / "benchmarks" / "README.md" if readme is None else Path(readme)
    _write_marked(readme, "models", models_table(paths))


def _pct(r: dict) -> str:
    if r.get("diverged"):
        return "diverged"
    return "-" if r.get("test_accuracy") is None else f"{100 * r['test_accuracy']:.2f}%"


def _loss(r: dict) -> str:
    return "-" if r.get("final_train_loss") is None else f"{r['final_train_loss']:.4f}"


def depth_sweep_table() -> str:
    """Plain vs residual capsule stacks per depth, from ``depth_sweep*.json``."""
    rows = ["| depth | parameters | test accuracy plain / residual | final training loss "
            "plain / residual | shortcuts of the residual stack | steps "
            "| training minutes plain / residual |", "|---|---|---|---|---|---|---|"]
    sweeps = []
    for p in sorted(RESULTS.glob("depth_sweep*.json")):
        z = json.loads(p.read_text())
        s = z.get("settings", {})
        sweeps.append(f"* {z['dataset']}, {s.get('routing')} routing, skip {s.get('skip')}, "
                      f"batch {s.get('batch_size')}, lr {s.get('lr')}, seed {s.get('seed')} "
                      f"(single seed); training loss: {z.get('train_loss_measure')}; "
                      f"`{z['command']}`; {_machine(z['machine'])}")
        by = {(r["depth"], r["skips"]): r for r in z["rows"]}
        for d in sorted({r["depth"] for r in z["rows"]}):
            a, b = by.get((d, False), {}), by.get((d, True), {})
            if b.get("same_as_plain"):
                links = "none fits (residual = plain)"
            else:
                links = " ".join(f"{i}->{j}" for i, j in b.get("shortcuts", [])) or "-"
            mins = " / ".join("-" if r.get("train_minutes") is None else f"{r['train_minutes']:.1f}"
                              for r in (a, b))
            params = a.get("parameters") or b.get("parameters")
            rows.append(f"| {d} | {'-' if params is None else f'{params:,}'} | "
                        f"{_pct(a)} / {_pct(b)} | {_loss(a)} / {_loss(b)} | {links} | "
                        f"{a.get('steps', b.get('steps', '-'))} | {mins} |")
    return portable("\n".join(rows + ([""] + sweeps if sweeps else [])))

#: Sabour et al. 2017: affNIST accuracy (Sec. 5.2, model stopped at ~99.2% on translated
#: MNIST) and MultiMNIST error (Sec. 6, Table 1 text).
PAPER_ROBUSTNESS = {("affnist", "capsnet"): "79% affine (99.23% translated)",
                    ("affnist", "cnn_baseline"): "66% affine (99.22% translated)",
                    ("multimnist", "capsnet"): "5.2% error",
                    ("multimnist", "cnn_baseline"): "8.1% error"}


def robustness_table(path: Path | None = None) -> str:
    """One row per robustness run (benchmarks/robustness.py): capsnet vs the CNN baseline."""
    path = RESULTS / "robustness.json" if path is None else Path(path)
    rows = ["| suite | model | parameters | translated test acc | affine test acc | "
            "MultiMNIST error (top-2) | paper | epochs | stopped on target? | training minutes "
            "| precision, threads | command |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    if not path.exists():
        return "\n".join(rows)
    z = json.loads(path.read_text())

    def pct(v) -> str:
        return "-" if v is None else f"{100 * v:.2f}%"

    for r in z["rows"]:
        aff = r["suite"] == "affnist"
        stop = ("-" if not aff else "yes" if r.get("target_reached")
                else f"no: budget of {r['max_epochs']} epochs ended below {100 * r['target']:.2f}%")
        rows.append(
            f"| {r['suite']} | {r['model']} | {r['parameters']:,} | "
            f"{pct(r.get('translated_test_accuracy')) if aff else '-'} | "
            f"{pct(r.get('affine_accuracy')) if aff else '-'} | "
            f"{'-' if aff else pct(r.get('error'))} | "
            f"{PAPER_ROBUSTNESS.get((r['suite'], r['model']), '-')} | {r['epochs']:.2f} | {stop} | "
            f"{r['train_minutes']:.1f} | {r.get('precision', 'fp32')}, {r.get('threads') or '-'} | "
            f"`{r['command']}` |")
    data = ", ".join(sorted({r["dataset"] for r in z["rows"]}))
    notes = ["", f"Data: {data}. Machine: {_machine(z['machine'])}. Single seed. The affine set is "
             "regenerated from the MNIST test digits (torchcaps.data.make_affnist_test), not the "
             "official affNIST files; MultiMNIST is trained on far fewer pairs than the paper's "
             f"60M. All runs: `{z.get('script', '')}`."]
    return portable("\n".join(rows + notes))


def headline_mnist_table() -> str:
    """The README's model results: the best full-MNIST run of each classifier.

    Best = highest test accuracy (of the checkpoint chosen on validation); a tie goes to
    the run with fewer training minutes. Every run is in ``zoo_table()`` (docs/results.md).
    """
    rows = ["| model | parameters | test accuracy | epochs | training minutes | paper (MNIST) |",
            "|---|---|---|---|---|---|"]
    found = zoo_rows()
    paper = _paper_column(found)
    best: dict[str, dict] = {}
    for r, _ in found:
        b = best.get(r["model"])
        if b is None or (r["test_accuracy"], -r["train_minutes"]) > (b["test_accuracy"],
                                                                      -b["train_minutes"]):
            best[r["model"]] = r
    for model in sorted(best):
        r = best[model]
        rows.append(f"| {model} | {r['parameters']:,} | {100 * r['test_accuracy']:.2f}% | "
                    f"{r['epochs']} | {r['train_minutes']:.1f} | {paper.get(model, '')} |")
    return "\n".join(rows)


def headline_robustness_table(path: Path | None = None) -> str:
    """The README's robustness table: ``robustness_table()`` without budgets and commands."""
    path = RESULTS / "robustness.json" if path is None else Path(path)
    rows = ["| suite | model | translated test acc | affine test acc | MultiMNIST error (top-2) "
            "| paper | epochs |", "|---|---|---|---|---|---|---|"]
    if not path.exists():
        return "\n".join(rows)

    def pct(v) -> str:
        return "-" if v is None else f"{100 * v:.2f}%"

    for r in json.loads(path.read_text())["rows"]:
        aff = r["suite"] == "affnist"
        rows.append(f"| {r['suite']} | {r['model']} | "
                    f"{pct(r.get('translated_test_accuracy')) if aff else '-'} | "
                    f"{pct(r.get('affine_accuracy')) if aff else '-'} | "
                    f"{'-' if aff else pct(r.get('error'))} | "
                    f"{PAPER_ROBUSTNESS.get((r['suite'], r['model']), '-')} | {r['epochs']:g} |")
    return "\n".join(rows)


def headline_depth_table() -> str:
    """The README's depth table: test accuracy of plain and residual stacks per depth."""
    rows = ["| depth | test accuracy, plain stack | test accuracy, residual stack |",
            "|---|---|---|"]
    for p in sorted(RESULTS.glob("depth_sweep*.json")):
        z = json.loads(p.read_text())
        by = {(r["depth"], r["skips"]): r for r in z["rows"]}
        for d in sorted({r["depth"] for r in z["rows"]}):
            a, b = by.get((d, False), {}), by.get((d, True), {})
            same = " (no shortcut fits)" if b.get("same_as_plain") else ""
            rows.append(f"| {d} | {_pct(a)} | {_pct(b)}{same} |")
    return "\n".join(rows)


#: what changed between the baseline and the current library, by before/after result file
BEFORE_AFTER_CHANGES = {
    "before_after_cluster_capsnet.json": (
        "cluster routing: one fused gradient for the cluster mean and variance, the variance "
        "formed a few samples at a time, and ClusterConvCaps recomputing its votes in backward "
        "32 MB at a time; two 1-thread training runs shared the 2 cores"),
}


def before_after_table() -> str:
    """docs/results.md: ``before_after_*.json`` (bench_models.py with ``--baseline-src``)."""
    rows = ["| model | batch | train images/s before / after | infer images/s before / after "
            "| peak memory train before / after (MB) | peak memory infer before / after (MB) "
            "| change | command | machine | CPU capability |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for p in sorted(RESULTS.glob("before_after_*.json")):
        z = json.loads(p.read_text())
        for r in z["rows"]:
            b = r["baseline"]
            rows.append(
                f"| {r['model']} | {r['batch_size']} | {b['train_images_per_s']:.1f} / "
                f"{r['train_images_per_s']:.1f} | {b['infer_images_per_s']:.1f} / "
                f"{r['infer_images_per_s']:.1f} | {b['train_peak_memory_mb']:.0f} / "
                f"{r['train_peak_memory_mb']:.0f} | {b['infer_peak_memory_mb']:.0f} / "
                f"{r['infer_peak_memory_mb']:.0f} | {BEFORE_AFTER_CHANGES.get(p.name, '')} | "
                f"`{z['command']}` | {_machine(z['machine'])} | {_capability(z)} |")
    return portable("\n".join(rows))


def routing_speed_table() -> str:
    """docs/results.md: ``routing_*.json`` of ``benchmarks/routing_speed.py``."""
    rows = ["| library | threads | forward (reads) | training forward (ms) | backward (ms, reads) "
            "| backward / forward | kept for backward besides the votes (MB) "
            "| training peak growth (MB) | command | machine | CPU capability |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in sorted(RESULTS.glob("routing_*.json")):
        z = json.loads(p.read_text())
        for name in ("baseline", "current"):
            if name not in z:
                continue
            r = z[name]
            rows.append(
                f"| {'before' if name == 'baseline' else 'after'} | {r['threads']} | "
                f"{r['infer_ms']:.1f} ms ({r['infer_reads']:.1f}) | {r['train_forward_ms']:.1f} | "
                f"{r['backward_ms']:.1f} ({r['backward_reads']:.1f}) | "
                f"{r['backward_to_forward']:.1f}x | {r['saved_mbytes_besides_votes']:.1f} | "
                f"{r['training_peak_mbytes_besides_votes']:.0f} | `{z['command']}` | "
                f"{_machine(z['machine'])} | {_capability(z)} |")
    return portable("\n".join(rows))


def conv_weight_grad_table() -> str:
    """docs/results.md: ``conv_weight_grad*.json`` of ``benchmarks/conv_weight_grad.py``."""
    rows = ["| convolution | batch | threads | forward (ms) | input gradient (ms) "
            "| weight gradient, native (ms) | as a forward convolution (ms) | speed-up "
            "| command | machine | CPU capability |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in sorted(RESULTS.glob("conv_weight_grad*.json")):
        z = json.loads(p.read_text())
        for r in z["rows"]:
            rows.append(
                f"| {r['conv']} | {r['input'][0]} | {r['threads']} | {r['forward_ms']:.0f} | "
                f"{r['input_grad_ms']:.0f} | {r['weight_grad_native_ms']:.0f} | "
                f"{r['weight_grad_as_forward_ms']:.0f} | {r['weight_grad_speedup']:.1f}x | "
                f"`{z['command']}` | {_machine(z['machine'])} | {_capability(z)} |")
    return portable("\n".join(rows))


def independent_table() -> str:
    """docs/results.md: ``independent_capsnet*.json`` of ``benchmarks/independent_capsnet.py``."""
    rows = ["| threads | batch | independent (images/s) | torchcaps before (images/s) "
            "| torchcaps (images/s) | torchcaps / independent | command | machine "
            "| CPU capability |", "|---|---|---|---|---|---|---|---|---|"]
    for p in sorted(RESULTS.glob("independent_capsnet*.json")):
        z = json.loads(p.read_text())
        for r in z["rows"]:
            before = r.get("torchcaps baseline images/s")
            rows.append(
                f"| {r['threads']} | {r['batch_size']} | {r['independent images/s']:.1f} | "
                f"{'-' if before is None else f'{before:.1f}'} | {r['torchcaps images/s']:.1f} | "
                f"{r['torchcaps / independent']:.2f}x | `{z['command']}` | "
                f"{_machine(z['machine'])} | {_capability(z)} |")
    return portable("\n".join(rows))


def _seed_results() -> list[dict]:
    return [r for r in (json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json")))
            if isinstance(r, dict) and "seeds" in r and "test_accuracy_mean" in r]


def _mean_std(r: dict) -> str:
    std = r["test_accuracy_std"]
    return f"{100 * r['test_accuracy_mean']:.2f}%" + ("" if std is None else f" ± {100 * std:.2f}")


def seeds_table() -> str:
    """docs/results.md: every several-seed result, each seed's figure and the mean ± std."""
    rows = ["| result | model | dataset | seeds | test accuracy per seed | mean ± std "
            "| training minutes per seed | command | machine |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in _seed_results():
        each = ", ".join(f"{100 * x['test_accuracy']:.2f}%" for x in r["runs"])
        mins = ", ".join(f"{x['train_minutes']:.1f}" for x in r["runs"])
        rows.append(f"| {r['name']} | {r['model']} | {r['dataset']} | "
                    f"{', '.join(map(str, r['seeds']))} | {each} | {_mean_std(r)} | {mins} | "
                    f"`{r['command']}` | {_machine(r['machine'])} |")
    return portable("\n".join(rows))


def headline_seeds_table() -> str:
    """README: mean ± std of every several-seed result."""
    rows = ["| model | dataset | epochs | seeds | test accuracy, mean ± std |", "|---|---|---|---|---|"]
    for r in _seed_results():
        epochs = sorted({x["epochs"] for x in r["runs"]})
        rows.append(f"| {r['model']} | {r['dataset']} | {', '.join(map(str, epochs))} | "
                    f"{len(r['seeds'])} | {_mean_std(r)} |")
    return "\n".join(rows)


def _pretrained_records() -> list:
    from torchcaps.models.pretrained import get_pretrained, list_pretrained

    return [get_pretrained(n) for n in list_pretrained()]


def pretrained_table() -> str:
    """docs/results.md: every published set of weights with how it was made."""
    rows = ["| weights | model | file | SHA-256 | test acc | val acc | mnist-mini test acc "
            "| epochs (best) | training minutes | command | machine |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in _pretrained_records():
        t = r.training
        where = "shipped" if r.shipped else f"[download]({r.url})"
        rows.append(f"| {r.name} | {r.model} | {r.bytes / 1e6:.2f} MB, {where} | `{r.sha256}` | "
                    f"{100 * r.accuracy['test']:.2f}% | {100 * r.accuracy['val']:.2f}% | "
                    f"{100 * r.accuracy['mnist-mini test']:.2f}% | {t['epochs']} "
                    f"({t['best_epoch']}) | {t['minutes']:.1f} | `{t['command']}` | "
                    f"{t['machine']}, torch {t['torch']} |")
    return "\n".join(rows)


def headline_pretrained_table() -> str:
    """README: one row per set of weights (``create_model(MODEL, pretrained=True)``)."""
    rows = ["| model | weights | MNIST test accuracy | size | where |", "|---|---|---|---|---|"]
    for r in _pretrained_records():
        where = "in the package" if r.shipped else "downloaded on first use"
        rows.append(f"| `{r.model}` | {r.name} | {100 * r.accuracy['test']:.2f}% | "
                    f"{r.bytes / 1e6:.1f} MB | {where} |")
    return "\n".join(rows)


def _write_all(path: Path, tables: dict[str, str]) -> None:
    """Replace each named section of ``path``; every section's markers must be present."""
    text = path.read_text()
    for name, table in tables.items():
        pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"{path.relative_to(ROOT)} has no {name} markers")
        text = pattern.sub(lambda m, t=table: m.group(1) + t + "\n" + m.group(2), text)
    path.write_text(text)


def main() -> None:
    _write_all(ROOT / "docs" / "results.md", {
        "accuracy": accuracy_table(), "zoo": zoo_table(), "depth_sweep": depth_sweep_table(),
        "robustness": robustness_table(), "throughput": throughput_table(),
        "pretrained": pretrained_table(), "seeds": seeds_table(),
        "before_after": before_after_table(), "routing_speed": routing_speed_table(),
        "conv_weight_grad": conv_weight_grad_table(), "independent": independent_table()})
    print("docs/results.md tables updated")
    _write_all(ROOT / "README.md", {
        "headline_mnist": headline_mnist_table(), "headline_robustness": headline_robustness_table(),
        "headline_depth": headline_depth_table(), "pretrained": headline_pretrained_table(),
        "headline_seeds": headline_seeds_table()})
    print("README.md tables updated")
    write_models_table()
    _write_marked(ROOT / "benchmarks" / "README.md", "conv_caps", conv_caps_table())
    _write_marked(ROOT / "benchmarks" / "README.md", "capsnet_perf", capsnet_perf_table())
    print("benchmarks/README.md tables updated")


if __name__ == "__main__":
    main()
