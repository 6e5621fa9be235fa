"""Docker backend benchmark: why one driver per container over the attach stream, and what
sessions, restarts and the warm pool cost.

Measured against the engine the backend finds (`make docker-engine`), image
`spo-agents-sandbox:latest`:

- call: `print(sum(range(1000)))` through a session (the attach-stream driver) vs. `docker exec`
  of `python3 -c` and of `true` in a running container (the floor of an exec-per-call design);
- session open: with the warm pool empty (create + start + driver ready) and from a warm pool;
- recovery: the call after a timed-out call (the supervisor kills the worker and forks a new one
  in the same container) and the call after the supervisor itself is gone (new container);
- throughput: 16 sessions, 25 calls each, all in flight together.

    .venv/bin/python bench/docker_sandbox.py [--calls 200]

Results go in bench/RESULTS.md (`## Docker sandbox`), with the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time

from spo_agents.sandboxes.base import SandboxLimits
from spo_agents.sandboxes.docker.backend import DEFAULT_IMAGE, DockerBackend, _api, engine_url

CODE = "print(sum(range(1000)))"


def ms(values: list[float]) -> str:
    s = sorted(values)
    p99 = s[min(len(s) - 1, int(round(0.99 * (len(s) - 1))))]
    return f"p50 {1000 * statistics.median(s):7.1f} ms   p99 {1000 * p99:7.1f} ms   (n={len(s)})"


async def timed(coro) -> float:
    t0 = time.perf_counter()
    await coro
    return time.perf_counter() - t0


async def main(calls: int) -> None:
    ok, why = DockerBackend.available()
    if not ok:
        sys.exit(f"docker backend not available: {why}")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
        f"load avg {os.getloadavg()[0]:.2f}; engine {engine_url()}"
    )
    lim = SandboxLimits(timeout_s=10.0)

    # Calls through the attach-stream driver.
    cold = DockerBackend(pool_size=0)
    s = await cold.open_session(limits=lim)
    await s.run(CODE)
    lat = [await timed(s.run(CODE)) for _ in range(calls)]
    print(f"call, attach-stream driver:        {ms(lat)}")

    # docker exec into the same kind of container.
    api = _api(engine_url())
    cid = s.container_id
    for label, cmd in (("docker exec python3 -c", ["python3", "-c", CODE]), ("docker exec true", ["true"])):
        ex = []
        for _ in range(max(calls // 4, 20)):
            t0 = time.perf_counter()
            eid = api.exec_create(cid, cmd, user="1000:1000")["Id"]
            api.exec_start(eid)
            ex.append(time.perf_counter() - t0)
        print(f"call, {label + ':':28s} {ms(ex)}")
    api.close()

    # Recovery.
    rec, lost = [], []
    for _ in range(10):
        await s.run("while True: pass", timeout=0.2)
        rec.append(await timed(s.run(CODE)))
    print(f"next call after a timeout:         {ms(rec)}   (worker re-forked, same container)")
    for _ in range(5):
        cold._api.kill(s.container_id)
        await s.run(CODE)  # reports the loss
        lost.append(await timed(s.run(CODE)))
    print(f"next call after the container died: {ms(lost)}   (pool 0: a new container)")
    await s.close()

    # Session open: cold vs. warm pool.
    opens = []
    for _ in range(10):
        t0 = time.perf_counter()
        x = await cold.open_session(limits=lim)
        opens.append(time.perf_counter() - t0)
        await x.close()
    print(f"session open, no pool:             {ms(opens)}")
    await cold.aclose()

    warm = DockerBackend(pool_size=4)
    await warm.warm(limits=lim)
    wopen = []
    for _ in range(10):
        await warm.warm(limits=lim)  # the pool refills between opens (as between episodes)
        t0 = time.perf_counter()
        x = await warm.open_session(limits=lim)
        wopen.append(time.perf_counter() - t0)
        await x.close()
    print(f"session open, warm pool:           {ms(wopen)}")

    # Throughput: 16 sessions in flight.
    sessions = await asyncio.gather(*[warm.open_session(limits=lim) for _ in range(16)])
    t0 = time.perf_counter()

    async def loop(sess) -> list[float]:
        return [await timed(sess.run(CODE)) for _ in range(25)]

    per = await asyncio.gather(*[loop(x) for x in sessions])
    wall = time.perf_counter() - t0
    flat = [v for p in per for v in p]
    print(f"16 sessions x 25 calls:            {ms(flat)}   {len(flat) / wall:6.0f} calls/s")
    await asyncio.gather(*[x.close() for x in sessions])
    await warm.aclose()
    print(f"image {DEFAULT_IMAGE}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=200)
    asyncio.run(main(p.parse_args().calls))
