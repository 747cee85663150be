"""The playground page at `/`: served without the API key (the API calls it makes send the key typed
into it), and driven in headless Chromium (Debian's package, through Playwright) against a real
server: an upload shows the original (the server's preview, so an AVI the browser cannot play too)
and its reconstruction with PSNR and the planes, a frame range decodes to a playable video, and a
generation job is followed to playable results; nothing empty shows on first load, sizes read WxH,
and no request but the first, keyless one is refused (no favicon 404).

`COORDTOK_PLAYGROUND_SCREENSHOT=docs/playground.png` runs the browser test on the bundled models
and saves a screenshot of the page there, showing the sample clip (how docs/playground.png is made)."""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
import shutil
from pathlib import Path

import httpx
import numpy as np
import torch
from fastapi.testclient import TestClient

from coordtok.model import LatentStats, SiT, load_model, save_generator, sit_preset
from coordtok.model.checkpoint import DEFAULT_WEIGHTS, file_sha256
from coordtok.model.triplane import to_uint8
from coordtok.service.app import create_app
from coordtok.service.commands.roundtrip import SAMPLE_CLIP
from coordtok.formats.video import MediaLimits, read_frames
from coordtok.formats.video_write import write_video
from coordtok.service.settings import Settings
from tests.service.server_process import ROOT, running_server
from tests.service.test_jobs import save_models
from tests.system_tools import require

KEY = "playground-key"
SCREENSHOT = os.environ.get("COORDTOK_PLAYGROUND_SCREENSHOT")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Chromium without a sandbox (root), GPU or calls home (this machine's network is closed).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def moving_shapes_clip(frames: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A synthetic clip [frames, height, width, 3] in [-1, 1]: a smooth colour gradient with a
    bright disc moving across it."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(frames).float()[:, None, None]
    x = torch.linspace(0, 1, height)[None, :, None]
    y = torch.linspace(0, 1, width)[None, None, :]
    phase = torch.rand(3, generator=g) * 2 * math.pi
    base = torch.stack([torch.sin(2 * math.pi * (x + y) / 2 + t / frames * 2 + p) for p in phase], dim=-1)
    cx = 0.5 + 0.3 * torch.sin(2 * math.pi * t / frames)
    cy = 0.2 + 0.6 * t / max(frames - 1, 1)
    disc = ((x - cx) ** 2 + (y - cy) ** 2 < 0.02).float()[..., None]
    return (0.6 * base * (1 - disc) + disc).clamp(-1, 1)


def test_the_page_is_served_without_the_key_and_the_api_still_needs_it(tmp_path):
    tokenizer, _ = save_models(tmp_path)
    settings = Settings(model=str(tokenizer), generator="none", devices=["cpu"], api_keys=[KEY], jobs_dir=tmp_path / "jobs")
    with TestClient(create_app(settings)) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "CoordTok playground" in page.text and "/static/playground.js" in page.text
        script = client.get("/static/playground.js")
        assert script.status_code == 200 and "javascript" in script.headers["content-type"]
        assert "/v1/encode?format=json" in script.text and "Authorization" in script.text
        assert client.get("/static/playground.css").status_code == 200
        icon = client.get("/favicon.ico")  # open, like the page
        assert icon.status_code == 200 and icon.headers["content-type"] == "image/x-icon" and icon.content[:4] == b"\0\0\1\0"
        assert client.get("/static/missing.js").status_code == 404
        assert client.get("/static/%2e%2e/app.py").status_code == 404  # only the static folder is open
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert "/" not in client.get("/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()["paths"]


def browser_or_skip():
    """Playwright and Debian's chromium: skipped without them outside CI, required in CI."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    require(sync_playwright, "playwright", "pip install -e '.[test]'")
    require(CHROMIUM, "Debian's chromium", "apt-get install chromium; .ci/run installs it")
    return sync_playwright


def models_for_the_page(folder: Path) -> tuple[Path, Path, tuple[int, int, int]]:
    """(tokenizer, generator, upload shape): tiny random models, or for the screenshot the bundled
    tokenizer with the bundled generator (a random SiT over its triplanes when there is none)."""
    if not SCREENSHOT:
        tokenizer, generator = save_models(folder)
        return tokenizer, generator, (20, 24, 40)  # three clips of the tiny model's 8 frames, wider than high
    generator = DEFAULT_WEIGHTS.with_name("generator.safetensors")
    if not generator.is_file():
        config = load_model(None, device="cpu").config
        c = config.latent_channels
        torch.manual_seed(0)
        sit = dataclasses.replace(sit_preset("sit-tiny", config), depth=2)
        generator = folder / "generator.safetensors"
        stats = LatentStats(tuple(torch.zeros(c) for _ in range(3)), tuple(torch.ones(c) for _ in range(3)))
        save_generator(SiT(sit), generator, stats, file_sha256(DEFAULT_WEIGHTS))
    return DEFAULT_WEIGHTS, generator, (48, 96, 160)


def clip_frames(meta: dict, k: int) -> tuple[int, int]:
    """The video frames [start, stop) clip k reconstructs (the page's clipFrames)."""
    value = lambda v: json.loads(v) if isinstance(v, str) else v  # noqa: E731
    lengths = value(meta["n_frames"])
    starts = value(meta["clip_starts"]) if "clip_starts" in meta else [sum(lengths[:i]) for i in range(len(lengths))]
    return starts[k], starts[k + 1] if k + 1 < len(starts) else starts[k] + lengths[k]


def reference(url: str, clip: Path, size: tuple[int, int]) -> tuple[dict, float]:
    """(the tokens' metadata, PSNR of the first clip's reconstruction), computed here from the
    same API answers against the frames PyAV decodes and resizes as the server does."""
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=url, headers=auth, timeout=120) as client:
        tokens = client.post("/v1/encode", params={"format": "json"}, files={"file": clip.read_bytes()}).content
        meta = json.loads(tokens)["metadata"]
        start, stop = clip_frames(meta, 0)
        decoded = client.post("/v1/decode", params={"format": "npy", "start": start, "end": stop}, content=tokens,
                              headers={"content-type": "application/json"})
    recon = np.load(io.BytesIO(decoded.content)).astype(np.float64)
    original, _, _ = read_frames(clip, MediaLimits(), size=size, resize="crop")
    mse = ((original[start:stop].astype(np.float64) - recon) ** 2).mean()
    return meta, 10 * np.log10(255**2 / mse)


def lit_canvases(page) -> dict[str, list[int]]:
    """[height, width, pixels not black] of the side-by-side and plane canvases."""
    return page.evaluate("""() => Object.fromEntries(["original", "reconstruction", "plane-xy", "plane-yt", "plane-xt"].map(id => {
        const c = document.getElementById(id);
        const pixels = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
        let lit = 0;
        for (let i = 0; i < pixels.length; i += 4) lit += pixels[i] + pixels[i + 1] + pixels[i + 2] > 0;
        return [id, [c.height, c.width, lit]];
    }))""")


def shown_psnr(page) -> float:
    return float(re.search(r"PSNR (-?[\d.]+) dB", page.inner_text("#psnr")).group(1))


def test_the_playground_encodes_decodes_and_generates_in_chromium(tmp_path):
    sync_playwright = browser_or_skip()
    tokenizer, generator, (frames, height, width) = models_for_the_page(tmp_path)
    clip = tmp_path / "clip.mp4"
    write_video(to_uint8(moving_shapes_clip(frames, height, width, seed=3)).numpy(), clip, fps=8)
    config = load_model(str(tokenizer), device="cpu").config
    size = (config.height, config.width)
    env = {"COORDTOK_MODEL": str(tokenizer), "COORDTOK_GENERATOR": str(generator), "COORDTOK_JOBS_DIR": str(tmp_path / "jobs"),
           "COORDTOK_API_KEYS": f'["{KEY}"]', "COORDTOK_GENERATION_BATCH_SIZE": "2", "COORDTOK_BATCH_MAX_FRAMES": "128"}
    with running_server(tmp_path / "server.log", env) as url, sync_playwright() as playwright:
        from playwright.sync_api import expect

        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        errors, refused = [], []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("response", lambda response: response.status >= 400 and refused.append((response.status, response.url)))
        page.goto(url)
        expect(page.locator("#model-info")).to_contain_text("401")  # the page loads; the API wants the key
        for hidden in ("#job-progress", "#encode-result", "#decode-result", "#cancel-button"):
            expect(page.locator(hidden)).to_be_hidden()  # nothing empty shows before there is something in it
        page.fill("#api-key", KEY)
        page.click("#connect")
        expect(page.locator("#model-info")).to_contain_text(f"at {config.width}x{config.height}, ")

        page.set_input_files("#video-file", str(clip))
        page.click("#encode-form button[type=submit]")
        expect(page.locator("#psnr")).to_contain_text("dB", timeout=120_000)
        meta, expected = reference(url, clip, size)
        start, stop = clip_frames(meta, 0)
        assert f"over {stop - start} frames" in page.inner_text("#psnr")
        assert abs(shown_psnr(page) - expected) < 0.01  # the page scores against the server's frames: exactly
        expect(page.locator("#token-info")).to_contain_text(f"{width}x{height} at 8 fps")  # WxH, as video sizes are written
        canvases = lit_canvases(page)
        r_xy, r_t = config.latent_res_xy, config.latent_res_t
        assert canvases["original"][:2] == canvases["reconstruction"][:2] == [*size]
        assert [canvases[f"plane-{p}"][:2] for p in ("xy", "yt", "xt")] == [[r_xy, r_xy], [r_t, r_xy], [r_t, r_xy]]
        assert all(lit > 0 for _, _, lit in canvases.values()), canvases

        clips = len(json.loads(meta["n_frames"]) if isinstance(meta["n_frames"], str) else meta["n_frames"])
        if clips > 1:  # the last clip: its planes, reconstruction and PSNR
            page.select_option("#clip", str(clips - 1))
            first, last = clip_frames(meta, clips - 1)
            expect(page.locator("#encode-status")).to_contain_text(f"Clip {clips}: {last - first} frames", timeout=60_000)
            expect(page.locator("#psnr")).to_contain_text(f"over {last - first} frames")

        page.fill("#decode-start", "2")
        page.fill("#decode-end", "6")
        page.click("#decode-form button[type=submit]")
        expect(page.locator("#decode-status")).to_contain_text("Decoded frames 2 to 6", timeout=60_000)
        page.wait_for_function("() => document.getElementById('decoded').readyState >= 2", timeout=30_000)
        assert page.evaluate("() => [document.getElementById('decoded').videoHeight, document.getElementById('decoded').videoWidth]") \
            == [*size]

        # The sample clip is an AVI (Cinepak), which Chromium cannot play: the server's preview is
        # the original, so it still gets the side-by-side and the PSNR.
        page.click("#try-sample")
        expect(page.locator("#psnr")).to_contain_text("against the frames the server encoded", timeout=120_000)
        expect(page.locator("#token-info")).to_contain_text("sample.avi")
        expect(page.locator("#token-info")).to_contain_text("320x240 at 15 fps")
        _, expected = reference(url, SAMPLE_CLIP, size)
        assert abs(shown_psnr(page) - expected) < 0.01
        assert all(lit > 0 for _, _, lit in lit_canvases(page).values())

        page.fill("#num-videos", "2")
        page.fill("#steps", "50" if SCREENSHOT else "3")
        page.fill("#seed", "5")
        page.click("#generate-button")
        expect(page.locator("#job-progress")).to_be_visible()
        expect(page.locator("#job-status")).to_contain_text("succeeded, 2 videos", timeout=300_000)
        page.wait_for_function("() => [...document.querySelectorAll('#generated video')].every(v => v.readyState >= 2)"
                               " && document.querySelectorAll('#generated video').length === 2", timeout=30_000)
        assert page.evaluate("() => fetch('/favicon.ico').then(r => [r.status, r.headers.get('content-type')])") == [200, "image/x-icon"]
        if SCREENSHOT:
            page.evaluate("() => { document.getElementById('play').click(); }")  # pause on a frame for the picture
            page.screenshot(path=str(ROOT / SCREENSHOT), full_page=True)
        browser.close()
    assert not errors, errors
    assert refused == [(401, f"{url}/v1/models")], refused  # only the call made before the key was typed
