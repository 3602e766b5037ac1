"""Offers: snapshot, GPU names, and the live fetchers against recorded responses on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from launcher.offers import Offer, gather_offers, load_snapshot, normalize_gpu
from launcher.providers import cache

RECORDED = Path(__file__).parent / "recorded"
KEYS = {
    "LAMBDA_API_KEY": "lam_sk_test_9f8e7d6c5b4a3210",
    "RUNPOD_API_KEY": "rp_TESTKEY_1234567890abcdef",
    "VAST_API_KEY": "vast_secret_abcdef0123456789",
}
PATHS = {
    "lambda": ("GET", "/api/v1/instance-types"),
    "runpod": ("POST", "/graphql"),
    "vast": ("POST", "/api/v0/bundles/"),
}
NORMAL = {
    "lambda": "lambda_instance_types.json",
    "runpod": "runpod_gpu_types.json",
    "vast": "vast_bundles.json",
}

Response = tuple[int, bytes] | Callable[[dict], tuple[int, bytes]]


def recorded(name: str, status: int = 200) -> tuple[int, bytes]:
    return status, (RECORDED / name).read_bytes()


class FakeProviders:
    """An HTTP server on 127.0.0.1 answering each (method, path) from a queue of responses.

    The last response of a queue repeats; every request is recorded to count hits.
    """

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], list[Response]] = {}
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path, _, query = self.path.partition("?")
                req = {"method": self.command, "path": path, "query": query, "headers": dict(self.headers)}
                req["body"] = json.loads(body) if body else None
                with fake.lock:
                    fake.requests.append(req)
                    queue = fake.routes.get((self.command, path), [(404, b'{"error": "no route"}')])
                    answer = queue.pop(0) if len(queue) > 1 else queue[0]
                status, payload = answer(req) if callable(answer) else answer
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _answer

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        # A client that gave up (the timeout test) leaves a broken pipe: not worth a traceback.
        self.httpd.handle_error = lambda request, client_address: None
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def serve(self, provider: str, *responses: Response) -> None:
        with self.lock:
            self.routes[PATHS[provider]] = list(responses)

    def hits(self, provider: str) -> list[dict]:
        method, path = PATHS[provider]
        with self.lock:
            return [r for r in self.requests if (r["method"], r["path"]) == (method, path)]


@pytest.fixture
def server() -> Iterator[FakeProviders]:
    fake = FakeProviders()
    # A short poll interval only makes shutdown() return sooner; requests are served at once.
    thread = threading.Thread(target=fake.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield fake
    fake.httpd.shutdown()
    fake.httpd.server_close()


@pytest.fixture
def live(server: FakeProviders, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeProviders:
    """All three providers pointed at the fake server with normal answers, keys set, fresh cache."""
    for provider in PATHS:
        monkeypatch.setenv(f"MEETARA_{provider.upper()}_API_URL", server.url)
        server.serve(provider, recorded(NORMAL[provider]))
    for var, key in KEYS.items():
        monkeypatch.setenv(var, key)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MEETARA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MEETARA_HTTP_RETRIES", "1")
    monkeypatch.setenv("MEETARA_HTTP_BACKOFF", "0")
    monkeypatch.delenv("MEETARA_OFFERS_TTL", raising=False)
    monkeypatch.delenv("MEETARA_HTTP_TIMEOUT", raising=False)
    return server


def by_type(offers: list[Offer], provider: str) -> dict[tuple[str, str], Offer]:
    return {(o.instance_type, o.region): o for o in offers if o.provider == provider}


def fields(offer: Offer) -> dict:
    return offer.model_dump(exclude={"fetched_at"})


# --- snapshot and names ----------------------------------------------------------------------


def test_snapshot_loads_and_is_dated() -> None:
    offers = load_snapshot()
    assert 40 <= len(offers) <= 80
    assert {o.provider for o in offers} == {"lambda", "runpod", "vast"}
    assert {o.fetched_at for o in offers} == {datetime(2026, 11, 20, 12, tzinfo=UTC)}
    assert all(o.source == "snapshot" for o in offers)
    for o in offers:
        if o.provider == "vast":
            assert o.disk_price_hour > 0
            assert o.spot_price_hour is not None and o.spot_price_hour < o.price_hour
        elif o.provider == "runpod":  # on-demand only; its container disk billed on top
            from launcher.providers.runpod import container_disk_hour

            assert o.spot_price_hour is None and o.disk_price_hour == container_disk_hour() > 0
        else:
            assert o.spot_price_hour is None and o.disk_price_hour == 0
    meta = json.loads((Path(__file__).parents[1] / "launcher/data/offers_snapshot.meta.json").read_text())
    assert meta["date"].startswith("2026-11") and set(meta["sources"]) == {"lambda", "runpod", "vast"}


def test_default_gather_is_the_snapshot_without_network(live: FakeProviders) -> None:
    table = gather_offers(providers=["vast", "lambda"])
    assert table.source == "snapshot" and str(table.snapshot_date) == "2026-11-20"
    assert {o.provider for o in table.offers} == {"vast", "lambda"}
    assert table.provenance == {"vast": "snapshot", "lambda": "snapshot"}
    assert live.requests == []


def test_unknown_provider_is_refused() -> None:
    with pytest.raises(ValueError, match="aws"):
        gather_offers(providers=["aws"])


@pytest.mark.parametrize(
    ("name", "mem_gb", "expected"),
    [
        ("NVIDIA GeForce RTX 4090", 24, "RTX4090"),
        ("RTX 4090", 24, "RTX4090"),
        ("RTX A6000", 48, "A6000"),
        ("NVIDIA RTX 6000 Ada Generation", 48, "RTX6000-Ada"),
        ("RTX 6000Ada", 48, "RTX6000-Ada"),
        ("A100 SXM4", 80, "A100-80GB"),
        ("A100 PCIE", 40, "A100-40GB"),
        ("NVIDIA A100-SXM4-80GB", None, "A100-80GB"),
        ("A100", None, "A100"),
        ("H100 NVL", 94, "H100-NVL"),  # a different GPU (94 GB, own board), not a form factor
        ("NVIDIA H100 NVL", 94, "H100-NVL"),
        ("H200 NVL", 141, "H200-NVL"),
        ("H100 PCIE", 80, "H100"),
        ("NVIDIA H100 80GB HBM3", 80, "H100"),
        ("H100 (80 GB SXM5)", 80, "H100"),
        ("A10", 24, "A10"),
        ("L40S", 48, "L40S"),
        ("Tesla V100", 16, "V100"),
        ("Q RTX 8000", 48, "RTX8000"),
        ("Quadro RTX 6000", 24, "RTX6000"),
        ("RTX 3090 Ti", 24, "RTX3090Ti"),  # as RunPod's and SkyPilot's keys spell it
        ("NVIDIA GeForce RTX 3090 Ti", 24, "RTX3090Ti"),
        ("RTX 4070S Ti", 16, "RTX4070STi"),
        ("GTX 1080 Ti", 11, "GTX1080Ti"),
    ],
)
def test_normalize_gpu(name: str, mem_gb: float | None, expected: str) -> None:
    assert normalize_gpu(name, mem_gb) == expected


def test_offer_prices_include_disk_and_split_per_gpu() -> None:
    offer = Offer(
        provider="vast",
        instance_type="1",
        gpu="RTX4090",
        gpu_count=2,
        gpu_mem_gb=24,
        vcpus=16,
        mem_gib=64,
        region="US-Texas",
        price_hour=0.8,
        spot_price_hour=0.4,
        disk_price_hour=0.01,
        fetched_at=datetime.now(UTC),
        source="live",
    )
    assert offer.effective_price(spot=False) == pytest.approx(0.81)
    assert offer.effective_price(spot=True) == pytest.approx(0.41)
    assert offer.price_per_gpu_hour(spot=True) == pytest.approx(0.205)
    no_spot = offer.model_copy(update={"spot_price_hour": None})
    assert no_spot.effective_price(spot=True) is None and no_spot.price_per_gpu_hour(spot=True) is None


def test_importing_offers_stays_light() -> None:
    code = (
        "import sys, launcher.offers; "
        "print([m for m in ('requests', 'tenacity', 'torch', 'transformers', 'sky') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- parsing each provider ---------------------------------------------------------------------


def test_lambda_offers(live: FakeProviders) -> None:
    table = gather_offers(live=True, providers=["lambda"])
    assert table.errors == {} and table.provenance == {"lambda": "live"}
    offers = by_type(table.offers, "lambda")
    # Sold-out types (no region with capacity) give no offer; the others one per region.
    assert sorted(offers) == [
        ("gpu_1x_a10", "europe-central-1"),
        ("gpu_1x_a10", "us-east-1"),
        ("gpu_1x_a6000", "us-west-1"),
        ("gpu_1x_gh200", "us-east-3"),
        ("gpu_1x_h100_pcie", "us-east-1"),
        ("gpu_1x_h100_pcie", "us-west-3"),
        ("gpu_8x_a100_80gb_sxm4", "us-midwest-1"),
    ]
    assert fields(offers["gpu_8x_a100_80gb_sxm4", "us-midwest-1"]) == {
        "provider": "lambda",
        "instance_type": "gpu_8x_a100_80gb_sxm4",
        "gpu": "A100-80GB",
        "gpu_name": "A100",
        "gpu_count": 8,
        "gpu_mem_gb": 80,
        "vcpus": 240,
        "mem_gib": 1800.0,  # Lambda's `memory_gib`
        "region": "us-midwest-1",
        "price_hour": 22.32,
        "spot_price_hour": None,
        "disk_price_hour": 0.0,
        "source": "live",
    }
    assert offers["gpu_1x_a6000", "us-west-1"].gpu == "A6000"
    assert offers["gpu_8x_a100_80gb_sxm4", "us-midwest-1"].price_per_gpu_hour(spot=False) == 2.79
    (request,) = live.hits("lambda")
    assert request["headers"]["Authorization"] == f"Bearer {KEYS['LAMBDA_API_KEY']}"


def test_runpod_offers(live: FakeProviders) -> None:
    table = gather_offers(live=True, providers=["runpod"])
    assert table.errors == {}
    offers = {o.instance_type: o for o in table.offers}
    # Out of stock (null stockStatus or lowestPrice), AMD and empty types are left out.
    assert sorted(offers) == [
        "NVIDIA A100 80GB PCIe",
        "NVIDIA GeForce RTX 3090 Ti",
        "NVIDIA GeForce RTX 4090",
        "NVIDIA H100 80GB HBM3",
        "NVIDIA H100 NVL",
        "NVIDIA L40S",
    ]
    assert fields(offers["NVIDIA GeForce RTX 4090"]) == {
        "provider": "runpod",
        "instance_type": "NVIDIA GeForce RTX 4090",
        "gpu": "RTX4090",
        "gpu_name": "RTX 4090",
        "gpu_count": 1,
        "gpu_mem_gb": 24,
        "vcpus": 6,
        "mem_gib": 41.0,
        "region": "US",
        "price_hour": 0.74,
        "spot_price_hour": None,
        "disk_price_hour": 0.006944,  # the container disk: 50 GB at $0.10/GB-month
        "source": "live",
    }
    assert offers["NVIDIA A100 80GB PCIe"].gpu == "A100-80GB"
    # the NVL (94 GB) is its own GPU; the SXM and PCIe H100 (80 GB) are one
    assert (offers["NVIDIA H100 NVL"].gpu, offers["NVIDIA H100 NVL"].gpu_mem_gb) == ("H100-NVL", 94)
    assert offers["NVIDIA H100 80GB HBM3"].gpu == "H100"
    assert offers["NVIDIA GeForce RTX 3090 Ti"].gpu == "RTX3090Ti"
    # A positive spot price the API still sends is not offered: RunPod retired interruptible pods and the
    # mutation SkyPilot would rent one with (launcher/providers/runpod.py, SPOT_RETIRED).
    assert offers["NVIDIA H100 NVL"].spot_price_hour is None
    (request,) = live.hits("runpod")
    assert request["body"]["variables"] == {"lowestPriceInput": {"gpuCount": 1, "secureCloud": True}}
    assert "gpuTypes" in request["body"]["query"]
    assert request["headers"]["Authorization"] == f"Bearer {KEYS['RUNPOD_API_KEY']}"
    assert request["query"] == ""  # the key never travels in the URL


def test_vast_offers_include_disk_cost(live: FakeProviders) -> None:
    table = gather_offers(live=True, providers=["vast"])
    assert table.errors == {}
    offers = {o.instance_type: o for o in table.offers}
    assert len(offers) == 13
    o = offers["31245871"]
    assert fields(o) == {
        "provider": "vast",
        "instance_type": "31245871",
        "gpu": "RTX4090",
        "gpu_name": "RTX 4090",
        "gpu_count": 1,
        "gpu_mem_gb": 24,
        "vcpus": 16,
        "mem_gib": 62.9,  # a quarter of the host's 257,586 MiB: 16 of its 64 cores
        "region": "US-Texas",
        "price_hour": 0.38,
        "spot_price_hour": 0.19,
        "disk_price_hour": 0.010417,  # 50 GB at $0.15/GB/month
        "source": "live",
    }
    assert o.effective_price(spot=False) == pytest.approx(0.390417)
    assert o.effective_price(spot=True) == pytest.approx(0.200417)
    assert offers["31350882"].gpu == "H100" and offers["31350882"].gpu_count == 2
    assert offers["31350882"].price_per_gpu_hour(spot=False) == pytest.approx((3.74 + 50 * 0.25 / 720) / 2)
    assert offers["31188725"].gpu == "A100-80GB" and offers["30455018"].gpu == "A100-40GB"
    assert offers["30455018"].spot_price_hour is None  # min_bid null: no interruptible price
    # regions lead with the ISO country code: "ZZ" (unknown) for a null geolocation, a country's name
    # ("Sweden") gets its code
    assert offers["30566120"].region == "ZZ" and offers["30688413"].region == "SE-Sweden"
    assert offers["31077310"].region == "BG-Sofia-Capital"
    assert offers["30871529"].region == "JP-Yutakachō,ShinagawaDistrict,Tokyo"
    assert (offers["30688413"].gpu, offers["30688413"].gpu_name) == ("RTX8000", "Q RTX 8000")
    # a host reporting 23,028 MiB on its RTX 4090 has a 24 GB card
    assert (offers["31402291"].gpu, offers["31402291"].gpu_mem_gb) == ("RTX4090", 24)
    assert (offers["31077310"].gpu, offers["31077310"].gpu_mem_gb) == ("H100-NVL", 94)
    assert offers["30914476"].gpu == "RTX3090Ti" and offers["30914476"].gpu_count == 2
    # a host that does not report its RAM, or its core count, still offers its GPU at its price
    assert offers["30790104"].mem_gib == offers["31120458"].mem_gib == 0.0
    (request,) = live.hits("vast")
    assert request["body"]["rentable"] == {"eq": True} and request["body"]["disk_space"] == {"gte": 50}


# --- failures ------------------------------------------------------------------------------


FAILURES = [
    ("lambda", recorded("lambda_empty.json"), "empty response"),
    ("lambda", recorded("lambda_malformed.json"), "not valid JSON"),
    ("lambda", recorded("lambda_401.json", 401), "HTTP 401: global/invalid-api-key"),
    ("lambda", recorded("lambda_500.json", 500), "HTTP 500: global/unknown Unknown error."),
    ("lambda", (200, b'{"data": "gpu_1x_a10"}'), "not a list"),
    ("runpod", recorded("runpod_empty.json"), "empty response"),
    ("runpod", recorded("runpod_malformed.json"), "not valid JSON"),
    ("runpod", recorded("runpod_401.json", 401), "HTTP 401: Unauthorized"),
    ("runpod", recorded("runpod_500.html", 500), "HTTP 500"),
    ("runpod", recorded("runpod_graphql_error.json"), "GraphQL error: Cannot query field"),
    ("runpod", (200, b"[]"), "no 'data' field"),
    ("vast", recorded("vast_empty.json"), "empty response"),
    ("vast", recorded("vast_malformed.json"), "not valid JSON"),
    ("vast", recorded("vast_401.json", 401), "HTTP 401: Invalid user key"),
    ("vast", recorded("vast_500.json", 500), "HTTP 500: Internal server error"),
    ("vast", (200, b'{"offers": [null, 3, "x"]}'), "all 3 rows unreadable"),
]


@pytest.mark.parametrize(("provider", "response", "message"), FAILURES)
def test_a_failing_provider_is_recorded_and_the_others_still_answer(
    live: FakeProviders, provider: str, response: tuple[int, bytes], message: str
) -> None:
    live.serve(provider, response)
    table = gather_offers(live=True)
    assert list(table.errors) == [provider]
    assert message in table.errors[provider]
    others = set(PATHS) - {provider}
    assert {o.provider for o in table.offers} == others
    assert set(table.provenance) == others
    assert not cache.cache_path(provider).exists()  # a failure is never cached


@pytest.mark.parametrize(
    ("provider", "n_offers", "n_bad"), [("lambda", 3, 3), ("runpod", 2, 3), ("vast", 4, 3)]
)
def test_malformed_rows_are_skipped_and_counted(
    live: FakeProviders, caplog: pytest.LogCaptureFixture, provider: str, n_offers: int, n_bad: int
) -> None:
    live.serve(provider, recorded(f"{provider}_bad_rows.json"))
    with caplog.at_level(logging.WARNING, logger="launcher.offers"):
        table = gather_offers(live=True, providers=[provider])
    assert table.errors == {}
    assert len(table.offers) == n_offers
    assert table.bad_rows == {provider: n_bad}
    assert f"{provider}: skipped {n_bad} malformed row(s)" in caplog.text


def test_transient_errors_are_retried(live: FakeProviders, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEETARA_HTTP_RETRIES", "2")
    live.serve("lambda", recorded("lambda_500.json", 500), (503, b""), recorded(NORMAL["lambda"]))
    live.serve("vast", (429, b'{"msg": "slow down"}'), recorded(NORMAL["vast"]))
    table = gather_offers(live=True, providers=["lambda", "vast"])
    assert table.errors == {}
    assert len(live.hits("lambda")) == 3 and len(live.hits("vast")) == 2
    assert {o.provider for o in table.offers} == {"lambda", "vast"}


def test_retries_are_bounded(live: FakeProviders, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEETARA_HTTP_RETRIES", "2")
    live.serve("vast", recorded("vast_500.json", 500))
    table = gather_offers(live=True, providers=["vast"])
    assert len(live.hits("vast")) == 3
    assert table.errors["vast"] == "HTTP 500: Internal server error after 3 attempts"


def test_unreachable_provider(live: FakeProviders, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MEETARA_VAST_API_URL", f"http://127.0.0.1:{port}")
    table = gather_offers(live=True)
    assert table.errors == {"vast": "unreachable (ConnectionError) after 2 attempts"}
    assert {o.provider for o in table.offers} == {"lambda", "runpod"}


def test_a_provider_that_does_not_answer_times_out(
    live: FakeProviders, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()

    def hang(_request: dict) -> tuple[int, bytes]:
        release.wait(10)
        return recorded(NORMAL["runpod"])

    monkeypatch.setenv("MEETARA_HTTP_TIMEOUT", "0.3")
    monkeypatch.setenv("MEETARA_HTTP_RETRIES", "0")
    live.serve("runpod", hang)
    try:
        table = gather_offers(live=True)
    finally:
        release.set()
    assert table.errors == {"runpod": "unreachable (ReadTimeout) after 1 attempts"}
    assert {o.provider for o in table.offers} == {"lambda", "vast"}


# --- cache -----------------------------------------------------------------------------------


def test_cache_serves_within_ttl_and_refresh_bypasses_it(live: FakeProviders) -> None:
    first = gather_offers(live=True)
    assert first.provenance == dict.fromkeys(PATHS, "live")
    second = gather_offers(live=True)
    assert second.provenance == dict.fromkeys(PATHS, "cache")
    assert second.offers == first.offers  # fetched_at included: the cache keeps the original time
    assert all(len(live.hits(p)) == 1 for p in PATHS)
    third = gather_offers(live=True, refresh=True)
    assert third.provenance == dict.fromkeys(PATHS, "live")
    assert all(len(live.hits(p)) == 2 for p in PATHS)
    assert json.loads(cache.cache_path("vast").read_text())["provider"] == "vast"


def test_cache_expires_and_belongs_to_its_url(live: FakeProviders, monkeypatch: pytest.MonkeyPatch) -> None:
    gather_offers(live=True, providers=["vast"])
    monkeypatch.setenv("MEETARA_OFFERS_TTL", "0")
    assert gather_offers(live=True, providers=["vast"]).provenance == {"vast": "live"}
    monkeypatch.delenv("MEETARA_OFFERS_TTL")
    monkeypatch.setenv("MEETARA_VAST_API_URL", live.url + "/")  # another endpoint, another answer
    assert gather_offers(live=True, providers=["vast"]).provenance == {"vast": "live"}
    assert len(live.hits("vast")) == 3


def test_a_corrupt_cache_is_ignored(live: FakeProviders, caplog: pytest.LogCaptureFixture) -> None:
    gather_offers(live=True, providers=["lambda"])
    cache.cache_path("lambda").write_text('{"offers": [')
    table = gather_offers(live=True, providers=["lambda"])
    assert table.provenance == {"lambda": "live"} and len(table.offers) == 7
    assert "unreadable offers cache" in caplog.text


# --- credentials ---------------------------------------------------------------------------


def test_missing_key_skips_the_provider(live: FakeProviders, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in KEYS:
        monkeypatch.delenv(var)
    table = gather_offers(live=True)
    assert table.skipped == {"lambda": "no API key: set LAMBDA_API_KEY or write ~/.lambda_cloud/lambda_keys"}
    assert table.errors == {}
    assert live.hits("lambda") == []
    # RunPod's and Vast's offer searches answer without a key, and none is sent.
    assert {o.provider for o in table.offers} == {"runpod", "vast"}
    assert all("Authorization" not in r["headers"] for r in live.requests)


def test_keys_come_from_the_usual_credential_files(
    live: FakeProviders, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for var in KEYS:
        monkeypatch.delenv(var)
    home = tmp_path / "home"
    (home / ".lambda_cloud").mkdir(parents=True)
    (home / ".lambda_cloud/lambda_keys").write_text("api_key = lam-from-file\n")
    (home / ".runpod").mkdir()
    (home / ".runpod/config.toml").write_text('[default]\napi_key = "rp-from-file"\n')
    (home / ".vast_api_key").write_text("vast-from-file\n")
    table = gather_offers(live=True)
    assert table.errors == {} and table.skipped == {}
    sent = {p: live.hits(p)[0]["headers"]["Authorization"] for p in PATHS}
    assert sent == {
        "lambda": "Bearer lam-from-file",
        "runpod": "Bearer rp-from-file",
        "vast": "Bearer vast-from-file",
    }


def test_api_keys_never_leak(live: FakeProviders, caplog: pytest.LogCaptureFixture) -> None:
    def echo_key(status: int, template: str) -> Callable[[dict], tuple[int, bytes]]:
        # A hostile or careless API that repeats the credential in its error body.
        return lambda req: (status, template.replace("KEY", req["headers"]["Authorization"]).encode())

    caplog.set_level(logging.DEBUG)
    gather_offers(live=True)  # fills the cache files
    live.serve("lambda", echo_key(401, '{"error": {"code": "global/invalid-api-key", "message": "bad KEY"}}'))
    live.serve("runpod", echo_key(200, '{"errors": [{"message": "token KEY expired"}]}'))
    live.serve("vast", echo_key(500, "upstream rejected KEY"))
    table = gather_offers(live=True, refresh=True)
    assert set(table.errors) == set(PATHS)
    assert all("***" in message for message in table.errors.values())
    cached = "".join(cache.cache_path(p).read_text() for p in PATHS)
    for key in KEYS.values():
        assert key not in caplog.text
        assert key not in json.dumps(table.model_dump(mode="json"))
        assert key not in cached
