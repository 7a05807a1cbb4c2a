// Tetherlab world view: one snapshot, then server-sent events. No build step, no dependencies.
"use strict";

const LIST_MAX = 400;          // rows a list shows (filters narrow the rest): keeps the DOM small
const FINISHED_KEEP = 600;     // finished intents the page remembers (verdict history)
const RECONNECT_MS = [500, 1000, 2000, 5000];
const HOLDING = new Set(["active", "lapsed"]);

const S = {
  graph: { concepts: [], groups: [], width: 0, height: 0, version: 0 },
  byId: new Map(),            // concept id -> concept (with x, y)
  intents: new Map(),         // intent id -> intent view
  sessions: new Map(),        // agent id -> session
  health: null,
  through: 0,
  stale: new Set(),
  filter: { dev: "", concept: "" },
  view: { scale: 1, x: 0, y: 0 },
  hover: null,
  selected: null,
  dirty: true,
  listsDirty: true,
  perf: { snapshotMs: 0, drawMs: 0, listsMs: 0, firstRenderAt: 0 },  // read by the benchmark
  retry: 0,
  es: null,
};

const $ = (id) => document.getElementById(id);
const el = (tag, attrs = {}, ...kids) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const k of kids) if (k != null) e.append(k.nodeType ? k : document.createTextNode(String(k)));
  return e;
};
const shortAgent = (a) => { const [d, u] = a.split("/"); return `${d}/${(u || "").slice(0, 8)}`; };
const ago = (ms) => {
  if (!ms) return "";
  const s = Math.max(0, (Date.now() - ms) / 1000);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  return `${Math.round(s / 3600)} h ago`;
};
const developer = (agent) => agent.split("/")[0];
const fill = (node, ...kids) => node.replaceChildren(...kids.filter((k) => k != null && k !== ""));

// --- data ------------------------------------------------------------------------------------------

async function loadSnapshot() {
  const t0 = performance.now();
  const r = await fetch("/ui/api/snapshot", { credentials: "same-origin" });
  if (r.status === 401) { showAuth(); throw new Error("unauthorised"); }
  if (!r.ok) throw new Error(`snapshot: HTTP ${r.status}`);
  const snap = await r.json();
  S.graph = snap.graph;
  S.byId = new Map(S.graph.concepts.map((c) => [c.id, c]));
  S.intents = new Map(snap.intents.map((i) => [i.intent_id, i]));
  S.sessions = new Map(Object.entries(snap.sessions || {}));
  S.through = snap.through;
  setHealth(snap.health);
  fillDevelopers();
  if (S.view.scale === 1 && S.view.x === 0) fit();
  $("graph-empty").hidden = S.graph.concepts.length > 0;
  S.dirty = S.listsDirty = true;
  S.perf.snapshotMs = performance.now() - t0;
}

function mergeIntents(delta) {
  if (delta.resync) { reload(); return; }
  for (const it of delta.intents) S.intents.set(it.intent_id, it);
  S.through = Math.max(S.through, delta.through);
  // Forget the oldest finished intents beyond what the page keeps.
  const finished = [...S.intents.values()].filter((i) => !HOLDING.has(i.status));
  if (finished.length > FINISHED_KEEP) {
    finished.sort((a, b) => a.updated_index - b.updated_index);
    for (const i of finished.slice(0, finished.length - FINISHED_KEEP)) S.intents.delete(i.intent_id);
  }
  fillDevelopers();
  S.dirty = S.listsDirty = true;
}

function connect() {
  if (S.es) S.es.close();
  const es = new EventSource(`/ui/events?since=${S.through}`);
  S.es = es;
  es.addEventListener("intents", (e) => { S.retry = 0; mergeIntents(JSON.parse(e.data)); });
  es.addEventListener("health", (e) => { S.retry = 0; setHealth(JSON.parse(e.data)); });
  es.onerror = () => {
    es.close();
    const wait = RECONNECT_MS[Math.min(S.retry++, RECONNECT_MS.length - 1)];
    $("served").textContent = "reconnecting…";
    setTimeout(reload, wait);
  };
}

async function reload() {
  try { await loadSnapshot(); connect(); } catch (err) {
    const wait = RECONNECT_MS[Math.min(S.retry++, RECONNECT_MS.length - 1)];
    setTimeout(reload, wait);
  }
}

function showAuth() {
  fill($("health"), el("span", {}, "This node needs a read token: open the URL `tetherlab ui` prints."));
}

// --- derived state ----------------------------------------------------------------------------------

function holders() {
  const mod = new Map(), dep = new Map();
  for (const it of S.intents.values()) {
    if (!HOLDING.has(it.status)) continue;
    for (const c of it.modify) mod.set(c, it);
    for (const c of it.depend) { if (!dep.has(c)) dep.set(c, []); dep.get(c).push(it); }
  }
  return { mod, dep };
}

function visible(it) {
  if (S.filter.dev && developer(it.agent_id) !== S.filter.dev) return false;
  if (S.filter.concept) {
    const q = S.filter.concept;
    if (![...it.modify, ...it.depend].some((c) => c.includes(q))) return false;
  }
  return true;
}

function fillDevelopers() {
  const sel = $("dev-filter");
  const devs = new Set([...S.intents.values()].map((i) => developer(i.agent_id)));
  const have = new Set([...sel.options].map((o) => o.value));
  for (const d of [...devs].sort()) if (!have.has(d)) sel.append(el("option", { value: d }, d));
}

// --- header -------------------------------------------------------------------------------------------

function setHealth(h) {
  S.health = h;
  S.stale = new Set((h.stale_agents || []).map((a) => a.agent_id));
  const chips = h.nodes.map((n) => {
    const cls = !n.reachable ? "chip down" : n.role === "leader" ? "chip leader" : "chip";
    const what = !n.reachable ? "unreachable" : `${n.role} · term ${n.term}`;
    return el("span", { class: cls, "data-node": n.id, "data-role": n.reachable ? n.role : "unreachable" },
      el("b", {}, n.id), what);
  });
  const leader = h.leader ? el("span", { class: "chip", id: "leader" }, "leader ", el("b", {}, h.leader))
    : el("span", { class: "chip down", id: "leader" }, "no leader");
  fill($("health"), leader, ...chips);
  const behind = h.behind ? `, ${h.behind} entries behind the leader` : ", up to date";
  $("served").textContent = `served by ${h.served_by} (${h.role}${h.role === "leader" ? "" : behind})`;
  S.listsDirty = true;
}

// --- lists ---------------------------------------------------------------------------------------------

function tag(concept, kind) {
  return el("span", { class: `tag ${kind}`, title: `${kind}: ${concept}`, onclick: () => openConcept(concept) }, concept);
}

function intentItem(it, withConflicts) {
  const s = S.sessions.get(it.agent_id);
  const hb = !s || !HOLDING.has(it.status) ? null
    : S.stale.has(it.agent_id) ? el("span", { class: "stale" }, ` · heartbeat ${ago(s.last_seen_ms)}`) : " · heartbeat current";
  const item = el("div", { class: "item", "data-intent": it.intent_id, "data-status": it.status },
    el("div", { class: "head" }, el("span", { class: `act ${it.status}` }, it.status),
      el("a", { onclick: () => openIntent(it.intent_id) }, it.intent_id),
      el("span", { class: "summary" }, it.summary)),
    el("div", { class: "meta" }, `${shortAgent(it.agent_id)} · ${it.tool} · since ${ago(it.since)}`, hb),
    el("div", {}, ...it.modify.map((c) => tag(c, "modify")), ...it.depend.map((c) => tag(c, "depend"))));
  if (withConflicts) for (const c of it.conflicts || []) {
    item.append(el("div", { class: "conflict" }, `${c.kind.replaceAll("_", " ")} on `, tag(c.concept, "modify"),
      ` held by ${shortAgent(c.holder_agent_id)}: “${c.holder_summary}”`));
  }
  if (withConflicts && it.ended_by) item.append(el("div", { class: "meta" }, it.ended_by));
  return item;
}

function renderLists() {
  if (!S.listsDirty) return;
  S.listsDirty = false;
  const t0 = performance.now();
  const all = [...S.intents.values()];
  const holding = all.filter((i) => HOLDING.has(i.status) && visible(i)).sort((a, b) => b.updated_index - a.updated_index);
  $("counts").textContent = `${all.filter((i) => i.status === "active").length} active intents`;
  const p1 = $("panel-intents");
  fill(p1, ...holding.slice(0, LIST_MAX).map((i) => intentItem(i, false)),
    holding.length > LIST_MAX ? el("div", { class: "more" }, `${holding.length - LIST_MAX} more: filter to narrow`) : null,
    holding.length === 0 ? el("div", { class: "more" }, "No active intents.") : null);
  const verdicts = all.filter(visible).sort((a, b) => b.updated_index - a.updated_index).slice(0, LIST_MAX);
  fill($("panel-verdicts"), ...verdicts.map((i) => intentItem(i, true)),
    verdicts.length === 0 ? el("div", { class: "more" }, "No verdicts yet.") : null);
  const agents = [...new Set(holding.map((i) => i.agent_id))].map((a) => {
    const s = S.sessions.get(a) || { agent_id: a };
    return el("div", { class: "item", "data-agent": a },
      el("div", { class: "head" }, el("span", { class: "summary" }, shortAgent(a)), el("span", { class: "meta" }, s.tool || "")),
      el("div", { class: "meta" }, `${s.machine || ""} · session ${s.status || "?"} · opened ${ago(s.opened_ms)} · `,
        S.stale.has(a) ? el("span", { class: "stale" }, `last heartbeat ${ago(s.last_seen_ms)}`) : "heartbeat current"));
  });
  fill($("panel-agents"), ...agents.slice(0, LIST_MAX),
    agents.length === 0 ? el("div", { class: "more" }, "No agents hold anything.") : null);
  const soft = all.filter((i) => HOLDING.has(i.status) && (i.soft_conflicts || []).length && visible(i));
  fill($("panel-soft"), ...soft.slice(0, LIST_MAX).map((i) => {
    const item = intentItem(i, false);
    for (const c of i.soft_conflicts) item.append(el("div", { class: "conflict" }, c.message || JSON.stringify(c)));
    return item;
  }), soft.length === 0 ? el("div", { class: "more" }, "No soft conflicts: no two agents' in-flight changes overlap.") : null);
  S.perf.listsMs = performance.now() - t0;
  if (!S.perf.firstRenderAt && S.intents.size) S.perf.firstRenderAt = performance.now();
}

// --- graph ------------------------------------------------------------------------------------------------

const canvas = $("graph");
const ctx = canvas.getContext("2d");
const BOX_W = 200, BOX_H = 22;

function resize() {
  const r = canvas.getBoundingClientRect();
  canvas.width = Math.round(r.width * devicePixelRatio);
  canvas.height = Math.round(r.height * devicePixelRatio);
  S.dirty = true;
}

function fit() {
  const r = canvas.getBoundingClientRect();
  if (!S.graph.width || !r.width) return;
  S.view.scale = Math.min(1.2, Math.max(0.05, (r.width - 40) / S.graph.width));
  S.view.x = 20; S.view.y = 20;
  S.dirty = true;
}

function draw() {
  if (!S.dirty) return;
  S.dirty = false;
  const t0 = performance.now();
  const { scale, x, y } = S.view;
  const dpr = devicePixelRatio;
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.setTransform(dpr * scale, 0, 0, dpr * scale, dpr * x, dpr * y);
  const vx0 = -x / scale, vy0 = -y / scale;
  const vx1 = vx0 + canvas.width / dpr / scale, vy1 = vy0 + canvas.height / dpr / scale;
  const { mod, dep } = holders();
  ctx.font = "12px system-ui, sans-serif";
  ctx.textBaseline = "middle";
  for (const g of S.graph.groups) {
    if (g.y + g.height < vy0 || g.y > vy1) continue;
    ctx.fillStyle = "rgba(47,111,223,0.05)";
    ctx.fillRect(-10, g.y, S.graph.width + 20, g.height);
    if (scale * 12 > 5) { ctx.fillStyle = "#6b7480"; ctx.fillText(g.name, -4, g.y + 12); }
  }
  const focus = S.hover || S.selected;
  const lit = new Set();
  if (focus && S.byId.has(focus)) {
    lit.add(focus);
    for (const d of S.byId.get(focus).depends_on) lit.add(d);
    ctx.strokeStyle = "rgba(47,111,223,0.7)"; ctx.lineWidth = 1.5 / scale;
    const c = S.byId.get(focus);
    for (const d of c.depends_on) {
      const t = S.byId.get(d); if (!t) continue;
      ctx.beginPath(); ctx.moveTo(c.x, c.y + BOX_H / 2); ctx.lineTo(t.x + BOX_W, t.y + BOX_H / 2); ctx.stroke();
    }
  }
  const q = S.filter.concept;
  for (const c of S.graph.concepts) {
    if (c.x + BOX_W < vx0 || c.x > vx1 || c.y + BOX_H < vy0 || c.y > vy1) continue;
    const m = mod.get(c.id);
    let fill = "#e6ecf3";
    if (m) fill = m.status === "lapsed" ? "#9aa3ad" : "#e4572e";
    else if (dep.has(c.id)) fill = "#f3a712";
    if (S.filter.dev && !(m && developer(m.agent_id) === S.filter.dev) &&
        !(dep.get(c.id) || []).some((i) => developer(i.agent_id) === S.filter.dev)) fill = m || dep.has(c.id) ? "#f1d3c9" : fill;
    ctx.fillStyle = fill;
    ctx.fillRect(c.x, c.y, BOX_W, BOX_H);
    if (lit.has(c.id) || (q && (c.id.includes(q) || c.title.toLowerCase().includes(q)))) {
      ctx.strokeStyle = "#2f6fdf"; ctx.lineWidth = 2 / scale; ctx.strokeRect(c.x, c.y, BOX_W, BOX_H);
    }
    if (scale > 0.45) {
      ctx.fillStyle = m && m.status !== "lapsed" ? "#fff" : "#1d2430";
      ctx.fillText(c.id.length > 30 ? c.id.slice(0, 29) + "…" : c.id, c.x + 5, c.y + BOX_H / 2);
    }
  }
  S.perf.drawMs = performance.now() - t0;
}

function at(px, py) {
  const gx = (px - S.view.x) / S.view.scale, gy = (py - S.view.y) / S.view.scale;
  for (const c of S.graph.concepts) {
    if (gx >= c.x && gx <= c.x + BOX_W && gy >= c.y && gy <= c.y + BOX_H) return c;
  }
  return null;
}

let drag = null;
canvas.addEventListener("mousedown", (e) => { drag = { x: e.clientX, y: e.clientY, vx: S.view.x, vy: S.view.y, moved: false }; });
window.addEventListener("mouseup", (e) => {
  if (drag && !drag.moved) {
    const r = canvas.getBoundingClientRect();
    const c = at(e.clientX - r.left, e.clientY - r.top);
    if (c) openConcept(c.id);
  }
  drag = null;
});
canvas.addEventListener("mousemove", (e) => {
  const r = canvas.getBoundingClientRect();
  if (drag) {
    const dx = e.clientX - drag.x, dy = e.clientY - drag.y;
    if (Math.abs(dx) + Math.abs(dy) > 3) drag.moved = true;
    S.view.x = drag.vx + dx; S.view.y = drag.vy + dy; S.dirty = true;
    return;
  }
  const c = at(e.clientX - r.left, e.clientY - r.top);
  const tip = $("tooltip");
  if ((c && c.id) !== S.hover) { S.hover = c ? c.id : null; S.dirty = true; }
  if (!c) { tip.hidden = true; return; }
  const { mod, dep } = holders();
  const m = mod.get(c.id), d = dep.get(c.id) || [];
  fill(tip, el("b", {}, c.id), el("div", {}, c.title),
    m ? el("div", {}, `modified by ${shortAgent(m.agent_id)}: ${m.summary}`) : null,
    d.length ? el("div", {}, `depended on by ${d.map((i) => shortAgent(i.agent_id)).join(", ")}`) : null);
  tip.style.left = `${e.clientX - r.left + 14}px`; tip.style.top = `${e.clientY - r.top + 40}px`;
  tip.hidden = false;
});
canvas.addEventListener("mouseleave", () => { $("tooltip").hidden = true; S.hover = null; S.dirty = true; });
canvas.addEventListener("wheel", (e) => {
  e.preventDefault();
  const r = canvas.getBoundingClientRect();
  zoomAt(e.clientX - r.left, e.clientY - r.top, e.deltaY < 0 ? 1.15 : 1 / 1.15);
}, { passive: false });

function zoomAt(px, py, f) {
  const s = Math.min(3, Math.max(0.02, S.view.scale * f));
  const k = s / S.view.scale;
  S.view.x = px - (px - S.view.x) * k; S.view.y = py - (py - S.view.y) * k; S.view.scale = s; S.dirty = true;
}

function centerOn(id) {
  const c = S.byId.get(id); if (!c) return;
  const r = canvas.getBoundingClientRect();
  if (S.view.scale < 0.6) S.view.scale = 0.8;
  S.view.x = r.width / 2 - (c.x + BOX_W / 2) * S.view.scale;
  S.view.y = r.height / 2 - (c.y + BOX_H / 2) * S.view.scale;
  S.selected = id; S.dirty = true;
}

// --- detail pages -----------------------------------------------------------------------------------------

async function openConcept(id) {
  location.hash = `concept=${encodeURIComponent(id)}`;
}

async function openIntent(id) {
  location.hash = `intent=${encodeURIComponent(id)}`;
}

async function showDetail() {
  const h = new URLSearchParams(location.hash.slice(1));
  const body = $("detail-body");
  if (h.has("concept")) {
    const id = h.get("concept");
    centerOn(id);
    const r = await fetch(`/ui/api/concept/${encodeURIComponent(id)}`);
    const c = r.ok ? await r.json() : null;
    if (!c) { fill(body, el("p", {}, `No concept ${id}.`)); $("detail").hidden = false; return; }
    fill(body, el("h2", {}, c.id), el("div", { class: "muted" }, c.title || ""),
      c.description ? el("p", {}, c.description) : null,
      el("h3", {}, "Held now"),
      c.active.length ? el("div", {}, ...c.active.map((i) => el("div", { class: "item" },
        el("span", { class: `act ${i.status}` }, i.kind), " ", el("a", { onclick: () => openIntent(i.intent_id) }, i.intent_id),
        ` ${shortAgent(i.agent_id)}: ${i.summary}`))) : el("div", { class: "muted" }, "Nobody holds it."),
      el("h3", {}, "Depends on"), el("div", {}, ...(c.depends_on.length ? c.depends_on.map((d) => tag(d, "depend")) : ["nothing"])),
      el("h3", {}, "Depended on by"), el("div", {}, ...(c.dependents_of.length ? c.dependents_of.map((d) => tag(d, "")) : ["nothing"])),
      el("h3", {}, "Files and symbols"), el("pre", {}, [...(c.paths || []), ...(c.symbols || [])].join("\n") || "none"),
      el("h3", {}, "Recent history"),
      c.recent.length ? el("div", {}, ...[...c.recent].reverse().map((r) => el("div", { class: "item" },
        el("span", { class: "act completed" }, "completed"), ` ${ago(r.finished_ms)} · ${shortAgent(r.agent_id)}: ${r.summary}`)))
        : el("div", { class: "muted" }, "No completed intent has modified it yet."));
    $("detail").hidden = false;
  } else if (h.has("intent")) {
    const id = h.get("intent");
    const r = await fetch(`/ui/api/intent/${encodeURIComponent(id)}`);
    const d = r.ok ? await r.json() : null;
    if (!d) { fill(body, el("p", {}, `No intent ${id}.`)); $("detail").hidden = false; return; }
    const it = d.intent, s = d.session;
    const reasons = (kind) => (it.claims[kind] || []).map((c) => el("div", { class: "item" }, tag(c.concept, kind), " ",
      el("span", { class: "meta" }, c.reasons.map((x) => `${x.kind}: ${x.detail}`).join("; "))));
    fill(body, el("h2", {}, `${it.intent_id} `, el("span", { class: `act ${it.status}` }, it.status)),
      el("div", { class: "muted" }, `${it.agent_id} · ${it.tool} · fencing token ${it.fencing_token ?? "none"}`),
      el("p", { class: "summary" }, it.intent.summary), el("pre", {}, (it.intent.steps || []).join("\n")),
      el("h3", {}, "Claims"), ...reasons("modify"), ...reasons("depend"),
      it.conflicts.length ? el("h3", {}, "Conflicts") : null,
      ...it.conflicts.map((c) => el("div", { class: "conflict" }, `${c.kind} on ${c.concept}, held by ${c.holder_agent_id}`)),
      s ? el("h3", {}, "Session") : null,
      s ? el("div", { class: "meta" }, `${s.machine} · ${s.status} · last heartbeat ${ago(s.last_seen_ms)}`) : null);
    $("detail").hidden = false;
  } else {
    $("detail").hidden = true;
  }
}

// --- wiring ------------------------------------------------------------------------------------------------

$("detail-close").addEventListener("click", () => { history.replaceState(null, "", location.pathname); showDetail(); S.selected = null; S.dirty = true; });
window.addEventListener("hashchange", showDetail);
$("dev-filter").addEventListener("change", (e) => { S.filter.dev = e.target.value; S.dirty = S.listsDirty = true; });
$("concept-filter").addEventListener("input", (e) => {
  S.filter.concept = e.target.value.trim().toLowerCase(); S.dirty = S.listsDirty = true;
  const hit = S.filter.concept && S.graph.concepts.find((c) => c.id.includes(S.filter.concept));
  if (hit) centerOn(hit.id);
});
$("zoom-in").addEventListener("click", () => zoomAt(canvas.clientWidth / 2, canvas.clientHeight / 2, 1.3));
$("zoom-out").addEventListener("click", () => zoomAt(canvas.clientWidth / 2, canvas.clientHeight / 2, 1 / 1.3));
$("zoom-fit").addEventListener("click", fit);
for (const b of document.querySelectorAll("#tabs button")) {
  b.addEventListener("click", () => {
    for (const o of document.querySelectorAll("#tabs button")) o.setAttribute("aria-selected", String(o === b));
    for (const p of document.querySelectorAll(".panel")) p.hidden = p.id !== `panel-${b.dataset.tab}`;
  });
}
window.addEventListener("resize", resize);
(function frame() { draw(); renderLists(); requestAnimationFrame(frame); })();
setInterval(() => { S.listsDirty = true; }, 5000); // "since … ago" texts age
window.tetherlab = S;  // for benchmarks and debugging in the console
resize();
reload().then(showDetail);
