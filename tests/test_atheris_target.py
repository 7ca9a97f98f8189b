"""
The atheris target (scripts/fuzz_atheris.py) stays runnable: every one of
its targets runs here on inputs that reach deep into it, without atheris.
"""

from __future__ import annotations

import random

import pytest

from scripts.fuzz_atheris import SEPARATOR, TARGETS, fuzzOne

SEEDS = [
    b"a1 LOGIN {5}\r\nalice {7+}\r\nalicepw\r\n" + SEPARATOR + b"a2 NOOP " + b"x" * 200 + b"\r\n",
    b"* 1 FETCH (BODY[] {12}\r\nhello\r\nworld)\r\n" + SEPARATOR + b"a1 OK done\r\n",
    b"USER alice\r\nPASS pw\r\n" + SEPARATOR + b"LIST\n" + b"y" * 600,
    b"a1 CAPABILITY\r\na2 STARTTLS\r\n" + SEPARATOR + b"a3 LOGIN alice alicepw\r\n",
    b"\x00a1 SELECT INBOX\r\n"
    + SEPARATOR
    + b"\x01* 3 EXISTS\r\na1 OK [READ-WRITE] done\r\n"
    + SEPARATOR
    + b"\x02"
    + SEPARATOR
    + b"\x00a2 APPEND INBOX {3}\r\nabc\r\n",
]


@pytest.mark.parametrize("target", range(len(TARGETS)), ids=TARGETS)
def test_every_target_runs_its_checks_on_seed_and_random_inputs(target: int) -> None:
    generator = random.Random(target)
    inputs = [bytes([target + len(TARGETS) * variant]) + seed for seed in SEEDS for variant in range(3)]
    inputs += [bytes([target]) + generator.randbytes(generator.randrange(200)) for _ in range(40)]
    for data in inputs:
        fuzzOne(data)
