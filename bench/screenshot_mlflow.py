"""Screenshot the MLflow UI of a finished training job (the picture in docs/mlflow_compare.png).

    python bench/screenshot_mlflow.py --backend-store-uri sqlite:///runs/tiny/mlflow.db \
        --out docs/mlflow_compare.png [--experiment sfrs] [--view runs|compare]

Starts ``mlflow server`` on 127.0.0.1 over a copy of the store (SQLite) or the store itself,
finds the newest parent run of the experiment and its generation runs through the REST API,
and has headless Chromium render one of two pages:

- ``runs`` (default): the experiment's runs table with the job's parent row expanded into its
  generation runs and Recall@1/5/10 columns of the test sets. The columns come from a shared
  view state (an experiment tag, written only into the copy of the store); expanding the row
  and closing the side panels is done through the Chrome DevTools protocol (``aiohttp``
  websocket client, installed with MLflow 3).
- ``compare``: the compare page of the generation runs, taken with Chromium's plain
  ``--screenshot`` switch.

The server and the browser are stopped afterwards. Needs a ``chromium`` binary (Debian:
``apt-get install chromium``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from sfrs_dist.mlflow_server import LOG_NAME, free_port, start_server, stop_server, wait_until_up

log = logging.getLogger("screenshot_mlflow")
HOST = "127.0.0.1"
SHARE_KEY = "sfrs-generations"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


# ----------------------------------------------------------------------------- server
def get_json(url: str, timeout: float = 10.0) -> Dict[str, Any]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def post_json(url: str, body: Dict[str, Any], timeout: float = 10.0) -> Dict[str, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def private_store(store_uri: str, workdir: Path) -> Tuple[str, bool]:
    """A copy of a SQLite store in ``workdir`` (the view state is written there, never into
    the job's store); other stores are served as they are. Returns (uri, is_copy)."""
    prefix = "sqlite:///"
    if not store_uri.startswith(prefix):
        return store_uri, False
    src = Path(store_uri[len(prefix):])
    if not src.is_file():
        raise FileNotFoundError(f"MLflow store not found: {src}")
    dst = workdir / "mlflow.db"
    shutil.copyfile(src, dst)
    return f"{prefix}{dst}", True


# ----------------------------------------------------------------------------- runs
def _tags(run: Dict[str, Any]) -> Dict[str, str]:
    return {t["key"]: t["value"] for t in run.get("data", {}).get("tags", [])}


def job_runs(base: str, experiment: str) -> Tuple[str, Dict[str, Any], List[Dict[str, Any]]]:
    """(experiment id, newest parent run, its child runs sorted by generation)."""
    q = urllib.parse.urlencode({"experiment_name": experiment})
    try:
        exp_id = get_json(f"{base}/api/2.0/mlflow/experiments/get-by-name?{q}")["experiment"]["experiment_id"]
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"experiment {experiment!r} not found in the store ({exc})") from None
    runs = post_json(f"{base}/api/2.0/mlflow/runs/search",
                     {"experiment_ids": [exp_id], "max_results": 1000,
                      "order_by": ["attributes.start_time DESC"]}).get("runs", [])
    parents = [r for r in runs if "mlflow.parentRunId" not in _tags(r)]
    if not parents:
        raise RuntimeError(f"experiment {experiment!r} has no parent run")
    parent = parents[0]
    children = [r for r in runs if _tags(r).get("mlflow.parentRunId") == parent["info"]["run_id"]]
    children.sort(key=lambda r: int(_tags(r).get("generation", "0")))
    return exp_id, parent, children


def recall_columns(children: List[Dict[str, Any]], ns: Sequence[int] = (1, 5, 10)) -> List[str]:
    """Runs-table column ids of the test sets' ``<split>/all/recall_<N>`` metrics."""
    keys = {m["key"] for c in children for m in c.get("data", {}).get("metrics", [])}
    wanted = [k for k in keys if "_test/all/recall_" in k and int(k.rsplit("_", 1)[1]) in ns]
    wanted.sort(key=lambda k: (k.split("/")[0], int(k.rsplit("_", 1)[1])))
    return [f"metrics.`{k}`" for k in wanted]


def share_view_state(base: str, exp_id: str, columns: List[str], width: int) -> str:
    """Store a runs-table view (columns, their widths) as a shared view state; return its key.

    The UI reads the experiment tag ``mlflow.sharedViewState.<key>`` as plain JSON when the
    page is opened with ``?viewStateShareKey=<key>``.
    """
    state = {"selectedColumns": columns,
             "columnOrder": ["attributes.`Run Name`", "attributes.`Created`", *columns],
             "columnWidths": {c: width for c in columns},
             "orderByKey": "attributes.start_time", "orderByAsc": False}
    post_json(f"{base}/api/2.0/mlflow/experiments/set-experiment-tag",
              {"experiment_id": exp_id, "key": f"mlflow.sharedViewState.{SHARE_KEY}", "value": json.dumps(state)})
    return SHARE_KEY


def compare_url(base: str, exp_id: str, children: List[Dict[str, Any]]) -> str:
    ids = [c["info"]["run_id"] for c in children]
    q = urllib.parse.urlencode({"runs": json.dumps(ids, separators=(",", ":")),
                                "experiments": json.dumps([exp_id], separators=(",", ":"))},
                               quote_via=urllib.parse.quote)
    return f"{base}/#/compare-runs?{q}"


def runs_url(base: str, exp_id: str, share_key: Optional[str]) -> str:
    suffix = f"?{urllib.parse.urlencode({'viewStateShareKey': share_key})}" if share_key else ""
    return f"{base}/#/experiments/{exp_id}/runs{suffix}"


# ----------------------------------------------------------------------------- browser
def screenshot_plain(url: str, out: Path, chromium: str, size: Tuple[int, int], budget_ms: int,
                     workdir: Path) -> None:
    """Chromium's ``--screenshot`` switch (the React UI needs a virtual-time budget to render)."""
    cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={workdir / 'profile-plain'}",
           f"--window-size={size[0]},{size[1]}", f"--virtual-time-budget={budget_ms}", f"--screenshot={out}", url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}")


def click_js(element: str) -> str:
    """JavaScript clicking the element ``element`` evaluates to, if any; evaluates to True if clicked."""
    return f"(el => {{ if (el) {{ el.click(); return true; }} return false; }})({element})"


def button_by_text(text: str) -> str:
    return f"Array.from(document.querySelectorAll('button')).find(b => b.innerText.trim() === {json.dumps(text)})"


class DevTools:
    """A minimal Chrome DevTools protocol session over one page's websocket."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.next_id = 0

    async def call(self, method: str, timeout: float = 60.0, **params: Any) -> Dict[str, Any]:
        self.next_id += 1
        msg_id = self.next_id
        await self.ws.send_json({"id": msg_id, "method": method, "params": params})
        while True:  # events arrive in between; keep the answer to this call
            msg = await self.ws.receive_json(timeout=timeout)
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"DevTools {method}: {msg['error']}")
                return msg["result"]

    async def js(self, expression: str) -> Any:
        r = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return r.get("result", {}).get("value")

    async def wait_for(self, expression: str, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await self.js(f"!!({expression})"):
                return
            await asyncio.sleep(0.25)
        raise RuntimeError(f"the MLflow UI did not show {what} within {timeout:.0f} s")


async def _runs_table_session(ws_url: str, url: str, size: Tuple[int, int], last_child: str) -> bytes:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
        dt = DevTools(ws)
        await dt.call("Emulation.setDeviceMetricsOverride", width=size[0], height=size[1],
                      deviceScaleFactor=1, mobile=False)
        await dt.call("Page.navigate", url=url)
        expander = "document.querySelector('button[data-component-id*=runnamecellrenderer]')"
        await dt.wait_for(expander, 60, "the parent run row")
        # keep the shared columns as this browser's view (removes the shared-view banner)
        await dt.js(click_js(button_by_text("Override saved view")))
        await asyncio.sleep(1.0)
        await dt.js(click_js(expander))
        shown = f"Array.from(document.querySelectorAll('.ag-row a')).some(a => a.innerText.trim() === {json.dumps(last_child)})"
        await dt.wait_for(shown, 30, f"the nested run {last_child}")
        for component in ("mlflow.assistant.chat_panel.close", "mlflow_header.toggle_sidebar_button"):
            await dt.js(click_js(f"document.querySelector('button[data-component-id=\"{component}\"]')"))
        toast = "!document.body.innerText.includes('Your saved view was overridden')"
        try:
            await dt.wait_for(toast, 15, "the end of the notification")
        except RuntimeError:
            log.warning("a notification is still visible in the screenshot")
        await asyncio.sleep(1.0)
        shot = await dt.call("Page.captureScreenshot", format="png")
        return base64.b64decode(shot["data"])


def screenshot_runs_table(url: str, out: Path, chromium: str, size: Tuple[int, int], workdir: Path,
                          last_child: str) -> None:
    """Runs table with the parent row expanded, driven through the DevTools protocol."""
    profile = workdir / "profile-devtools"
    cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
           f"--remote-debugging-address={HOST}", "--remote-debugging-port=0", "about:blank"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.is_file() and len(port_file.read_text().split()) >= 2):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        targets = json.loads(urllib.request.urlopen(f"http://{HOST}:{port}/json/list", timeout=10).read())
        page = next((t for t in targets if t.get("type") == "page"), None)
        if page is None:
            raise RuntimeError("chromium has no page target")
        png = asyncio.run(asyncio.wait_for(_runs_table_session(page["webSocketDebuggerUrl"], url, size, last_child),
                                           timeout=150))
        out.write_bytes(png)
    finally:
        stop_server(proc)


def shrink_png(path: Path, max_bytes: int) -> None:
    """Re-encode as a palette PNG if the file is larger than ``max_bytes``."""
    if path.stat().st_size <= max_bytes:
        return
    from PIL import Image

    tmp = path.with_name(path.name + ".tmp.png")
    with Image.open(path) as img:
        img.convert("RGB").quantize(colors=256).save(tmp, format="PNG", optimize=True)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- main
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend-store-uri", required=True, help="e.g. sqlite:///runs/tiny/mlflow.db")
    p.add_argument("--out", type=Path, default=Path("docs/mlflow_compare.png"))
    p.add_argument("--experiment", default="sfrs")
    p.add_argument("--view", choices=("runs", "compare"), default="runs")
    p.add_argument("--chromium", default="chromium", help="Chromium binary")
    p.add_argument("--size", type=int, nargs=2, default=(1600, 480), metavar=("W", "H"))
    p.add_argument("--column-width", type=int, default=175, help="px per recall column (runs view)")
    p.add_argument("--budget-ms", type=int, default=15000, help="virtual time to render (compare view)")
    p.add_argument("--max-bytes", type=int, default=500_000, help="re-encode the PNG above this size")
    return p.parse_args(argv)


def take(args: argparse.Namespace, chromium: str, workdir: Path) -> str:
    """Serve the store, render the view into ``args.out``; return a one-line summary."""
    store, is_copy = private_store(args.backend_store_uri, workdir)
    port = free_port(HOST)
    base = f"http://{HOST}:{port}"
    server = start_server(store, workdir / "artifacts", HOST, port, workdir)
    try:
        wait_until_up(base, server, timeout=120, log_path=workdir / LOG_NAME)
        exp_id, parent, children = job_runs(base, args.experiment)
        if not children:
            raise RuntimeError(f"parent run {parent['info']['run_id']} has no generation runs")
        shot = workdir / "shot.png"
        size = (args.size[0], args.size[1])
        if args.view == "runs":
            if not is_copy:
                raise RuntimeError("the runs view writes a view-state tag: give a sqlite:/// store (it is copied)")
            key = share_view_state(base, exp_id, recall_columns(children), args.column_width)
            url = runs_url(base, exp_id, key)
            log.info("rendering %s", url)
            screenshot_runs_table(url, shot, chromium, size, workdir, children[-1]["info"]["run_name"])
        else:
            url = compare_url(base, exp_id, children)
            log.info("rendering %s", url)
            screenshot_plain(url, shot, chromium, size, args.budget_ms, workdir)
    finally:
        stop_server(server)
    shrink_png(shot, args.max_bytes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    shutil.copyfile(shot, tmp)
    os.replace(tmp, args.out)
    return (f"{args.out}: {args.out.stat().st_size // 1024} KB, {args.view} view of parent run "
            f"{parent['info']['run_name']!r} and {len(children)} generation runs")


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    chromium = shutil.which(args.chromium)
    if chromium is None:
        print(f"error: no {args.chromium!r} binary on PATH (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="sfrs-mlflow-shot-") as tmp:
        try:
            print(take(args, chromium, Path(tmp)))
        except (RuntimeError, FileNotFoundError, urllib.error.URLError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
