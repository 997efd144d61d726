"""The page in a real headless Chromium (Debian's, driven by Playwright; no browser download): upload an
image, the result canvas is drawn, the legend lists the predicted classes, a hover names a segment's
class. The screenshot is saved in the test's temporary folder."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="omniseg[serve] is not installed")
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (test extra)")

from serving import chromium, server, tiny_weights  # noqa: E402

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


def test_page_draws_the_result_lists_classes_and_names_a_hovered_segment(tmp_path):
    browser_path = chromium()
    weights = tiny_weights(tmp_path / "m2f.safetensors")
    picture = np.random.default_rng(1).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    picture[20:70, 30:90] = (40, 200, 60)
    image = tmp_path / "scene.png"
    Image.fromarray(picture).save(image)
    with server(weights) as (url, _), playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            page.wait_for_function("window.omniseg && window.omniseg.model !== null")
            assert "MaskFormer" in page.inner_text("#model-name")
            assert page.locator('input[name="task"]').count() == 3
            page.set_input_files("#file-input", str(image))
            page.wait_for_function("Number(document.querySelector('#result-canvas').dataset.rendered || 0) > 0",
                                   timeout=60_000)
            assert "96" in page.inner_text("#status") and not page.locator("#status.error").count()

            # the canvas holds the image with the segments drawn over it
            width, height = page.evaluate("[document.querySelector('#result-canvas').width, "
                                          "document.querySelector('#result-canvas').height]")
            assert (width, height) == (128, 96)
            changed = page.evaluate("""() => {
                const get = (id) => document.getElementById(id).getContext('2d').getImageData(0, 0, 128, 96).data;
                const a = get('input-canvas'), b = get('result-canvas');
                let n = 0; for (let i = 0; i < a.length; i += 4) if (a[i] !== b[i] || a[i+1] !== b[i+1]) n++;
                return n; }""")
            assert changed > 0

            # the legend lists exactly the classes of the shown segments
            segments = page.evaluate("[...window.omniseg.segments.values()]")
            assert segments
            legend = page.locator("#legend-list li .name").all_inner_texts()
            assert sorted(legend) == sorted({s["name"] for s in segments})

            # hovering a segment names its class
            segment = max(segments, key=lambda s: s["area"])
            where = page.evaluate(f"window.omniseg.locate({segment['id']})")
            page.mouse.move(where["x"], where["y"])
            page.wait_for_selector("#tooltip:not([hidden])")
            assert page.inner_text("#tooltip").startswith(segment["name"])

            # toggling the class off in the legend hides it from the hover
            page.locator(f'#legend-list li[data-class="{segment["class"]}"] input').uncheck()
            page.mouse.move(where["x"] + 1, where["y"])
            page.mouse.move(where["x"], where["y"])
            assert page.locator("#tooltip").is_hidden()

            page.screenshot(path=str(tmp_path / "omniseg_serve.png"), full_page=True)
            assert (tmp_path / "omniseg_serve.png").stat().st_size > 10_000
            assert errors == []
        finally:
            browser.close()
