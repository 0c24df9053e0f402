"""The playground page in a real headless browser: type a prompt, press Generate, see the text stream in."""

import shutil

import pytest

from serving import random_model, running_server, write_checkpoint

pytest.importorskip("uvicorn")  # the serve extra
webdriver = pytest.importorskip("selenium.webdriver")
CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver")


@pytest.fixture
def browser():
    if not (shutil.which(CHROMIUM) and CHROMEDRIVER):
        pytest.skip("needs chromium and chromedriver (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,760"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def test_the_playground_streams_a_continuation(tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    checkpoint = write_checkpoint(tmp_path / "tiny-char", random_model())
    with running_server(checkpoint) as (url, _):
        browser.get(url)
        wait = WebDriverWait(browser, 20)
        wait.until(lambda b: "tiny-char" in b.find_element(By.ID, "info").text)
        info = browser.find_element(By.ID, "info").text
        assert "parameters" in info and "char" in info and "128 tokens" in info
        prompt = browser.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("JULIET:")
        browser.execute_script("const s = document.getElementById('max_tokens'); s.value = 60;"
                               "s.dispatchEvent(new Event('input'));")
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda b: "tokens in" in b.find_element(By.ID, "status").text)
        output = browser.find_element(By.ID, "output")
        assert output.find_element(By.CLASS_NAME, "prompt").text == "JULIET:"
        assert len(output.find_element(By.CLASS_NAME, "completion").get_attribute("textContent")) == 60
        assert browser.find_element(By.ID, "status").text.startswith("60 tokens in")
