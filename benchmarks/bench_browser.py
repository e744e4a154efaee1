"""The explorer in a real browser: Step -> repaint time and Play's frame rate for a 16 GiB guest, and
what bounds them (kernel time per step, comm messages and bytes sent to the browser, BokehJS paint),
each figure with the load average it was measured under.

    PYTHONPATH=. python benchmarks/bench_browser.py [--memory 16G] [--steps 15] [--play-s 6]

Starts JupyterLab on 127.0.0.1 (a temporary root, config and home, ``BOKEH_RESOURCES=inline``) and
Debian's headless Chromium at 1400x1000 (as tests/browser does), opens a notebook that shows
``labkit.viz.explore(memory=...)`` with a target below the guest's size, then:

* **Step -> repaint**, timed on one clock (the epoch, ``performance.timeOrigin + performance.now()``
  in the page, ``time.time()`` in the kernel): a capturing listener on the Step button stamps the
  browser's ``click`` event (what a person's click starts from; Playwright's own click machinery
  before it is not counted); the kernel stamps the start and end of ``explorer.step()`` (into a
  file of the benchmark's temporary folder); a wrapper of the page's WebSocket stamps every message
  as it arrives (its own header's ``msg_type`` tells comm messages from kernel status; Playwright's
  frame events reach this process late and in bursts); a requestAnimationFrame loop stamps the
  first frame at which the page map's canvas pixels differ (a checksum of the canvas). Printed: the
  median and worst of ``--steps`` clicks, and the split click -> kernel start (browser, server,
  kernel queue), kernel step (model, page map, serialising), kernel end -> the step's last comm
  message in the page (sending, the server, the websocket), that message -> new pixels (BokehJS
  decoding and painting); the messages and bytes per step each way (the browser sends
  jupyter_bokeh's echo of every applied change back).
* **Play**: picks 10 ms a tick (20 balloon requests: the balloon has work for the whole run, so
  every tick changes the map), starts Play at a 50 ms interval and counts the page map's pixel
  changes per second, with the kernel's own tick rate and time per tick beside it.
* **Kernel side, no browser**: the same explorer's ``step()`` and ``tick()`` timed in this process,
  and the comm messages and Bokeh events one step sends (``LiveBokeh`` counts them).

``--root DIR`` measures another checkout of labkit (e.g. before a change) with the same method.

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
if "--root" in sys.argv:  # measure another checkout: its labkit in the kernel and in this process
    ROOT = Path(sys.argv[sys.argv.index("--root") + 1]).resolve()
sys.path.insert(0, str(ROOT))

from labkit.cli import any_free_port, lab_ready  # noqa: E402
from tests.browser.conftest import CHROMIUM_ARGS, NO_NEWS, chromium_path, private_home  # noqa: E402

# a checksum of the page map's canvas on every animation frame; the epoch time of each change
PROBE_JS = """
(canvas) => {
  const now = () => performance.timeOrigin + performance.now();
  const sum = () => { const d = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    let s = 0; for (let i = 0; i < d.length; i += 3) s = (s * 31 + d[i]) | 0; return s; };
  window.__probe = {now, last: sum(), changes: [], clicks: [], running: true};
  const loop = () => { if (!window.__probe.running) return; const s = sum();
    if (s !== window.__probe.last) { window.__probe.last = s; window.__probe.changes.push(now()); }
    requestAnimationFrame(loop); };
  requestAnimationFrame(loop);
}
"""
# every websocket message, timed in the page itself when it arrives (Playwright's own frame events
# reach this process late and in bursts): epoch ms, bytes, whether it is a comm message
SOCKET_JS = """
(() => {
  const Native = window.WebSocket, now = () => performance.timeOrigin + performance.now();
  const text = new TextDecoder();
  const kind = (data) => { const head = typeof data === 'string' ? data.slice(0, 800)
      : text.decode(new Uint8Array(data, 0, Math.min(800, data.byteLength)));
    const m = head.match(/"msg_type": ?"(\\w+)"/); return m ? m[1] : '?'; };
  const size = (data) => typeof data === 'string' ? data.length : (data.byteLength || data.size || 0);
  window.__ws = {received: [], sent: []};
  class Traced extends Native {
    constructor(...args) { super(...args);
      this.addEventListener('message',
        (e) => window.__ws.received.push([now(), size(e.data), kind(e.data)])); }
    send(data) { window.__ws.sent.push([now(), size(data), typeof data === 'string' ? kind(data) : '?']);
      return super.send(data); }
  }
  window.WebSocket = Traced;
})();
"""
CLICK_JS = "(b) => b.addEventListener('click', () => window.__probe.clicks.push(window.__probe.now()), true)"


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def notebook(memory: str, log: Path) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(s) for s in (
        "import labkit, labkit.viz\nlabkit.viz.setup_notebook()",
        f"ex = labkit.viz.explore(memory={memory!r}, seed=0)\n"
        "ex.slider.value = ex.slider.max - 4096  # a 4 GiB balloon to inflate\n"
        "ex.play.interval = 50  # (labkit before the kernel-driven Play: ipywidgets Play's interval)\n"
        "ex.play_interval_ms = 50\n"
        "import json, time\n"
        f"_log = open({str(log)!r}, 'a')\n"
        "def _timed(name, call):\n"
        "    def run():\n"
        "        t0 = time.time(); result = call(); t1 = time.time()\n"
        "        _log.write(json.dumps([name, t0 * 1000, t1 * 1000]) + '\\n'); _log.flush()\n"
        "        return result\n"
        "    return run\n"
        "ex.step, ex.tick = _timed('step', ex.step), _timed('tick', ex.tick)\n"
        "ex",
    )]
    return nb


def kernel_side(memory: str, steps: int) -> dict:
    import labkit.viz

    ex = labkit.viz.explore(memory=memory, seed=0)
    ex.slider.value = ex.slider.max - 4096
    live = getattr(ex, "live", None)  # None: a labkit from before LiveBokeh (a comparison run)
    times, messages, events = [], getattr(live, "sent_messages", 0), getattr(live, "sent_events", 0)
    for _ in range(steps):
        start = time.perf_counter()
        ex.step()
        times.append(time.perf_counter() - start)
    per_step = ((live.sent_messages - messages) / steps, (live.sent_events - events) / steps) \
        if live is not None else (float("nan"), float("nan"))
    ticks = []
    for _ in range(5):
        start = time.perf_counter()
        ex.tick()
        ticks.append(time.perf_counter() - start)
    ex.vm.close()
    return {"step_ms": 1000 * statistics.median(times), "tick_ms": 1000 * statistics.median(ticks),
            "messages": per_step[0], "events": per_step[1]}


def med(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} ms" if values else "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--memory", default="16G")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--play-s", type=float, default=6.0)
    ap.add_argument("--root", default=str(ROOT), help="the checkout of labkit to measure (default: this one)")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    base = Path(tempfile.mkdtemp(prefix="labkit-bench-browser-"))
    root = base / "nb"
    root.mkdir()
    log = base / "kernel-times.jsonl"
    nbformat.write(notebook(args.memory, log), root / "bench.ipynb")
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
    loads = {"start": load()}
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
                page.add_init_script(SOCKET_JS)
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
                step.evaluate(CLICK_JS)
                rows = []
                loads["steps"] = load()
                for i in range(args.steps):
                    n_changes = page.evaluate("() => window.__probe.changes.length")
                    page.evaluate("() => { window.__ws.received = []; window.__ws.sent = []; }")
                    step.click()
                    page.wait_for_function(f"() => window.__probe.changes.length > {n_changes}",
                                           timeout=30_000, polling=10)
                    time.sleep(0.6)  # the status line's frames, and the browser's echo
                    probe = page.evaluate("() => window.__probe")
                    ws = page.evaluate("() => window.__ws")
                    received, sent = ws["received"], ws["sent"]
                    click, painted = probe["clicks"][i], probe["changes"][n_changes]
                    kernel = [json.loads(line) for line in log.read_text().splitlines()]
                    _, k0, k1 = [k for k in kernel if k[0] == "step"][-1]
                    before = [t for t, _, kind in received if t <= painted and kind == "comm_msg"]
                    rows.append({"latency": painted - click, "to_kernel": k0 - click, "kernel": k1 - k0,
                                 "to_last_frame": (before[-1] - k1) if before else float("nan"),
                                 "paint": (painted - before[-1]) if before else float("nan"),
                                 "frames_in": len(received), "bytes_in": sum(r[1] for r in received),
                                 "comm_in": sum(r[2] == "comm_msg" for r in received),
                                 "frames_out": len(sent) - 1})  # minus the click itself
                # Play with 10 ms a tick (20 balloon requests of 0.5 ms): the balloon has work for
                # the whole run (at 100 ms a tick the 4 GiB balloon is done after ~20 ticks and the
                # map stops changing: that would count as missing frames)
                page.locator(".widget-dropdown select").first.select_option(label="10 ms")
                time.sleep(1)
                loads["play"] = load()
                old_play = page.locator(".widget-play button")  # ipywidgets' Play (labkit before)
                # an element handle: the toggle's label turns to "Pause" once it plays
                play = old_play.first if old_play.count() else page.locator(
                    "button.widget-toggle-button", has_text="Play").first.element_handle()
                n0 = page.evaluate("() => window.__probe.changes.length")
                ticks0 = sum(1 for line in log.read_text().splitlines() if '"tick"' in line)
                page.evaluate("() => { window.__ws.received = []; }")
                play.click()
                time.sleep(args.play_s)
                (old_play.nth(1) if old_play.count() else play).click()  # pause
                n1 = page.evaluate("() => window.__probe.changes.length")
                play_bytes = sum(r[1] for r in page.evaluate("() => window.__ws.received"))
                time.sleep(2)
                tick_rows = [json.loads(line) for line in log.read_text().splitlines() if '"tick"' in line]
                ticks = len(tick_rows) - ticks0
                tick_ms = [t1 - t0 for _, t0, t1 in tick_rows[ticks0:]]
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
    loads["kernel side"] = load()
    kernel = kernel_side(args.memory, args.steps)
    col = {k: [r[k] for r in rows if r[k] == r[k]] for k in rows[0]}
    fps = (n1 - n0) / args.play_s
    latency = statistics.median(col["latency"])
    print(f"explorer of a {args.memory} guest in headless Chromium (1400x1000), {args.steps} Steps "
          f"({loads['steps']} when they started):")
    print(f"  Step -> repaint, from the browser's click event: median {latency:.0f} ms, worst "
          f"{max(col['latency']):.0f} ms (goal <= 150 ms): {latency / 150:.2f} x the goal")
    print(f"    click -> kernel starts the step:      {med(col['to_kernel'])}")
    print(f"    kernel step (model + map + serialise): {med(col['kernel'])}")
    print(f"    kernel done -> its last comm frame arrives: {med(col['to_last_frame'])}")
    print(f"    that frame -> new pixels (BokehJS):    {med(col['paint'])}")
    print(f"    frames from the kernel per Step: median {statistics.median(col['frames_in']):.0f} "
          f"({statistics.median(col['comm_in']):.0f} comm messages, the rest kernel status), "
          f"{statistics.median(col['bytes_in']) / 1024:.1f} KiB; frames back (echo): median "
          f"{statistics.median(col['frames_out']):.0f}")
    print(f"  Play at a 50 ms interval ({loads['play']}): {fps:.1f} page-map frames/s over "
          f"{args.play_s:g} s (goal >= 10): {fps / 10:.2f} x the goal; the kernel ran "
          f"{ticks / args.play_s:.1f} ticks/s of {med(tick_ms)} each; "
          f"{play_bytes / max(1, n1 - n0) / 1024:.1f} KiB per frame")
    print(f"  kernel side, no browser ({loads['kernel side']}): step() {kernel['step_ms']:.1f} ms, "
          f"Play tick {kernel['tick_ms']:.1f} ms; per step {kernel['messages']:.0f} comm messages "
          f"carrying {kernel['events']:.0f} Bokeh changes")


if __name__ == "__main__":
    main()
