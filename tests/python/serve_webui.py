#!/usr/bin/env python3
"""dsopen-serve's WebUI in a real headless browser (Debian chromium + chromedriver, driven by selenium).

A small model is trained for a few steps and served. The page loads with the served model in its model list; a
message sent from the text box streams a reply that equals the same request made through the API (greedy); the
conversation is kept in the browser across a reload; a reply taller than the window scrolls under a composer that
stays in view; a long generation stops at the Stop button, which cancels it on the server (/metrics counts one
cancelled request). A screenshot of the page is written to SCREENSHOT.

Usage: serve_webui.py BIN_DIR SCREENSHOT
"""
import json
import os
import subprocess
import sys
import time
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait
from harness import Harness

H = Harness(sys.argv[1], "dsopen-webui-")
SCREENSHOT = sys.argv[2]
W, b, must, check = H.work, H.b, H.must, H.check

model = H.train_small("webui", "{flavor: tiny-dense, vocab_size: 640, hidden_size: 64, intermediate_size: 128, "
                      "num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, "
                      "max_position_embeddings: 32768}", steps=30, warmup=3)
# Only <unk> (never a training target) ends a reply, so the long generation below runs until stopped.
with open(os.path.join(model, "generation_config.json"), "w") as f:
    json.dump({"eos_token_id": [0], "do_sample": False}, f)

server = subprocess.Popen([b("serve"), "--model", model, "--port", "0", "--served-model-name", "tiny-chat",
                           "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
line = server.stdout.readline()
if not line.startswith("listening on"):
    sys.exit(f"dsopen-serve did not start: {line}{server.stderr.read()}")
url = line.split()[-1]


def api(path, body=None):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.read().decode()


def metric(name):
    for line in api("/metrics").splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


options = Options()
for arg in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,800"]:
    options.add_argument(arg)
options.binary_location = "/usr/bin/chromium"
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
try:
    driver.get(url + "/")
    wait = WebDriverWait(driver, 60)
    wait.until(lambda d: [o.text for o in Select(d.find_element(By.ID, "model")).options] == ["tiny-chat"])
    check(True, "the page loads and lists the served model")

    def setting(name, value):
        el = driver.find_element(By.ID, name)
        el.clear()
        el.send_keys(str(value))

    setting("temperature", 0)
    setting("max_tokens", 24)

    def send(text):
        box = driver.find_element(By.ID, "prompt")
        box.send_keys(text)
        driver.find_element(By.ID, "send").click()

    def last_reply():
        return driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]

    send("Tell me a joke")
    wait.until(lambda d: last_reply().get_attribute("data-done") == "1")
    shown = last_reply().find_element(By.CLASS_NAME, "text").text
    expected = json.loads(api("/v1/chat/completions", {
        "model": "tiny-chat", "messages": [{"role": "user", "content": "Tell me a joke"}], "temperature": 0,
        "top_p": 0.95, "max_tokens": 24}))["choices"][0]["message"]["content"]
    # The page shows text as the browser renders it (trailing whitespace collapsed); compare that way.
    check(shown != "" and shown.strip() == expected.strip(), "a sent message streams the reply the API gives")

    driver.refresh()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg")) == 2)
    check(driver.find_elements(By.CSS_SELECTOR, ".msg.user")[0].text.endswith("Tell me a joke"),
          "the conversation is kept across a reload")
    check(len(driver.find_elements(By.CSS_SELECTOR, "#conversations li")) == 1, "one conversation in the list")

    cancelled = metric('dsopen_requests_total{outcome="cancelled"}')
    setting("max_tokens", 30000)  # long enough to be still streaming when Stop is clicked (the model is fast)
    send("Write a long story")
    # Let the reply grow taller than the window: the composer must stay in view (the messages scroll, not the page).
    wait.until(lambda d: last_reply().size["height"] > d.execute_script("return window.innerHeight"))
    in_view = driver.execute_script(
        "const r = document.getElementById('stop').getBoundingClientRect();"
        "const top = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);"
        "return r.bottom <= window.innerHeight && top === document.getElementById('stop');")
    check(in_view, "a reply taller than the window scrolls inside the conversation; Stop stays in view")
    driver.find_element(By.ID, "stop").click()
    wait.until(lambda d: last_reply().get_attribute("data-stopped") == "1")
    for _ in range(100):
        if metric('dsopen_requests_total{outcome="cancelled"}') > cancelled:
            break
        time.sleep(0.1)
    check(metric('dsopen_requests_total{outcome="cancelled"}') == cancelled + 1,
          "Stop cancels the generation on the server")
    check(driver.find_element(By.ID, "send").is_enabled(), "the page accepts a new message after Stop")

    driver.find_element(By.ID, "new-chat").click()
    check(len(driver.find_elements(By.CSS_SELECTOR, "#conversations li")) == 2, "New chat adds a conversation")
    driver.find_elements(By.CSS_SELECTOR, "#conversations li")[1].click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg")) == 4)
    # A phone-sized window: the panels fold away behind the menu button.
    driver.set_window_size(420, 800)
    check(not driver.find_element(By.ID, "settings").is_displayed(), "narrow window: the settings fold away")
    driver.find_element(By.ID, "menu").click()
    check(driver.find_element(By.ID, "settings").is_displayed() and driver.find_element(By.ID, "api_key").is_enabled(),
          "narrow window: the menu button shows conversations and settings")
    driver.find_element(By.ID, "close-panels").click()
    check(not driver.find_element(By.ID, "settings").is_displayed(), "narrow window: Close folds them again")
    driver.set_window_size(1280, 800)
    driver.save_screenshot(SCREENSHOT)
    check(os.path.getsize(SCREENSHOT) > 1000, f"screenshot written to {SCREENSHOT}")
finally:
    driver.quit()
    server.terminate()
    server.wait(timeout=60)
H.finish()
