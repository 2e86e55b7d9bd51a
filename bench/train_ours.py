"""One run of our trainer, as a child process of ``bench/train.py``.

It does what the engine does for one subject: load the base model, (optionally) draw the class
priors with ``generate_class_images``, train with ``train_lora``, write the adapter with
``save_adapter``. Phase times and per-step timestamps go to a JSON file for the parent.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's engine/bench

from bench.machine import library_versions, peak_rss_mib
from bench.photos import load_photos, save_photos


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--instance-dir", type=Path, required=True)
    parser.add_argument("--class-dir", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True, help="adapter .safetensors path")
    parser.add_argument("--report", type=Path, required=True, help="JSON timings for the parent")
    parser.add_argument("--token", default="sks")
    parser.add_argument("--class-noun", default="toy")
    parser.add_argument("--class-images", type=int, default=8)
    parser.add_argument(
        "--only-class-images",
        action="store_true",
        help="only draw the class priors into --class-dir (the engine's cached phase), no training",
    )
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--prior-loss-weight", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="compile the trainable UNet copy with inductor (TrainConfig.compile_backend)",
    )
    parser.add_argument(
        "--trainings",
        type=int,
        default=1,
        help="train the subject this many times in this process, as an engine trains one "
        "subject after another; the step times are the last training's",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from torch._dynamo.utils import counters

    from engine.models import load_pipeline
    from engine.training import TrainConfig, generate_class_images, save_adapter, train_lora

    phases: dict[str, float] = {}
    started = time.perf_counter()
    pipe = load_pipeline(args.model, device=args.device)
    phases["load_s"] = time.perf_counter() - started
    step_times: list[float] = []  # wall seconds since training began, at each step's end
    step_cpu_times: list[float] = []  # this process's CPU seconds at each step's end
    step_graphs: list[int] = []  # graphs compiled by each step's end

    if args.only_class_images:
        began = time.perf_counter()
        class_images = generate_class_images(
            pipe, args.class_noun, args.class_images, args.resolution, seed=args.seed
        )
        phases["class_images_s"] = time.perf_counter() - began
        save_photos(class_images, args.class_dir, "class")
    else:
        instance_images = load_photos(args.instance_dir)
        class_images = load_photos(args.class_dir)[: args.class_images]
        cfg = TrainConfig(
            steps=args.steps,
            learning_rate=args.learning_rate,
            rank=args.rank,
            alpha=args.rank,
            prior_loss_weight=args.prior_loss_weight,
            class_images=len(class_images),
            resolution=args.resolution,
            seed=args.seed,
            compile_backend="inductor" if args.compile else None,
        )

        def on_step(step: int, total: int, loss: float) -> None:
            step_times.append(time.perf_counter() - began)
            step_cpu_times.append(time.process_time())
            # Graphs Dynamo has compiled so far: shows in which steps compilation happened.
            step_graphs.append(counters["stats"]["unique_graphs"])

        for _ in range(args.trainings):
            for record in (step_times, step_cpu_times, step_graphs):
                record.clear()
            counters.clear()  # count the graphs this training compiles
            began = time.perf_counter()
            outcome = train_lora(
                pipe,
                instance_images,
                class_images,
                args.token,
                args.class_noun,
                cfg,
                progress=on_step,
            )
            phases["train_s"] = time.perf_counter() - began
        began = time.perf_counter()
        save_adapter(
            outcome.state_dict,
            args.output,
            {"token": args.token, "class_noun": args.class_noun},
            lora_config=outcome.lora_config,
        )
        phases["save_s"] = time.perf_counter() - began

    report = {
        "versions": library_versions(),
        "phases": phases,
        "step_times": step_times,
        "step_cpu_times": step_cpu_times,
        "step_graphs": step_graphs,
        "peak_rss_mib": peak_rss_mib(),
    }
    args.report.write_text(json.dumps(report, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
