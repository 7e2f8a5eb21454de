"""The model-based oracle: random operations on a watch folder, the config and the network,
against the real daemon and the devserver; after quiescence, the dataset must match the disk.

Hypothesis' stateful testing draws the operations (see OPERATIONS); tests/oracle_model.py holds
the model, the world (folders, devserver, daemon) and the oracle itself. One daemon per example,
many steps per example (starting daemons costs time).

Seeded and reproducible: the seed comes from ORACLE_SEED (else a random one), is printed, and a
failing run prints the steps it took and the command that runs the same seed again:

    ORACLE_SEED=<seed> .venv/bin/python -m pytest -q -s tests/test_oracle.py

The operations are a pure function of the seed (they are drawn from the model, never from what
the daemon did); the daemon's timing is not, so a seed that failed once may pass on a later run
when the failure needs a race. For that reason shrinking is off by default: every shrink step
re-runs a daemon for tens of seconds, and a timing-dependent failure makes the shrinker chase
noise. ORACLE_SHRINK=1 turns it on for a local investigation (Hypothesis caps it at 5 minutes).
ORACLE_EXAMPLES and ORACLE_STEPS change the budget; ORACLE_OPERATIONS=create,delete,... runs a
subset of ENABLED_OPERATIONS.
"""

from __future__ import annotations

import collections
import os
import random
import sys
import time

import pytest
from hypothesis import HealthCheck, Phase, Verbosity, seed, settings
from hypothesis import strategies as st
from hypothesis.control import current_build_context
from hypothesis.errors import StopTest
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    rule,
    run_state_machine_as_test,
)

from tests.oracle_model import (
    FOLDERS,
    RULE_FOLDERS,
    Model,
    OracleFailure,
    Version,
    World,
    folder_of,
    join,
    name_of,
)

OPERATIONS = frozenset(
    {
        "create",
        "overwrite_in_place",
        "overwrite_by_rename",
        "revert",
        "delete",
        "rename",
        "move_between_rule_folders",
        "reuse_deleted_name",
        "rule_change_sighup",
        "dataset_change",
        "asynchronous_toggle",
        # The next 1-3 append requests get a fault: the answer lost after the server stored
        # the items, a 500/503, a 429 with Retry-After, a connection reset, a stall past the
        # request deadline.
        "fault_lost",
        "fault_5xx",
        "fault_429",
        "fault_reset",
        "fault_stall",
        "wait_for_faults",
        "lost_answer_then_change",
        "kill9_restart",
        "kill9_during_request",
        "sigterm_restart",
        "check",
        # Not a step: an example may start the daemon with nucleus.asynchronous = true.
        "asynchronous_start",
    }
)
# The switch: operations this test draws. All of them unless a known defect forces one out
# while it is being fixed (say which, and why, next to the line that removes it).
ENABLED_OPERATIONS: frozenset[str] = OPERATIONS

FAULT_KINDS = {
    "fault_lost": ("lost",),
    "fault_5xx": ("500", "503"),
    "fault_429": ("429",),
    "fault_reset": ("reset",),
    "fault_stall": ("stall",),
}
CHANGE_KINDS = ("overwrite_in_place", "overwrite_by_rename", "revert", "move", "delete")

SEED_ENV = "ORACLE_SEED"


def _seed_from_env() -> int:
    text = os.environ.get(SEED_ENV, "").strip()
    return int(text) if text else random.SystemRandom().randrange(1, 2**31)


ORACLE_SEED = _seed_from_env()
SHRINK = os.environ.get("ORACLE_SHRINK", "").strip() == "1"


def _operations() -> frozenset[str]:
    text = os.environ.get("ORACLE_OPERATIONS", "").strip()
    if not text:
        return ENABLED_OPERATIONS
    wanted = frozenset(name.strip() for name in text.split(",") if name.strip())
    unknown = wanted - OPERATIONS
    if unknown:
        pytest.fail(f"ORACLE_OPERATIONS: unknown operation(s) {sorted(unknown)}", pytrace=False)
    return wanted & ENABLED_OPERATIONS


# These shape what is drawn, so a reproduction must repeat them.
_SHAPING_ENV = ("ORACLE_OPERATIONS", "ORACLE_EXAMPLES", "ORACLE_STEPS")


def reproduce_command(seed_value: int, test_name: str = "") -> str:
    shaping = "".join(
        f"{name}={os.environ[name].strip()} "
        for name in _SHAPING_ENV
        if os.environ.get(name, "").strip()
    )
    target = f"tests/test_oracle.py::{test_name}" if test_name else "tests/test_oracle.py"
    return f"{SEED_ENV}={seed_value} {shaping}.venv/bin/python -m pytest -q -s {target}"


class RunStats:
    """What all examples of one test did, for the summary line."""

    def __init__(self) -> None:
        self.examples = 0
        self.steps = 0
        self.operations: collections.Counter[str] = collections.Counter()
        self.checks = 0
        self.quiesce_seconds: list[float] = []

    def summary(self, label: str, seconds: float) -> str:
        ops = ", ".join(f"{name}={count}" for name, count in sorted(self.operations.items()))
        slowest = max(self.quiesce_seconds, default=0.0)
        return (
            f"[oracle {label}] seed={ORACLE_SEED} examples={self.examples} steps={self.steps}"
            f" oracle_checks={self.checks} slowest_quiescence_seconds={slowest:.1f}"
            f" wall_seconds={seconds:.0f} operations: {ops}"
        )


# How often each operation is drawn (relative). File changes dominate; restarts are dear.
WEIGHTS: dict[str, int] = {
    "create": 4,
    "overwrite_in_place": 2,
    "overwrite_by_rename": 2,
    "revert": 2,
    "delete": 1,
    "rename": 1,
    "move_between_rule_folders": 2,
    "reuse_deleted_name": 1,
    "rule_change_sighup": 1,
    "dataset_change": 1,
    "asynchronous_toggle": 1,
    "fault_lost": 1,
    "fault_5xx": 1,
    "fault_429": 1,
    "fault_reset": 1,
    "fault_stall": 1,
    "wait_for_faults": 1,
    "lost_answer_then_change": 2,
    "kill9_restart": 1,
    "kill9_during_request": 1,
    "sigterm_restart": 1,
    "check": 2,
}
assert set(WEIGHTS) == OPERATIONS - {"asynchronous_start"}


class OracleMachine(RuleBasedStateMachine):
    """One example: one world (folders, devserver, daemon), many steps, the oracle at every
    `check` step and once more at the end.

    One rule, `step`, draws the operation itself: Hypothesis has no rule weights, and its
    per-example rule subsets ("swarm testing") leave a handful of expensive examples doing
    only one or two kinds of thing. The first entry of the draw list is what Hypothesis' first,
    all-zero example repeats: `create`, the cheapest useful one.
    """

    after_upload = "keep"
    test_name = ""
    stats = RunStats()

    def __init__(self) -> None:
        super().__init__()
        self.operations = _operations()
        self.model = Model(after_upload=self.after_upload)
        self.steps: list[str] = []
        self.current: str | None = None
        self.world = World(self.model)
        self.stats.examples += 1

    @initialize(asynchronous=st.booleans())
    def start(self, asynchronous: bool) -> None:
        """The daemon starts in either upload mode, so the asynchronous one is covered even
        while `asynchronous_toggle` is switched off."""
        asynchronous = asynchronous and "asynchronous_start" in self.operations
        self.model.asynchronous = asynchronous
        self.world.write_config()
        self.world.start_daemon()
        self._did("start_asynchronous" if asynchronous else "start_sync")

    @rule(data=st.data())
    def step(self, data: st.DataObject) -> None:
        choices = [
            name
            for name, weight in WEIGHTS.items()
            if name in self.operations and self._applicable(name)
            for _ in range(weight)
        ]
        name = data.draw(st.sampled_from(choices), label="operation")
        self.current = name
        getattr(self, name)(data)
        self.current = None

    def _applicable(self, name: str) -> bool:
        model = self.model
        if name == "create":
            return any(p not in model.history for p in model.free_relpaths())
        if name in ("overwrite_in_place", "overwrite_by_rename", "delete"):
            return bool(model.files)
        if name in ("lost_answer_then_change", "kill9_during_request"):
            return bool(model.files)
        if name == "revert":
            return bool(self._revertible())
        if name == "rename":
            return bool(self._renamable())
        if name == "move_between_rule_folders":
            return bool(self._movable())
        if name == "reuse_deleted_name":
            return bool(model.deleted_by_test)
        if name == "wait_for_faults":
            return self.world.faults_armed > self.world.faults_awaited
        return True

    # -- bookkeeping

    def _did(self, operation: str, detail: str = "") -> None:
        self.world.assert_alive()
        self.steps.append(f"{operation} {detail}".strip())
        self.stats.steps += 1
        self.stats.operations[operation] += 1

    def _write(self, relpath: str, version: Version, *, by_rename: bool) -> None:
        if by_rename:
            self.world.write_by_rename(relpath, version)
        else:
            self.world.write_in_place(relpath, version)
        self.model.place(relpath, version)

    # -- files

    def create(self, data: st.DataObject) -> None:
        never_used = [p for p in self.model.free_relpaths() if p not in self.model.history]
        relpath = data.draw(st.sampled_from(never_used), label="relpath")
        version = self.model.new_version(self.model.fresh_seed())
        self._write(relpath, version, by_rename=data.draw(st.booleans(), label="by_rename"))
        self._did("create", f"{relpath} seed={version.seed}")

    def overwrite_in_place(self, data: st.DataObject) -> None:
        relpath = data.draw(st.sampled_from(sorted(self.model.files)), label="relpath")
        version = self.model.new_version(self.model.fresh_seed())
        self._write(relpath, version, by_rename=False)
        self._did("overwrite_in_place", f"{relpath} seed={version.seed}")

    def overwrite_by_rename(self, data: st.DataObject) -> None:
        relpath = data.draw(st.sampled_from(sorted(self.model.files)), label="relpath")
        version = self.model.new_version(self.model.fresh_seed())
        self._write(relpath, version, by_rename=True)
        self._did("overwrite_by_rename", f"{relpath} seed={version.seed}")

    def _revertible(self) -> list[str]:
        return sorted(
            relpath
            for relpath, version in self.model.files.items()
            if any(s != version.seed for s in self.model.history[relpath])
        )

    def revert(self, data: st.DataObject) -> None:
        relpath = data.draw(st.sampled_from(self._revertible()), label="relpath")
        current = self.model.files[relpath].seed
        earlier = sorted({s for s in self.model.history[relpath] if s != current})
        old_seed = data.draw(st.sampled_from(earlier), label="earlier_seed")
        version = self.model.new_version(old_seed)
        self._write(relpath, version, by_rename=data.draw(st.booleans(), label="by_rename"))
        self._did("revert", f"{relpath} back to seed={old_seed}")

    def delete(self, data: st.DataObject) -> None:
        relpath = data.draw(st.sampled_from(sorted(self.model.files)), label="relpath")
        self.world.delete(relpath)
        del self.model.files[relpath]
        self.model.deleted_by_test.add(relpath)
        self._did("delete", relpath)

    def _move(self, source: str, destination: str) -> None:
        version = self.model.files[source]
        self.world.rename(source, destination, version)
        del self.model.files[source]
        self.model.files[destination] = version
        self.model.history.setdefault(destination, []).append(version.seed)
        self.model.deleted_by_test.discard(destination)

    def _renamable(self) -> list[tuple[str, str]]:
        free = set(self.model.free_relpaths())
        return [
            (source, join(folder_of(source), name))
            for source in sorted(self.model.files)
            for name in sorted({name_of(p) for p in free if folder_of(p) == folder_of(source)})
        ]

    def rename(self, data: st.DataObject) -> None:
        source, destination = data.draw(st.sampled_from(self._renamable()), label="rename")
        self._move(source, destination)
        self._did("rename", f"{source} -> {destination}")

    def _movable(self) -> list[tuple[str, str]]:
        free = set(self.model.free_relpaths())
        return [
            (source, join(folder, name_of(source)))
            for source in sorted(self.model.files)
            for folder in FOLDERS
            if folder != folder_of(source) and join(folder, name_of(source)) in free
        ]

    def move_between_rule_folders(self, data: st.DataObject) -> None:
        source, destination = data.draw(st.sampled_from(self._movable()), label="move")
        self._move(source, destination)
        self._did("move_between_rule_folders", f"{source} -> {destination}")

    def reuse_deleted_name(self, data: st.DataObject) -> None:
        relpath = data.draw(st.sampled_from(sorted(self.model.deleted_by_test)), label="relpath")
        # The old bytes again (the server holds them) or new ones.
        same = data.draw(st.booleans(), label="same_bytes_as_before")
        seed_value = self.model.history[relpath][-1] if same else self.model.fresh_seed()
        version = self.model.new_version(seed_value)
        self._write(relpath, version, by_rename=data.draw(st.booleans(), label="by_rename"))
        self._did("reuse_deleted_name", f"{relpath} seed={seed_value} same={same}")

    # -- config

    def rule_change_sighup(self, data: st.DataObject) -> None:
        folder = data.draw(st.sampled_from(RULE_FOLDERS), label="folder")
        value = data.draw(st.sampled_from(("a", "b", "c")), label="value")
        self.model.rule_values[folder] = f"{folder.lower()}-{value}"
        self.world.write_config()
        self.world.reload()
        self._did("rule_change_sighup", f"{folder} -> {self.model.rule_values[folder]}")

    def dataset_change(self, data: st.DataObject) -> None:
        number = data.draw(st.integers(0, 2), label="dataset_number")
        via = data.draw(st.sampled_from(("sighup", "restart")), label="via")
        self.model.set_dataset(f"ds_oracle_{number}")
        self.world.write_config()
        if via == "sighup":
            self.world.reload()
        else:
            self.world.stop_and_restart()
        self._did("dataset_change", f"-> {self.model.dataset_id} via {via}")

    def asynchronous_toggle(self, data: st.DataObject) -> None:
        self.model.asynchronous = not self.model.asynchronous
        self.world.write_config()
        self.world.stop_and_restart()
        self._did("asynchronous_toggle", f"-> asynchronous={self.model.asynchronous}")

    # -- network and process faults

    def _fault(self, operation: str, data: st.DataObject) -> None:
        kind = data.draw(st.sampled_from(FAULT_KINDS[operation]), label="kind")
        count = data.draw(st.integers(1, 3), label="count")
        self.world.arm_faults(kind, count)
        self._did(operation, f"next {count} append(s): {kind}")

    def fault_lost(self, data: st.DataObject) -> None:
        self._fault("fault_lost", data)

    def fault_5xx(self, data: st.DataObject) -> None:
        self._fault("fault_5xx", data)

    def fault_429(self, data: st.DataObject) -> None:
        self._fault("fault_429", data)

    def fault_reset(self, data: st.DataObject) -> None:
        self._fault("fault_reset", data)

    def fault_stall(self, data: st.DataObject) -> None:
        self._fault("fault_stall", data)

    def wait_for_faults(self, data: st.DataObject) -> None:
        used = self.world.wait_faults_used()
        self.world.faults_awaited = self.world.faults_armed
        self._did("wait_for_faults", "" if used else "(some still armed: nothing was sent)")

    def lost_answer_then_change(self, data: st.DataObject) -> None:
        """A new version goes out, the server stores it and the answer is lost; THEN the file
        changes again (the daemon does not know whether the server has the first one)."""
        relpath = data.draw(st.sampled_from(sorted(self.model.files)), label="relpath")
        lost_before = self.world.lost_answers()
        self.world.arm_faults("lost", 1)
        first = self.model.new_version(self.model.fresh_seed())
        self._write(relpath, first, by_rename=True)
        lost = self.world.wait_lost_answer(lost_before)
        change = data.draw(st.sampled_from(CHANGE_KINDS), label="change")
        detail = f"{relpath} seed={first.seed} lost={lost}, then {change}"
        if change == "delete":
            self.world.delete(relpath)
            del self.model.files[relpath]
            self.model.deleted_by_test.add(relpath)
        elif change == "move":
            destinations = [d for s, d in self._movable() + self._renamable() if s == relpath]
            if destinations:
                destination = data.draw(st.sampled_from(destinations), label="destination")
                self._move(relpath, destination)
                detail += f" -> {destination}"
            else:
                detail += " (nowhere free: skipped)"
        else:
            seeds = [s for s in self.model.history[relpath] if s != first.seed]
            reverting = change == "revert" and bool(seeds)
            seed_value = seeds[-1] if reverting else self.model.fresh_seed()
            version = self.model.new_version(seed_value)
            self._write(relpath, version, by_rename=change == "overwrite_by_rename")
            detail += f" seed={seed_value}"
        self._did("lost_answer_then_change", detail)

    def kill9_restart(self, data: st.DataObject) -> None:
        self.world.kill9_and_restart()
        self._did("kill9_restart")

    def kill9_during_request(self, data: st.DataObject) -> None:
        """A new version, and SIGKILL as its append is recorded by the server; restart."""
        relpath = data.draw(st.sampled_from(sorted(self.model.files)), label="relpath")
        version = self.model.new_version(self.model.fresh_seed())
        self._write(relpath, version, by_rename=True)
        died = self.world.kill9_during_next_append()
        self._did("kill9_during_request", f"{relpath} seed={version.seed} mid_request={died}")

    def sigterm_restart(self, data: st.DataObject) -> None:
        self.world.stop_and_restart()
        self._did("sigterm_restart")

    # -- the oracle

    def check(self, data: st.DataObject) -> None:
        self._quiesce_and_check()
        self._did("check")

    def _quiesce_and_check(self) -> None:
        reached, seconds = self.world.quiesce()
        self.stats.quiesce_seconds.append(seconds)
        self.stats.checks += 1
        problems = self.world.check_oracle()
        if problems:
            counts = {k: v for k, v in self.world.store_counts().items() if v}
            where = "quiet" if reached else f"NOT quiet after {seconds:.0f} s; store {counts}"
            raise OracleFailure(
                f"oracle violated ({where}; dataset {self.model.dataset_id},"
                f" after_upload={self.model.after_upload},"
                f" asynchronous={self.model.asynchronous}):\n  "
                + "\n  ".join(problems)
                + f"\ndaemon log tail:\n{self.world.log_tail(2500)}"
            )

    def teardown(self) -> None:
        # Hypothesis runs teardown in a `finally`: an exception on its way out is the step
        # that failed (or Hypothesis ending an over-long example, which is no failure).
        pending = sys.exc_info()[1]
        failed = pending is not None and not isinstance(pending, StopTest)
        if (pending is not None and not failed) or self.world.daemon is None:
            self.world.close(keep_files=False)
            return
        try:
            if not failed:
                self._quiesce_and_check()
        except BaseException:
            failed = True
            raise
        finally:
            # While shrinking, only the final (reported) run speaks and keeps its folder.
            report = failed and (current_build_context().is_final or not SHRINK)
            if report:
                print(self._failure_report(), flush=True)
            self.world.close(keep_files=report)

    def _failure_report(self) -> str:
        steps = "\n".join(f"  {number:2}. {step}" for number, step in enumerate(self.steps, 1))
        if self.current is not None:
            steps += f"\n  {len(self.steps) + 1:2}. {self.current} (failed here)"
        return (
            f"\n[oracle] FAILED with seed {ORACLE_SEED} (after_upload={self.after_upload});"
            f" files kept in {self.world.root}\n"
            f"[oracle] steps of the failing example:\n{steps}\n"
            f"[oracle] reproduce: {reproduce_command(ORACLE_SEED, self.test_name)}"
        )


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    return int(text) if text else default


def _run(after_upload: str, max_examples: int, step_count: int) -> None:
    stats = RunStats()
    machine = type(
        f"OracleMachine_{after_upload}",
        (OracleMachine,),
        {"after_upload": after_upload, "stats": stats, "test_name": f"test_oracle_{after_upload}"},
    )
    seeded = seed(ORACLE_SEED)(machine)
    phases = [Phase.explicit, Phase.generate] + ([Phase.shrink] if SHRINK else [])
    print(
        f"\n[oracle {after_upload}] seed={ORACLE_SEED}; reproduce: "
        f"{reproduce_command(ORACLE_SEED, f'test_oracle_{after_upload}')}",
        flush=True,
    )
    started = time.monotonic()
    try:
        run_state_machine_as_test(
            seeded,
            settings=settings(
                max_examples=_env_int("ORACLE_EXAMPLES", max_examples),
                stateful_step_count=_env_int("ORACLE_STEPS", step_count),
                deadline=None,
                database=None,  # a failure replays by its seed, not from a local cache
                phases=phases,
                suppress_health_check=list(HealthCheck),
                print_blob=False,
                verbosity=Verbosity.normal,
            ),
        )
    finally:
        print(stats.summary(after_upload, time.monotonic() - started), flush=True)


@pytest.mark.timeout(600)
def test_oracle_keep() -> None:
    """after_upload = "keep": every file stays; the dataset must mirror the folder."""
    _run("keep", max_examples=6, step_count=40)


@pytest.mark.timeout(600)
def test_oracle_delete() -> None:
    """after_upload = "delete": a file may only vanish once the dataset holds its bytes."""
    _run("delete", max_examples=4, step_count=40)
