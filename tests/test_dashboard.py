"""`meetara dashboard` in a real headless Chromium (Debian's `chromium` and `chromium-driver`, driven by
selenium; nothing is downloaded at run time): the dashboard runs as a user starts it (a subprocess on a
free port), the runs are real `meetara launch` runs on the local backend, the ledger a real SQLite file.

The browser waits on page content (WebDriverWait), never on the clock."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import select
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from html import unescape
from pathlib import Path

import pytest
from conftest import ROOT, local_env, run_cli

from budgets import usd

RATE_H = 10.0  # $/h of the local machine
FAST = ["--samples", "16", "--epochs", "1", "--poll", "0.2", "--budget", "5", "--yes"]  # ~3 steps a domain
# a preemption injected once training shows steps; 48 samples x 3 epochs outlast the injection's delay
CHAOS = ["--samples", "48", "--epochs", "3", "--poll", "0.2", "--budget", "5", "--yes"]
CHAOS += ["--preempt-every", "1", "--preempt-max", "1"]
CHAOS_RUN = ("chaos", "fitness", *CHAOS)  # a one-domain run preempted once on its way
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
WAIT_S = 60  # the most a page may take to show what a test waits for


# ---- the work folder, its runs, the dashboard, the browser ---------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, isolated_env: None) -> tuple[Path, dict[str, str]]:
    """One folder for this module's runs, and the env every command here runs with."""
    tmp = tmp_path_factory.mktemp("dashboard")
    return tmp, local_env(tmp, RATE_H)


def meetara(work: tuple[Path, dict[str, str]], *args: str) -> subprocess.CompletedProcess:
    tmp, env = work
    return run_cli(*args, env=env, cwd=tmp, module="launcher", timeout=300)


class Launches:
    """`meetara launch` runs of this module, each launched once, when a test first needs it."""

    def __init__(self, work: tuple[Path, dict[str, str]]) -> None:
        self.work = work
        self.done: dict[str, subprocess.CompletedProcess] = {}

    def __call__(self, run_id: str, domains: str, *flags: str) -> str:
        if run_id not in self.done:
            with self.running(run_id, domains, *flags):
                pass
        return run_id

    @contextlib.contextmanager
    def running(self, run_id: str, domains: str, *flags: str) -> Iterator[subprocess.Popen]:
        """Start the launch, yield while it runs, then wait for it to succeed."""
        assert run_id not in self.done, f"{run_id} was launched already"
        tmp, env = self.work
        proc = subprocess.Popen(
            [sys.executable, "-m", "launcher", "launch", "-d", domains, "--run-id", run_id, *flags],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp,
            env={**os.environ, **env},
        )
        try:
            yield proc
            out, err = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, err[-3000:]
        self.done[run_id] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def launch(work) -> Launches:
    return Launches(work)


@pytest.fixture(scope="module")
def first(launch: Launches) -> str:
    """A finished two-domain run."""
    return launch("first", "nutrition,legal", *FAST)


@contextlib.contextmanager
def dashboard(work: tuple[Path, dict[str, str]], *args: str) -> Iterator[tuple[str, str | None]]:
    """`meetara dashboard --port 0 ARGS` (as `python -m launcher`); yields the URL it
    prints (without its ?token=) and the token, once the server answers; stops it by its PID."""
    tmp, env = work
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher", "dashboard", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp,
        env={**os.environ, **env},
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], WAIT_S)  # it prints the URL once it listens
        line = proc.stdout.readline() if ready else ""
        found = re.search(r"(http://\S+?)/(?:\?token=(\S+))?$", line.strip())
        assert found, f"no URL printed: {line!r} {proc.poll()} {proc.stderr.read() if proc.poll() else ''}"
        url, token = found.groups()
        status, _, _ = get(url + "/", {"Authorization": f"Bearer {token}"} if token else {})
        assert status == 200  # it answers
        yield url, token
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def site(work) -> Iterator[str]:
    """The dashboard as a user starts it: read-only, on the loopback, no token."""
    with dashboard(work) as (url, _):
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator:
    """Debian's headless Chromium through its own chromedriver; selenium-manager stays offline."""
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail("the browser tests need Debian's chromium and chromium-driver (.ci/run installs them)")
    os.environ["SE_OFFLINE"] = "true"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def shown(driver, css: str, timeout: float = WAIT_S):
    """The first element matching `css`, once the page shows it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(ec.presence_of_element_located((By.CSS_SELECTOR, css)))


def get(url: str, headers: dict[str, str] | None = None, method: str = "GET", data: bytes | None = None):
    """(status, headers, body) of one request, following no redirect."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    req = urllib.request.Request(url, headers=headers or {}, method=method, data=data)
    try:
        with urllib.request.build_opener(NoRedirect).open(req, timeout=WAIT_S) as r:
            return r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode()


def screenshot(driver) -> bytes:
    """The whole page as PNG (Chromium's DevTools, beyond the window); saved as docs/dashboard.png (the
    README's picture) with MEETARA_SCREENSHOT=1."""
    import base64

    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 2400), "scale": 1}
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip}
    )
    png = base64.b64decode(shot["data"])
    if os.environ.get("MEETARA_SCREENSHOT") == "1":
        out = ROOT / "docs" / "dashboard.png"
        out.parent.mkdir(exist_ok=True)
        out.write_bytes(png)
    return png


def job_status(work, run_id: str) -> list[dict]:
    r = meetara(work, "status", run_id, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


# ---- what a user sees ----------------------------------------------------------------------------


def test_after_a_launch_the_pages_show_the_run_its_domains_loss_curves_and_spend(browser, site, first, work):
    budget = json.loads(meetara(work, "budget", "--json").stdout)
    daily = next(w for w in budget["windows"] if w["window"] == "daily")
    assert daily["spent"] > 0
    browser.get(site + "/")
    link = shown(browser, f'a.run-link[data-run="{first}"]')
    assert browser.find_element(
        "css selector", '.window[data-window="daily"] .window-text .spent'
    ).text == usd(daily["spent"])
    link.click()

    shown(browser, f'section.run-head[data-run="{first}"]')
    cost = sum(j["cost_so_far"] for j in job_status(work, first))
    assert browser.find_element("css selector", "dd.cost").text == usd(cost) and cost > 0
    for domain in ("nutrition", "legal"):
        row = shown(browser, f'span.domain[data-domain="{domain}"]').find_element("xpath", "./ancestor::tr")
        assert "done" in row.text and "yes" in row.text, row.text  # trained, validated, pulled
        curve = shown(browser, f'svg.loss-curve[data-domain="{domain}"]')
        steps = int(curve.get_attribute("data-points"))
        path = curve.find_element("css selector", "path.series").get_attribute("d")
        assert steps >= 2 and len(re.findall(r"[ML][\d.]+,[\d.]+", path)) == steps, path
        assert len(curve.find_elements("css selector", "circle.heldout")) == 2  # held-out before and after
    assert "Traceback" not in browser.page_source


def test_a_second_launch_appears_live_without_a_reload(browser, site, first, launch):
    browser.get(site + "/")
    shown(browser, f'a.run-link[data-run="{first}"]')
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, WAIT_S).until(lambda d: d.find_element("id", "live-state").text == "live")
    browser.execute_script("window.sameDocument = 'yes'")  # a reload would forget it
    assert not browser.find_elements("css selector", 'a.run-link[data-run="chaos"]')

    with launch.running(*CHAOS_RUN):  # in another process, while the page stays open
        shown(browser, 'a.run-link[data-run="chaos"]')
    shown(browser, 'tr:has(a.run-link[data-run="chaos"]) .state-done')  # and follows it to its end
    assert browser.execute_script("return window.sameDocument") == "yes"
    assert int(browser.find_element("id", "main").get_attribute("data-updates")) >= 1


def test_a_preempted_run_shows_its_preemption_on_the_time_line(browser, site, launch, work):
    run_id = launch(*CHAOS_RUN)
    assert [j["preemptions"] for j in job_status(work, run_id)] == [1]
    browser.get(f"{site}/runs/{run_id}")
    shown(browser, f'section.run-head[data-run="{run_id}"]')
    mark = shown(browser, 'svg.timeline polygon.event[data-kind="preempted"]')
    assert mark.get_attribute("data-job") == f"{run_id}-j1"
    assert browser.find_element("css selector", "dd.preemptions").text == "1"
    kinds = [e.text for e in browser.find_elements("css selector", "table.events .event-kind")]
    assert kinds[0] == "launched" and "preempted" in kinds, kinds  # the time line's table says it too
    shown(browser, 'svg.loss-curve[data-domain="fitness"] path.series')
    png = screenshot(browser)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_a_bad_url_gets_a_404_page_not_a_traceback(browser, site):
    for path, says in (("/no/such/page", "nothing at /no/such/page"), ("/runs/nosuch", "no run 'nosuch'")):
        status, headers, body = get(site + path)
        assert status == 404 and headers["content-type"].startswith("text/html"), (path, status)
        assert "404: Not found" in body and "Traceback" not in body
        browser.get(site + path)
        assert shown(browser, "section.error h1").text == "404: Not found"
        assert says in browser.find_element("css selector", "section.error .message").text
        assert "Traceback" not in browser.page_source
    status, _, body = get(site + "/api/runs/nosuch")
    assert status == 404 and "no run 'nosuch'" in json.loads(body)["error"]
    status, _, body = get(site + "/report?by=colour")  # a refusal: its one line, 400
    assert status == 400 and "--by: 'colour' is not one of" in unescape(body) and "Traceback" not in body


def test_bad_numbers_dates_and_missing_fields_are_one_line_400s(site):
    for path, says in (
        ("/api/plan", "name the domains to plan"),
        ("/api/plan?domains=legal&epochs=nan", "epochs must be a finite number, not nan"),
        ("/api/plan?domains=legal&epochs=inf", "epochs must be a finite number, not inf"),
        ("/api/plan?domains=legal&epochs=1000", "Invalid value for '--epochs': Input should be less than"),
        ("/api/plan?domains=legal&samples=1000000000000", "Invalid value for '--samples': Input should be"),
        ("/api/offers?limit=-1", "Invalid value for '--limit': -1 is not at least 1"),
        ("/api/report?since=99999999d", "--since: '99999999d' is out of range"),
        ("/api/report?until=9999-12-31", "--until: '9999-12-31' is out of range"),
    ):
        status, _, body = get(site + path)
        assert status == 400, (path, status, body)
        message = json.loads(body)["error"]
        assert says in message and "\n" not in message, (path, message)
    for path, says in (
        ("/report?until=9999-12-31", "is out of range"),
        ("/plan?domains=legal&epochs=nan", "nan"),
    ):
        status, _, body = get(site + path)
        assert status in (200, 400) and says in unescape(body) and "Traceback" not in body, (path, status)
        assert "Something went wrong" not in body, path


# ---- who may use it ------------------------------------------------------------------------------


def test_read_only_by_default_and_answers_only_its_own_loopback_name(site):
    status, _, body = get(site + "/launch", method="POST", data=b"domains=legal&budget=1")
    assert status == 403 and "--allow-launch" in body
    host, port = site.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=WAIT_S)
    conn.request("GET", "/", headers={"Host": f"attacker.example:{port}"})  # DNS rebinding
    assert conn.getresponse().status == 400
    conn.close()


def test_a_tokened_server_refuses_requests_without_its_token(work, browser):
    with dashboard(work, "--token", "s3cret-t0ken") as (url, token):
        assert token == "s3cret-t0ken"
        for path in ("/", "/runs/first", "/api/runs", "/events/overview", "/static/dashboard.js"):
            assert get(url + path)[0] == 401, path
        assert get(url + "/", {"Authorization": "Bearer wrong"})[0] == 401
        assert get(url + "/", {"Authorization": "Bearer s3cret-t0ken"})[0] == 200
        status, headers, _ = get(url + "/report?by=day&token=s3cret-t0ken")
        assert status == 303 and headers["location"] == "/report?by=day"  # the token leaves the URL
        assert "HttpOnly" in headers["set-cookie"] and "SameSite=strict" in headers["set-cookie"]

        browser.get(url + "/?token=s3cret-t0ken")  # once in the URL, then the cookie
        shown(browser, "section.spend")
        browser.get(url + "/report")
        assert shown(browser, "h1").text == "Cost by provider"
        browser.delete_all_cookies()
        browser.get(url + "/report")
        assert shown(browser, "section.error h1").text == "401: Token needed"


def test_another_host_needs_a_token(work):
    tmp, env = work
    r = subprocess.run(
        [sys.executable, "-m", "launcher", "dashboard", "--host", "0.0.0.0", "--port", "0"],
        capture_output=True,
        text=True,
        cwd=tmp,
        env={**os.environ, **env},
        timeout=60,
    )
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: --host 0.0.0.0 would let other machines")


def test_launching_from_the_dashboard_takes_the_flag_and_the_token(work, browser):
    """--allow-launch without a token makes one up; the launch form carries it (a cookie alone cannot
    launch: another site's form would send it); the run starts in the background and its page follows it."""
    from selenium.webdriver.support.ui import WebDriverWait

    tmp, _ = work
    with dashboard(work, "--allow-launch") as (url, token):
        assert token and len(token) >= 16
        assert get(url + "/")[0] == 401
        port = url.rsplit(":", 1)[1]
        form = b"domains=legal&budget=5&samples=16&epochs=1&run_id=web"
        status, _, body = get(url + "/launch", {"Cookie": f"meetara_dashboard_{port}={token}"}, "POST", form)
        assert status == 403 and "token" in body and not (tmp / "state" / "runs" / "web.json").exists()

        browser.get(f"{url}/plan?domains=legal&samples=16&epochs=1&run_id=web&token={token}")
        budget = shown(browser, "form.launch input[name=budget]")
        budget.clear()
        budget.send_keys("5")
        browser.find_element("css selector", "form.launch button").click()
        shown(browser, 'section.run-head[data-run="web"]')
        ended = shown(browser, "section.run-head h1 .state:not(.state-running)", timeout=180)  # live
        assert ended.text == "done", browser.find_element("css selector", "table.events").text
        assert (
            "yes"
            in shown(browser, 'span.domain[data-domain="legal"]').find_element("xpath", "./ancestor::tr").text
        )

        record = tmp / "state" / "runs" / "web.json"  # the follower ends on its own: wait for it
        WebDriverWait(browser, WAIT_S).until(
            lambda _: (json.loads(record.read_text()).get("follower") or {}).get("state") == "ended"
        )
        assert json.loads(record.read_text())["follower"]["exit_code"] == 0
