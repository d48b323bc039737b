"""The Prefect UI in a real headless Chromium: the SFT deployment's parameter form and a finished run's artifacts.

Needs Chromium (Debian's `chromium`, installed by `scripts/setup --test`) and Playwright's Python
package; skipped where either is missing. Screenshots go to test-output/screenshots/.
"""

import re
import shutil
import time
from pathlib import Path

import pytest
import yaml

from real_prefect import BIN, REPO, real_server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Chromium is not installed (apt-get install chromium)"),
]
SCREENSHOTS = REPO / "test-output" / "screenshots"


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield launched
        launched.close()


# Every request the UI's pages make (page → URL), for the check that none leaves the machine.
REQUESTS: list[tuple[str, str]] = []


def _recorded(page):
    page.on("request", lambda request: REQUESTS.append((page.url, request.url)))
    return page


def _page(browser, url: str, wait_for: str):
    page = _recorded(browser.new_page(viewport={"width": 1400, "height": 2000}))
    page.goto(url)
    page.get_by_text(wait_for, exact=False).first.wait_for(timeout=60_000)
    return page


def _screenshot(page, name: str) -> None:
    page.wait_for_timeout(500)  # let the last requests render
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def test_deployment_form_and_finished_run_artifacts_in_chromium(browser, tiny_model, tmp_path):
    config = tmp_path / "ui.yaml"
    config.write_text(yaml.safe_dump({
        "name": "ui", "storage": str(tmp_path / "store"), "model": {"base": str(tiny_model)},
        "data": {"path": str(REPO / "loraflow/data/sample/alpaca_gpt4_sample.json"), "val_set_size": 8, "cutoff_len": 128},
        "train": {"learning_rate": 1e-2, "batch_size": 8, "micro_batch_size": 4, "max_steps": 3, "logging_steps": 1,
                  "save_steps": 3, "eval_steps": 3, "gradient_checkpointing": "off"},
        "merge": {"enabled": False},
    }))
    with real_server(tmp_path / "prefect") as server:
        server.create_pool_and_deploy()
        store_url = _start_store_server(server, tmp_path / "store")
        finished = server.run(str(BIN / "loraflow"), "run", str(config), timeout=600, env={"LORAFLOW_STORE_URL": store_url}).stdout
        flow_run_id = re.search(r"/runs/flow-run/([0-9a-f-]{36})", finished).group(1)
        from prefect.client.orchestration import get_client

        with server.client_settings(), get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name("loraflow-sft/sft-xpu")
        ui = f"http://127.0.0.1:{server.port}"

        form = _page(browser, f"{ui}/deployments/deployment/{deployment.id}/run", "LoRA rank.")
        _screenshot(form, "sft-deployment-run-form")
        text = form.inner_text("body")
        # Human titles, and no nullable field's type switcher ('Property is type "None"').
        for title in ("Learning-rate schedule", "Rendezvous port", "Timeout (seconds)", "MPI flavour", "Rank (r)",
                      "DeepSpeed ZeRO stage", "Loss on the prompt too", "Work pool"):
            assert title in text, title
        for generated in ("Lr Scheduler", "Timeout S", "Property is type"):
            assert generated not in text, generated
        for section, description in [("Model", "The base model and how it is loaded for training."),
                                     ("Data", "The training data and how it becomes tokens."),
                                     ("Train", "The optimisation and where it runs."),
                                     ("Merge", "Merging the adapter into a full-precision copy of the base.")]:
            assert section in text and description in text
        assert "Peak learning rate." in text
        values = form.locator("input, textarea").evaluate_all("fields => fields.map(field => field.value)")
        assert "./loraflow-demo/models/tiny-llama" in values and "0.01" in values  # the deployment's defaults fill the form

        # The adapter: a tab per method with only its fields, in both of Prefect's UIs (a deep link opens v1; the
        # server's root opens v2); a run started from a tab gets that method's settings.
        v2_form = _page(browser, f"{ui}/v2/deployments/deployment/{deployment.id}/run", "Peak learning rate.")
        for page in (form, v2_form):
            for tab, shown, hidden in [("IA3", "Feed-forward modules", "Rank (r)"), ("Prefix tuning", "Virtual tokens", "Initial prompt text"),
                                       ("Prompt tuning", "Initial prompt text", "Feed-forward modules"), ("LoRA", "Rank (r)", "Virtual tokens")]:
                page.get_by_text(tab, exact=True).first.click()
                page.get_by_text(shown, exact=False).first.wait_for(timeout=10_000)
                assert hidden not in page.inner_text("body"), f"{tab} tab shows {hidden}"
            # A target is a choice or module names (the tabs' labels; untitled, Prefect names them "str" and "list").
            assert page.get_by_text("module names", exact=True).count() == 1
        v2_form.get_by_text("IA3", exact=True).first.click()
        _screenshot(v2_form, "sft-deployment-run-form-ia3")
        v2_form.get_by_role("button", name="Submit").click()
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

        from loraflow.adapters import Ia3Adapter
        from loraflow.config_loader import build_config

        deadline = time.time() + 30
        with server.client_settings(), get_client(sync_client=True) as client:
            while not (started := client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])))):
                assert time.time() < deadline, "the form's Submit started no run"
                time.sleep(0.5)
        assert build_config(started[0].parameters["config"]).lora == Ia3Adapter()

        console: list[str] = []
        run_page = _recorded(browser.new_page(viewport={"width": 1400, "height": 2000}))
        run_page.on("console", lambda message: console.append(message.text))
        run_page.goto(f"{ui}/runs/flow-run/{flow_run_id}")
        run_page.get_by_text("Completed", exact=False).first.wait_for(timeout=60_000)
        run_page.get_by_text("Task Runs", exact=True).first.click()
        run_page.get_by_text("adapter", exact=False).first.wait_for(timeout=30_000)  # the task list has rows
        _screenshot(run_page, "sft-run-task-runs")
        assert "No task runs" not in run_page.inner_text("body")
        assert not [line for line in console if "TaskInputResponse" in line], console
        run_page.get_by_text("Artifacts", exact=True).first.click()
        run_page.get_by_text("-loss-curve").first.wait_for(timeout=30_000)
        _screenshot(run_page, "sft-run-artifacts")
        text = run_page.inner_text("body")
        for suffix in ("summary", "metrics", "loss-curve", "adapter", "progress"):
            assert re.search(rf"ui-[0-9a-f]{{12}}-{suffix}", text), f"artifact *-{suffix} not listed:\n{text[:3000]}"
        # The progress card shows its description, not its value: the description carries the value.
        assert re.search(r"training ui-[0-9a-f]{12}: step 3 of 3 \(100%\)", text), text[:3000]

        run_page.get_by_text("-loss-curve").first.click()
        run_page.locator("img[src^='data:image/png']").first.wait_for(timeout=30_000)  # the inlined loss curve renders
        assert run_page.locator("img[src^='data:image/png']").first.evaluate("image => image.naturalWidth") > 100
        _screenshot(run_page, "sft-run-loss-curve")

        # The summary's code blocks fit their box: Prefect's markdown shows a code line unwrapped and cuts what is wider.
        started = time.time()
        run_page.goto(f"{ui}/runs/flow-run/{flow_run_id}")
        run_page.get_by_text("Artifacts", exact=True).first.click()
        run_page.get_by_text("-summary").first.click()
        run_page.get_by_text("Use it", exact=True).first.wait_for(timeout=30_000)
        _screenshot(run_page, "sft-run-summary")
        blocks = run_page.locator("pre").evaluate_all("blocks => blocks.map(b => [b.scrollWidth, b.clientWidth, b.innerText])")
        assert len(blocks) >= 3 and not [text for wide, shown, text in blocks if wide > shown], blocks

        # No request leaves the machine on the pages a user visits (the v2 UI is left out: Prefect 3.8's loads its
        # analytics library's settings from amplitude.com, which is why the README's server opens the v1 UI).
        for path, wait_for in (("/deployments", "sft-xpu"), ("/artifacts", "-summary"), ("/events", "Event")):
            _page(browser, ui + path, wait_for).wait_for_load_state("networkidle")  # (images included)
        blocks_page = _page(browser, f"{ui}/blocks", "loraflow")
        blocks_page.wait_for_load_state("networkidle")
        blocks_page.get_by_text("loraflow", exact=False).first.click()
        blocks_page.get_by_text("Basepath", exact=False).first.wait_for(timeout=30_000)
        blocks_page.wait_for_load_state("networkidle")
        _screenshot(blocks_page, "result-storage-block")
        outside = sorted({(page, url) for page, url in REQUESTS if "/v2/" not in page and "/v2/" not in url
                          and url.split(":", 1)[0] in ("http", "https", "ws", "wss")
                          and not re.match(r"(https?|wss?)://(127\.0\.0\.1|localhost|\[::1\])[:/]", url)})
        assert not outside, outside
        assert any("/blocks" in page for page, _ in REQUESTS) and any("/events" in page for page, _ in REQUESTS)
        print(f"summary code and outside-request checks: {time.time() - started:.1f} s")

        # The adapter's link opens the store server's folder listing (a file:// link does nothing from an http page).
        [summary] = (tmp_path / "store" / "runs").glob("ui-*/summary.md")
        assert f"([open]({store_url}{tmp_path / 'store'}/" in summary.read_text() and "file://" not in summary.read_text()
        run_page.goto(f"{ui}/runs/flow-run/{flow_run_id}")
        run_page.get_by_text("Artifacts", exact=True).first.click()
        run_page.get_by_text("-adapter", exact=False).first.click()
        link = run_page.locator(f"a[href^='{store_url}/']").first
        link.wait_for(timeout=30_000)
        with run_page.context.expect_page() if link.get_attribute("target") == "_blank" else _same_page(run_page) as opened:
            link.click()
        listing = opened.value
        listing.get_by_text("adapter_model.safetensors", exact=True).first.wait_for(timeout=30_000)
        _screenshot(listing, "store-adapter-folder-listing")
        assert listing.url.endswith("/adapter/") and "_manifest.json" in listing.inner_text("body")


def _start_store_server(server, store: Path) -> str:
    """`loraflow store serve` for the run's store, beside the Prefect server and stopped with it; its URL once it answers."""
    import httpx

    from loraflow.launch import free_port

    store.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{free_port()}"
    server.start_background(str(BIN / "loraflow"), "store", "serve", str(store), "--port", url.rsplit(":", 1)[1], log_name="store-server.log")
    deadline = time.time() + 60
    while True:
        try:
            if httpx.get(f"{url}/", follow_redirects=True).status_code == 200:
                return url
        except httpx.TransportError:
            pass
        assert time.time() < deadline, (server.home / "store-server.log").read_text()
        time.sleep(0.2)


class _same_page:
    """expect_page's shape for a link that opens in the same tab."""

    def __init__(self, page):
        self.value = page

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_an_invalid_upload_shows_its_reason_in_the_events_details(browser, tmp_path):
    import httpx

    with real_server(tmp_path / "prefect") as server:
        incoming = tmp_path / "incoming"
        incoming.mkdir()
        (incoming / "half.json").write_text('[{"instruction": "Name three colours.", "output": "Red, gre')
        server.run(str(BIN / "loraflow"), "watch", str(incoming), "--storage", str(tmp_path / "store"), "--once")
        deadline = time.time() + 30
        while not (events := httpx.post(f"{server.api_url}/events/filter",
                                        json={"filter": {"event": {"name": ["loraflow.dataset.invalid"]}}}).json()["events"]):
            assert time.time() < deadline, "no loraflow.dataset.invalid event"
            time.sleep(0.5)
        event = events[0]
        page = _page(browser, f"http://127.0.0.1:{server.port}/events/event/{event['occurred'][:10]}/{event['id']}", "loraflow.dataset.invalid")
        page.get_by_text("Unterminated string", exact=False).first.wait_for(timeout=30_000)
        _screenshot(page, "invalid-upload-event")
        text = page.inner_text("body")
        assert "problem: malformed JSON: Unterminated string starting at line 1, column 51; the file ends in the middle of a value" in text
        assert str(incoming / "half.json") in text
