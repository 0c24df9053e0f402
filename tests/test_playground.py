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


def test_the_playground_streams_a_continuation_on_its_defaults_past_a_short_context(tmp_path, browser):
    """The quick start's context, 64 tokens: the page's own prompt and sliders (200 tokens) just work, the
    server sliding its window past the context as `gptrain generate` does."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    checkpoint = write_checkpoint(tmp_path / "tiny-char", random_model(block_size=64))
    with running_server(checkpoint) as (url, _):
        browser.get(url)
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: "tiny-char" in b.find_element(By.ID, "info").text)
        info = browser.find_element(By.ID, "info").text
        assert "parameters" in info and "char" in info and "64 tokens" in info
        length = int(browser.find_element(By.ID, "max_tokens").get_attribute("value"))
        assert length > 64  # the default asks for more than the context holds
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda b: "tokens in" in b.find_element(By.ID, "status").text
                   or b.find_elements(By.CLASS_NAME, "error"))  # then the assert below shows the error
        status = browser.find_element(By.ID, "status").text
        assert status.startswith(f"{length} tokens in"), status
        output = browser.find_element(By.ID, "output")
        assert output.find_element(By.CLASS_NAME, "prompt").text == "ROMEO:"
        assert len(output.find_element(By.CLASS_NAME, "completion").get_attribute("textContent")) == length
