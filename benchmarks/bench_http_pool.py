"""The remote engine's HTTP client cost per request: one httpx pool vs the pool's small clients.

A minimal HTTP/1.1 server in a child process answers every request after ``--delay-ms`` (a stand-in
for generation, no compute), so the client's own work is what is measured: waves of
``--concurrency`` requests in flight (the shape of a batch of episodes), sent through
:class:`agentflow.engines.remote._http.ClientShards` with one client holding every connection
(what the remote engine did before 2026-12-05) and with its default of ``PER_CLIENT`` connections
per client, alternating wave by wave so machine noise hits both alike. Prints one JSON line per
setting and concurrency: CPU milliseconds per request (this process, on the loop) and wall seconds;
and the ratio, one pool / small clients.

    python benchmarks/bench_http_pool.py
    taskset -c 1 python benchmarks/bench_http_pool.py --concurrency 16,64,256
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import socket
import subprocess
import sys
import time

import httpx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from engines.remote._http import PER_CLIENT, ClientShards

SERVER = r'''
import asyncio, sys
body = b'{"text": "x", "meta_info": {"output_token_logprobs": []}}'
resp = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
delay = float(sys.argv[2]) / 1000
class Conn(asyncio.Protocol):
    def connection_made(self, t):
        self.t, self.buf = t, b""
    def data_received(self, data):
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, rest = self.buf.split(b"\r\n\r\n", 1)
            lengths = [x for x in head.split(b"\r\n") if x.lower().startswith(b"content-length:")]
            n = int(lengths[0].split(b":")[1]) if lengths else 0
            if len(rest) < n:
                return
            self.buf = rest[n:]
            asyncio.get_running_loop().call_later(delay, self.t.write, resp)
async def main():
    server = await asyncio.get_running_loop().create_server(Conn, "127.0.0.1", int(sys.argv[1]))
    print("ready", flush=True)
    async with server:
        await server.serve_forever()
asyncio.run(main())
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _wave(shards: ClientShards, url: str, n: int) -> tuple[float, float]:
    payload = {"input_ids": list(range(100)), "sampling_params": {"max_new_tokens": 4}, "return_logprob": True}

    async def one() -> None:
        r = await shards.request("POST", url, json=payload)
        r.json()

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*[one() for _ in range(n)])
    return time.process_time() - cpu, time.perf_counter() - wall


async def run(args: argparse.Namespace, port: int) -> None:
    url = f"http://127.0.0.1:{port}/generate"

    def make(limits: httpx.Limits, ssl_context: object) -> httpx.AsyncClient:
        return httpx.AsyncClient(limits=limits, verify=ssl_context, timeout=60)

    for conc in args.concurrency:
        settings = {"one_pool": ClientShards(make, args.max_connections, per_client=args.max_connections),
                    f"clients_of_{PER_CLIENT}": ClientShards(make, args.max_connections)}
        totals = {name: [0.0, 0.0] for name in settings}
        for i in range(args.waves + 1):  # wave 0 opens the connections
            for name, shards in settings.items():
                cpu, wall = await _wave(shards, url, conc)
                if i:
                    totals[name][0] += cpu
                    totals[name][1] += wall
        per_request = {name: 1000 * cpu / (conc * args.waves) for name, (cpu, _) in totals.items()}
        for name, (_, wall) in totals.items():
            print(json.dumps({"bench": "http_pool", "setting": name, "concurrency": conc,
                              "cpu_ms_per_request": round(per_request[name], 3), "wall_s": round(wall, 2)}))
        one, small = per_request.values()
        print(json.dumps({"bench": "http_pool_ratio", "concurrency": conc, "cpu_ratio": round(one / small, 2)}))
        for shards in settings.values():
            await shards.aclose()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", default="16,64,256", help="comma-separated requests in flight")
    p.add_argument("--waves", type=int, default=8, help="measured waves per setting and concurrency")
    p.add_argument("--delay-ms", type=float, default=50.0, help="the server's answer delay")
    p.add_argument("--max-connections", type=int, default=1024, help="RemoteEngineConfig.max_connections")
    args = p.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port), str(args.delay_ms)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        asyncio.run(run(args, port))
    finally:
        server.kill()
        server.wait()


if __name__ == "__main__":
    main()
