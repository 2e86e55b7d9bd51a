"""Training benchmark: our DreamBooth LoRA trainer vs diffusers' own script, side by side.

Default mode, on the tiny offline model (CPU): the same synthetic photos, class images, steps,
rank, resolution, learning rate and prior settings go to

- ours: ``engine.training.train_lora`` (``bench/train_ours.py``), and
- theirs: diffusers' ``examples/dreambooth/train_dreambooth_lora.py`` from a checkout at a
  pinned version, run unchanged (``bench/train_diffusers.py`` only times its progress bar).

Both run as child processes of one Python, the bench virtual environment (``--venv``), because
diffusers' script needs torchvision. Measured per run: wall time of the whole process, time per
step after warm-up, peak RSS; then the ratio ours/theirs. The class images are drawn once by
the engine's ``generate_class_images`` (a row of its own) and given to both trainers.
``--compile`` adds ours with its UNet copy compiled by inductor, its warm-up (the first step,
cold and warm cache) apart from its time per step, and a second training in one process.

``--full`` builds the real SD 1.5 architecture with random weights instead and times our
trainer at 512 px in this process (``--device cuda`` on a GPU; a 2-step smoke run on a CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's engine/bench

from bench.machine import describe_device, library_versions, peak_rss_mib, today
from bench.photos import save_photos, subject_photos
from bench.results import RESULTS_FILE, Row, append_results, format_table

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
DIFFUSERS_SCRIPT = Path("dreambooth") / "train_dreambooth_lora.py"
BENCH_VENV_HELP = """\
The diffusers comparison needs its own virtual environment (the script imports torchvision):
  python3 -m venv {venv}
  {venv}/bin/pip install torch==2.14.1 torchvision==0.29.1
  {venv}/bin/pip install diffusers=={diffusers} transformers accelerate peft safetensors pillow
or simply `make bench-venv`. Then pass --venv {venv} (or set DREAMBOT_BENCH_VENV)."""
DIFFUSERS_HELP = """\
The diffusers comparison needs a checkout of diffusers' examples at a pinned version, e.g.
  git clone --depth 1 --branch v0.40.0 https://github.com/huggingface/diffusers {where}
then pass --diffusers-examples {where}/examples (or set DREAMBOT_DIFFUSERS_EXAMPLES)."""

TOKEN = "sks"
CLASS_NOUN = "toy"
COMPILED = "ours-compile"
"""The extra trainer of ``--compile``: ours with the UNet copy compiled by inductor."""
TRAIN_COLUMNS = [
    "run",
    "wall s",
    "CPU s",
    "first step s",
    "s/step (after warm-up)",
    "CPU s/step",
    "steps/s",
    "peak RSS MiB",
]
PRIOR_COLUMNS = ["class priors", "images", "denoising steps", "generation s"]


Paths = dict[str, Path]
"""Named input folders shared by the runs: model, photos, class_dir (and output)."""


@dataclass
class ChildRun:
    """A finished child process: its wall time, peak RSS and its own JSON report."""

    wall_s: float
    cpu_s: float
    peak_rss_mib: float
    report: dict[str, object]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=60, help="training steps for both trainers")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of s/step")
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs of each trainer (medians are reported)"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also run ours with its UNet copy compiled by inductor, a row of its own; its runs "
        "share one inductor cache that starts empty, so the first compiles cold and the others "
        "load the compiled code from that cache",
    )
    parser.add_argument("--photos", type=int, default=5, help="synthetic subject photos")
    parser.add_argument("--class-images", type=int, default=8, help="class-prior images")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument(
        "--resolution", type=int, help="training size (default: the model's, 64 tiny, 512 SD 1.5)"
    )
    parser.add_argument(
        "--model",
        choices=["tiny", "sd15"],
        default="tiny",
        help="the base model both trainers get: the tiny model, or the SD 1.5 architecture with "
        "random weights (for --device cuda; theirs then runs with --mixed_precision bf16)",
    )
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads of each trainer (OMP_NUM_THREADS; default: torch's choice). "
        "1 gives steadier figures when other processes share the cores",
    )
    parser.add_argument(
        "--venv",
        type=Path,
        default=os.environ.get("DREAMBOT_BENCH_VENV"),
        help="virtual environment with torchvision that runs both trainers "
        "(default $DREAMBOT_BENCH_VENV; without it only ours runs, in this Python)",
    )
    parser.add_argument(
        "--diffusers-examples",
        type=Path,
        default=os.environ.get("DREAMBOT_DIFFUSERS_EXAMPLES"),
        help="diffusers' examples/ folder at a pinned version (default "
        "$DREAMBOT_DIFFUSERS_EXAMPLES); without it the comparison is skipped",
    )
    parser.add_argument(
        "--diffusers-version-label",
        default=os.environ.get("DREAMBOT_DIFFUSERS_EXAMPLES_VERSION", ""),
        help="the tag/commit of that checkout, recorded with the results",
    )
    parser.add_argument("--work-dir", type=Path, help="scratch folder (default: a temp folder)")
    parser.add_argument("--results", type=Path, default=RESULTS_FILE)
    parser.add_argument("--no-results", action="store_true", help="print only, append nothing")
    full = parser.add_argument_group(
        "full-size mode (real SD 1.5 / SDXL architecture, random weights)"
    )
    full.add_argument("--full", action="store_true")
    full.add_argument("--arch", choices=["sd15", "sdxl"], default="sd15")
    full.add_argument("--device", default="cpu", help="cpu or cuda (both modes)")
    full.add_argument("--full-steps", type=int, help="default: 2 on a CPU, 100 on a GPU")
    full.add_argument("--no-prior", action="store_true", help="full-size mode without priors")
    full.add_argument(
        "--class-generation",
        type=int,
        default=0,
        metavar="N",
        help="also time drawing N class-prior images with the engine (25 steps), as a job "
        "whose class has no cached priors does before training",
    )
    full.add_argument(
        "--cfg",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="extra TrainConfig field for the full-size run (JSON value), e.g. "
        "--cfg batch_size=2; repeatable",
    )
    return parser.parse_args(argv)


def child_environment(threads: int | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every child: offline, this checkout's packages first, ``threads``,
    and any ``extra`` variables."""
    env = dict(os.environ) | (extra or {})
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run_child(
    command: list[str],
    report: Path,
    log: Path,
    *,
    threads: int | None,
    env: dict[str, str] | None = None,
) -> ChildRun:
    """Run ``command`` to the end (``env``: extra environment variables); wall time and peak
    RSS are the kernel's for that process."""
    with log.open("w", encoding="utf-8") as output:
        started = time.perf_counter()
        process = subprocess.Popen(
            command,
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=child_environment(threads, env),
        )
        _, status, usage = os.wait4(process.pid, 0)
        wall_s = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-4000:]
        raise RuntimeError(f"{command[1]} failed ({process.returncode}); log {log}:\n{tail}")
    return ChildRun(
        wall_s=wall_s,
        cpu_s=usage.ru_utime + usage.ru_stime,
        peak_rss_mib=usage.ru_maxrss / 1024,  # Linux: KiB
        report=json.loads(report.read_text(encoding="utf-8")),
    )


def seconds_per_step(step_times: list[float], warmup: int) -> float | None:
    """Mean time per step after the first ``warmup`` steps, from end-of-step timestamps."""
    if len(step_times) <= warmup + 1:
        return None
    done = step_times[warmup:]
    return (done[-1] - done[0]) / (len(done) - 1)


def find_diffusers_script(examples: Path | None) -> Path | None:
    """The DreamBooth LoRA script inside ``examples`` (the script itself is accepted too)."""
    if examples is None:
        return None
    for candidate in (
        examples,
        examples / DIFFUSERS_SCRIPT,
        examples / "examples" / DIFFUSERS_SCRIPT,
    ):
        if candidate.is_file():
            return candidate
    return None


def prepare_inputs(work: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """Build the base model and write the subject photos; return (model, photo folder)."""
    from engine.tiny import build_tiny_model

    model = build_tiny_model(work / "tiny-model", seed=args.seed)
    if args.model == "sd15":
        from bench.full_size import save_random

        model = save_random("sd15", model / "tokenizer", work / "sd15-random", device=args.device)
    photos = work / "instance"
    save_photos(subject_photos(args.photos, args.resolution * 3 // 2, seed=args.seed), photos, "me")
    return model, photos


def ours_command(
    python: str,
    args: argparse.Namespace,
    work: Path,
    *,
    compile: bool = False,
    trainings: int = 1,
    **paths: Path,
) -> list[str]:
    """The command line of one ``bench/train_ours.py`` run (``compile``: with inductor;
    ``trainings``: that many in the process, the last one timed)."""
    return [
        python,
        str(BENCH / "train_ours.py"),
        "--model", str(paths["model"]),
        "--instance-dir", str(paths["photos"]),
        "--class-dir", str(paths["class_dir"]),
        "--output", str(work / (COMPILED if compile else "ours") / "adapter.safetensors"),
        "--report", str(paths["report"]),
        "--token", TOKEN,
        "--class-noun", CLASS_NOUN,
        "--class-images", str(args.class_images),
        "--steps", str(args.steps),
        "--rank", str(args.rank),
        "--resolution", str(args.resolution),
        "--learning-rate", str(args.learning_rate),
        "--seed", str(args.seed),
        "--device", args.device,
        "--trainings", str(trainings),
        *(["--compile"] if compile else []),
    ]  # fmt: skip


def diffusers_command(
    python: str, script: Path, args: argparse.Namespace, steps: int, **paths: Path
) -> list[str]:
    """The command line of diffusers' script with our settings (through the timing shim)."""
    from engine.training import class_prompt, instance_prompt

    return [
        python,
        str(BENCH / "train_diffusers.py"),
        "--script", str(script),
        "--report", str(paths["report"]),
        "--",
        "--pretrained_model_name_or_path", str(paths["model"]),
        "--instance_data_dir", str(paths["photos"]),
        "--class_data_dir", str(paths["class_dir"]),
        "--with_prior_preservation",
        "--prior_loss_weight", "1.0",
        "--num_class_images", str(args.class_images),
        "--instance_prompt", instance_prompt(TOKEN, CLASS_NOUN),
        "--class_prompt", class_prompt(CLASS_NOUN),
        "--resolution", str(args.resolution),
        "--center_crop",  # ours crops the centre too; its default is a random crop
        "--train_batch_size", "1",
        "--max_train_steps", str(steps),
        "--checkpointing_steps", str(steps + 1),  # ours writes no checkpoint either
        "--rank", str(args.rank),
        "--learning_rate", str(args.learning_rate),
        "--lr_scheduler", "constant",
        "--lr_warmup_steps", "0",
        "--seed", str(args.seed),
        # fp32 on the CPU as ours; on a GPU bf16 autocast with fp32 LoRA weights, as ours.
        "--mixed_precision", "bf16" if args.device.startswith("cuda") else "no",
        "--report_to", "all",  # "all" = every installed tracker: none in the bench venv
        "--output_dir", str(paths["output"]),
    ]  # fmt: skip


def bar_times(report: dict[str, object], desc: str, clock: str = "times") -> list[float]:
    """Timestamps of the script's progress bar named ``desc`` (creation first); ``clock`` is
    ``times`` (wall) or ``cpu_times``."""
    for bar in report["bars"]:  # type: ignore[union-attr]
        if bar["desc"] == desc:
            return list(bar[clock])
    raise RuntimeError(f"diffusers' script opened no {desc!r} progress bar")


def training_row(
    name: str,
    runs: list[ChildRun],
    step_times: list[list[float]],
    step_cpu_times: list[list[float]],
    first_steps: list[float],
    warmup: int,
) -> Row:
    """One table row for a trainer: medians over its repeated runs."""
    per_step = _median([seconds_per_step(times, warmup) for times in step_times])
    cpu_per_step = _median([seconds_per_step(times, warmup) for times in step_cpu_times])
    return {
        "run": name,
        "wall s": _median([run.wall_s for run in runs]),
        "CPU s": _median([run.cpu_s for run in runs]),
        "first step s": _median(list(first_steps)),
        "s/step (after warm-up)": per_step,
        "CPU s/step": cpu_per_step,
        "steps/s": 1 / per_step if per_step else None,
        "peak RSS MiB": _median([run.peak_rss_mib for run in runs]),
    }


def ours_row(name: str, runs: list[ChildRun], warmup: int) -> Row:
    """The table row of ``bench/train_ours.py`` runs (their first step counts from the call of
    ``train_lora``: latents and prompts cached, LoRA added, the UNet compiled if asked)."""
    return training_row(
        name,
        runs,
        [run.report["step_times"] for run in runs],  # type: ignore[misc]
        [run.report["step_cpu_times"] for run in runs],  # type: ignore[misc]
        [run.report["step_times"][0] for run in runs],  # type: ignore[index]
        warmup,
    )


def ratio_row(ours: Row, theirs: Row, name: str = "ratio ours/theirs") -> Row:
    """ours/theirs for every numeric column."""
    row: Row = {"run": name}
    for column in TRAIN_COLUMNS[1:]:
        a, b = ours[column], theirs[column]
        row[column] = f"{a / b:.2f}" if a and b else None  # type: ignore[operator]
    return row


def compiled_rows(
    runs: list[ChildRun], again: ChildRun, theirs: Row | None, warmup: int
) -> list[Row]:
    """The rows of ``--compile``: ours compiled, its ratio to theirs, and the second of two
    trainings in one process (``again``)."""
    compiled = ours_row("ours + torch.compile (inductor)", runs, warmup)
    rows = [compiled]
    if theirs is not None:
        rows.append(ratio_row(compiled, theirs, "ratio ours + compile/theirs"))
    # That process ran two trainings: its wall time, CPU time and RSS are not one run's.
    second = ours_row("ours + compile, 2nd training in one process", [again], warmup)
    return [*rows, second | {"wall s": None, "CPU s": None, "peak RSS MiB": None}]


def last_compiling_step(step_graphs: list[int]) -> int:
    """The last step (1-based) during which Dynamo compiled a graph; 0 when none."""
    pairs = itertools.pairwise([0, *step_graphs])
    return max((step for step, (a, b) in enumerate(pairs, start=1) if b > a), default=0)


def compile_notes(runs: list[ChildRun], again: ChildRun, warmup: int) -> list[str]:
    """What the compiled runs' warm-up cost, run by run, whether any compilation fell after
    the warm-up (it would then be inside s/step), and what a second training compiled."""
    firsts = ", ".join(f"{run.report['step_times'][0]:.1f}" for run in runs)  # type: ignore[index]
    walls = ", ".join(f"{run.wall_s:.1f}" for run in runs)
    last = [last_compiling_step(run.report["step_graphs"]) for run in runs]  # type: ignore[arg-type]
    graphs = [run.report["step_graphs"][-1] for run in runs]  # type: ignore[index]
    notes = [
        f"ours + compile, run by run: first step {firsts} s, wall {walls} s; the first run "
        "started with an empty inductor cache (cold compile), the others loaded the compiled "
        "code from it (a restarted engine on the same host). The row '2nd training in one "
        "process' times the second of two trainings in one process (the engine's case once "
        f"it has trained a subject), which compiled {again.report['step_graphs'][-1]} "  # type: ignore[index]
        "graph(s).",
        f"ours + compile: Dynamo compiled {graphs} graph(s) per run, the last during step "
        f"{last}; s/step leaves out the first {warmup} steps"
        + (", so no compilation is inside it." if max(last) <= warmup else "."),
    ]
    if max(last) > warmup:
        notes.append(
            f"WARNING: a compilation fell after the {warmup}-step warm-up: ours + compile's "
            "s/step includes it (raise --warmup)."
        )
    return notes


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def draw_class_priors(python: str, args: argparse.Namespace, work: Path, paths: Paths) -> Row:
    """The engine's cached class-prior phase, once: its images then feed both trainers."""
    print(f"class priors: {args.class_images} images with generate_class_images …", flush=True)
    report = work / "priors.json"
    command = [*ours_command(python, args, work, report=report, **paths), "--only-class-images"]
    run = run_child(command, report, work / "logs" / "priors.log", threads=args.threads)
    return {
        "class priors": "ours: engine.training.generate_class_images (DPM-Solver++)",
        "images": args.class_images,
        "denoising steps": 25,
        "generation s": run.report["phases"]["class_images_s"],  # type: ignore[index]
    }


def their_class_priors(
    python: str, script: Path, args: argparse.Namespace, work: Path, paths: Paths
) -> Row:
    """diffusers' script drawing its own class images, timed by its progress bar (0 steps)."""
    print("diffusers' script drawing its own class images (0 training steps) …", flush=True)
    report = work / "gen.json"
    own = dict(paths, class_dir=work / "class-images-theirs", output=work / "gen")
    command = diffusers_command(python, script, args, 0, report=report, **own)
    run = run_child(
        command, report, work / "logs" / "theirs-class-images.log", threads=args.threads
    )
    times = bar_times(run.report, "Generating class images")
    return {
        "class priors": "diffusers script (its DiffusionPipeline defaults: PNDM)",
        "images": args.class_images,
        "denoising steps": 50,
        "generation s": times[-1] - times[0],
    }


def compare_trainers(args: argparse.Namespace, work: Path) -> None:
    """The default mode: class priors once, then ours and diffusers' script, one table."""
    python = str(args.venv / "bin" / "python") if args.venv else sys.executable
    script = find_diffusers_script(args.diffusers_examples)
    skipped = []
    if args.venv is None or not Path(python).exists():
        venv = args.venv or "../bench-venv"
        skipped.append(BENCH_VENV_HELP.format(venv=venv, diffusers=_diffusers()))
        python = sys.executable
    if script is None:
        skipped.append(DIFFUSERS_HELP.format(where="../diffusers"))
    compare = not skipped
    model, photos = prepare_inputs(work, args)
    (work / "logs").mkdir()
    paths: Paths = dict(model=model, photos=photos, class_dir=work / "class-images")
    load_before = os.getloadavg()
    prior_rows = [draw_class_priors(python, args, work, paths)]

    trainers = ["theirs", "ours"] if compare else ["ours"]
    if args.compile:
        trainers.append(COMPILED)
    runs: dict[str, list[ChildRun]] = {who: [] for who in trainers}
    # The compiled runs share one inductor cache that starts empty: the first compiles cold,
    # the others load the compiled code from it, as an engine restarted on this host would.
    compile_env = {"TORCHINDUCTOR_CACHE_DIR": str(work / "inductor-cache")}
    for repeat in range(args.repeats):
        # Alternate the order, so a neighbour's load hits every trainer alike.
        order = trainers if repeat % 2 == 0 else trainers[::-1]
        for who in order:
            print(f"{who}: {args.steps} steps (run {repeat + 1}/{args.repeats}) …", flush=True)
            report = work / f"{who}-{repeat}.json"
            log = work / "logs" / f"{who}-{repeat}.log"
            if who == "theirs":
                output = work / f"theirs-{repeat}"
                command = diffusers_command(
                    python, script, args, args.steps, report=report, output=output, **paths
                )
                runs[who].append(run_child(command, report, log, threads=args.threads))
            else:
                compiled = who == COMPILED
                command = ours_command(python, args, work, compile=compiled, report=report, **paths)
                env = compile_env if compiled else None
                runs[who].append(run_child(command, report, log, threads=args.threads, env=env))
    again = None
    if args.compile:
        print(f"{COMPILED}: a second training in the same process …", flush=True)
        report = work / f"{COMPILED}-again.json"
        command = ours_command(
            python, args, work, compile=True, trainings=2, report=report, **paths
        )
        log = work / "logs" / f"{COMPILED}-again.log"
        again = run_child(command, report, log, threads=args.threads, env=compile_env)
    if compare:
        prior_rows.append(their_class_priors(python, script, args, work, paths))
    load_after = os.getloadavg()

    plain_row = ours_row("ours: engine.training.train_lora", runs["ours"], args.warmup)
    rows = [plain_row]
    theirs_row = None
    if compare:
        theirs_row = training_row(
            f"diffusers {DIFFUSERS_SCRIPT.name}",
            runs["theirs"],
            [bar_times(run.report, "Steps")[1:] for run in runs["theirs"]],
            [bar_times(run.report, "Steps", "cpu_times")[1:] for run in runs["theirs"]],
            [_first_step(bar_times(run.report, "Steps")) for run in runs["theirs"]],
            args.warmup,
        )
        rows += [theirs_row, ratio_row(plain_row, theirs_row)]
    if again is not None:
        rows += compiled_rows(runs[COMPILED], again, theirs_row, args.warmup)

    versions = runs["ours"][0].report["versions"]
    model_label = (
        "SD 1.5 architecture, random weights"
        if args.model == "sd15"
        else "tiny SD 1.x-shaped (engine.tiny)"
    )
    on_gpu = args.device.startswith("cuda")
    precision = "bf16 weights, fp32 LoRA (autocast)" if on_gpu else "fp32"
    context = [
        f"device: {describe_device(args.device)}; 1-min load average {load_before[0]:.1f} "
        f"before, {load_after[0]:.1f} after",
        "versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),  # type: ignore[union-attr]
        f"model: {model_label}, {args.resolution} px, {precision}, batch 1 photo + 1 class image",
        f"settings: {args.steps} steps, rank {args.rank}, lr {args.learning_rate}, "
        f"{args.photos} photos, {args.class_images} class images, prior weight 1.0, "
        f"seed {args.seed}, torch threads {args.threads or 'default'}; "
        f"medians of {args.repeats} run(s) each, alternating order; "
        f"s/step leaves out the first {args.warmup} steps",
    ]
    if compare:
        label = args.diffusers_version_label or "unlabelled checkout"
        context.append(f"reference: {script.name} at diffusers {label}, run unchanged")
    notes = [
        "wall s / CPU s: the whole process, interpreter start to exit (imports, load, latents, "
        "steps, save); CPU s is user + system time from the kernel.",
        "diffusers' script runs the VAE and the text encoder at every step; ours encodes the "
        "photos, class images and prompts once.",
        "theirs' wall time also holds its closing reload of the pipeline with the new LoRA "
        "(it generates nothing without --validation_prompt).",
        "first step s: ours from the call of train_lora (latents and prompts cached, LoRA "
        "added, the UNet compiled if asked) to the first step's end; theirs its first step.",
    ]
    if again is not None:
        notes += compile_notes(runs[COMPILED], again, args.warmup)
    print()
    print(format_table(TRAIN_COLUMNS, rows))
    print()
    print(format_table(PRIOR_COLUMNS, prior_rows))
    for note in skipped:
        print("\nSKIPPED the diffusers comparison.\n" + note)
    if not args.no_results:
        title = f"train, {model_label} — {today()}"
        append_results(title, context, TRAIN_COLUMNS, rows, notes, args.results)
        title = f"class priors, {model_label} — {today()}"
        append_results(title, context[:3], PRIOR_COLUMNS, prior_rows, path=args.results)
        print(f"\nappended to {args.results}")


def _first_step(times: list[float]) -> float:
    """The first step's seconds from a progress bar's timestamps (its creation first)."""
    return times[1] - times[0]


def _diffusers() -> str:
    return library_versions()["diffusers"]


def config_overrides(pairs: list[str]) -> dict[str, object]:
    """``FIELD=VALUE`` pairs for TrainConfig; values are JSON (``true``, ``2``) or plain text."""
    from engine.training import TrainConfig

    known = {f.name for f in dataclasses.fields(TrainConfig)}
    overrides: dict[str, object] = {}
    for pair in pairs:
        name, _, raw = pair.partition("=")
        if name not in known:
            raise SystemExit(
                f"--cfg {name}: TrainConfig has no such field ({', '.join(sorted(known))})"
            )
        try:
            overrides[name] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[name] = raw
    return overrides


def full_size_run(args: argparse.Namespace, work: Path) -> None:
    """SD 1.5 (512 px) or SDXL (1024 px), random weights: our trainer's time per step, memory."""
    import torch

    from bench.full_size import NAMES, RESOLUTIONS, build_random
    from engine.models import default_dtype, resolve_device
    from engine.tiny import build_tiny_model
    from engine.training import TrainConfig, generate_class_images, train_lora

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = default_dtype(device)
    on_gpu = device.startswith("cuda")
    steps = args.full_steps or (100 if on_gpu else 2)
    warmup = min(args.warmup, max(steps - 2, 0))
    resolution, name = RESOLUTIONS[args.arch], NAMES[args.arch]
    tokenizer = build_tiny_model(work / "tiny-model") / "tokenizer"
    began = time.perf_counter()
    pipe = build_random(args.arch, tokenizer, device=device, dtype=dtype, seed=args.seed)
    build_s = time.perf_counter() - began
    photos = subject_photos(args.photos, resolution * 5 // 4, seed=args.seed)
    overrides = config_overrides(args.cfg)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    class_s = None
    if args.class_generation and not args.no_prior:
        print(f"drawing {args.class_generation} class images …", flush=True)
        began = time.perf_counter()
        generate_class_images(pipe, CLASS_NOUN, args.class_generation, resolution, seed=0)
        if on_gpu:
            torch.cuda.synchronize()
        class_s = time.perf_counter() - began
    # Priors' content does not change the cost of a step: other synthetic pictures stand in.
    priors = [] if args.no_prior else subject_photos(args.class_images, resolution, seed=99)
    cfg = TrainConfig(
        steps=steps,
        rank=args.rank,
        alpha=args.rank,
        learning_rate=args.learning_rate,
        prior_loss_weight=0.0 if args.no_prior else 1.0,
        class_images=len(priors),
        resolution=resolution,
        seed=args.seed,
        **overrides,
    )
    step_times: list[float] = []

    def progress(step: int, total: int, loss: float) -> None:
        step_times.append(time.perf_counter() - began)
        if step % 100 == 0 or step == total:  # a run killed at its time limit still says this
            print(f"  step {step}/{total}: {step_times[-1]:.1f} s", flush=True)

    print(f"full-size {name}, {resolution} px, {steps} steps on {device} …", flush=True)
    began = time.perf_counter()
    train_lora(pipe, photos, priors, TOKEN, CLASS_NOUN, cfg, progress=progress)
    if on_gpu:
        torch.cuda.synchronize()
    train_s = time.perf_counter() - began
    per_step = seconds_per_step(step_times, warmup)
    if per_step is None:  # too few steps to leave any out: the mean over all of them
        per_step = step_times[-1] / len(step_times)
        warmup = 0
    memory = torch.cuda.max_memory_allocated() / 2**20 if on_gpu else peak_rss_mib()
    extras = ", ".join(f"{k}={v}" for k, v in overrides.items())
    columns = [
        "run", "steps", "train_lora s", "s/step", "steps/s", "class images s", "peak memory MiB"
    ]  # fmt: skip
    row = {
        "run": f"{name} random weights, {resolution} px, "
        + ("no priors" if args.no_prior else "prior preservation")
        + (f", {extras}" if extras else ""),
        "steps": steps,
        "train_lora s": train_s,
        "s/step": per_step,
        "steps/s": 1 / per_step,
        "class images s": "–" if class_s is None else f"{class_s:.1f} ({args.class_generation})",
        "peak memory MiB": memory,
    }
    context = [
        f"device: {describe_device(device)}, dtype {str(dtype).removeprefix('torch.')}, "
        f"torch threads {torch.get_num_threads()}",
        "versions: " + ", ".join(f"{k} {v}" for k, v in library_versions().items()),
        f"settings: {dataclasses.asdict(cfg)}",
        f"s/step leaves out the first {warmup} steps; model built in {build_s:.1f} s (not "
        "counted); train_lora s: caching latents and prompts, all steps, the adapter's "
        "weights copied out",
        "class images s: the engine drawing that many class-prior images (25 DPM-Solver++ "
        "steps, batches of 4), timed apart; the training itself uses synthetic priors",
        "peak memory: " + ("torch.cuda.max_memory_allocated" if on_gpu
                           else "peak RSS of the whole process, model build included"),
    ]  # fmt: skip
    print()
    print(format_table(columns, [row]))
    if not args.no_results:
        append_results(
            f"train, full-size {name} — {today()}", context, columns, [row], path=args.results
        )
        print(f"\nappended to {args.results}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.resolution is None:
        args.resolution = 512 if args.model == "sd15" else 64
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="dreambot-bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.full:
            full_size_run(args, work)
        else:
            compare_trainers(args, work)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
