"""The report renders in a real headless Chromium: a screenshot of the right size that is not a blank page.

Needs Debian's `chromium` (`.ci/run` installs it). Outside CI a machine without it skips, saying why;
in CI (`CI` set) a missing browser is a failure. Run alone with: pytest tests/e2e/test_report_browser.py
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess

import numpy as np
import pytest
from matplotlib.image import imread

from pipeline.report import write_report
from tests.conftest import make_cache
from tests.unit.test_report import fake_result, write_run

pytestmark = [pytest.mark.e2e]
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome-headless-shell")
WIDTH, HEIGHT = 1200, 3000


@pytest.mark.timeout(180)
def test_report_screenshot_in_headless_chromium(tmp_path):
    browser = next((path for name in BROWSERS if (path := shutil.which(name))), None)
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("CI has no headless Chromium: .ci/run installs Debian's chromium before the tests")
        pytest.skip("no headless Chromium installed here (apt-get install chromium); CI installs it and runs this test")
    cache = make_cache(tmp_path)
    html = write_report([write_run(tmp_path, fake_result(f"kd-seed{s}", cache, s, calibration=s == 0)) for s in (0, 1, 2)])
    png = tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--screenshot={png}",
                    f"--window-size={WIDTH},{HEIGHT}", f"file://{html}"], check=False, timeout=120, capture_output=True)
    assert png.exists(), "Chromium wrote no screenshot"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (WIDTH, HEIGHT)
    pixels = imread(str(png))
    colours = np.unique((pixels[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 50, f"the page looks blank ({len(colours)} distinct colours)"
