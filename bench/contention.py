"""
What CPU time taken by another process costs direct Dovecot's load figures
on this machine: the load generator's login churn and mixed load (bench.load)
against a private Dovecot alone, and with a burner process taking a fixed
share of one core, interleaved round by round.

    .venv/bin/python -m bench.contention [--shares 0.2,0.35,0.5] [--rounds 3] [--seconds 4]

A proxy on the same machine as Dovecot and the clients takes CPU time as it
relays: make bench's row "the proxy's share of a core" gives each proxy's.
This gives what a share like that costs Dovecot's own rate, whatever the
proxy does with it. The burner spins for its share of each millisecond and
sleeps for the rest; the share it really took (preempted or oversleeping,
less than asked) is read from its CPU time over the load's window. Every
loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import time
from collections.abc import Sequence
from multiprocessing.synchronize import Event

from bench.common import markdownTable, privateDovecot, seed, treeCpuSeconds
from bench.load import CHURN, LOAD_USERS, MIXED, LoadGenerator, LoadPlan, loadGenerator, warmUp

SLICE_SECONDS = 0.001
# a burner outlives no run by more than this, even if nobody stops it
BURNER_LIMIT_SECONDS = 120.0


def burn(share: float, stop: Event) -> None:
    """
    Take C{share} of one core, in slices of L{SLICE_SECONDS}, until C{stop}
    is set or L{BURNER_LIMIT_SECONDS} have passed.
    """
    ends = time.monotonic() + BURNER_LIMIT_SECONDS
    while not stop.is_set() and time.monotonic() < ends:
        started = time.perf_counter()
        while time.perf_counter() - started < share * SLICE_SECONDS:
            pass
        time.sleep((1 - share) * SLICE_SECONDS)


def rateWithBurner(generator: LoadGenerator, plan: LoadPlan, scenario: str, share: float) -> tuple[float, float]:
    """
    C{scenario}'s rate with a burner asked to take C{share} of a core (none
    for 0), and the share it took over the load's time (its CPU time over
    the time: preempted or oversleeping, it takes less than asked).
    """
    stop = multiprocessing.get_context("fork").Event()
    burner = None
    if share > 0:
        burner = multiprocessing.get_context("fork").Process(target=burn, args=(share, stop), daemon=True)
        burner.start()
    try:
        pid = burner.pid if burner is not None else None
        result = generator.run(plan, scenario, lambda: (treeCpuSeconds(pid) if pid is not None else 0.0,))
    finally:
        stop.set()
        if burner is not None:
            burner.join(timeout=5)
            if burner.is_alive():
                burner.kill()
    if result.errors:
        raise RuntimeError(f"{scenario} with a burner of {share:g}: {result.errors} errors ({result.firstError})")
    if not result.metered:
        raise RuntimeError(f"{scenario}: the burner's CPU time was not read in time")
    return result.rate, result.metered[0] / result.seconds


def measure(shares: Sequence[float], rounds: int, seconds: float) -> dict[str, dict[float, list[tuple[float, float]]]]:
    """
    Per scenario and share asked for, each round's (rate over the same
    round's rate without a burner, share taken).
    """
    ratios: dict[str, dict[float, list[tuple[float, float]]]] = {
        scenario: {share: [] for share in shares} for scenario in (CHURN, MIXED)
    }
    # the client processes are forked before Dovecot starts (see LoadGenerator)
    with loadGenerator() as generator, privateDovecot(dict(LOAD_USERS), maxSessions=200) as upstream:
        for user, password in LOAD_USERS:
            seed(upstream.ports["imap"], 20, 8000, user=user, password=password)
        plan = LoadPlan(upstream.ports["imap"], LOAD_USERS, 20, seconds, 20)
        asyncio.run(warmUp(plan.port, LOAD_USERS))
        for scenario in (CHURN, MIXED):
            for number in range(rounds):
                alone, _ = rateWithBurner(generator, plan, scenario, 0.0)
                for share in shares:
                    rate, taken = rateWithBurner(generator, plan, scenario, share)
                    ratios[scenario][share].append((rate / alone, taken))
                    print(
                        f"{scenario} round {number + 1}: {alone:.1f} alone, {rate:.1f} with a burner taking "
                        f"{taken:.2f} of a core ({share:g} asked)"
                    )
    return ratios


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shares", default="0.2,0.35,0.5", help="shares of one core the burner takes, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds per load run")
    arguments = parser.parse_args(argv)
    shares = [float(text) for text in arguments.shares.split(",")]
    if not all(0 < share < 1 for share in shares):
        parser.error("each share is between 0 and 1")
    ratios = measure(shares, arguments.rounds, arguments.seconds)
    rows = []
    for share in shares:
        row = [f"{share:g}"]
        for scenario in (CHURN, MIXED):
            runs = ratios[scenario][share]
            row.append(
                f"{statistics.median(taken for _, taken in runs):.2f}: "
                f"{statistics.median(ratio for ratio, _ in runs):.2f}x "
                f"({min(ratio for ratio, _ in runs):.2f}x to {max(ratio for ratio, _ in runs):.2f}x)"
            )
        rows.append(row)
    print()
    print(
        f"direct Dovecot's rate with a burner over its rate alone, median (and range) of {arguments.rounds} rounds, "
        "after the share of a core the burner took:"
    )
    header = ["share asked", "login churn: share taken: rate", "mixed load: share taken: rate"]
    print(markdownTable(header, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
