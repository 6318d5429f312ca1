"""The web page in a real headless Chromium (Debian's chromium + chromedriver, driven by Selenium).

Runs under `make test-browser` (which installs what it needs); skipped in `make test`.
Attaches a digit PNG, asks "which digit is this?", waits for the streamed answer, saves a screenshot.
"""

import os
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    not os.environ.get("OMNILM_TEST_BROWSER") or shutil.which("chromium") is None,
    reason="browser test: run `make test-browser`",
)

from test_serve import KEY, server  # noqa: E402,F401  (the real server fixture)


def test_page_in_chromium_answers_a_digit(server, tmp_path, capsys):  # noqa: F811
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from omnilm.cli import main
    from omnilm.demo.data import load_digits, render_digit

    _, _, test_x, _ = load_digits(seed=0)
    png = tmp_path / "digit.png"
    render_digit(test_x[3], 16).save(png)
    assert main(["generate", "--model", "demo", "--image", str(png), "--prompt", "which digit is this?"]) == 0
    expected = capsys.readouterr().out.strip()

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=900,700",
    ):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        _, port = server
        driver.get(f"http://127.0.0.1:{port}/?key={KEY}")
        assert "key=" not in driver.current_url  # the key left the address bar for sessionStorage
        driver.find_element(By.ID, "attach").send_keys(str(png))
        WebDriverWait(driver, 10).until(lambda d: "attached" in d.find_element(By.ID, "attached").text)
        prompt = driver.find_element(By.ID, "prompt")
        prompt.send_keys("which digit is this?")
        prompt.send_keys(Keys.ENTER)  # no mouse: Enter sends
        answer = WebDriverWait(driver, 60).until(
            lambda d: d.find_element(By.CSS_SELECTOR, ".msg.assistant[data-done='true']")
        )
        assert answer.text.strip() == expected
        shot = Path(os.environ.get("OMNILM_SCREENSHOT", "runs/test-browser/chat.png"))
        shot.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(shot))
        print(f"screenshot: {shot} (answer {answer.text.strip()!r})")
    finally:
        driver.quit()
