"""The benchmark driver: NeFT vs LoRA vs full fine-tuning, same model, data and steps, side by side.

    python -m benchmarks.compare                       # the full mode (the numbers in README.md)
    python -m benchmarks.compare --quick               # one seed, few steps, no sweep, tiny eval (CI smoke)
    python -m benchmarks.compare --regime long         # ~3 epochs, best dev checkpoint (see regime.py)
    python -m benchmarks.compare --ablations           # the ablation rows at equal parameters (methods.py)

Every run is ``benchmarks/run_method.py`` in its own process (peak memory is per method). Three phases:

1. sweep: each method at each learning rate of its family, first seed (hooks rows reuse their selector's
   delta sweep: same trained weights, see ``methods.Method.sweep_key``);
2. seeds: the other seeds at each method's best learning rate (lowest dev loss, never the test loss);
3. cost: one run per method at its best learning rate with nothing else running (``--jobs`` never applies
   here), for step time and memory. ``--cost_steps 0`` takes them from the quality runs instead.

Results land in ``--output_dir``: one JSON per run (an existing one is reused, so a stopped benchmark
resumes), ``table.md`` (the markdown table, the target checks and the quality/forgetting trade-off over the
sweeps, ``tradeoff.py``), ``results.json`` and ``eval_loss.png``. ``benchmark.json`` holds the settings the
folder's runs were made with: a later call with other settings is refused instead of mixing their results.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from transformers import HfArgumentParser

from .methods import ablation_methods, default_methods, parse_method
from .plot import mermaid_eval_curves, plot_eval_curves
from .table import best_rows, markdown_table, target_checks
from .tradeoff import sweep_points, tradeoff_markdown

ROOT = Path(__file__).resolve().parents[1]
#: run_method flags that the driver passes through unchanged when set.
PASSTHROUGH = ("model", "dataset", "source_column", "target_column", "lang", "max_chars", "param_ratio",
               "batch_size", "max_new_tokens", "threads", "chat", "prose_size", "max_train_pairs",
               "warmup_ratio")
#: Settings that change a run's numbers: one output folder holds runs of one setting only.
RESULT_SETTINGS = ("regime", "epochs", "max_steps", "eval_steps", "test_size", "dev_size", "model", "dataset",
                   "source_column", "target_column", "lang", "max_chars", "param_ratio", "batch_size", "chat",
                   "prose_size", "max_train_pairs", "selector_kwargs", "warmup_ratio")
REGIMES = ("short", "long")


@dataclass
class CompareArguments:
    """What to compare and how long. Defaults are the full mode; ``--quick`` shrinks everything."""

    quick: bool = field(default=False, metadata={"help": "CI smoke mode: first seed, middle learning rate only, "
                                                         "4 steps (long regime: 3 epochs of 32 pairs), 16 test "
                                                         "pairs, 8 prose paragraphs, no cost phase."})
    regime: str = field(default="short", metadata={"help": "'short': --max_steps steps, the final model. 'long': "
                                                           "--epochs passes over the training pairs, dev and test "
                                                           "loss every half epoch, the best dev checkpoint."})
    epochs: float = field(default=3.0, metadata={"help": "Epochs of the long regime."})
    ablations: bool = field(default=False, metadata={"help": "Run the ablation rows (benchmarks/methods.py "
                                                             "ablation_methods) instead of the default method list."})
    prose_size: int | None = field(default=None, metadata={"help": "Prose paragraphs of the forgetting probe "
                                                                   "(default 64; 0: no probe)."})
    max_train_pairs: int | None = field(default=None, metadata={"help": "Use only this many training pairs."})
    warmup_ratio: float | None = field(default=None, metadata={"help": "Share of the steps with a linear "
                                                                       "learning-rate warmup, every method alike "
                                                                       "(default 0)."})
    methods: str | None = field(default=None, metadata={"help": "Comma-separated methods (see benchmarks/methods.py)"
                                                                 ". Default: full, lora, NeFT hooks + delta per "
                                                                 "selector, qneft-delta-cosine, qlora."})
    selectors: str = field(default="cosine,gradient,activation,random",
                           metadata={"help": "Selectors for the default method list."})
    seeds: str = field(default="0,1", metadata={"help": "Comma-separated training seeds."})
    lr_full: str = field(default="3e-5,1e-4,3e-4", metadata={"help": "Learning-rate sweep for full fine-tuning."})
    lr_lora: str = field(default="3e-4,1e-3,3e-3", metadata={"help": "Learning-rate sweep for LoRA/QLoRA."})
    lr_neft: str = field(default="3e-4,1e-3,3e-3,1e-2", metadata={"help": "Learning-rate sweep for NeFT (sparse "
                                                                           "row/column tuning wants higher rates)."})
    max_steps: int = field(default=60, metadata={"help": "Training steps of every quality run."})
    eval_steps: int = field(default=10, metadata={"help": "Eval-loss curve resolution (steps)."})
    test_size: int = field(default=200, metadata={"help": "Held-out test pairs."})
    dev_size: int = field(default=60, metadata={"help": "Dev pairs for choosing the learning rate."})
    cost_steps: int = field(default=20, metadata={"help": "Steps of the cost runs (0: take step time and memory "
                                                          "from the quality runs)."})
    jobs: int = field(default=1, metadata={"help": "Quality runs at a time (cost runs always run alone)."})
    output_dir: str = field(default="runs/benchmarks", metadata={"help": "Where results go (git-ignored)."})
    report_only: bool = field(default=False, metadata={"help": "Run nothing: rebuild the table and plot from the "
                                                               "result files already in --output_dir."})
    selector_kwargs: str | None = field(default=None, metadata={"help": 'Per-selector kwargs as JSON, e.g. '
                                                                        '\'{"cosine": {"probe_steps": 6}}\'.'})
    model: str | None = field(default=None, metadata={"help": "Model id/folder/.gguf (default SmolLM2-135M)."})
    dataset: str | None = field(default=None, metadata={"help": "Pairs file instead of Django's catalogs."})
    source_column: str | None = field(default=None, metadata={"help": "Source column of --dataset."})
    target_column: str | None = field(default=None, metadata={"help": "Target column of --dataset."})
    lang: str | None = field(default=None, metadata={"help": "Target language (default de)."})
    max_chars: int | None = field(default=None, metadata={"help": "Longest Django pair kept (default 60)."})
    param_ratio: float | None = field(default=None, metadata={"help": "NeFT budget (default 0.018 ≈ LoRA r8 on "
                                                                      "SmolLM2-135M)."})
    batch_size: int | None = field(default=None, metadata={"help": "Train batch size (default 8)."})
    max_new_tokens: int | None = field(default=None, metadata={"help": "Generation limit for chrF (default 32)."})
    threads: int | None = field(default=None, metadata={"help": "torch threads per run."})
    chat: bool | None = field(default=None, metadata={"help": "Chat prompts (default: if the tokenizer has a "
                                                               "chat template)."})

    def __post_init__(self):
        if self.quick:
            self.seeds = self.seeds.split(",")[0]
            self.max_steps, self.eval_steps, self.test_size, self.dev_size, self.cost_steps = 4, 2, 16, 8, 0
            self.max_new_tokens = self.max_new_tokens or 8
            self.prose_size = self.prose_size if self.prose_size is not None else 8
            self.max_train_pairs = self.max_train_pairs or 32
        if self.regime not in REGIMES:
            raise ValueError(f"--regime must be one of {REGIMES}, got {self.regime!r}.")
        if self.regime == "long" and self.epochs <= 0:
            raise ValueError(f"--epochs must be positive for the long regime, got {self.epochs}.")
        self.selector_kwargs = json.loads(self.selector_kwargs) if isinstance(self.selector_kwargs, str) else \
            (self.selector_kwargs or {})
        if self.jobs < 1:
            raise ValueError(f"--jobs must be at least 1, got {self.jobs}.")

    def learning_rates(self, family: str) -> list[float]:
        text = {"full": self.lr_full, "lora": self.lr_lora, "neft": self.lr_neft}[family]
        values = [float(v) for v in text.split(",") if v.strip()]
        if not values:
            raise ValueError(f"--lr_{family} is empty: give at least one learning rate.")
        return [values[len(values) // 2]] if self.quick else values


@dataclass(frozen=True)
class Run:
    method: str
    learning_rate: float
    seed: int
    cost: bool = False

    @property
    def name(self) -> str:
        return f"{'cost/' if self.cost else 'runs/'}{self.method}_lr{self.learning_rate:g}_s{self.seed}"


def run_flags(args: CompareArguments, run: Run, output: Path) -> list[str]:
    method = parse_method(run.method)
    flags = ["--method", run.method, "--output", str(output), "--learning_rate", str(run.learning_rate),
             "--seed", str(run.seed), "--test_size", str(args.test_size), "--dev_size", str(args.dev_size),
             "--max_steps", str(args.cost_steps if run.cost else args.max_steps),
             "--eval_steps", str(0 if run.cost else args.eval_steps)]
    if run.cost:  # step time and memory per step do not depend on the regime: a short run, no probe
        flags += ["--generate", "false", "--prose_size", "0"]
    elif args.regime == "long":
        flags += ["--epochs", str(args.epochs)]
    for name in PASSTHROUGH:
        value = getattr(args, name)
        if value is not None and not (run.cost and name == "prose_size"):
            flags += [f"--{name}", str(value).lower() if isinstance(value, bool) else str(value)]
    if method.selector and method.selector in args.selector_kwargs:
        flags += ["--selector_kwargs", json.dumps(args.selector_kwargs[method.selector])]
    return flags


def execute(args: CompareArguments, runs: list[Run], jobs: int, desc: str, errors: list[str]) -> list[dict[str, Any]]:
    """Run what has no result file yet (``jobs`` at a time) and return the records of the runs that succeeded.

    A failed run is appended to ``errors`` (with its log's tail) instead of stopping the benchmark: the other
    methods' numbers are still worth the table, and ``main`` exits non-zero at the end.
    """
    out = Path(args.output_dir)
    todo = [] if args.report_only else [r for r in runs if not (out / f"{r.name}.json").is_file()]

    def one(run: Run) -> None:
        result, log = out / f"{run.name}.json", out / "logs" / f"{run.name.replace('/', '_')}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as handle:
            code = subprocess.run([sys.executable, "-m", "benchmarks.run_method", *run_flags(args, run, result)],
                                  cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT).returncode
        if code != 0:
            tail = "".join(open(log).readlines()[-15:])
            raise RuntimeError(f"{run.name} failed (exit {code}); log {log}:\n{tail}")

    with ThreadPoolExecutor(max_workers=jobs) as pool, tqdm(total=len(todo), desc=desc, unit="run") as bar:
        for future in [pool.submit(one, r) for r in todo]:
            try:
                future.result()
            except RuntimeError as err:
                errors.append(str(err))
            bar.update()
    return [json.loads((out / f"{r.name}.json").read_text()) for r in runs if (out / f"{r.name}.json").is_file()]


def check_settings(args: CompareArguments) -> None:
    """Record the settings in ``benchmark.json`` on first use of the folder; refuse different ones later.

    Result files are reused by name (method, lr, seed), so runs of another regime, language or budget in the
    same folder would silently mix into one table.
    """
    out = Path(args.output_dir)
    path = out / "benchmark.json"
    settings = {name: getattr(args, name) for name in RESULT_SETTINGS}
    if path.is_file():
        saved = json.loads(path.read_text())
        differ = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
        if differ:
            raise ValueError(f"{out} holds runs made with other settings ({differ}, as saved -> now): give another "
                             "--output_dir (one per regime, language and budget), or the saved settings.")
        return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=1))


def plan_methods(args: CompareArguments) -> list[str]:
    if args.methods and args.ablations:
        raise ValueError("--methods and --ablations both choose the methods: give one of them.")
    if args.ablations:
        from neft_trl import available_selectors

        installed = list(available_selectors())
        if "magnitude" not in installed:
            print("note: the magnitude selector plugin is not installed (pip install plugins/neft-selector-magnitude)"
                  ": its ablation row is left out.", file=sys.stderr)
        names = ablation_methods(installed)
    else:
        names = args.methods.split(",") if args.methods else default_methods(args.selectors.split(","))
    names = [n.strip() for n in names if n.strip()]
    methods = [parse_method(n) for n in names]  # fails early on a bad name or variant
    bases = ["base"] + (["qbase"] if any(m.quantized for m in methods) else [])
    return bases + [n for n in names if n not in bases]


def main(argv: list[str] | None = None) -> str:
    (args,) = HfArgumentParser(CompareArguments).parse_args_into_dataclasses(args=argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    names = plan_methods(args)
    methods = {n: parse_method(n) for n in names}
    missing = [n for n, m in methods.items() if m.family != "base" and m.sweep_key not in methods]
    if missing:
        raise ValueError(f"{missing} reuse the sweep of a method that is not in --methods: add "
                         f"{sorted({methods[n].sweep_key for n in missing})}.")
    sweep = [Run(n, lr, seeds[0]) for n, m in methods.items() if m.family != "base" and m.sweep_key == n
             for lr in args.learning_rates(m.family)]
    base = [Run(n, 0.0, seeds[0]) for n, m in methods.items() if m.family == "base"]
    check_settings(args)
    errors: list[str] = []
    records = execute(args, base + sweep, args.jobs, "sweep", errors)
    sweep_rows = best_rows(records)
    best = {n: sweep_rows[m.sweep_key].learning_rate for n, m in methods.items()
            if m.family != "base" and m.sweep_key in sweep_rows}
    seeded = [Run(n, best[n], s) for n in best for s in seeds if not (s == seeds[0] and methods[n].sweep_key == n)]
    records += execute(args, seeded, args.jobs, "seeds", errors)
    costs = execute(args, [Run(n, best[n], seeds[0], cost=True) for n in best], 1, "cost", errors) \
        if args.cost_steps else []
    rows = best_rows(records, costs)
    rows = {n: rows[n] for n in names if n in rows}
    out = Path(args.output_dir)
    device = next((r.get("device") for r in records if r.get("device")), "cpu")
    steps = next((r["max_steps"] for r in records if r["family"] != "base"), args.max_steps)
    length = (f"long regime: {args.epochs:g} epochs = {steps} steps, test/dev loss every half epoch, each run at its "
              "best dev checkpoint" if args.regime == "long" else f"{steps} steps")
    summary = (f"{len(seeds)} seed(s) {args.seeds}, {length}, batch {args.batch_size or 8}, "
               f"{args.test_size} test pairs, device {device}; cost runs: "
               f"{f'{args.cost_steps} steps each, alone' if args.cost_steps else 'from the quality runs'}")
    if args.cost_steps and any(not r.cost_runs for n, r in rows.items() if methods[n].family != "base"):
        summary += "; † no cost run: step time and memory from its quality runs (which may have shared the machine)"
    lora = rows.get("lora")
    target = lora.stat("eval_loss_after").mean if lora else None
    swept = [r for r in records if parse_method(r["method"]).sweep_key == r["method"]]  # hooks rows = delta sweep
    tradeoff = tradeoff_markdown(sweep_points(swept), target, f"LoRA's at lr {lora.learning_rate:g}" if lora else "")
    title = ("Test loss per half epoch (mean over seeds); reported: best dev checkpoint"
             if args.regime == "long" else "Eval loss vs steps (mean over seeds)")
    text = "\n".join([markdown_table(rows), "", summary, "", "Targets:",
                      *target_checks(rows, long_regime=args.regime == "long"), "", tradeoff, "",
                      mermaid_eval_curves(rows, title)])
    (out / "table.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({n: {"learning_rate": r.learning_rate, "runs": r.runs,
                                                      "cost_runs": r.cost_runs} for n, r in rows.items()}, indent=1))
    plot = plot_eval_curves(rows, out / "eval_loss.png", f"{title}, band: min-max")
    print(text)
    print(f"\nwritten: {out / 'table.md'}, {out / 'results.json'}, {plot}")
    if errors:
        print("\n".join(["", f"{len(errors)} run(s) FAILED:", *errors]), file=sys.stderr)
        raise SystemExit(1)
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
