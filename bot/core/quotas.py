"""Daily quotas and the per-user cap on jobs in flight, platform-free.

Limits come from the settings (every workspace's defaults), replaced by the workspace's own
defaults, then by the most generous override among the user's roles, then by an override for
the user, which wins outright so a moderator can also restrict one person. Days are UTC.

Counting happens in SQLite: ``Store.reserve_job`` reads the usage and records the job and its
units in one BEGIN IMMEDIATE transaction. We chose that over a Redis Lua counter because the
units then live next to the jobs they pay for: a refund is one UPDATE keyed by the job id,
history survives a Redis flush, and there is no second store to keep in step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from bot.config import Settings
from bot.core.errors import UserError
from bot.core.store import (
    QUOTA_FIELDS,
    Owner,
    QuotaField,
    QuotaOverride,
    Store,
    Usage,
    UsageKind,
)

FIELD_NAMES: dict[QuotaField, str] = {
    "daily_images": "images per day",
    "daily_trainings": "trainings per day",
    "max_active_jobs": "jobs at once",
}


@dataclass(frozen=True)
class Limits:
    """A user's effective limits, and where each came from (for moderators)."""

    daily_images: int
    daily_trainings: int
    max_active_jobs: int
    sources: dict[QuotaField, str]

    def daily(self, kind: UsageKind) -> int:
        """The daily limit for images or trainings."""
        return self.daily_images if kind == "images" else self.daily_trainings


def next_reset(now: datetime | None = None) -> datetime:
    """When today's (UTC) quotas reset: the coming UTC midnight."""
    now = now or datetime.now(UTC)
    return datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), tzinfo=UTC)


def format_duration(delta: timedelta) -> str:
    """A short human duration: ``3d 4h``, ``5h 12m``, ``7m``."""
    minutes = max(0, int(delta.total_seconds() // 60))
    days, rest = divmod(minutes, 24 * 60)
    hours, minutes = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h" if hours else f"{days}d"
    if hours:
        return f"{hours}h {minutes}m" if minutes else f"{hours}h"
    return f"{minutes}m"


def reset_text() -> str:
    """``00:00 UTC (in 5h 12m)``."""
    return f"00:00 UTC (in {format_duration(next_reset() - datetime.now(UTC))})"


def resolve_limits(settings: Settings, overrides: Sequence[QuotaOverride]) -> Limits:
    """Combine the configured defaults with the overrides that apply to one user."""
    values: dict[QuotaField, int] = {
        "daily_images": settings.quota_daily_images,
        "daily_trainings": settings.quota_daily_trainings,
        "max_active_jobs": settings.quota_max_active_jobs,
    }
    sources: dict[QuotaField, str] = dict.fromkeys(QUOTA_FIELDS, "default")
    for field in QUOTA_FIELDS:
        for scope in ("workspace", "role", "user"):
            found = [
                (value, o.target_id)
                for o in overrides
                if o.scope == scope and (value := o.limit(field)) is not None
            ]
            if found:
                # Several roles: the member gets the most generous of them.
                value, target = max(found)
                values[field] = value
                sources[field] = {
                    "workspace": "workspace",
                    "role": f"role {target}",
                    "user": "user",
                }[scope]
    return Limits(
        daily_images=values["daily_images"],
        daily_trainings=values["daily_trainings"],
        max_active_jobs=values["max_active_jobs"],
        sources=sources,
    )


def check_allowance(limits: Limits, usage: Usage, kind: UsageKind, units: int) -> None:
    """Raise UserError if a request for ``units`` of ``kind`` would break a limit."""
    if usage.active_jobs >= limits.max_active_jobs:
        if limits.max_active_jobs == 0:
            raise UserError("You can't queue jobs here right now. Nothing was queued.")
        raise UserError(
            f"You already have {usage.active_jobs} job{'s' if usage.active_jobs != 1 else ''} "
            f"waiting or running (the limit is {limits.max_active_jobs}). Nothing was queued; "
            "try again when one finishes."
        )
    limit, used = limits.daily(kind), getattr(usage, kind)
    left = max(0, limit - used)
    if units <= left:
        return
    noun = "images" if kind == "images" else "trainings"
    if left == 0:
        raise UserError(
            f"You've used all {limit} of today's {noun}. Nothing was queued; your quota "
            f"resets at {reset_text()}."
        )
    raise UserError(
        f"That needs {units} {noun} but you have {left} left today. Nothing was queued; "
        f"ask for fewer (--count {left}) or wait for the reset at {reset_text()}."
    )


class Quotas:
    """Looks up limits and usage; ``Core`` reserves units through ``Store.reserve_job``."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store

    async def limits(self, owner: Owner, roles: Sequence[str] = ()) -> Limits:
        """The owner's effective limits given their platform role ids."""
        overrides = await self.store.quota_overrides(
            owner.platform, owner.workspace, owner.user_id, roles
        )
        return resolve_limits(self.settings, overrides)

    async def precheck(
        self, owner: Owner, roles: Sequence[str], kind: UsageKind, units: int
    ) -> Limits:
        """Refuse early, before costly work; the binding check is ``Store.reserve_job``'s."""
        limits = await self.limits(owner, roles)
        check_allowance(limits, await self.store.usage(owner), kind, units)
        return limits

    async def refund(self, job_id: str, reason: str) -> bool:
        """Give a job's units back (idempotent)."""
        return await self.store.release_usage(job_id, reason)

    async def usage_text(self, owner: Owner, roles: Sequence[str] = (), *, you: bool = True) -> str:
        """Usage against limits and the reset time, as ``/quota`` shows it."""
        limits = await self.limits(owner, roles)
        usage = await self.store.usage(owner)
        who = "You have" if you else f"{owner.user_id} has"
        lines = [
            f"{who} used today (UTC):",
            f"  images:    {usage.images} of {limits.daily_images}",
            f"  trainings: {usage.trainings} of {limits.daily_trainings}",
            f"  jobs waiting or running: {usage.active_jobs} of {limits.max_active_jobs}",
            f"Daily counts reset at {reset_text()}. A job that fails gives its units back.",
        ]
        if not you:
            custom = [
                f"{FIELD_NAMES[field]} from {source}"
                for field, source in limits.sources.items()
                if source != "default"
            ]
            lines.append("Overrides: " + (", ".join(custom) if custom else "none (defaults)"))
        return "\n".join(lines)
