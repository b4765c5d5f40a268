"""Dashboard speed as the browser feels it: `streamlit run` the real app, drive it in headless Chromium (not
AppTest) and time each interaction from the input event to a settled page, on a run that has an external set.

    nice .venv/bin/python bench/benchmark_browser.py [--run RUN_DIR] [--reps 10] [--baseline GIT_REV]

Without --run it trains one (`python -m core train --preset tiny` on ../shared/data/kermany_224, then
`python -m core evaluate RUN --data ../shared/data/kermany_original_train_subset --name originals`: a few
minutes). The run is copied into a temporary runs folder; nothing is written to it. --baseline REV runs the same
interactions against that commit of the app (`git archive REV`, same Python environment) first and prints both.

Settled: the input event's own timestamp (a capturing listener in the page) to the last DOM mutation (a
MutationObserver) of the rerun it caused, once Streamlit reports the script not running, its status widget is
gone and nothing has changed for QUIET_MS. Canvas repaints (the data grids) are not DOM mutations and are not
waited for. Beside each median and 90th percentile: websocket messages and kilobytes received, the server
process's CPU and the page's main-thread busy time (Chromium's TaskDuration: wall time of its tasks, so it
grows with the machine's load), per interaction.

Interactions: a threshold slider step (arrow key on the focused slider) and a rule change (Youden <-> Best F1)
on Thresholds; warm switches between Thresholds, Mistakes, Compare and Data (sidebar links, each page visited
before); Mistakes' set switch (test <-> the external set) and Grad-CAM image select; a Predict upload (one
full-size X-ray through the page's file input, the previous one removed first, unmeasured).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from app_helpers import HAS_BROWSER, KERMANY_224, NO_BROWSER_REASON, ORIGINAL_SUBSET, headless_chromium  # noqa: E402

QUIET_MS = 100
SETTLE_TIMEOUT_MS = 60_000
SERVER_START_TIMEOUT_S = 120
FIRST_LOAD_TIMEOUT_S = 300
TARGETS = {"threshold slider step": 0.3, "rule change": 0.3, "warm switch": 0.5}
SWITCH_PAGES = ("Thresholds", "Mistakes", "Compare", "Data")

# Installed once per document (page switches keep the document). `armed` marks the window of one interaction:
# the first input event after arming sets t0; every mutation after it moves `last`.
INSTALL_JS = """
if (window.__bench) return;
const b = window.__bench = {armed: false, t0: null, last: 0, sawRunning: false, mutations: 0, messageAt: null};
const onInput = e => { if (b.armed && b.t0 === null) b.t0 = e.timeStamp; };
for (const type of ['keydown', 'pointerdown', 'mousedown', 'click', 'input', 'change'])
    document.addEventListener(type, onInput, true);
new MutationObserver(records => {
    if (!b.armed || b.t0 === null) return;
    b.last = performance.now();
    b.mutations += records.length;
    if (b.messageAt !== null) b.sawRunning = true;  // the server answered the input and the page changed
    for (const r of records)
        if (r.attributeName === 'data-test-script-state' && r.target.getAttribute(r.attributeName) === 'running')
            b.sawRunning = true;
}).observe(document.documentElement, {subtree: true, childList: true, attributes: true, characterData: true});
"""
ARM_JS = ("Object.assign(window.__bench, {armed: true, t0: null, last: 0, sawRunning: false, mutations: 0, "
          "messageAt: null});")
# Every websocket message the page receives after the input event. React can commit a fast rerun's 'running' and
# 'notRunning' script states in one batch, so the script-state attribute never changes: a server message after the
# input followed by a DOM mutation is then the only sign that the rerun happened. Installed before the app's scripts
# (the socket opens as the page loads).
MESSAGE_HOOK_JS = """
const Socket = window.WebSocket;
window.WebSocket = class extends Socket {
    constructor(...args) {
        super(...args);
        this.addEventListener('message', () => {
            const b = window.__bench;
            if (b && b.armed && b.t0 !== null) b.messageAt = performance.now();
        });
    }
};
"""
SETTLED_JS = """
const [quiet, timeout, done] = arguments;
const b = window.__bench, start = performance.now();
const tick = () => {
    const app = document.querySelector('[data-testid="stApp"]');
    const state = app && app.getAttribute('data-test-script-state');
    const busy = document.querySelector('[data-testid="stStatusWidget"]') !== null;
    const now = performance.now();
    if (b.t0 !== null && b.sawRunning && state === 'notRunning' && !busy && now - b.last >= quiet) {
        b.armed = false;
        return done({seconds: (b.last - b.t0) / 1000, mutations: b.mutations});
    }
    if (now - start > timeout) {
        b.armed = false;
        return done({timeout: true, t0: b.t0, sawRunning: b.sawRunning, state: state, busy: busy});
    }
    setTimeout(tick, 10);
};
tick();
"""
RENDERED_JS = """
const app = document.querySelector('[data-testid="stApp"]');
return app !== null && app.getAttribute('data-test-connection-state') === 'CONNECTED'
    && app.getAttribute('data-test-script-state') === 'notRunning'
    && document.querySelector('[data-testid="stStatusWidget"]') === null
    && document.querySelector('[data-testid="stMain"] h1') !== null;
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_run(workdir: Path) -> Path:
    """A tiny finished run on Kermany with the 400 original-size images evaluated as the external set 'originals'."""
    runs_dir = workdir / "trained"
    python = [sys.executable, "-m", "core"]
    subprocess.run(python + ["train", "--preset", "tiny", "--data", str(KERMANY_224), "--runs-dir", str(runs_dir)],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    run = next(d for d in sorted(runs_dir.iterdir()) if d.is_dir())
    subprocess.run(python + ["evaluate", str(run), "--data", str(ORIGINAL_SUBSET), "--name", "originals"],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return run


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads) from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Server:
    """`streamlit run streamlit_app.py` from `app_root`, on a free localhost port, over `runs_dir`."""

    def __init__(self, app_root: Path, runs_dir: Path, workdir: Path):
        settings = workdir / "settings.json"
        settings.write_text(json.dumps({"data_folder": str(KERMANY_224)}))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"streamlit-{self.port}.log"
        env = {**os.environ, "CXR_RUNS_DIR": str(runs_dir), "CXR_SETTINGS": str(settings), "PYTHONUNBUFFERED": "1"}
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "streamlit", "run", "streamlit_app.py", "--server.port", str(self.port),
                 "--server.address", "127.0.0.1", "--server.headless", "true"],
                cwd=app_root, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"streamlit exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/_stcore/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"streamlit did not answer within {SERVER_START_TIMEOUT_S} s")

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class Session:
    """One browser on one server: interactions timed from input event to settled page."""

    def __init__(self, server: Server, profile: Path):
        self.server = server
        self.driver = headless_chromium(profile, FIRST_LOAD_TIMEOUT_S, logs=True)
        self.driver.set_script_timeout(SETTLE_TIMEOUT_MS / 1000 + 10)
        self.driver.execute_cdp_cmd("Performance.enable", {})
        self.driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": MESSAGE_HOOK_JS})
        self.results: dict[str, list[dict]] = {}

    def close(self) -> None:
        self.driver.quit()

    def css(self, selector: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, selector)

    def wait_for(self, condition: Callable[[], Any], what: str, timeout_s: float = FIRST_LOAD_TIMEOUT_S) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                found = condition()
            except Exception:  # an element replaced mid-query: ask again
                found = None
            if found:
                return found
            time.sleep(0.05)
        raise TimeoutError(f"{what} within {timeout_s:.0f} s (server log {self.server.log})")

    def rendered(self) -> None:
        """Wait until a script run has finished and stayed finished for a moment (a run can trigger another)."""
        for _ in range(2):
            self.wait_for(lambda: self.driver.execute_script(RENDERED_JS), "page did not render")
            time.sleep(0.5)
        self.driver.execute_script(INSTALL_JS)

    def open(self, path: str) -> None:
        self.driver.get(f"{self.server.url}/{path}")
        self.rendered()

    def browser_busy_s(self) -> float:
        metrics = self.driver.execute_cdp_cmd("Performance.getMetrics", {})["metrics"]
        return next(m["value"] for m in metrics if m["name"] == "TaskDuration")

    def websocket_received(self) -> tuple[int, int]:
        """(messages, bytes) the page received over the websocket since the last call."""
        messages = size = 0
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message.get("method") == "Network.webSocketFrameReceived":
                response = message["params"]["response"]
                payload = response.get("payloadData", "")
                messages += 1
                size += len(payload) * 3 // 4 if response.get("opcode") == 2 else len(payload.encode())
        return messages, size

    @contextlib.contextmanager
    def measure(self, name: str, keep: bool = True) -> Iterator[None]:
        """Arm, let the body make the input, wait for the settled page; record the seconds and what it cost."""
        self.driver.execute_script(INSTALL_JS)
        self.websocket_received()
        busy, cpu = self.browser_busy_s(), cpu_seconds(self.server.proc.pid)
        self.driver.execute_script(ARM_JS)
        yield
        result = self.driver.execute_async_script(SETTLED_JS, QUIET_MS, SETTLE_TIMEOUT_MS)
        if result.get("timeout"):
            raise TimeoutError(f"{name}: the page did not settle ({result}); server log {self.server.log}")
        time.sleep(0.3)  # let late timers and the server finish before the next interaction's counters
        messages, size = self.websocket_received()
        result.update(messages=messages, kb=size / 1024, server_cpu=cpu_seconds(self.server.proc.pid) - cpu,
                      browser_cpu=self.browser_busy_s() - busy)
        if keep:
            self.results.setdefault(name, []).append(result)

    # -- interactions -------------------------------------------------------------------------------------------

    def click_radio(self, key: str, text: str) -> None:
        from selenium.webdriver.common.by import By

        labels = self.driver.find_elements(By.CSS_SELECTOR, f".st-key-{key} label")
        next(label for label in labels if label.text.strip() == text).click()

    def open_select(self, key: str) -> list:
        from selenium.webdriver.common.by import By

        self.css(f".st-key-{key} button[aria-haspopup='listbox']").click()
        return self.wait_for(lambda: self.driver.find_elements(By.CSS_SELECTOR, "[role='listbox'] [role='option']"),
                             f"the options of {key} did not open", 10)

    def slider_steps(self, reps: int) -> None:
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.keys import Keys

        self.open("Thresholds")
        self.click_radio("thr_mode", "By hand")
        self.rendered()
        for i in range(reps + 1):
            self.driver.execute_script("document.querySelector('.st-key-thr_slider input[type=\"range\"]').focus()")
            with self.measure("threshold slider step", keep=i > 0):
                ActionChains(self.driver).send_keys(Keys.ARROW_RIGHT if i % 2 == 0 else Keys.ARROW_LEFT).perform()

    def rule_changes(self, reps: int) -> None:
        for i in range(reps + 1):
            with self.measure("rule change", keep=i > 0):
                self.click_radio("thr_mode", "Youden" if i % 2 == 0 else "Best F1")
        self.click_radio("thr_mode", "By hand")
        self.rendered()

    def menu_link(self, title: str):
        """The sidebar's link to a page, by its words (the home page's address is /, not /<title>)."""
        from selenium.webdriver.common.by import By

        links = self.driver.find_elements(By.CSS_SELECTOR, "[data-testid='stSidebarNav'] a")
        return next(link for link in links if link.text.strip() == title)

    def page_switches(self, reps: int) -> None:
        for i in range(reps + 1):  # the first round is each page's first visit: not kept
            for page in SWITCH_PAGES[1:] + SWITCH_PAGES[:1]:
                link = self.menu_link(page)
                with self.measure(f"warm switch to {page}", keep=i > 0):
                    link.click()

    def mistakes(self, reps: int) -> None:
        self.open("Mistakes")
        sets = ("external: originals", "test")
        for i in range(reps + 1):
            option = next(o for o in self.open_select("mistakes_set") if o.text.strip() == sets[i % 2])
            with self.measure("Mistakes set switch", keep=i > 0):
                option.click()
        for i in range(reps + 1):
            options = self.open_select("mistakes_cam")
            selected = next((n for n, o in enumerate(options) if o.get_attribute("aria-selected") == "true"), 0)
            with self.measure("Mistakes image select", keep=i > 0):
                options[(selected + 1) % len(options)].click()

    def uploads(self, reps: int) -> None:
        self.open("Predict")
        images = sorted((ORIGINAL_SUBSET / "PNEUMONIA").glob("*.jpeg"))[:reps + 1]
        for i, image in enumerate(images):
            if i:
                self.css(".st-key-predict_files button[aria-label^='Remove ']").click()
                self.rendered()
            file_input = self.css(".st-key-predict_files input[type='file']")
            with self.measure("Predict upload", keep=i > 0):
                file_input.send_keys(str(image))

INTERACTIONS = ("slider", "rule", "switch", "mistakes", "upload")


def run_all(app_root: Path, run: Path, reps: int, workdir: Path,
            only: tuple[str, ...] = INTERACTIONS) -> dict[str, list[dict]]:
    runs_dir = workdir / "runs"
    if not runs_dir.exists():
        shutil.copytree(run, runs_dir / run.name)
    server = Server(app_root, runs_dir, workdir)
    session = None
    try:
        session = Session(server, Path(tempfile.mkdtemp(dir=workdir, prefix="chromium-")))
        steps = {"slider": session.slider_steps, "rule": session.rule_changes, "switch": session.page_switches,
                 "mistakes": session.mistakes, "upload": session.uploads}
        if "slider" not in only:
            session.open("Thresholds")
        for name in INTERACTIONS:
            if name in only:
                steps[name](reps)
        return session.results
    except Exception:
        if session:
            report("measured before the failure", session.results)
        raise
    finally:
        if session:
            session.close()
        server.stop()


def p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]


def report(title: str, results: dict[str, list[dict]]) -> None:
    print(f"\n{title}")
    print(f"{'interaction':<34}{'median s':>9}{'p90 s':>8}{'target':>8}{'msgs':>6}{'KB':>8}{'server CPU s':>14}"
          f"{'page busy s':>12}")
    for name, rows in results.items():
        seconds = [r["seconds"] for r in rows]
        target = next((t for key, t in TARGETS.items() if name.startswith(key) or key in name), None)
        median = statistics.median
        print(f"{name:<34}{median(seconds):>9.3f}{p90(seconds):>8.3f}{(f'{target:.1f}' if target else '-'):>8}"
              f"{median(r['messages'] for r in rows):>6.0f}{median(r['kb'] for r in rows):>8.1f}"
              f"{median(r['server_cpu'] for r in rows):>14.2f}{median(r['browser_cpu'] for r in rows):>12.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="a finished run with an external set (default: train one)")
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions of each interaction")
    parser.add_argument("--baseline", help="also measure this git revision of the app first, e.g. HEAD~3")
    parser.add_argument("--only", nargs="+", choices=INTERACTIONS, default=list(INTERACTIONS),
                        help="measure only these interactions (default: all)")
    args = parser.parse_args()
    if not HAS_BROWSER:
        sys.exit(NO_BROWSER_REASON)
    with tempfile.TemporaryDirectory(prefix="cxr-bench-browser-") as tmp:
        workdir = Path(tmp)
        run = args.run.resolve() if args.run else make_run(workdir)
        if not (run / "external").is_dir() or not any((run / "external").iterdir()):
            sys.exit(f"{run} has no external set: `python -m core evaluate {run} --data FOLDER --name NAME` first")
        print(f"run {run}, {args.reps} repetitions, load average {os.getloadavg()[0]:.2f} "
              f"on {os.cpu_count()} cores")
        if args.baseline:
            baseline_root = workdir / "baseline"
            baseline_root.mkdir()
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline], check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(baseline_root)], input=archive, check=True)
            (workdir / "before").mkdir()
            before = run_all(baseline_root, run, args.reps, workdir / "before", tuple(args.only))
            report(f"before: the app at {args.baseline} (load average {os.getloadavg()[0]:.2f})", before)
        (workdir / "now").mkdir()
        now = run_all(ROOT, run, args.reps, workdir / "now", tuple(args.only))
        report(f"now: the working tree (load average {os.getloadavg()[0]:.2f})", now)


if __name__ == "__main__":
    main()
