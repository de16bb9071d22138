"""The web console in a real browser (Debian's Chromium, headless, driven by Playwright) against a real gateway.

Screenshots go to docs/img/ (the README shows them).
"""

import re
from pathlib import Path

import pytest

from tests.browser import console_page, require_browser
from tests.browser import send_prompt as send
from tests.fleet import start_fleet

pytestmark = pytest.mark.slow

IMG = Path(__file__).resolve().parents[2] / "docs" / "img"
MODEL = "smollm2-135m-instruct"
ADMIN = "console-admin"

require_browser()


@pytest.fixture(scope="module")
def fleet(model_dir):
    f = start_fleet(1, "", 3.0, "--admin-key", ADMIN)
    yield f
    f.stop()


@pytest.fixture(scope="module")
def page(fleet):
    with console_page(fleet.url, ADMIN) as pg:
        yield pg


def node_row(page, name: str):
    return page.locator(f'tr.node-row[data-name="{name}"]')


def test_a_prompt_streams_in_over_several_updates_and_its_timeline_appears(page):
    page.wait_for_function("document.querySelector('#model').options.length > 0")
    # Record every change of the answer's text as it streams in.
    page.evaluate(
        """() => {
            window.__answerLengths = [];
            const answer = document.querySelector('#answer');
            new MutationObserver(() => window.__answerLengths.push(answer.textContent.length))
                .observe(answer, {childList: true, characterData: true, subtree: true});
        }"""
    )
    send(page, "Write two sentences about the sea.", 48)
    page.wait_for_function("document.querySelector('#request-info').textContent.includes('tokens')")
    lengths = page.evaluate("window.__answerLengths")
    assert len({n for n in lengths if n > 0}) > 1, lengths  # the text grew in more than one update
    assert page.text_content("#answer").strip()
    for name in ("receive", "queue", "dispatch", "prefill", "decode", "finish"):
        page.wait_for_selector(f'#timeline .span-row[data-name="{name}"]')
    assert "worker-0" in page.text_content("#timeline")
    page.wait_for_timeout(4500)  # let the charts take a few samples
    page.screenshot(path=str(IMG / "console-answer.png"), full_page=True)


def test_join_a_node_see_it_healthy_then_drain_and_stop_it(page):
    node_row(page, "worker-0").wait_for()
    page.fill("#join-memory", "1000")
    page.click("#join")
    healthy = page.locator('tr.node-row[data-name="local-1"][data-state="healthy"]')
    healthy.wait_for(timeout=120_000)
    page.screenshot(path=str(IMG / "console-nodes.png"), full_page=True)
    node_row(page, "local-1").locator("button.drain").click()
    page.locator('tr.node-row[data-name="local-1"][data-state="draining"]').wait_for()
    node_row(page, "local-1").locator("button.stop").click()
    node_row(page, "local-1").wait_for(state="detached", timeout=60_000)


def test_a_stage_node_joined_from_the_form_shows_its_pipeline_waiting_for_capacity(page):
    page.select_option("#join-role", "stage")
    assert page.text_content("#join-memory-label") == "Stage cap (MiB)"
    page.fill("#join-memory", "200")  # the head's embeddings and a few layers: not the whole model
    page.click("#join")
    stage = page.locator('tr.node-row[data-role="stage"]')
    stage.locator(".cell-role", has_text="stage (spare)").wait_for(timeout=60_000)  # registered, no layers
    status = page.locator(f'#pipelines .pipeline[data-model="{MODEL}"] .pipeline-status')
    status.filter(has_text="waiting for capacity").wait_for()
    assert re.search(r"Pipeline not serving: waiting for capacity: \d+ of \d+ MiB placed", status.text_content())
    boxes = [page.locator(f"#{panel}").bounding_box() for panel in ("nodes", "pipelines")]
    top, bottom = boxes[0]["y"], boxes[1]["y"] + boxes[1]["height"]
    clip = {"x": boxes[0]["x"], "y": top, "width": boxes[0]["width"], "height": bottom - top}
    page.screenshot(path=str(IMG / "console-pipelines.png"), full_page=True, clip=clip)

    name = stage.get_attribute("data-name")
    stage.locator("button.stop").click()
    node_row(page, name).wait_for(state="detached", timeout=60_000)
    status.filter(has_text="waiting for stage nodes").wait_for()
    page.select_option("#join-role", "replica")
    page.fill("#join-memory", "1000")


def test_the_page_fits_a_phone_width(page):
    page.set_viewport_size({"width": 390, "height": 844})
    page.wait_for_timeout(300)
    assert page.evaluate("document.documentElement.scrollWidth") <= 391
    page.screenshot(path=str(IMG / "console-phone.png"), full_page=True)
    page.set_viewport_size({"width": 1280, "height": 800})


def test_with_every_worker_stopped_the_error_is_shown(page):
    node_row(page, "worker-0").locator("button.stop").click()
    node_row(page, "worker-0").wait_for(state="detached", timeout=90_000)
    send(page, "Anyone there?", 8)
    error = page.locator("#error")
    error.wait_for(state="visible")
    assert "503" in error.text_content() or "no healthy worker" in error.text_content()
