"""The ``dreambot`` command: the demo, the shell, the adapters, the engine, migrations, the tiny
model, image inspection and subject evaluation."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import cast
from urllib.parse import urlparse

from bot.config import (
    TINY_MODEL,
    TINY_SD2_MODEL,
    TINY_SDXL_MODEL,
    ConfigError,
    Settings,
    load_settings,
)
from bot.core.store import Owner
from bot.redis_server import RedisServer, RedisUnavailable, answers

log = logging.getLogger("dreambot")


def _log_level(name: str) -> str:
    """A logging level's name, checked (argparse reports a bad one with the choices)."""
    level = name.strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise argparse.ArgumentTypeError(
            f"unknown log level {name!r} (from --log-level or DREAMBOT_LOG_LEVEL): "
            "use DEBUG, INFO, WARNING or ERROR"
        )
    return level


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _require_redis(settings: Settings) -> None:
    if not answers(settings.redis_url):
        raise SystemExit(
            f"No Redis answers at {settings.redis_url}. Start one, set DREAMBOT_REDIS_URL, "
            "or use `dreambot run`, which starts its own."
        )


async def _shell(settings: Settings) -> None:
    from bot.adapters.shell import PLATFORM, ShellAdapter
    from bot.launcher import delivering, open_core

    async with open_core(settings, PLATFORM) as runtime:
        adapter = ShellAdapter(
            runtime.core, settings.shell_user, downloads=settings.data_dir / "downloads"
        )
        async with delivering(runtime, adapter):
            await adapter.run()


def cmd_shell(settings: Settings, args: argparse.Namespace) -> None:
    """Chat with the bot in this terminal (commands may also come through a pipe)."""
    _require_redis(settings)
    try:
        asyncio.run(_shell(settings))
    except KeyboardInterrupt:
        print("\nbye — queued jobs keep running; their results appear next time.")


def cmd_discord(settings: Settings, args: argparse.Namespace) -> None:
    """Run the Discord bot (DREAMBOT_DISCORD_TOKEN) until interrupted."""
    import discord

    from bot.adapters.discord import run_discord

    if settings.discord_token is None:
        raise SystemExit("Set DREAMBOT_DISCORD_TOKEN to the bot's token (see the README).")
    _require_redis(settings)
    try:
        serve(lambda: run_discord(settings))
    except discord.LoginFailure as exc:
        raise SystemExit(f"Discord refused the token: {exc}") from exc


def cmd_slack(settings: Settings, args: argparse.Namespace) -> None:
    """Run the Slack bot (DREAMBOT_SLACK_BOT_TOKEN) until interrupted."""
    from bot.adapters.slack import run_slack

    if settings.slack_bot_token is None:
        raise SystemExit("Set DREAMBOT_SLACK_BOT_TOKEN to the bot's token (see the README).")
    if settings.slack_app_token is None and settings.slack_signing_secret is None:
        raise SystemExit(
            "Set DREAMBOT_SLACK_SIGNING_SECRET (HTTP mode) or DREAMBOT_SLACK_APP_TOKEN "
            "(Socket Mode); see the README."
        )
    _require_redis(settings)
    try:
        serve(lambda: run_slack(settings))
    except ConfigError as exc:
        raise SystemExit(str(exc)) from exc


def cmd_engine(settings: Settings, args: argparse.Namespace) -> None:
    """Run the engine worker (the GPU process) until interrupted."""
    from engine.models import DeviceError, ModelLoadError
    from engine.worker import run_engine

    _require_redis(settings)
    try:
        serve(lambda: run_engine(settings))
    except (ModelLoadError, DeviceError, ConfigError) as exc:
        raise SystemExit(f"engine: {exc}") from exc
    log.info("engine stopped")


def serve(main: Callable[[], Awaitable[None]]) -> None:
    """Run a long-lived process's ``main()`` until it ends or is stopped. SIGTERM (what
    ``systemctl stop`` and ``docker stop`` send) stops it as Ctrl-C does: ``main`` is
    cancelled, so its clean-up runs (deliveries under way finish, engine jobs are handed
    back), instead of the process dying on the spot."""

    async def until_stopped() -> None:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        await main()

    with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
        asyncio.run(until_stopped())


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> None:
    """Apply pending database migrations."""
    import aiosqlite

    from bot.core.store import apply_migrations

    async def migrate() -> list[str]:
        settings.database_file.parent.mkdir(parents=True, exist_ok=True)
        async with aiosqlite.connect(settings.database_file) as db:
            return await apply_migrations(db)

    applied = asyncio.run(migrate())
    print(f"{settings.database_file}: applied {', '.join(applied) if applied else 'nothing'}")


def cmd_tiny_model(settings: Settings, args: argparse.Namespace) -> None:
    """Build a tiny random Stable Diffusion model (offline): SD 1.x-, SD 2.x- or SDXL-shaped."""
    from engine.tiny import build_tiny_named

    name = {"sd1": TINY_MODEL, "sd2": TINY_SD2_MODEL, "sdxl": TINY_SDXL_MODEL}[args.family]
    target = Path(args.path) if args.path else settings.tiny_model_folder(name)
    print(build_tiny_named(name, target))


def cmd_inspect(settings: Settings, args: argparse.Namespace) -> None:
    """Show what an image says about its origin: dreambot metadata and invisible watermark."""
    from engine.images import describe_png

    for index, name in enumerate(args.images):
        path = Path(name)
        if not path.is_file():
            raise SystemExit(f"{path}: no such file")
        if len(args.images) > 1:
            print(("\n" if index else "") + f"{path}:")
        try:
            print(describe_png(path.read_bytes()))
        except OSError as exc:
            raise SystemExit(f"{path}: not an image ({exc})") from exc


def eval_owner(text: str | None, default_user: str) -> Owner:
    """``--user``: ``platform:workspace:user`` (e.g. ``discord:<guild id>:<user id>``), or a
    shell user name (default: ``DREAMBOT_SHELL_USER``)."""
    from bot.adapters.shell import PLATFORM, WORKSPACE

    parts = (text or default_user).split(":")
    if len(parts) == 1:
        return Owner(PLATFORM, WORKSPACE, parts[0])
    if len(parts) != 3 or not all(parts):
        raise SystemExit(f"--user takes platform:workspace:user or a shell user, not {text!r}")
    return Owner(*parts)


def cmd_eval(settings: Settings, args: argparse.Namespace) -> None:
    """Score a trained subject with the DreamBooth paper's metrics (CLIP-I, CLIP-T, DINO)."""
    from engine.evaluation import EvalError, EvalOptions, evaluate_subject
    from engine.models import DeviceError

    options = EvalOptions(
        reference=args.subject,
        owner=eval_owner(args.user, settings.shell_user),
        prompt_file=Path(args.prompts) if args.prompts else None,
        images_per_prompt=args.images_per_prompt,
        limit=args.limit,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        strength=args.strength,
        save_images=Path(args.save_images) if args.save_images else None,
    )
    try:
        report = asyncio.run(
            evaluate_subject(settings, options, log=lambda line: print(line, file=sys.stderr))
        )
    except (EvalError, DeviceError) as exc:
        raise SystemExit(f"eval: {exc}") from exc
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    output = Path(
        args.output or settings.data_dir / "evaluations" / f"{report.subject}-{stamp}.json"
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(report.to_json() + "\n", encoding="utf-8")
    print(report.table())
    print(f"written: {output}")


def cmd_run(settings: Settings, args: argparse.Namespace) -> None:
    """Everything on this machine: Redis (if none answers), the engine, and the shell."""
    redis_child = None
    if not answers(settings.redis_url):
        host = urlparse(settings.redis_url).hostname
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise SystemExit(f"No Redis answers at {settings.redis_url}.")
        try:
            redis_child = RedisServer(settings.data_dir / "redis").start()
        except RedisUnavailable as exc:
            raise SystemExit(str(exc)) from exc
        settings = settings.model_copy(update={"redis_url": redis_child.url})
        print(f"started a private Redis at {redis_child.url} (data in {redis_child.data_dir})")
    if settings.base_model == TINY_MODEL:
        from engine.tiny import build_tiny_model

        print("preparing the tiny offline model…")
        build_tiny_model(settings.base_model_source)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine_log = settings.data_dir / "engine.log"
    env = {**os.environ, "DREAMBOT_REDIS_URL": settings.redis_url}
    with engine_log.open("ab") as log_file:
        engine = subprocess.Popen(
            [sys.executable, "-m", "bot.cli", "engine"],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    print(f"engine started (log: {engine_log}); base model: {settings.base_model}")
    try:
        _wait_for_engine(settings.redis_url, engine, engine_log)
        cmd_shell(settings, args)
    finally:
        engine.terminate()
        try:
            engine.wait(15)
        except subprocess.TimeoutExpired:
            engine.kill()
        if redis_child:
            redis_child.stop()


def _wait_for_engine(
    redis_url: str, engine: subprocess.Popen[bytes], engine_log: Path, timeout: float = 300.0
) -> None:
    """Wait until the engine ``dreambot run`` started announces itself (its heartbeat, written
    once its models are loaded), so the first command doesn't hear "no engine is running";
    exit if it dies first. After ``timeout`` the shell starts anyway."""
    import redis

    from engine.api import ENGINES_KEY, EngineHeartbeat, engine_alive_key

    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if engine.poll() is not None:
                raise SystemExit(f"the engine exited at start: {_last_line(engine_log)}")
            # redis-py's sync client is typed as sync-or-async: say which.
            members = cast(set[bytes], client.smembers(ENGINES_KEY))
            for engine_id in members:
                found = cast(bytes | None, client.get(engine_alive_key(engine_id.decode())))
                if found and EngineHeartbeat.model_validate_json(found).pid == engine.pid:
                    return
            time.sleep(0.2)
    finally:
        client.close()
    print(f"the engine is still loading after {timeout:.0f} s; see {engine_log}")


def _last_line(log_file: Path) -> str:
    """The last line a log says (an engine's last word is why it stopped), and where it is."""
    try:
        lines = log_file.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        lines = []
    return f"{lines[-1]} (log: {log_file})" if lines else f"see {log_file}"


def _eval_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("subject", help="the subject's name (see --user) or id")
    sub.add_argument(
        "--user",
        help="whose subject: platform:workspace:user, or a shell user (default: the shell's)",
    )
    sub.add_argument(
        "--prompts",
        help="a file of prompts, one a line, {} where the subject goes "
        "(default: the DreamBooth dataset's 25 for the subject's kind)",
    )
    sub.add_argument("--images-per-prompt", type=int, default=4, help="as in the paper: 4")
    sub.add_argument("--limit", type=int, help="only the first N prompts (a quick check)")
    sub.add_argument("--seed", type=int, default=0, help="prompt i is drawn with seed+i")
    sub.add_argument("--steps", type=int, help="sampler steps (default: GENERATE_STEPS)")
    sub.add_argument("--guidance", type=float, help="default: GUIDANCE_SCALE")
    sub.add_argument("--strength", type=float, default=1.0, help="the subject's LoRA scale")
    sub.add_argument("--output", help="JSON file (default: DATA_DIR/evaluations/…)")
    sub.add_argument("--save-images", help="also write the generated images to this folder")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``dreambot`` console script."""
    # Weights only ever come from local paths; keep the ML libraries offline and quiet.
    for name, value in [
        ("HF_HUB_OFFLINE", "1"),
        ("TRANSFORMERS_VERBOSITY", "error"),
        ("DIFFUSERS_VERBOSITY", "error"),
        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
    ]:
        os.environ.setdefault(name, value)
    parser = argparse.ArgumentParser(prog="dreambot", description=__doc__)
    parser.add_argument(
        "--log-level",
        type=_log_level,
        default=os.environ.get("DREAMBOT_LOG_LEVEL") or None,
        help="DEBUG, INFO, WARNING or ERROR (default: DREAMBOT_LOG_LEVEL, else WARNING; INFO "
        "for the engine)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, handler in [
        ("run", cmd_run),
        ("shell", cmd_shell),
        ("discord", cmd_discord),
        ("slack", cmd_slack),
        ("engine", cmd_engine),
        ("migrate", cmd_migrate),
        ("tiny-model", cmd_tiny_model),
        ("inspect", cmd_inspect),
        ("eval", cmd_eval),
    ]:
        sub = commands.add_parser(name, help=(handler.__doc__ or "").strip().splitlines()[0])
        sub.set_defaults(handler=handler)
        if name == "tiny-model":
            sub.add_argument("path", nargs="?", help="folder to write (default: in DATA_DIR)")
            sub.add_argument(
                "--family",
                choices=("sd1", "sd2", "sdxl"),
                default="sd1",
                help="shape of the model (sd2: v-prediction, as SD 2.x 768 px models)",
            )
        if name == "inspect":
            sub.add_argument("images", nargs="+", help="PNG files written by dreambot")
        if name == "eval":
            _eval_arguments(sub)
    args = parser.parse_args(argv)
    _setup_logging(args.log_level or ("INFO" if args.command == "engine" else "WARNING"))
    try:
        settings = load_settings()
    except ConfigError as exc:
        raise SystemExit(str(exc)) from exc
    args.handler(settings, args)


if __name__ == "__main__":
    main()
