"""
The benchmark's own client logic, against the real Dovecot: the load
generator's workloads complete without errors, count what they did, read
literals as literals, and count refusals as errors. Correctness only: no
figure is compared with a threshold.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from bench.common import processTree, raiseFileLimit, seed, treeCpuSeconds
from bench.contention import burn
from bench.haproxy import HaproxyTcpProxy, findHaproxy
from bench.instructions import Counts, IncompleteProfile, Work, counts, totalInstructions
from bench.load import (
    CHURN,
    METER_GRACE,
    MIXED,
    LoadClient,
    LoadPlan,
    loadGenerator,
    parseImaptestTotals,
    runClients,
    warmUp,
)
from bench.summary import DIRECT, Target, loadMeter
from tests.dovecot import DovecotUpstream

LOAD_USERS = (("loadgen1", "loadgen1pw"), ("loadgen2", "loadgen2pw"))
MESSAGES = 5
# a body line that looks like the load client's own tagged reply: a client
# that read literals as lines would stop here
TRAP_LINE = b"L3 OK FETCH completed"


@pytest.fixture(scope="module")
def loadUsers(dovecot: DovecotUpstream) -> tuple[tuple[str, str], ...]:
    dovecot.addUsers(dict(LOAD_USERS))
    for user, password in LOAD_USERS:
        seed(dovecot.ports["imap"], MESSAGES, 3000, user=user, password=password, lastLine=TRAP_LINE)
    return LOAD_USERS


def plan(dovecot: DovecotUpstream, users: tuple[tuple[str, str], ...], clients: int = 4) -> LoadPlan:
    return LoadPlan(dovecot.ports["imap"], users, clients=clients, seconds=1.0, messages=MESSAGES)


def test_login_churn_completes_logins_without_errors(
    dovecot: DovecotUpstream, loadUsers: tuple[tuple[str, str], ...]
) -> None:
    """Each churn round is connect, LOGIN, SELECT, FETCH, LOGOUT: four commands per login counted."""
    with loadGenerator(1) as generator:
        result = generator.run(plan(dovecot, loadUsers), CHURN)
    assert (result.errors, result.firstError) == (0, "")
    assert result.operations > 0
    assert result.commands == 4 * result.operations
    assert len(result.loginSeconds) == result.operations
    assert result.rate == result.operations / result.seconds


def test_mixed_load_runs_commands_on_logged_in_clients_without_errors(
    dovecot: DovecotUpstream, loadUsers: tuple[tuple[str, str], ...]
) -> None:
    """The mixed loop (SELECT, FETCH FLAGS, UID FETCH BODY.PEEK[], UID STORE, NOOP) gets only tagged OKs."""
    with loadGenerator(1) as generator:
        result = generator.run(plan(dovecot, loadUsers), MIXED)
    assert (result.errors, result.firstError) == (0, "")
    assert result.operations == result.commands
    # more than one turn of the loop, so every command of it ran at least once
    assert result.operations > 5


def test_client_processes_add_up_their_counts(dovecot: DovecotUpstream, loadUsers: tuple[tuple[str, str], ...]) -> None:
    """With two forked client processes, the clients are split between them and their totals merged."""
    with loadGenerator(2) as generator:
        assert generator.processes == 2
        result = generator.run(plan(dovecot, loadUsers, clients=3), CHURN)
    assert (result.errors, result.firstError) == (0, "")
    assert result.operations > 0
    assert result.commands == 4 * result.operations


def test_the_meter_and_the_clients_cpu_are_read_over_the_run_window_in_forked_clients(
    dovecot: DovecotUpstream, loadUsers: tuple[tuple[str, str], ...]
) -> None:
    """
    With client processes, the caller's meter is read at the window's start
    and end (a clock read as the meter counts the window's length, not the
    start margin or the clients' wind-down), and each client process reports
    the CPU time it spent within the window.
    """
    with loadGenerator(2) as generator:
        result = generator.run(plan(dovecot, loadUsers, clients=3), CHURN, lambda: (time.monotonic(), 7.0))
    assert (result.errors, result.firstError) == (0, "")
    window, constant = result.metered
    # (the start margin is 0.5 s, the parent's sleeps overshoot by far less)
    assert window == pytest.approx(result.seconds, abs=0.2)
    assert constant == 0.0
    # the clients logged in and out many times: neither nothing nor more than two CPUs' worth of the window
    assert 0.0 < result.clientCpuSeconds <= 2 * result.seconds


def test_mixed_load_sessions_outlast_the_meter_reading_at_the_deadline(
    dovecot: DovecotUpstream, loadUsers: tuple[tuple[str, str], ...]
) -> None:
    """
    The mixed load's clients log out only after the meter's reading at the
    deadline: a session process exiting just then would be in neither the
    live processes' CPU counters nor its parent's, and the servers' CPU
    time over the window would come out short.
    """
    assert dovecot.pid is not None
    root = dovecot.pid

    def sessionProcesses() -> int:
        return sum(_command(pid) == "imap" for pid in processTree(root))

    before = _steady(sessionProcesses)
    readings: list[int] = []

    def countSessionProcesses() -> tuple[float]:
        readings.append(sessionProcesses() - before)
        return (0.0,)

    with loadGenerator(2) as generator:
        result = generator.run(plan(dovecot, loadUsers, clients=4), MIXED, countSessionProcesses)
    assert (result.errors, result.firstError) == (0, "")
    # one imap process per logged-in client, at the start and still at the end
    assert readings == [4, 4]


def _steady(count: Callable[[], int], seconds: float = 5.0) -> int:
    """
    C{count} once it has not changed for 0.3 s (earlier tests' sessions
    still ending), or after C{seconds}.
    """
    deadline = time.monotonic() + seconds
    last, since = count(), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < 0.3:
        time.sleep(0.05)
        now = count()
        if now != last:
            last, since = now, time.monotonic()
    return last


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def test_in_one_process_the_meter_is_read_at_the_window_edges_too(
    dovecot: DovecotUpstream, loadUsers: tuple[tuple[str, str], ...]
) -> None:
    """Clients in the calling process: the meter is read at the window's start and deadline, on their event loop."""
    with loadGenerator(1) as generator:
        result = generator.run(plan(dovecot, loadUsers), MIXED, lambda: (time.monotonic(),))
    (elapsed,) = result.metered
    # not the 1.5 s start margin, nor the logouts after the deadline
    assert elapsed == pytest.approx(result.seconds, abs=0.2)
    assert 0.0 < result.clientCpuSeconds <= elapsed


def test_a_reading_at_the_deadline_taken_too_late_is_not_counted(
    dovecot: DovecotUpstream, loadUsers: tuple[tuple[str, str], ...]
) -> None:
    """
    When the meter's end reading finishes after the mixed load's sessions
    may have ended (the deadline plus METER_GRACE), the run has no figure
    rather than a wrong one.
    """
    readings = 0

    def slowAtTheEnd() -> tuple[float]:
        nonlocal readings
        readings += 1
        if readings == 2:
            time.sleep(METER_GRACE + 0.2)
        return (1.0,)

    with loadGenerator(1) as generator:
        result = generator.run(plan(dovecot, loadUsers), MIXED, slowAtTheEnd)
    assert readings == 2
    assert result.metered == ()
    assert (result.errors, result.firstError) == (0, "")


def test_the_load_meter_reads_cpu_with_exited_session_processes() -> None:
    """
    make bench's meter reads each target's CPU time under load, which
    counts the processes that served a session and exited, not the live
    processes' alone; direct Dovecot's run has no proxy figure.
    """

    def target(name: str, live: float, underLoad: float) -> Target:
        return Target(name, DIRECT, 1, 2, lambda: 0, lambda: live, lambda: underLoad)

    direct, proxy = target("direct", 1.0, 10.0), target("proxy", 2.0, 20.0)
    assert loadMeter(direct, proxy) == (10.0, 20.0)
    assert loadMeter(direct, direct) == (10.0, 0.0)


def test_tree_cpu_counts_exited_children_only_when_asked() -> None:
    """
    A server that forks a process per session (Dovecot's imap) has spent
    that process's CPU time once it has exited and been waited for: counted
    with C{reaped}, not by the live processes' counters.
    """
    busyChild = "import subprocess, sys, time\nsubprocess.run([sys.executable, '-c', 'sum(range(10**7))'])\nprint(flush=True)\ntime.sleep(30)"
    parent = subprocess.Popen([sys.executable, "-c", busyChild], stdout=subprocess.PIPE)
    try:
        assert parent.stdout is not None
        parent.stdout.readline()
        live, withReaped = treeCpuSeconds(parent.pid), treeCpuSeconds(parent.pid, reaped=True)
        childCpu = withReaped - live
        assert childCpu >= 0.05
        # the parent only waited: far less than its child's work
        assert live < childCpu
    finally:
        parent.kill()
        parent.wait()


def test_the_burner_takes_about_its_share_of_a_core_and_stops_when_told() -> None:
    """
    bench.contention's burner spins for its share of each millisecond and
    sleeps for the rest, until it is told to stop.
    """
    context = multiprocessing.get_context("fork")
    stop = context.Event()
    burner = context.Process(target=burn, args=(0.3, stop), daemon=True)
    burner.start()
    try:
        assert burner.pid is not None
        time.sleep(0.2)
        before = treeCpuSeconds(burner.pid)
        time.sleep(1.0)
        taken = treeCpuSeconds(burner.pid) - before
        # 0.3 asked; less when preempted or oversleeping, never all of a core
        assert 0.05 < taken < 0.6
    finally:
        stop.set()
        burner.join(timeout=5)
    assert burner.exitcode == 0


def test_a_refused_login_counts_as_an_error_not_as_a_login(dovecot: DovecotUpstream) -> None:
    """A wrong password is an error with the server's answer, and no login is counted."""
    wrong = LoadPlan(dovecot.ports["imap"], (("loadgen1", "not the password"),), clients=1, seconds=0.5)
    result = asyncio.run(runClients(wrong, CHURN, [0], time.monotonic()))
    assert result.operations == 0
    assert result.errors > 0
    assert "LOGIN" in result.firstError


def test_literals_are_read_whole_so_a_tag_inside_a_message_does_not_end_the_reply(
    dovecot: DovecotUpstream, loadUsers: tuple[tuple[str, str], ...]
) -> None:
    """A message body holding a line like the client's tagged OK is read as part of the literal."""

    async def fetchThenNoop() -> bytes:
        client = await LoadClient.connect(dovecot.ports["imap"])
        try:
            await client.login(*loadUsers[0])
            await client.command(b"SELECT INBOX")
            # tag L3: the trap line in every body reads "L3 OK FETCH completed"
            await client.command(b"FETCH 1:* (BODY.PEEK[])")
            # a client that stopped at the trap would now read the rest of
            # the FETCH as the NOOP's reply and fail or desynchronise
            client.writer.write(b"L4 NOOP\r\n")
            return await client._response()
        finally:
            await client.close()

    reply = asyncio.run(fetchThenNoop())
    assert reply.startswith(b"L4 OK")


def test_warm_up_logs_every_user_in_once(dovecot: DovecotUpstream, loadUsers: tuple[tuple[str, str], ...]) -> None:
    """The warm-up succeeds for good users and raises on a refused one."""
    asyncio.run(warmUp(dovecot.ports["imap"], loadUsers))
    with pytest.raises(Exception, match="LOGIN"):
        asyncio.run(warmUp(dovecot.ports["imap"], [("loadgen1", "wrong")]))


IMAPTEST_OUTPUT = """\
Logi List Stat Sele Fetc Fet2 Stor Dele Expu Appe Logo
100%  50%  50% 100% 100% 100%  50% 100% 100% 100% 100%
                          30%                  5%
 524  262  253  500    0    0    0    0    0   63   24 20/ 20
   5    2    1    3    4    0    0    0    0    2    5 ms/cmd avg

Totals:
Logi List Stat Sele Fetc Fet2 Stor Dele Expu Appe Logo
100%  50%  50% 100% 100% 100%  50% 100% 100% 100% 100%
                          30%                  5%
2927 1460 1455 2900 2890 2011  640  600  590 1500 2900
"""


def test_imaptest_totals_are_read_after_the_header_and_probabilities() -> None:
    """The counts come from the line after "Totals:", its header and its percentage lines."""
    totals = parseImaptestTotals(IMAPTEST_OUTPUT)
    assert totals["Logi"] == 2927
    assert totals["Fetc"] == 2890
    assert totals["Logo"] == 2900
    assert parseImaptestTotals("imaptest: Fatal: connect() failed\n") == {}


@pytest.fixture
def scratch() -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix="mp-test-bench-")
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.skipif(findHaproxy()[0] is None, reason="haproxy is not installed (make bench-deps)")
def test_haproxy_peer_relays_imap_to_dovecot_and_stops_by_pid(
    dovecot: DovecotUpstream, loadUsers: tuple[tuple[str, str], ...], scratch: str
) -> None:
    """The private haproxy relays a login, and stopping it ends its process."""
    binary = findHaproxy()[0]
    assert binary is not None
    peer = HaproxyTcpProxy(binary, scratch, dovecot.ports["imap"], dovecot.ports["pop3"], connections=64, threads=1)
    peer.start()
    try:
        assert peer.process is not None
        asyncio.run(warmUp(peer.ports["imap"], loadUsers))
        assert peer.memoryKiB() > 0
    finally:
        peer.stop()
    assert peer.process.poll() is not None
    assert peer.process.pid not in processTree(os.getpid())


def test_file_limit_is_raised_or_explained() -> None:
    """Asking for no more descriptors than the soft limit changes nothing and says so."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert "was enough" in raiseFileLimit(soft)
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (soft, hard)


def test_instruction_counts_are_the_extra_work_of_each_run_divided_by_how_much_more_it_did(tmp_path: Any) -> None:
    """Start-up cancels out: per FETCH from the second run, per login from the third, per mixed round from the fourth."""
    runs = [
        Work(fetches=100, logins=20, rounds=20),
        Work(fetches=1100, logins=20, rounds=20),
        Work(fetches=100, logins=220, rounds=20),
        Work(fetches=100, logins=20, rounds=320),
    ]
    # start-up 5e9, 150k per FETCH, 2.3M per login, 600k per round
    totals = [5_000_000_000 + 100 * 150_000 + 20 * 2_300_000 + 20 * 600_000]
    totals.append(totals[0] + 1000 * 150_000)
    totals.append(totals[0] + 200 * 2_300_000)
    totals.append(totals[0] + 300 * 600_000)
    assert counts(totals, runs) == Counts(150_000, 2_300_000, 600_000)


def test_instruction_totals_add_up_every_profile_of_a_run(tmp_path: Any) -> None:
    """A twistd run may leave a profile per process (callgrind.%p): all are counted."""
    for pid, total in ((101, 7), (102, 35)):
        (tmp_path / f"callgrind.{pid}").write_text(
            f"# callgrind format\nevents: Ir\nsummary: {total}\ntotals: {total}\n"
        )
    assert totalInstructions(str(tmp_path / "callgrind.*")) == 42


def test_a_profile_without_totals_is_an_error_not_zero_instructions(tmp_path: Any) -> None:
    """A process killed under callgrind leaves an empty profile: that run cannot be counted."""
    (tmp_path / "callgrind.101").write_text("# callgrind format\nevents: Ir\nsummary: 7\ntotals: 7\n")
    (tmp_path / "callgrind.102").write_text("")
    with pytest.raises(IncompleteProfile, match="callgrind.102 has no totals"):
        totalInstructions(str(tmp_path / "callgrind.*"))
    with pytest.raises(IncompleteProfile, match="no profile"):
        totalInstructions(str(tmp_path / "nothing.*"))
