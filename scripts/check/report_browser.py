"""The report in a real browser (headless Chromium, Debian's `chromium`): the README's tiny run's
report opens, one curve per metric and run with every logged point is in the page Chromium built,
the page fetches nothing, and a screenshot is kept (docs/report.png, shown in the README).

    apt-get install chromium          (once)
    python3 scripts/check/report_browser.py [--kiln target/release/kiln] [--screenshot docs/report.png]
"""
import argparse
import html.parser
import json
import os
import subprocess
import sys
import tempfile

ap = argparse.ArgumentParser()
ap.add_argument("--kiln", default="target/release/kiln")
ap.add_argument("--screenshot", default="docs/report.png")
ap.add_argument("--browser", default="chromium")
a = ap.parse_args()

work = tempfile.mkdtemp()
run = os.path.join(work, "tiny")
subprocess.run([a.kiln, "train", "recipes/tiny.toml", "-q", "--set", f'output.dir="{run}"'], check=True)
page = os.path.join(run, "report.html")
quiet = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-domain-reliability",
         "--disable-features=Translate,OptimizationHints,MediaRouter,DialMediaRouteProvider,SpareRendererForSitePerProcess",
         f"--user-data-dir={work}/profile"]
net = os.path.join(work, "net.json")
subprocess.run([a.browser, *quiet, "--window-size=1200,1500", f"--screenshot={os.path.abspath(a.screenshot)}",
                f"--log-net-log={net}", "file://" + page], check=True, capture_output=True)
dom = subprocess.run([a.browser, *quiet, "--dump-dom", "file://" + page], check=True, capture_output=True,
                     text=True).stdout


class Curves(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.curves = []

    def handle_starttag(self, tag, attrs):
        d = dict(attrs)
        if "curve" in (d.get("class") or "").split():
            self.curves.append((d["data-metric"], d["data-run"], int(d["data-points"])))


p = Curves()
p.feed(dom)
want = {}
for line in open(os.path.join(run, "metrics.jsonl")):
    for k, v in json.loads(line).items():
        if k not in ("step", "epoch", "elapsed_s") and isinstance(v, (int, float)):
            want[k] = want.get(k, 0) + 1
got = {m: n for m, r, n in p.curves}
assert len(p.curves) == len(want), (len(p.curves), len(want))
assert got == want, (got, want)
# Requests the page made carry its origin as their initiator; the browser's own background
# requests (its clock, accounts) say "not an origin".
events = json.load(open(net)).get("events", [])
fetched = sorted({e["params"]["url"] for e in events
                  if e.get("params", {}).get("initiator", "not an origin") != "not an origin"})
assert not fetched, f"the page fetched: {fetched}"
print(f"ok: {len(p.curves)} curves, one per metric, every point of metrics.jsonl; no network request; "
      f"screenshot {a.screenshot}")
