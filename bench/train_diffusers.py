"""Runs diffusers' ``train_dreambooth_lora.py`` unchanged, timing its progress bars.

A child process of ``bench/train.py``. The script is executed as ``__main__`` from the given
path (it is never copied here); the only change is that ``tqdm.auto.tqdm`` is replaced by a
subclass that records a timestamp at every update, so the parent gets per-step times without
parsing terminal output. Arguments after ``--`` go to the script unchanged.
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
import time
from pathlib import Path

import tqdm.auto

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import library_versions, peak_rss_mib

BARS: list[dict[str, object]] = []
"""One record per progress bar the script opened: its description and update timestamps."""

STARTED = time.perf_counter()


class TimedTqdm(tqdm.auto.tqdm):  # type: ignore[misc]
    """A tqdm that remembers when each step finished: wall seconds since this process began,
    and this process's CPU seconds."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._bench_times: list[float] = []
        self._bench_cpu_times: list[float] = []
        desc = str(kwargs.get("desc", ""))
        BARS.append({"desc": desc, "times": self._bench_times, "cpu_times": self._bench_cpu_times})
        self._bench_stamp()

    def _bench_stamp(self) -> None:
        self._bench_times.append(time.perf_counter() - STARTED)
        self._bench_cpu_times.append(time.process_time())

    def update(self, n: float | None = 1) -> bool | None:
        result = super().update(n)
        self._bench_stamp()
        return result

    def __iter__(self):  # type: ignore[no-untyped-def]
        for item in super().__iter__():
            yield item
            self._bench_stamp()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--script", type=Path, required=True)
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("script_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    script_args = args.script_args[1:] if args.script_args[:1] == ["--"] else args.script_args

    tqdm.auto.tqdm = TimedTqdm
    sys.argv = [str(args.script), *script_args]
    runpy.run_path(str(args.script), run_name="__main__")

    report = {
        "versions": library_versions(),
        "bars": BARS,
        "finished_s": time.perf_counter() - STARTED,
        "peak_rss_mib": peak_rss_mib(),
    }
    args.report.write_text(json.dumps(report, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
