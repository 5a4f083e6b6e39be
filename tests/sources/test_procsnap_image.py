"""The exec snapshot never mixes two images of one process (a shell exec'ing its last command)."""

from __future__ import annotations

import os
import subprocess

from agent.sources.procsnap import read_snapshot


def test_a_snapshot_describes_one_image_of_a_process_that_keeps_exec_ing() -> None:
    # env execs nice execs env ... execs sleep, all as one pid, read over and over meanwhile:
    # a snapshot's arguments, name and program are of the same image. Reading the program
    # before and after the rest catches an exec in between, not two (env, nice, env again)
    # while the reader was preempted: on a loaded machine one such read can slip through in
    # a chain. Without the check, 60 to 85 reads of each chain mixed two images (measured).
    p = subprocess.Popen(["env", "nice", "-n", "0"] * 150 + ["sleep", "5"])
    seen = 0
    mixed: list[tuple[bytes, bytes, bytes]] = []
    try:
        while True:
            snap = read_snapshot(p.pid)
            if snap is None:  # mid-exec (no memory mapped yet)
                continue
            seen += 1
            argv0 = os.path.basename(snap.cmdline.split(b"\0")[0])
            exe = os.path.basename(snap.exe or b"")
            assert snap.stat is not None
            comm = snap.stat.split(b"(", 1)[1].split(b")", 1)[0]
            if not argv0 == comm == exe:
                mixed.append((argv0, comm, exe))
            if argv0 == b"sleep":
                break
    finally:
        p.kill()
        p.wait()
    assert seen > 1
    assert len(mixed) <= 2, mixed
