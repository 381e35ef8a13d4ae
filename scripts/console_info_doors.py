"""
Console info in memory, one twisted.web Request each, through the HTTP
API's fast door (L{vaporproxy.http.routing.Root}) and through Klein's route
(the same handler): microseconds a request, fastest and median of 7 runs.
The figure behind README's "Doors" paragraph.  Run from the checkout:
C{PYTHONPATH=. python3 scripts/console_info_doors.py}.
"""

import gc
import time
from dataclasses import replace
from typing import Any

from twisted.web.server import Request, Site
from twisted.web.test.requesthelper import DummyChannel

from tests.http.test_api import CONFIG, USER_KEY, VMS, Harness

RUNS, REQUESTS = 7, 400
PATH = f"{VMS}/web-1/console".encode()


def one(resource: Any, site: Site) -> Request:
    channel = DummyChannel()
    channel.site = site
    request = Request(channel, False)
    request.method, request.uri, request.path, request.clientproto = b"GET", PATH, PATH, b"HTTP/1.1"
    request.prepath, request.postpath, request.args = [], PATH.split(b"/")[1:], {}
    request.requestHeaders.setRawHeaders(b"authorization", [f"Bearer {USER_KEY}".encode()])
    request.requestHeaders.setRawHeaders(b"host", [b"proxy.test"])
    request.site = site
    resource.render(request)
    return request


def run(resource: Any, site: Site) -> float:
    gc.collect()
    start = time.perf_counter()
    for _ in range(REQUESTS):
        request = one(resource, site)
    assert request.code == 200, request.code
    return (time.perf_counter() - start) / REQUESTS * 1e6


def main() -> None:
    unlimited = replace(CONFIG.auth, mint_rate=1e9, mint_burst=10**9, max_outstanding_tokens=10**9)
    h = Harness(replace(CONFIG, auth=unlimited))
    doors = {"fast door (Root)": h.api.resource(), "Klein route": h.api.app.resource()}
    site = Site(doors["fast door (Root)"])
    times: dict = {name: [] for name in doors}
    for _ in range(RUNS):
        for name, resource in doors.items():
            times[name].append(run(resource, site))
    for name, values in times.items():
        values.sort()
        print(f"{name}: fastest {values[0]:.0f} µs, median {values[RUNS // 2]:.0f} µs a request ({RUNS} runs of {REQUESTS})")


if __name__ == "__main__":
    main()
