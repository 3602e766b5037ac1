"""meetara's SkyPilot plugin: Vast rented as planned, and a network check that works behind a proxy.
Loaded by meetara's own SkyPilot API server
(`launcher/skyserver.py` lists it in that server's plugins.yaml), in its request executors and its
jobs controller, where SkyPilot provisions (sky/server/plugins.py, `PluginContext`).

Why: with skypilot 0.14.1 and vastai 1.9.1, SkyPilot's Vast provisioner (sky/provision/vast/utils.py,
`launch`) cannot rent the offer meetara planned:
- its offer search is a query string (`geolocation="NA" ... gpu_name="RTX 3090" cpu_ram>="32.0"`) that
  vastai's `preprocess_search_query` cannot parse (its value grammar has no quotes or dots); the
  parse stops at the first quoted value and the search goes out with no filter at all, so the machine
  rented is Vast's best-"score" offer of any GPU at any price;
- spot never reaches it: `Vast.make_deploy_resources_variables` (sky/clouds/vast.py) returns no
  `use_spot`, so the cluster template renders `Preemptible: null`, the search asks for `on-demand`
  offers and the create sends no bid (and the chunked `min_bid` it would bid is set to 0 by vastai);
- it writes the Vast API key in plain text into the instance's `onstart` script, kept by Vast and
  run on the rented machine (nothing in SkyPilot reads it there);
- vastai sends through `Session.send()`, which ignores `REQUESTS_CA_BUNDLE` (a TLS-inspecting
  corporate proxy, or the test harness's, then fails verification).

What this plugin changes: the deploy variables carry `use_spot` (as RunPod's do), and, only for
meetara's Vast instance types (`<n>x-<gpu>-m<offer id>-0`, `launcher/skycatalog.py`):
- the search asks Vast for exactly the planned offer id (rentable, not rented: the filters of
  meetara's own offer search), in the planned market (`bid` for spot, `on-demand` otherwise), with
  the planned disk priced;
- spot bids the planned price (the catalog's SpotPrice less the price of the disk it includes, the
  `DISK_GB` meetara prices every Vast offer with: the `min_bid` meetara saw, whatever disk the task
  asks for);
- an offer gone since planning fails the launch with a line saying so, and SkyPilot's failover moves
  to meetara's next ordered offer;
- the key is left out of `onstart`.
Everything else is SkyPilot's own `launch`; any other instance type goes to SkyPilot's code unchanged.

The network check: before every status check of a running managed job, SkyPilot's jobs controller
(sky/jobs/controller.py) calls `backend_utils.async_check_network_connection()`, which HEADs
https://8.8.8.8 and https://1.1.1.1 directly (aiohttp, ignoring the proxy variables), and while that fails
it logs "Network is not available" and skips the check, forever: a job whose controller runs where those
addresses cannot be reached (behind a corporate proxy, on a network that allows only what it needs) stays
RUNNING after it ended, its machine up and billed. meetara's controller runs on the user's machine
(consolidation mode), so this plugin replaces the check (and its synchronous twin, which the cluster
status refresh calls): the network is up when any of the providers' APIs (what the controller must reach to
manage the machines) or SkyPilot's two addresses answers anything over HTTP, through the proxy the
environment names. A network that reaches none of them is still "not available", as before.

Recovery to the next offer: SkyPilot's EAGER_NEXT_REGION (`EagerFailoverStrategyExecutor.recover`,
sky/jobs/recovery_strategy.py) is meant to relaunch a preempted job anywhere but where it was preempted
first, but it blocks that place only when the launched resources have neither region nor zone, which
launched resources always have (skypilot-org/skypilot#10021), and the block (`Task.blocked_resources`) never
leaves the controller anyway: it launches through `sdk.launch`, which sends the task as YAML. The relaunch
goes to the cheapest offer again, the one just preempted. For that first relaunch this plugin sends the task
without the preempted offer (cloud, region, zone, instance type, market), so it goes to meetara's next
ordered offer; if none has a machine, SkyPilot's own unconstrained retries follow, as before.
"""

from __future__ import annotations

import contextvars
import functools
import os
import re
from dataclasses import dataclass
from typing import Any

from sky.server import plugins

from launcher.providers.vast import DISK_GB as PRICED_DISK_GB  # the disk meetara's Vast prices include

# meetara's Vast instance type: the offer id rides in the field SkyPilot's own types use for cores
VAST_TYPE = re.compile(r"^(\d+)x-(.+)-m(\d+)-0$")
HOURS_PER_MONTH = 30 * 24  # Vast prices storage per GB-month (launcher/providers/vast.py)
_KEY_LINE = re.compile(r'echo "[^"]*" > ~/\.vast_api_key;?')
# what the jobs controller must reach to manage meetara's machines (the hosts SkyPilot's provisioners and the
# providers' SDKs call), then SkyPilot's own probes; any HTTP answer from one means the network is up
NETWORK_PROBES = (
    "https://console.vast.ai",
    "https://api.runpod.io",
    "https://cloud.lambdalabs.com",
    "https://8.8.8.8",
    "https://1.1.1.1",
)
PROBE_TIMEOUT_S = 5.0


@dataclass
class Planned:
    """The Vast launch under way in this thread or task, as meetara planned it."""

    offer_id: int
    spot: bool
    disk_gb: int  # the disk the task asks for (what Vast rents and bills)
    catalog_price: float | None  # the catalog's $/h for the market (PRICED_DISK_GB of disk included)
    bid: float | None = None  # set once the offer is found: catalog price less the priced disk's price


_PLANNED: contextvars.ContextVar[Planned | None] = contextvars.ContextVar("meetara_vast_plan", default=None)


def bid_for(catalog_price: float | None, offer: dict, disk_gb: int = PRICED_DISK_GB) -> float | None:
    """The bid meetara priced: its catalog SpotPrice includes the disk it was priced with (`disk_gb`,
    meetara's `PRICED_DISK_GB`, x the offer's `storage_cost` $/GB-month), Vast's bid does not."""
    if catalog_price is None:
        return None
    disk_hour = disk_gb * float(offer.get("storage_cost") or 0) / HOURS_PER_MONTH
    return round(max(catalog_price - disk_hour, 0.0), 6)


def _catalog_price(instance_type: str, region: str, spot: bool) -> float | None:
    from sky.catalog import vast_catalog

    try:
        return float(vast_catalog.get_hourly_cost(instance_type, use_spot=spot, region=region, zone=None))
    except Exception:  # not in the catalog: no bid to set, SkyPilot's own then stands
        return None


def _search(original):
    @functools.wraps(original)
    def search_offers(self, query=None, type: str = "on-demand", **kwargs):  # noqa: A002 (vastai's name)
        plan = _PLANNED.get()
        if plan is None:
            return original(self, query=query, type=type, **kwargs)
        for k in ("storage", "no_default"):
            kwargs.pop(k, None)
        # a dict query skips vastai's string parser; the filters are those meetara's own offer search
        # used (launcher/providers/vast.py: rentable, not rented; not vastai's default "verified" only,
        # which would miss a planned unverified host), and the id names exactly the planned machine
        query = {"id": {"eq": plan.offer_id}, "rentable": {"eq": True}, "rented": {"eq": False}}
        offers = original(
            self,
            query=query,
            type="bid" if plan.spot else "on-demand",
            storage=float(plan.disk_gb),
            no_default=True,
            **kwargs,
        )
        if plan.spot and isinstance(offers, list) and offers:
            # the disk the price included, not the one asked for: a bigger disk costs its storage on
            # top of the bid, it must not lower the bid below the min_bid meetara planned
            plan.bid = bid_for(plan.catalog_price, offers[0], PRICED_DISK_GB)
        return offers

    search_offers.__meetara__ = True  # type: ignore[attr-defined]
    return search_offers


def _create(original):
    @functools.wraps(original)
    def create_instance(self, *args, **kwargs):
        plan = _PLANNED.get()
        if plan is not None:
            if plan.spot and plan.bid is not None:
                kwargs["price"] = plan.bid
                kwargs.pop("bid_price", None)
            if isinstance(kwargs.get("onstart_cmd"), str):
                kwargs["onstart_cmd"] = _KEY_LINE.sub("", kwargs["onstart_cmd"]).strip(";")
        return original(self, *args, **kwargs)

    return create_instance


def _launch(original):
    @functools.wraps(original)
    def launch(name: str, instance_type: str, region: str, disk_size: int, *args, **kwargs) -> Any:
        m = VAST_TYPE.match(instance_type)
        if m is None:
            return original(name, instance_type, region, disk_size, *args, **kwargs)
        spot = bool(kwargs["preemptible"] if "preemptible" in kwargs else args[2])
        plan = Planned(int(m.group(3)), spot, int(disk_size), _catalog_price(instance_type, region, spot))
        token = _PLANNED.set(plan)
        try:
            return original(name, instance_type, region, disk_size, *args, **kwargs)
        except RuntimeError as e:
            if "could not find an offer" in str(e):
                market = "spot" if spot else "on-demand"
                raise RuntimeError(
                    f"Vast offer {plan.offer_id} ({market}) is no longer available: rented or withdrawn "
                    "since meetara planned"
                ) from None
            raise
        finally:
            _PLANNED.reset(token)

    launch.__meetara__ = True  # type: ignore[attr-defined]
    return launch


def _verify_from_env(session_cls) -> None:
    """Give vastai's session the CA bundle requests' own `merge_environment_settings` would."""
    init = session_cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
        if bundle:
            self.verify = bundle

    session_cls.__init__ = __init__
    session_cls.__meetara__ = True


def _with_use_spot(original):
    @functools.wraps(original)
    def make_deploy_resources_variables(self, resources, *args, **kwargs):
        variables = original(self, resources, *args, **kwargs)
        variables.setdefault("use_spot", bool(resources.use_spot))
        return variables

    make_deploy_resources_variables.__meetara__ = True  # type: ignore[attr-defined]
    return make_deploy_resources_variables


def network_available(probes: tuple[str, ...] | None = None, timeout: float | None = None) -> bool:
    """Whether any probe (default NETWORK_PROBES) answers over HTTP (any status), through the environment's
    proxy settings."""
    import requests

    probes, timeout = probes or NETWORK_PROBES, timeout or PROBE_TIMEOUT_S
    with requests.Session() as http:  # trust_env: HTTPS_PROXY / NO_PROXY / REQUESTS_CA_BUNDLE apply
        for url in probes:
            try:
                http.head(url, timeout=timeout, allow_redirects=False)
                return True
            except requests.RequestException:
                continue
    return False


async def async_network_available(
    probes: tuple[str, ...] | None = None, timeout: float | None = None
) -> bool:
    """`network_available` for the controller's event loop (aiohttp, honouring the proxy variables)."""
    import ssl

    import aiohttp

    probes, timeout = probes or NETWORK_PROBES, timeout or PROBE_TIMEOUT_S
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("SSL_CERT_FILE")
    context = ssl.create_default_context(cafile=bundle) if bundle else ssl.create_default_context()
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(timeout=client_timeout, trust_env=True) as session:
        for url in probes:
            try:
                async with session.head(url, ssl=context, allow_redirects=False):
                    return True
            except (TimeoutError, aiohttp.ClientError, OSError):
                continue
    return False


def install_network_check_fix() -> None:
    """Replace SkyPilot's network checks in this process as the module docstring says. Idempotent."""
    from sky import exceptions
    from sky.backends import backend_utils

    if getattr(backend_utils.async_check_network_connection, "__meetara__", False):
        return
    down = "Could not refresh the cluster. Network seems down (no provider API or probe answered)."

    def check_network_connection() -> None:
        if not network_available():
            raise exceptions.NetworkError(down)

    async def async_check_network_connection() -> None:
        if not await async_network_available():
            raise exceptions.NetworkError(down)

    check_network_connection.__meetara__ = True  # type: ignore[attr-defined]
    async_check_network_connection.__meetara__ = True  # type: ignore[attr-defined]
    backend_utils.check_network_connection = check_network_connection
    backend_utils.async_check_network_connection = async_check_network_connection


def _recover_elsewhere(original):
    @functools.wraps(original)
    async def recover(self) -> float:
        launched = getattr(self, "_launched_resources", None)
        task = self.dag.tasks[0]
        before = task.resources
        if launched is None:
            return await original(self)
        rest = [r for r in before if r.cloud is None or not r.should_be_blocked_by(launched)]
        if not rest or len(rest) == len(before):
            return await original(self)
        import asyncio

        await asyncio.to_thread(self._cleanup_cluster)
        # the task as the controller sends it to the API server, less the preempted offer (SkyPilot's own
        # `blocked_resources` stays on this Task object: `sdk.launch` never sends it)
        task.set_resources(type(before)(rest))
        try:
            submitted_at = await self._launch(raise_on_failure=False, recovery=True)
        finally:
            task.set_resources(before)
        if submitted_at is not None:
            return submitted_at
        self._launched_resources = None  # SkyPilot's own retries, anywhere (its first step is then a no-op)
        return await original(self)

    recover.__meetara__ = True  # type: ignore[attr-defined]
    return recover


def install_recovery_fix() -> None:
    """Make EAGER_NEXT_REGION relaunch a preempted job elsewhere first (module docstring). Idempotent."""
    from sky.jobs.recovery_strategy import EagerFailoverStrategyExecutor

    if not getattr(EagerFailoverStrategyExecutor.recover, "__meetara__", False):
        EagerFailoverStrategyExecutor.recover = _recover_elsewhere(EagerFailoverStrategyExecutor.recover)


def install_vast_fix() -> None:
    """Patch SkyPilot's Vast provisioner in this process as the module docstring says. Idempotent."""
    from sky.clouds.vast import Vast
    from sky.provision.vast import utils

    if not getattr(Vast.make_deploy_resources_variables, "__meetara__", False):
        Vast.make_deploy_resources_variables = _with_use_spot(Vast.make_deploy_resources_variables)

    if not getattr(utils.launch, "__meetara__", False):
        utils.launch = _launch(utils.launch)
    try:
        from vastai.api import client
        from vastai.sdk import VastAI
    except ImportError:  # no vastai: SkyPilot cannot use Vast anyway and says so itself
        return
    if not getattr(client.VastSession, "__meetara__", False):
        _verify_from_env(client.VastSession)
    if not getattr(VastAI.search_offers, "__meetara__", False):
        VastAI.search_offers = _search(VastAI.search_offers)
        VastAI.create_instance = _create(VastAI.create_instance)


class MeetaraPlugin(plugins.BasePlugin):
    """Installs meetara's Vast fix, network check and recovery order where SkyPilot provisions and follows
    jobs: request executors and jobs controllers."""

    load_contexts = frozenset({plugins.PluginContext.EXECUTOR, plugins.PluginContext.CONTROLLER})

    @property
    def name(self) -> str:
        return "meetara"

    @property
    def hidden_from_display(self) -> bool:
        return True

    def install(self, extension_context: plugins.ExtensionContext) -> None:
        del extension_context
        install_vast_fix()
        install_network_check_fix()
        install_recovery_fix()
