"""What the launcher remembers about a run: its plan, and per job its handle, state and history.

One JSON file per run under the state directory, replaced atomically on every change, so a launcher
that crashed (or a second terminal running `meetara status`) reads a consistent picture.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from budgets import clock
from launcher.plan import JobPlan, OfferRef, Plan

ACTIVE = {"PENDING", "RUNNING", "RECOVERING"}
# "planned": not launched yet, or waiting to be relaunched after a preemption
# "LAUNCHING": recorded under `launch_name` before the backend was asked to start it; whoever finds a
# job in this state asks the backend for that name (found: follow it; not found: launch it again)
LAUNCHING = "LAUNCHING"
# LOST: the backend could not tell what became of it (status failed too often): settled to its whole
# reservation, the most its in-job deadline lets it spend
# NO-MACHINE: no offer had a machine for it within `start_timeout_minutes`: cancelled before it ran
FINAL = {"SUCCEEDED", "FAILED", "CANCELLED", "GAVE-UP", "STOPPED-BUDGET", "LOST", "NO-MACHINE"}


def runs_dir() -> Path:
    from budgets import state_dir

    return state_dir() / "runs"


class JobRecord(BaseModel):
    name: str
    domains: list[str]
    offers: list[OfferRef]  # planned offer first, then the fallbacks
    offer_index: int = 0  # which of `offers` the current launch uses
    handle: str | None = None
    launch_name: str | None = None  # the name of the current launch, recorded before it starts
    state: str = "planned"
    launches: int = 0
    preemptions: int = 0  # relaunches by the conductor after a preemption
    # preemptions of this job in the run's earlier records (a recover plans the run anew; its cap on
    # recoveries starts again, its history stays)
    earlier_preemptions: int = 0
    backend_recoveries: int = 0  # recoveries the backend made itself (SkyPilot), earlier launches
    launch_recoveries: int = 0  # ... and the current launch (the highest it reported)
    status_errors: int = 0
    launched_at: datetime | None = None  # when the current launch was asked for
    started_at: datetime | None = None  # current launch
    ended_at: datetime | None = None
    run_seconds: float = 0.0  # billed seconds of earlier launches of this job
    exit_code: int | None = None
    reservation_id: int | None = None
    stop_at: float | None = None  # Unix time the current launch must stop by (in-job budget guard)
    stop_hard_at: float | None = None  # ... and the time it is ended at whatever it is doing
    first_launched_at: datetime | None = None  # the job's first launch (status: start, elapsed)
    billed_usd: float = 0.0  # earlier launches: their seconds at their offers' $/h
    # the $/h the provider reports billing for the current launch's machine (None: not reported); the
    # money follows it, and status shows it beside the offer's planned $/h
    billed_hour: float | None = None
    machine_since: datetime | None = None  # when the current launch's machine was created (backend's word)
    history: list[str] = []
    activity: str = Field("", exclude=True)  # the job's last log line, for progress (never saved)
    # the offers (indices) a policy allows this launch, in its order; empty: the current one and after
    allowed: list[int] = Field(default_factory=list, exclude=True)
    # per preemption: when, the domain and last step the log showed, the step training resumed from
    preemption_log: list[dict] = []

    @property
    def recoveries(self) -> int:
        """Every recovery of this job, whoever made it: the one count max_recoveries caps."""
        return self.preemptions + self.backend_recoveries + self.launch_recoveries

    @property
    def lost_steps(self) -> int:
        return sum(p.get("lost_steps") or 0 for p in self.preemption_log)

    @property
    def lost_seconds(self) -> float:
        return sum(p.get("lost_seconds") or 0.0 for p in self.preemption_log)

    @property
    def offer(self) -> OfferRef:
        return self.offers[min(self.offer_index, len(self.offers) - 1)]

    @property
    def rate_hour(self) -> float:
        """What the current launch's machine costs an hour: the provider's billed rate where it reported
        one, else the offer's planned price."""
        return self.offer.price_hour if self.billed_hour is None else self.billed_hour

    def task_offers(self) -> list[OfferRef]:
        """The offers this launch may run on, first choice first (SkyPilot's `ordered` resources)."""
        if self.allowed:
            return [self.offers[i] for i in self.allowed]
        return self.offers[self.offer_index :]

    def end_launch(self, ended_at: datetime) -> None:
        """The current launch ended at `ended_at`: its machine time counts with the earlier launches'."""
        self.ended_at = ended_at
        if self.started_at:
            seconds = max((ended_at - self.started_at).total_seconds(), 0.0)
            self.run_seconds += seconds
            self.billed_usd += seconds / 3600 * self.rate_hour

    def machine_seconds(self, now: datetime | None = None) -> float:
        """Machine time so far: the ended launches', plus the current one's while it runs."""
        running = self.state in ACTIVE and self.started_at is not None and self.ended_at is None
        now = now or clock.now()
        return self.run_seconds + (max((now - self.started_at).total_seconds(), 0.0) if running else 0.0)

    def cost_so_far(self, now: datetime | None = None) -> float:
        """Machine time so far at the offers' $/h (what the providers bill; the ledger settles it)."""
        earlier = self.billed_usd or self.run_seconds / 3600 * self.offer.price_hour  # older records
        return earlier + (self.machine_seconds(now) - self.run_seconds) / 3600 * self.rate_hour

    def phase(self, max_recoveries: int) -> str:
        """What the job is doing, in words a progress line shows: 'preempted, relaunching (1 of 3)'."""
        n = f"({self.recoveries} of {max_recoveries})"
        if self.state == "planned" and self.preemptions:
            return f"preempted, relaunching {n}"
        if self.state == "RECOVERING":
            return f"preempted, the backend is recovering it {n}"
        if self.state == "GAVE-UP":
            return f"preempted {self.recoveries} times, over the cap of {max_recoveries}: given up"
        words = {"LAUNCHING": "launching", "PENDING": "starting"}.get(self.state, self.state.lower())
        if self.state in ("LAUNCHING", "PENDING", "RUNNING"):
            words += f" on {self.offer.label}"
            if self.recoveries:
                words += f", relaunched after {self.recoveries} of {max_recoveries} preemptions"
        return words

    def note(self, text: str) -> None:
        self.history.append(f"{clock.now().isoformat(timespec='seconds')} {text}")

    @classmethod
    def of(cls, job: JobPlan) -> JobRecord:
        return cls(name=job.name, domains=job.domains, offers=[job.offer, *job.fallbacks])


class RunRecord(BaseModel):
    run_id: str
    backend: str
    store: str
    endpoint_url: str | None = None
    models_dir: str
    budget: float | None = None
    plan: Plan
    jobs: dict[str, JobRecord] = {}
    pulled: list[str] = []
    errors: dict[str, str] = {}  # domain -> why it could not be pulled (the run goes on without it)
    deadline: datetime | None = None  # `launch --deadline`: the run should be done by then
    policy: str | None = None  # the spot policy that chooses each launch's offers (launcher/policies.py)
    created_at: datetime = Field(default_factory=lambda: clock.now())
    # a background run's follower (launcher/background.py): pid, log, state (following / ended) and,
    # once ended, its exit code, message and the domains pulled
    follower: dict | None = None

    def path(self) -> Path:
        return runs_dir() / f"{self.run_id}.json"

    def save(self) -> None:
        from budgets import private_dir, write_private

        private_dir(self.path().parent)
        write_private(self.path(), self.model_dump_json(indent=1))  # run records are private (0600)


def load_run(run_id: str) -> RunRecord | None:
    """The run's record, or None if this machine never launched it."""
    from train.names import check_run_id

    path = runs_dir() / f"{check_run_id(run_id)}.json"
    if not path.exists():
        return None
    try:
        return RunRecord.model_validate(json.loads(path.read_text()))
    except (ValueError, ValidationError) as e:
        from train import BadInput

        raise BadInput(
            f"{path}: unreadable run record ({type(e).__name__}); move it away to start over"
        ) from None


def select_runs(run_id: str | None, listed_by: str = "meetara status") -> list[RunRecord]:
    """That run's record, or every run's when `run_id` is None; an unknown run is a BadInput that
    names the command listing the runs."""
    if not run_id:
        return list_runs()
    rec = load_run(run_id)
    if rec is None:
        from train import BadInput

        raise BadInput(f"no run {run_id!r} on this machine (see {listed_by})")
    return [rec]


def list_runs() -> list[RunRecord]:
    out = []
    for p in sorted(runs_dir().glob("*.json")) if runs_dir().is_dir() else []:
        rec = load_run(p.stem)
        if rec is not None:
            out.append(rec)
    return sorted(out, key=lambda r: r.created_at)


def _cancels_path(run_id: str) -> Path:
    return runs_dir() / "cancels" / f"{run_id}.json"


def request_cancel(run_id: str, handle: str, withdraw: bool = False) -> None:
    """Note that a user cancelled the launch `handle` of the run (`meetara cancel`, before it asks the
    backend): whoever follows the run ends that launch CANCELLED whatever the backend reports after it
    (SkyPilot may report FAILED_CONTROLLER, which otherwise means "relaunch"). `withdraw`: the backend
    refused the cancel, so the launch may be preempted and relaunched as any other."""
    import fcntl

    from budgets import private_dir, write_private

    path = _cancels_path(run_id)
    private_dir(path.parent)
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        now = cancel_requested(run_id)
        handles = sorted(now - {str(handle)} if withdraw else now | {str(handle)})
        write_private(path, json.dumps(handles) + "\n")


def cancel_requested(run_id: str) -> set[str]:
    """The launches of the run a user cancelled (see `request_cancel`)."""
    try:
        data = json.loads(_cancels_path(run_id).read_text())
    except (OSError, ValueError):
        return set()
    return {str(h) for h in data} if isinstance(data, list) else set()
