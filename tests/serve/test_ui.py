"""The playground page (/ui) in a real browser: Debian's Chromium, driven by selenium and its chromedriver.

One app: the demo models with API keys required, under a route prefix (/playground), so the page must
find its assets and the API relative to where it is served and send the key its user typed. The page
is driven through everything it offers: the model lists, a streamed chat with the real chat model, a
VLM chat with an uploaded PNG, a transcription of an uploaded WAV, speech played in an <audio> element,
and the voice round trip from Chromium's fake microphone (recorded with MediaRecorder, sent as the WebM/Opus
it writes). No console errors are allowed beyond the one 401 the test provokes; a screenshot is saved.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import os
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import soundfile as sf
from PIL import Image

from serve_testutil import DEMO_KEY, wav_bytes

KEY = DEMO_KEY
CHROMIUM = Path(os.environ.get("MODELFLEET_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("MODELFLEET_CHROMEDRIVER", "/usr/bin/chromedriver"))
INSTALL = ("install Debian's Chromium and its driver (`apt-get install -y chromium chromium-driver`) and the "
           "driver library (`.venv/bin/pip install selenium`, part of the [test] extra)")
ASK = "What is the capital of France? Answer in one sentence."
STEP_TIMES: dict[str, float] = {}  # seconds per card (typing, waiting and checks included), printed at the end


@pytest.fixture(scope="module")
def app(keyed_demo_app):
    """conftest's demo app with API keys required, under /playground."""
    return keyed_demo_app


def auth() -> dict:
    return {"Authorization": f"Bearer {KEY}"}


# --- the route, over plain HTTP -------------------------------------------------------------------


@pytest.mark.parametrize(("path", "media_type"), [
    ("/ui", "text/html; charset=utf-8"),
    ("/ui/app.js", "text/javascript; charset=utf-8"),
    ("/ui/style.css", "text/css; charset=utf-8"),
])
def test_the_page_and_its_assets_answer_without_a_key_with_type_and_cache_headers(app, path, media_type):
    response = requests.get(app.url + path, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == media_type
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-content-type-options"] == "nosniff"
    etag = response.headers["etag"]
    again = requests.get(app.url + path, headers={"If-None-Match": etag}, timeout=30)
    assert (again.status_code, again.content, again.headers["etag"]) == (304, b"", etag)
    head = requests.head(app.url + path, timeout=30)  # was a 405
    assert (head.status_code, head.content, head.headers["etag"]) == (200, b"", etag), head.headers
    assert head.headers["content-type"] == media_type
    if path == "/ui":
        csp = response.headers["content-security-policy"]
        assert "connect-src 'self'" in csp and "script-src 'self'" in csp and "default-src 'none'" in csp
        assert 'src="ui/app.js"' in response.text and 'href="ui/style.css"' in response.text


def test_nothing_in_the_page_points_outside_this_server(app):
    for path in ("/ui", "/ui/app.js", "/ui/style.css"):
        text = requests.get(app.url + path, timeout=30).text
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, path
        assert "@import" not in text and "@font-face" not in text, path


@pytest.mark.parametrize("path", [
    "/ui/index.html", "/ui/nope.js", "/ui/..%2fguard.py", "/ui/%2e%2e%2froutes%2fui.py", "/ui/../api.py",
    "/ui/app.js/x", "/ui/.%2e/api.py",
])
def test_only_the_known_files_are_served(app, path):
    response = requests.get(app.url + path, timeout=30)
    assert response.status_code in (401, 404), (path, response.status_code, response.text)
    assert "import" not in response.text  # no Python source, whatever the path
    if response.status_code == 404:
        assert response.json()["error"]["type"] == "invalid_request_error"
    with_key = requests.get(app.url + path, headers=auth(), timeout=30)
    assert with_key.status_code == 404 and "import" not in with_key.text, (path, with_key.text)


def test_the_key_exemption_is_the_page_only(app):
    assert requests.get(app.url + "/v1/models", timeout=30).status_code == 401
    assert requests.get(app.url + "/uix", timeout=30).status_code == 401
    assert requests.post(app.url + "/ui", timeout=30).status_code == 405  # the page is read-only
    assert requests.get(app.url + "/ui/", timeout=30).url.endswith("/playground/ui")  # the slash redirects
    schema = requests.get(app.url + "/openapi.json", headers=auth(), timeout=30).json()
    assert not [path for path in schema["paths"] if path.startswith("/ui")]


# --- the page, in Chromium ----------------------------------------------------------------------------


def browser_missing() -> str:
    """Why the browser test cannot run here ("" when it can)."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        return f"no {CHROMIUM} or {CHROMEDRIVER}: {INSTALL}"
    if importlib.util.find_spec("selenium") is None:
        return f"selenium is not installed: {INSTALL}"
    return ""


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        # no internet here: without these Chromium keeps calling home over closed connections
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
        # a fake microphone (a beep) that needs no permission prompt; audio may play without a gesture
        "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
        "--autoplay-policy=no-user-gesture-required", "--window-size=1400,1300",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    # every uncaught error and unhandled rejection, from the first script of every page on
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": """
        window.__pageErrors = [];
        addEventListener('error', (e) => window.__pageErrors.push(String(e.message || e)));
        addEventListener('unhandledrejection', (e) => window.__pageErrors.push(String(e.reason)));
    """})
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


def wait(driver, condition, timeout: float = 60.0, what: str = ""):
    """Poll a JavaScript expression until it is truthy; return its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = driver.execute_script(f"return ({condition});")
        if value:
            return value
        if time.monotonic() > deadline:
            errors = driver.execute_script(
                "return [...document.querySelectorAll('.error')].map(e => e.textContent).filter(Boolean);")
            raise AssertionError(f"{what or condition} did not happen within {timeout} s; errors in the page: {errors}")
        time.sleep(0.1)


def card_done(driver, card: str, timeout: float = 120.0) -> None:
    """Wait for a card's call to end; it must end without an error. The time since the previous card is noted."""
    state = wait(driver, f"document.querySelector('#{card}').dataset.state !== 'busy' && "
                         f"document.querySelector('#{card}').dataset.state", timeout, f"#{card} finishing")
    error = driver.execute_script(f"return document.querySelector('#{card} .error').textContent;")
    assert state == "done", f"#{card} ended {state}: {error}"
    STEP_TIMES[card] = time.monotonic() - STEP_TIMES.pop("_since", time.monotonic())
    STEP_TIMES["_since"] = time.monotonic()


def console_errors(driver) -> list[dict]:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def speech_wav(path: Path) -> Path:
    """A second of a voice-like tone with pauses, 16 kHz mono WAV."""
    samples, rate = sf.read(io.BytesIO(wav_bytes(1.5)))
    samples[int(0.6 * rate):int(0.8 * rate)] = 0
    sf.write(path, np.asarray(samples, dtype=np.float32), rate, format="WAV")
    return path


def png(path: Path) -> Path:
    image = Image.new("RGB", (64, 48), (30, 90, 200))
    image.paste((240, 200, 30), (16, 12, 48, 36))
    image.save(path, format="PNG")
    return path


@pytest.mark.skipif(bool(browser_missing()), reason=browser_missing() or "runs")
def test_the_playground_in_chromium(app, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver = browser
    started = time.monotonic()
    find = driver.find_element

    # Without a key the page loads but the API refuses it: the 401 is shown in the page, not thrown.
    driver.get(app.url + "/ui")
    message = wait(driver, "!document.querySelector('#models-error').hidden && "
                           "document.querySelector('#models-error').textContent", 30, "the 401 shown")
    assert message.startswith("401 invalid_request_error (invalid_api_key)") and "API key" in message, message
    refused = console_errors(driver)  # Chromium's own note of the failed request, nothing else
    assert all(entry["source"] == "network" and " 401 " in entry["message"] for entry in refused), refused

    # The key, typed once, lists the models per family, and is remembered across a reload.
    find(By.ID, "api-key").send_keys(KEY + Keys.TAB)  # leaving the field: its change event
    wait(driver, "document.querySelector('#models-status').textContent.includes('models:')", 30, "the model list")
    driver.refresh()
    wait(driver, "document.querySelector('#models-status').textContent.includes('models:')", 30, "the model list")
    assert find(By.ID, "api-key").get_attribute("value") == KEY
    assert driver.execute_script("return document.querySelector('#models-error').hidden;")
    options = driver.execute_script("""
        const out = {};
        for (const s of document.querySelectorAll('section > label > select.model')) {
            out[s.closest('section').id] = [...s.options].map(o => o.value);
        }
        return out;""")
    served = requests.get(app.url + "/v1/models", headers=auth(), timeout=30).json()["data"]
    family = {"chat": "llm", "vision": "vlm", "transcribe": "stt", "speech": "tts"}
    assert options == {card: [m["id"] for m in served if m["family"] == f] for card, f in family.items()}, options
    assert options["chat"][0] == "smollm2-135m-instruct" and options["vision"][0] == "tiny-llava", options

    # A streamed chat with the real chat model: the reply grows token by token, then finishes.
    STEP_TIMES["_since"] = time.monotonic()
    driver.execute_script("""
        window.__lengths = [];
        const log = document.querySelector('#chat .log');
        new MutationObserver(() => {
            const out = log.querySelector('.msg.assistant .text');
            if (out) window.__lengths.push(out.textContent.length);
        }).observe(log, {subtree: true, childList: true, characterData: true});""")
    find(By.CSS_SELECTOR, "#chat .prompt").send_keys(ASK)
    find(By.CSS_SELECTOR, "#chat .send").click()
    card_done(driver, "chat")
    reply = driver.execute_script("return document.querySelector('#chat .msg.assistant .text').textContent;")
    lengths = [n for n in driver.execute_script("return window.__lengths;") if n]
    assert "Paris" in reply, reply
    assert len(set(lengths)) >= 3 and lengths == sorted(lengths) and lengths[-1] == len(reply), lengths
    meta = find(By.CSS_SELECTOR, "#chat .meta").text
    assert "finish_reason stop" in meta and "completion tokens" in meta, meta
    assert not driver.find_elements(By.CSS_SELECTOR, "#chat .msg.streaming")

    # A VLM chat with an uploaded PNG: sent as a data: URI in an image_url part.
    find(By.CSS_SELECTOR, "#vision .image").send_keys(str(png(tmp_path / "picture.png")))
    wait(driver, "!document.querySelector('#vision .preview').hidden", 10, "the image preview")
    find(By.CSS_SELECTOR, "#vision .prompt").send_keys("What is in the image?")
    find(By.CSS_SELECTOR, "#vision .send").click()
    card_done(driver, "vision")
    assert driver.execute_script(
        "return document.querySelector('#vision .msg.user img').src.startsWith('data:image/png;base64,');")
    assert "tiny-llava: finish_reason" in find(By.CSS_SELECTOR, "#vision .meta").text

    # A transcription of an uploaded WAV: the page shows exactly what the API answers for that file.
    wav = speech_wav(tmp_path / "speech.wav")
    find(By.CSS_SELECTOR, "#transcribe .audio-file").send_keys(str(wav))
    wait(driver, "!document.querySelector('#transcribe .send').disabled", 10, "the file taken")
    find(By.CSS_SELECTOR, "#transcribe .send").click()
    card_done(driver, "transcribe")
    shown = driver.execute_script("return document.querySelector('#transcribe .output').textContent;")
    direct = requests.post(app.url + "/v1/audio/transcriptions", headers=auth(), timeout=60,
                           files={"file": ("speech.wav", wav.read_bytes())}, data={"model": "tiny-whisper"})
    assert shown == direct.json()["text"], (shown, direct.text)

    # Speech: the streamed WAV plays in an <audio> element that knows its duration.
    find(By.CSS_SELECTOR, "#speech .text").send_keys("Hello from the playground. It speaks.")
    find(By.CSS_SELECTOR, "#speech .send").click()
    card_done(driver, "speech")
    duration = wait(driver, "(a => a.readyState >= 2 && isFinite(a.duration) && a.duration)"
                            "(document.querySelector('#speech .output-audio'))", 20, "the speech audio ready")
    assert 0.1 < duration < 30, duration
    assert driver.execute_script("return document.querySelector('#speech .output-audio').error;") is None

    # The voice round trip from the (fake) microphone: MediaRecorder's WebM/Opus, as recorded -> /v1/audio/chat.
    find(By.CSS_SELECTOR, "#voice .record").click()
    wait(driver, "document.querySelector('#voice .record').textContent === 'Stop'", 10, "recording")
    time.sleep(1.5)
    find(By.CSS_SELECTOR, "#voice .record").click()
    wait(driver, "!document.querySelector('#voice .send').disabled", 20, "the recording made")
    find(By.CSS_SELECTOR, "#voice .max-tokens").clear()
    find(By.CSS_SELECTOR, "#voice .max-tokens").send_keys("24")
    driver.execute_script(  # keep the file the page sends (a blob: URL cannot be fetched under the page's CSP)
        "const send = window.fetch; window.fetch = (url, init) => { if (init && init.body instanceof FormData) "
        "window.__sentAudio = init.body.get('file'); return send(url, init); };")
    find(By.CSS_SELECTOR, "#voice .send").click()
    card_done(driver, "voice")
    # what the page sent: Chromium's own WebM, which the server decodes to its length (before PyAV it was a 400,
    # and the page re-encoded it to WAV)
    kind, name, recording = driver.execute_async_script(
        "const done = arguments[arguments.length - 1], file = window.__sentAudio; file.arrayBuffer().then("
        "b => done([file.type, file.name, btoa(String.fromCharCode(...new Uint8Array(b)))]));")
    assert kind.startswith("audio/webm") and name == "recording.webm", (kind, name)
    decoded = requests.post(app.url + "/v1/audio/transcriptions", headers=auth(), timeout=60, data={
        "model": "tiny-whisper", "response_format": "verbose_json"},
        files={"file": ("recording.webm", base64.b64decode(recording))})
    assert decoded.status_code == 200, decoded.text
    assert 1.0 < decoded.json()["duration"] < 3.0, decoded.json()["duration"]
    assert find(By.CSS_SELECTOR, "#voice .reply").text.strip()
    assert "llm smollm2-135m-instruct" in find(By.CSS_SELECTOR, "#voice .meta").text
    wait(driver, "(a => a.readyState >= 2 && isFinite(a.duration) && a.duration > 0)"
                 "(document.querySelector('#voice .output-audio'))", 20, "the reply audio ready")

    screenshot = tmp_path / "ui_playground.png"
    driver.save_screenshot(str(screenshot))
    steps = ", ".join(f"{card} {secs:.1f} s" for card, secs in STEP_TIMES.items() if card != "_since")
    print(f"\nplayground screenshot: {screenshot}\n{time.monotonic() - started:.1f} s in the browser: {steps}")
    assert screenshot.stat().st_size > 10_000
    assert console_errors(driver) == []
    assert driver.execute_script("return window.__pageErrors;") == []


@pytest.mark.skipif(bool(browser_missing()), reason=browser_missing() or "runs")
def test_the_chat_log_is_what_the_model_is_sent_next(app, browser):
    """A reply stopped with Stop stayed in the log but was left out of the history, with its question: the next
    message went out alone ([user 'And then?']) and SmolLM2 answered as if nothing had been said. A call refused
    before any text left its question in the log (never sent again) and cleared the text box."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver = browser
    find = driver.find_element
    driver.get(app.url + "/ui")
    if not find(By.ID, "api-key").get_attribute("value"):
        find(By.ID, "api-key").send_keys(KEY + Keys.TAB)
    wait(driver, "document.querySelector('#models-status').textContent.includes('models:')", 30, "the model list")
    driver.execute_script("""
        window.__sent = [];
        const plain = window.fetch;
        window.fetch = (url, init) => {
            if (String(url).endsWith('v1/chat/completions')) window.__sent.push(JSON.parse(init.body).messages);
            return plain(url, init);
        };""")
    card = "#chat"

    def ask(model: str, max_tokens: int, text: str) -> None:
        driver.execute_script(f"document.querySelector('{card} select.model').value = '{model}';")
        find(By.CSS_SELECTOR, f"{card} .max-tokens").clear()
        find(By.CSS_SELECTOR, f"{card} .max-tokens").send_keys(str(max_tokens))
        find(By.CSS_SELECTOR, f"{card} .prompt").send_keys(text)
        find(By.CSS_SELECTOR, f"{card} .send").click()

    def shown() -> list[tuple[str, str]]:
        return driver.execute_script(f"""return [...document.querySelectorAll('{card} .log .msg')]
            .map(m => [m.classList.contains('user') ? 'user' : 'assistant', m.querySelector('.text').textContent]);""")

    # refused before any text (max_tokens over tiny-llm's 64): nothing stays in the log, the text is back in the box
    ask("tiny-llm", 1000, "A question refused")
    wait(driver, f"document.querySelector('{card}').dataset.state === 'error'", 30, "the refusal")
    assert "max_tokens" in find(By.CSS_SELECTOR, f"{card} .error").text
    assert shown() == []
    assert find(By.CSS_SELECTOR, f"{card} .prompt").get_attribute("value") == "A question refused"
    find(By.CSS_SELECTOR, f"{card} .prompt").clear()

    # stopped after its first words: the question and those words are what the next message follows
    ask("smollm2-135m-instruct", 128, "Tell me a long story about a dragon.")
    wait(driver, f"document.querySelector('{card} .msg.assistant .text')?.textContent.length > 0", 60, "the first words")
    find(By.CSS_SELECTOR, f"{card} .stop").click()
    wait(driver, f"document.querySelector('{card}').dataset.state === 'done'", 30, "the stop")
    assert find(By.CSS_SELECTOR, f"{card} .meta").text == "stopped"  # stopped mid-reply, not finished
    ask("smollm2-135m-instruct", 8, "And then?")
    card_done(driver, "chat")
    log = shown()
    assert [role for role, _ in log] == ["user", "assistant", "user", "assistant"], log
    assert driver.execute_script("return window.__sent;")[-1] == [
        {"role": role, "content": text} for role, text in log[:3]], log
    errors = console_errors(driver)  # Chromium's notes of the refused requests (the page's 401 without a key), no more
    assert all(e["source"] == "network" and (" 400 " in e["message"] or " 401 " in e["message"]) for e in errors), errors
