"""The labelling page (one HTML document, no external resources): the frame large, the model's top-3 with
probabilities, a key per class, skip, "none of these", progress and undo. It talks to :mod:`fieldloop.label`'s
JSON API; every change is a POST with the ``X-Edgetune-Label`` header (a page of another origin cannot send it
without a CORS preflight, which the server never grants)."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>edgetune label</title>
<style>
 body{font-family:system-ui,sans-serif;margin:0;background:#16181c;color:#e8e8e8;display:flex;height:100vh}
 #left{flex:1;display:flex;align-items:center;justify-content:center;padding:12px}
 #frame{max-width:100%;max-height:92vh;min-width:60vh;image-rendering:pixelated;background:#000}
 #right{width:340px;padding:16px;background:#1f2228;overflow:auto}
 h2{font-size:15px;margin:14px 0 6px;color:#9aa}
 .cls{display:block;width:100%;margin:4px 0;padding:8px;text-align:left;background:#2c313a;color:#fff;
      border:1px solid #444;border-radius:4px;font-size:15px;cursor:pointer}
 .cls:hover{background:#3a4150} kbd{background:#444;border-radius:3px;padding:1px 6px;margin-right:8px}
 .top{display:flex;justify-content:space-between;font-size:14px;padding:2px 0}
 .bar{height:4px;background:#4a90d9;margin-bottom:4px} #meta{font-size:12px;color:#889;word-break:break-all}
 #done{font-size:20px;padding:40px}
</style></head>
<body>
<div id="left"><img id="frame" alt="frame to label"><div id="done" hidden>All frames have a decision.</div></div>
<div id="right">
 <div id="progress" data-labelled="0" data-total="0"></div>
 <h2>Model top-3</h2><div id="top3"></div>
 <h2>Label (key)</h2><div id="classes"></div>
 <button class="cls" id="skip"><kbd>s</kbd>skip</button>
 <button class="cls" id="none"><kbd>n</kbd>none of these</button>
 <button class="cls" id="undo"><kbd>u</kbd>undo</button>
 <h2>Frame</h2><div id="meta"></div>
</div>
<script>
"use strict";
let state = null, busy = false;
const $ = (id) => document.getElementById(id);
async function call(method, path, body) {
  const opt = {method, headers: {"X-Edgetune-Label": "1"}};
  if (body !== undefined) { opt.headers["Content-Type"] = "application/json"; opt.body = JSON.stringify(body); }
  const r = await fetch(path, opt);
  if (!r.ok) throw new Error(await r.text());
  return r.json();
}
function text(tag, t, cls) { const e = document.createElement(tag); e.textContent = t; if (cls) e.className = cls; return e; }
function render(s) {
  state = s;
  const p = s.progress;
  const pr = $("progress");
  pr.textContent = `${p.labelled} labelled, ${p.none} none, ${p.skipped} skipped, ${p.remaining} left of ${p.total}`;
  pr.dataset.labelled = p.labelled; pr.dataset.total = p.total; pr.dataset.remaining = p.remaining;
  const cl = $("classes"); cl.replaceChildren();
  s.classes.forEach((c, i) => {
    const b = text("button", "", "cls"); b.append(text("kbd", s.keys[i]), c);
    b.onclick = () => decide(c); cl.append(b);
  });
  const it = s.item;
  $("frame").hidden = !it; $("done").hidden = !!it;
  $("top3").replaceChildren(); $("meta").textContent = "";
  if (!it) { $("frame").removeAttribute("src"); $("frame").dataset.id = ""; return; }
  $("frame").src = `/frame/${it.id}`; $("frame").dataset.id = it.id;
  for (const [label, prob] of it.top3) {
    const row = document.createElement("div");
    const line = text("div", "", "top"); line.append(text("span", label), text("span", (100 * prob).toFixed(1) + " %"));
    const bar = text("div", "", "bar"); bar.style.width = (100 * prob).toFixed(1) + "%";
    row.append(line, bar); $("top3").append(row);
  }
  $("meta").textContent = `camera ${it.camera_id || "-"} | ${new Date(it.time_unix * 1000).toISOString()} | ` +
                          `kept: ${it.reason} | model ${it.model_version}`;
}
async function act(fn) {
  if (busy) return; busy = true;
  try { render(await fn()); } catch (e) { $("meta").textContent = "error: " + e.message; } finally { busy = false; }
}
function decide(d) { if (state && state.item) act(() => call("POST", "/api/decide", {id: state.item.id, decision: d})); }
$("skip").onclick = () => decide("skip");
$("none").onclick = () => decide("none");
$("undo").onclick = () => act(() => call("POST", "/api/undo", {}));
document.addEventListener("keydown", (e) => {
  if (!state || e.ctrlKey && e.key !== "z" || e.altKey || e.metaKey) return;
  if (e.key === "u" || e.key === "Backspace" || (e.ctrlKey && e.key === "z")) { e.preventDefault(); $("undo").click(); return; }
  if (e.key === "s") { decide("skip"); return; }
  if (e.key === "n") { decide("none"); return; }
  const i = state.keys.indexOf(e.key);
  if (i >= 0) decide(state.classes[i]);
});
act(() => call("GET", "/api/state"));
</script></body></html>
"""
