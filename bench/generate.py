"""Generation benchmark: latency, throughput and subject switching of ``engine.generation``.

On the tiny offline model (default, CPU) or the real SD 1.5 architecture with random weights
(``--full``, meant for ``--device cuda``). Two subjects are trained briefly with the engine's
trainer, then one warm :class:`engine.generation.Generator` is measured:

- first-image latency right after loading, one warm image, a batch of four (images/s);
- the first use of a subject (its adapter file is read); the switch between two cached
  subjects, as the difference between the medians of 1-step images alternating A↔B and
  repeating A (1-step images keep the switch from drowning in the noise of full generations);
- a full pipeline reload + generation, what a server without adapter switching pays;
- the safety checker (``engine.safety``) on a batch of four: the tiny model's own, or with
  ``--full`` the real checker's architecture with random weights;
- the reference path: a plain diffusers pipeline doing ``load_lora_weights`` → generate →
  ``unload_lora_weights`` for every request.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's engine/bench

from bench.machine import describe_device, library_versions, peak_rss_mib, today
from bench.photos import subject_photos
from bench.results import RESULTS_FILE, Row, append_results, format_table

COLUMNS = ["measure", "value", "unit", "CPU s", "÷ one generation"]
SAME_SUBJECT = "one image, same subject again"
"""The row every time is divided by: one warm generation with a subject."""
SWITCH_COST = "switch cost (difference of the two above)"
SUBJECTS = (("subject-a", "sks"), ("subject-b", "zwx"))
"""(adapter name, token) of the two benchmark subjects."""
PROMPT = "a photo of {token} toy on the beach"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--steps", type=int, help="denoising steps (default 25; 2 for --full on CPU)"
    )
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--repeats", type=int, default=5, help="runs per median")
    parser.add_argument(
        "--train-steps",
        type=int,
        help="training steps per subject (default 10; 1 for --full on CPU)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: torch's choice); 1 gives steadier figures when other "
        "processes share the cores",
    )
    parser.add_argument(
        "--full", action="store_true", help="a real architecture (--arch), random weights"
    )
    parser.add_argument("--arch", choices=["sd15", "sdxl"], default="sd15", help="with --full")
    parser.add_argument(
        "--hotswap",
        action="store_true",
        help="the Generator's hot-swap mode (fixed adapter slots whose weights are replaced)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the UNet (implies --hotswap; GPU); the first image with a subject "
        "pays the compilation",
    )
    parser.add_argument(
        "--no-reference", action="store_true", help="skip the plain diffusers load/unload path"
    )
    parser.add_argument("--work-dir", type=Path, help="scratch folder (default: a temp folder)")
    parser.add_argument("--results", type=Path, default=RESULTS_FILE)
    parser.add_argument("--no-results", action="store_true", help="print only, append nothing")
    return parser.parse_args(argv)


class Timing(NamedTuple):
    """How long something took: wall-clock seconds and this process's CPU seconds."""

    wall: float
    cpu: float


def timed(action: Callable[[], object]) -> Timing:
    """Time ``action()``, with the GPU's queued work included."""
    import torch

    wall, cpu = time.perf_counter(), time.process_time()
    action()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return Timing(time.perf_counter() - wall, time.process_time() - cpu)


def median_time(actions: Sequence[Callable[[], object]], runs: int) -> Timing:
    """Medians of ``runs`` timings, cycling through ``actions`` (one, or several to alternate)."""
    timings = [timed(actions[i % len(actions)]) for i in range(runs)]
    return Timing(
        statistics.median(t.wall for t in timings), statistics.median(t.cpu for t in timings)
    )


def interleaved_medians(actions: Sequence[Callable[[], object]], runs: int) -> list[Timing]:
    """Median timing of each action, measured in turns (A B C A B C …) so that drift in the
    machine's speed falls on all alike. Each timed run follows an untimed one of the same
    action, which settles any per-request state (a switch of adapters) out of the timing."""
    timings: list[list[Timing]] = [[] for _ in actions]
    for _ in range(runs):
        for action, times in zip(actions, timings, strict=True):
            action()
            times.append(timed(action))
    return [
        Timing(statistics.median(t.wall for t in times), statistics.median(t.cpu for t in times))
        for times in timings
    ]


def row(measure: str, timing: Timing) -> Row:
    """A table row for a time: wall seconds, with CPU seconds beside them."""
    return {"measure": measure, "value": timing.wall, "unit": "s", "CPU s": timing.cpu}


def build_model(work: Path, args: argparse.Namespace) -> Path:
    """The base model folder: the tiny model, or a saved random ``--arch`` (``--full``)."""
    from engine.tiny import build_tiny_model

    tiny = build_tiny_model(work / "tiny-model")
    if not args.full:
        return tiny
    from bench.full_size import save_random

    return save_random(
        args.arch, tiny / "tokenizer", work / f"{args.arch}-random", device=args.device
    )


def safety_checker_folder(work: Path, model: Path, args: argparse.Namespace) -> Path:
    """The model folder's own safety checker (the tiny model's), else the real checker's
    architecture with random weights (``--full``: the random base models are saved without
    one, so the reference pipeline runs none)."""
    from engine.safety import has_checker

    if has_checker(model):
        return model
    from bench.full_size import save_random_safety_checker

    return save_random_safety_checker(work / "safety-checker", device=args.device)


def train_subjects(pipe: object, work: Path, steps: int) -> list[tuple[str, Path]]:
    """Train each benchmark subject briefly (no priors) and save its adapter file."""
    from engine.training import TrainConfig, native_resolution, save_adapter, train_lora

    size = native_resolution(pipe)  # type: ignore[arg-type]
    adapters = []
    for seed, (name, token) in enumerate(SUBJECTS):
        cfg = TrainConfig(steps=steps, prior_loss_weight=0.0, class_images=0, seed=seed)
        photos = subject_photos(4, size, seed=seed)
        outcome = train_lora(pipe, photos, [], token, "toy", cfg)  # type: ignore[arg-type]
        path = work / "adapters" / f"{name}.safetensors"
        save_adapter(outcome.state_dict, path, {"token": token}, lora_config=outcome.lora_config)
        adapters.append((name, path))
    return adapters


def measure_generator(
    model: Path, adapters: list[tuple[str, Path]], checker: Path, args: argparse.Namespace
) -> tuple[list[Row], Timing]:
    """The engine's warm Generator: load, latency, throughput, subject switching, reload; the
    safety checker in ``checker`` on a batch of its images."""
    from engine.generation import Generator
    from engine.models import default_dtype, load_pipeline
    from engine.safety import load_safety_checker

    (a_name, a_path), (b_name, b_path) = adapters
    tokens = dict(SUBJECTS)
    options = dict(guidance=args.guidance, seed=1)

    def request(
        count: int = 1, subject: tuple[str, Path] | None = None, steps: int = args.steps
    ) -> Callable[[], object]:
        if subject is None:
            prompt, adapters_ = PROMPT.format(token="a"), []
        else:
            name, path = subject
            prompt, adapters_ = PROMPT.format(token=tokens[name]), [(name, path, 1.0)]
        return lambda: generator.generate(
            prompt, count=count, adapters=adapters_, steps=steps, **options
        )

    def new_generator(fuse: bool = True) -> Generator:
        pipe = load_pipeline(model, device=args.device)
        return Generator(
            pipe, hotswap=args.hotswap or args.compile, compile=args.compile, fuse=fuse
        )

    generator: Generator
    started = time.perf_counter(), time.process_time()
    generator = new_generator()
    load = Timing(time.perf_counter() - started[0], time.process_time() - started[1])
    first = timed(request())
    batch = median_time([request(count=4)], args.repeats)
    safety = load_safety_checker(checker, device=args.device, dtype=default_dtype(args.device))
    images = request(count=4)()
    assert isinstance(images, list)
    safety.flagged(images)  # warm-up
    check = median_time([lambda: safety.flagged(images)], args.repeats)

    first_a = timed(request(subject=(a_name, a_path)))  # reads A's file (and compiles)
    first_b = timed(request(subject=(b_name, b_path)))  # reads B's file
    unfused: Timing | None = None
    if args.hotswap or args.compile:
        one, same = interleaved_medians(
            [request(), request(subject=(a_name, a_path))], args.repeats
        )
    else:
        # Beside them, the same image with the adapter run beside the base layers, unmerged
        # (peft's way), from a Generator of its own on a pipeline of its own.
        plain = new_generator(fuse=False)

        def unmerged() -> object:
            nonlocal generator
            fused, generator = generator, plain
            try:
                return request(subject=(a_name, a_path))()
            finally:
                generator = fused

        one, same, unfused = interleaved_medians(
            [request(), request(subject=(a_name, a_path)), unmerged], args.repeats
        )
    # The switch is a small part of a generation: measured on 1-step images, many times, so
    # the difference of two medians is not lost in the noise of full generations.
    same_1 = median_time([request(subject=(a_name, a_path), steps=1)], 6 * args.repeats)
    switching_1 = median_time(
        [request(subject=(b_name, b_path), steps=1), request(subject=(a_name, a_path), steps=1)],
        6 * args.repeats,
    )
    switch = Timing(switching_1.wall - same_1.wall, switching_1.cpu - same_1.cpu)

    def reload_and_generate() -> None:
        nonlocal generator
        generator = new_generator()
        request(subject=(b_name, b_path))()

    rows = [
        row("load (load_pipeline + Generator)", load),
        row("first image after load", first),
        row("one image, warm (no subject)", one),
        row("batch of 4", batch),
        {"measure": "throughput, batches of 4", "value": 4 / batch.wall, "unit": "images/s"},
        row("safety check of that batch (engine.safety, one call)", check),
        row(SAME_SUBJECT, same),
        *(
            [row("the same, adapter not merged (Generator fuse=False)", unfused)]
            if unfused is not None
            else []
        ),
        row(
            "first use of subject A (first adapter loaded"
            + (", UNet compiled)" if args.compile else ")"),
            first_a,
        ),
        row("first use of subject B (reads its file)", first_b),
        row("1-step image, same subject again", same_1),
        row("1-step image, switching subject A↔B", switching_1),
        row(SWITCH_COST, switch),
    ]
    if not args.compile:  # a reload would compile again: minutes, not a serving cost
        reload = median_time([reload_and_generate], max(2, args.repeats // 2))
        rows.append(row("full reload + one image with subject B", reload))
    return rows, same_1


def measure_reference(
    model: Path, adapters: list[tuple[str, Path]], args: argparse.Namespace, ours_same_1: Timing
) -> list[Row]:
    """Plain diffusers: load_lora_weights → generate → unload_lora_weights, per request."""
    import torch
    from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler

    from engine.models import default_dtype
    from engine.safety import has_checker

    # No safety check, like the Generator's rows (the tiny model's folder ships a checker).
    unchecked = {"safety_checker": None, "feature_extractor": None} if has_checker(model) else {}
    pipe = DiffusionPipeline.from_pretrained(  # StableDiffusion(XL)Pipeline, as saved
        model, dtype=default_dtype(args.device), local_files_only=True, **unchecked
    ).to(args.device)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    tokens = dict(SUBJECTS)

    def serve(name: str, path: Path, steps: int = args.steps) -> None:
        pipe.load_lora_weights(str(path.parent), weight_name=path.name)
        pipe(
            PROMPT.format(token=tokens[name]),
            num_inference_steps=steps,
            guidance_scale=args.guidance,
            generator=torch.Generator(args.device).manual_seed(1),
        )
        pipe.unload_lora_weights()

    serve(*adapters[0])  # warm-up, as the Generator had its first image
    serving = [lambda: serve(*adapters[0]), lambda: serve(*adapters[1])]
    full = median_time(serving, 2 * args.repeats)
    serving_1 = [lambda: serve(*adapters[0], steps=1), lambda: serve(*adapters[1], steps=1)]
    one_step = median_time(serving_1, 6 * args.repeats)
    overhead = Timing(one_step.wall - ours_same_1.wall, one_step.cpu - ours_same_1.cpu)
    return [
        row("reference: load_lora_weights + image + unload_lora_weights", full),
        row("reference: the same with a 1-step image", one_step),
        row("reference: per-request adapter cost (vs our 1-step same subject)", overhead),
    ]


def add_ratios(rows: list[Row]) -> None:
    """Fill the last column: each time in units of one warm same-subject generation."""
    one = next(r["value"] for r in rows if r["measure"] == SAME_SUBJECT)
    for row_ in rows:
        if row_["unit"] == "s" and not str(row_["measure"]).startswith("load"):
            row_["÷ one generation"] = f"{row_['value'] / one:.3f}"  # type: ignore[operator]


def main(argv: list[str] | None = None) -> None:
    import diffusers
    import torch

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # load_lora_weights notes on every load that the adapters have no text-encoder part.
    diffusers.utils.logging.set_verbosity_error()
    if args.steps is None:
        args.steps = 2 if args.full and args.device == "cpu" else 25
    if args.train_steps is None:
        args.train_steps = 1 if args.full and args.device == "cpu" else 10
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="dreambot-bench-generate-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        from engine.models import load_pipeline
        from engine.training import native_resolution

        model = build_model(work, args)
        checker = safety_checker_folder(work, model, args)
        trainer_pipe = load_pipeline(model, device=args.device)
        adapters = train_subjects(trainer_pipe, work, args.train_steps)
        size = native_resolution(trainer_pipe)
        del trainer_pipe
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        rows, same_1 = measure_generator(model, adapters, checker, args)
        if not (args.no_reference or args.compile):
            rows += measure_reference(model, adapters, args, same_1)
        add_ratios(rows)
        rows.append({"measure": "peak RSS of this process", "value": peak_rss_mib(), "unit": "MiB"})
        if torch.cuda.is_available() and args.device.startswith("cuda"):
            rows.append(
                {
                    "measure": "peak GPU memory while generating",
                    "value": torch.cuda.max_memory_allocated() / 2**20,
                    "unit": "MiB",
                }
            )
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)

    from bench.full_size import NAMES

    model_name = (
        f"{NAMES[args.arch]} architecture, random weights" if args.full else "tiny SD 1.x-shaped"
    )
    mode = ", UNet torch.compile'd (hot-swap)" if args.compile else ""
    mode = mode or (", hot-swap slots" if args.hotswap else "")
    context = [
        f"device: {describe_device(args.device)}; 1-min load average {os.getloadavg()[0]:.1f} "
        "at the end",
        "versions: " + ", ".join(f"{k} {v}" for k, v in library_versions().items()),
        f"model: {model_name}, {size} px; {args.steps} DPM-Solver++ steps, guidance "
        f"{args.guidance}, 1 image unless said; torch threads {torch.get_num_threads()}; "
        f"medians of {args.repeats} runs, of {6 * args.repeats} for 1-step images; "
        f"subjects trained {args.train_steps} steps{mode}",
        "safety check: "
        + (
            "the real checker's architecture (CLIP ViT-L/14 vision, 224 px), random weights"
            if args.full
            else "the tiny model's checker (2-layer CLIP vision, 32 px)"
        ),
        "switch cost: median of 1-step images alternating between two cached subjects minus "
        "the median of 1-step images repeating one subject",
    ]
    print()
    print(format_table(COLUMNS, rows))
    if not args.no_results:
        append_results(
            f"generate, {model_name} — {today()}", context, COLUMNS, rows, path=args.results
        )
        print(f"\nappended to {args.results}")


if __name__ == "__main__":
    main()
