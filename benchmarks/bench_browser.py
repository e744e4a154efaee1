"""The explorer in a real browser: Step -> repaint time and Play's frame rate for a 16 GiB guest, and
what bounds them (kernel time per step, bytes sent to the browser per step, BokehJS paint).

    PYTHONPATH=. python benchmarks/bench_browser.py [--memory 16G] [--steps 15] [--play-s 6]

Starts JupyterLab on 127.0.0.1 (a temporary root, config and home, ``BOKEH_RESOURCES=inline``) and
Debian's headless Chromium at 1400x1000 (as tests/browser does), opens a notebook that shows
``labkit.viz.explore(memory=...)`` with a target below the guest's size, then:

* **Step -> repaint**: clicks Step; JavaScript in the page timestamps the click, every websocket
  frame from the kernel, and the first animation frame at which the page map's canvas pixels differ
  (a checksum of the canvas). Printed: the median and worst of ``--steps`` clicks, the bytes that
  arrived per step, and the split: click -> last frame (kernel + transfer) and last frame -> new
  pixels (BokehJS decoding and painting).
* **Play**: starts Play at its fastest interval and counts the page map's pixel changes per second.
* **Kernel side**: the same explorer's ``step()`` and ``tick()`` timed in this process (numpy page
  work, classification, downsampling, the outline), without a browser.

Goals (issue 9): Step -> repaint <= 150 ms and Play >= 10 frames/s. Both the server and the browser
are stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from labkit.cli import any_free_port, lab_ready  # noqa: E402
from tests.browser.conftest import CHROMIUM_ARGS, NO_NEWS, chromium_path, private_home  # noqa: E402

PROBE_JS = """
(canvas) => {
  const sum = () => { const d = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    let s = 0; for (let i = 0; i < d.length; i += 8) s = (s * 31 + d[i]) | 0; return s; };
  window.__probe = {sum, canvas, last: sum(), changes: [], frames: [], bytes: 0, running: true};
  const loop = () => { if (!window.__probe.running) return; const s = sum();
    if (s !== window.__probe.last) {
      window.__probe.last = s; window.__probe.changes.push(performance.now()); }
    requestAnimationFrame(loop); };
  requestAnimationFrame(loop);
}
"""


def notebook(memory: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(s) for s in (
        "import labkit, labkit.viz\nlabkit.viz.setup_notebook()",
        f"ex = labkit.viz.explore(memory={memory!r}, seed=0)\n"
        "ex.slider.value = ex.slider.max - 4096  # a 4 GiB balloon to inflate\n"
        "ex.play.interval = 50\nex",
    )]
    return nb


def kernel_side(memory: str, steps: int) -> dict:
    import labkit.viz

    ex = labkit.viz.explore(memory=memory, seed=0)
    ex.slider.value = ex.slider.max - 4096
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        ex.step()
        times.append(time.perf_counter() - start)
    ticks = []
    for _ in range(5):
        start = time.perf_counter()
        ex.tick()
        ticks.append(time.perf_counter() - start)
    ex.vm.close()
    return {"step_ms": 1000 * statistics.median(times), "tick_ms": 1000 * statistics.median(ticks)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--memory", default="16G")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--play-s", type=float, default=6.0)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    base = Path(tempfile.mkdtemp(prefix="labkit-bench-browser-"))
    root = base / "nb"
    root.mkdir()
    nbformat.write(notebook(args.memory), root / "bench.ipynb")
    (base / "config" / "labconfig").mkdir(parents=True)
    (base / "config" / "labconfig" / "default_setting_overrides.json").write_text(json.dumps(NO_NEWS))
    env = {**os.environ, **private_home(base / "home"), "BOKEH_RESOURCES": "inline",
           "JUPYTER_CONFIG_DIR": str(base / "config"), "JUPYTER_DATA_DIR": str(base / "data"),
           "JUPYTER_RUNTIME_DIR": str(base / "runtime"), "JUPYTER_TOKEN": os.urandom(16).hex(),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    port = any_free_port()
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--ServerApp.root_dir={root}",
           "--LabApp.expose_app_in_browser=True"]
    if os.geteuid() == 0:
        cmd.append("--ServerApp.allow_root=True")
    server = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not lab_ready(port, env["JUPYTER_TOKEN"]):
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("JupyterLab did not start")
            time.sleep(0.2)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                frames: list[tuple[float, int]] = []  # (perf_counter ms, bytes) of kernel frames

                def on_ws(ws):
                    ws.on("framereceived", lambda payload: frames.append(
                        (time.perf_counter() * 1000, len(payload))))
                page.on("websocket", on_ws)
                page.goto(f"http://127.0.0.1:{port}/lab/tree/bench.ipynb?token={env['JUPYTER_TOKEN']}")
                page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
                                       " && window.jupyterapp.shell.currentWidget.sessionContext.isReady",
                                       timeout=120_000)
                page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
                step = page.locator("button.widget-button", has_text="Step").first
                step.wait_for(timeout=180_000)
                canvas = page.locator(".jp-OutputArea-output canvas.bk-layer").first
                canvas.wait_for(timeout=60_000)
                time.sleep(3)
                page.wait_for_function("() => window.jupyterapp.shell.currentWidget.sessionContext"
                                       ".session.kernel.status === 'idle'", timeout=180_000)
                canvas.scroll_into_view_if_needed()
                canvas.evaluate(PROBE_JS)
                # the page's clock (performance.now) against this process's (perf_counter)
                offset = page.evaluate("() => performance.now()") - time.perf_counter() * 1000
                latencies, to_frame, paint, sizes = [], [], [], []
                for _ in range(args.steps):
                    n_changes = page.evaluate("() => window.__probe.changes.length")
                    frames.clear()
                    t0 = page.evaluate("() => performance.now()")
                    step.click()
                    page.wait_for_function(f"() => window.__probe.changes.length > {n_changes}",
                                           timeout=30_000, polling=10)
                    t1 = page.evaluate(f"() => window.__probe.changes[{n_changes}]")
                    time.sleep(0.3)  # let the status line's frames arrive too
                    before = [(t + offset, n) for t, n in frames if t + offset <= t1]
                    latencies.append(t1 - t0)
                    sizes.append(sum(n for _, n in frames))
                    if before:
                        to_frame.append(before[-1][0] - t0)
                        paint.append(t1 - before[-1][0])
                play = page.locator(".widget-play button").first
                n0 = page.evaluate("() => window.__probe.changes.length")
                frames.clear()
                play.click()
                time.sleep(args.play_s)
                page.locator(".widget-play button").nth(1).click()
                n1 = page.evaluate("() => window.__probe.changes.length")
                play_bytes = sum(n for _, n in frames)
                page.evaluate("() => window.jupyterapp.shell.currentWidget.sessionContext.shutdown()")
            finally:
                browser.close()
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
    kernel = kernel_side(args.memory, args.steps)
    fps = (n1 - n0) / args.play_s
    med = statistics.median(latencies)
    print(f"explorer of a {args.memory} guest in headless Chromium (1400x1000), {args.steps} Steps:")
    print(f"  Step -> repaint: median {med:.0f} ms, worst {max(latencies):.0f} ms (goal <= 150 ms): "
          f"{med / 150:.2f} x the goal")
    if to_frame:
        print("    click -> last kernel frame (kernel + transfer): median "
              f"{statistics.median(to_frame):.0f} ms")
        print("    last frame -> new pixels (BokehJS decode + paint): median "
              f"{statistics.median(paint):.0f} ms")
    print(f"    bytes from the kernel per Step: median {statistics.median(sizes) / 1024:.1f} KiB")
    print(f"  Play at a 50 ms interval: {fps:.1f} page-map frames/s over {args.play_s:g} s (goal >= 10): "
          f"{fps / 10:.2f} x the goal; {play_bytes / max(1, n1 - n0) / 1024:.1f} KiB per frame")
    print(f"  kernel side, no browser: step() {kernel['step_ms']:.1f} ms, Play tick "
          f"{kernel['tick_ms']:.1f} ms (model + snapshot + classify + downsample + outline)")


if __name__ == "__main__":
    main()
