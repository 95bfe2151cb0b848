// loratune ui: one page, routed by the URL's hash (#/runs, #/run/NAME, #/compare, #/studies,
// #/study/NAME, #/launch, #/plan, #/chat). Talks to /api (JSON; the metrics as server-sent events read with fetch so the
// API key can ride in a header).
"use strict";

const page = document.getElementById("page");
let cleanup = [];                     // what the current page must stop when leaving it
// The server's per-process token, written into this page: no other origin can read it, and
// every POST must carry it.
const CSRF = document.querySelector("meta[name='csrf-token']").content;

// ---------------------------------------------------------------- API
function headers(extra) {
  const h = Object.assign({}, extra || {});
  const key = localStorage.getItem("loratune-key");
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function api(path, opts) {
  opts = opts || {};
  const init = {method: opts.method || "GET", headers: headers()};
  if (init.method !== "GET") init.headers["X-CSRF-Token"] = CSRF;
  if (opts.body !== undefined) {
    init.body = JSON.stringify(opts.body);
    init.headers["Content-Type"] = "application/json";
  }
  const resp = await fetch(path, init);
  if (resp.status === 401) document.getElementById("key-box").hidden = false;
  const data = await resp.json().catch(() => ({error: resp.statusText}));
  return {ok: resp.ok, status: resp.status, data};
}

async function imageUrl(path) {
  const resp = await fetch(path, {headers: headers()});
  return resp.ok ? URL.createObjectURL(await resp.blob()) : null;
}

// Server-sent events over fetch: onEvent(name, data) per event; returns a stop function.
function streamEvents(path, onEvent) {
  const ctrl = new AbortController();
  (async () => {
    let resp;
    try { resp = await fetch(path, {headers: headers(), signal: ctrl.signal}); }
    catch (e) { return; }
    if (!resp.ok || !resp.body) { onEvent("error", {status: resp.status}); return; }
    const reader = resp.body.getReader(), dec = new TextDecoder();
    let buf = "";
    for (;;) {
      let chunk;
      try { chunk = await reader.read(); } catch (e) { return; }
      if (chunk.done) return;
      buf += dec.decode(chunk.value, {stream: true});
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut); buf = buf.slice(cut + 2);
        let name = "message", data = "";
        for (const line of block.split("\n")) {
          if (line.startsWith("event: ")) name = line.slice(7);
          else if (line.startsWith("data: ")) data += line.slice(6);
        }
        if (data) onEvent(name, JSON.parse(data));
      }
    }
  })();
  return () => ctrl.abort();
}

// ---------------------------------------------------------------- helpers
function setPage(...kids) { page.replaceChildren(...kids.filter(k => k !== null && k !== undefined)); }
function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined && v !== false) el.setAttribute(k, v === true ? "" : v);
  }
  for (const kid of kids.flat()) {
    if (kid !== null && kid !== undefined) el.append(kid instanceof Node ? kid : String(kid));
  }
  return el;
}
const num = (v, d) => (v === null || v === undefined) ? "–" : (+v).toFixed(d);
const pct = v => (v === null || v === undefined) ? "–" : (100 * v).toFixed(1) + "%";
const stateTag = (s, why) => h("span", {class: "state state-" + s, "data-state": s, title: why},
  why ? "unreadable: " + why : s);
function bytes(n) {
  const u = ["B", "KiB", "MiB", "GiB"]; let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return n.toFixed(i ? 1 : 0) + " " + u[i];
}
function duration(s) {
  if (!s) return "–";
  return s < 120 ? s.toFixed(1) + " s" : (s / 60).toFixed(1) + " min";
}

// ---------------------------------------------------------------- runs table
const RUN_COLUMNS = [
  ["name", "run"], ["state", "status"], ["method", "method"], ["model", "model"],
  ["step", "steps"], ["last_loss", "last loss"], ["eval_loss", "held-out loss"],
  ["score", "held-out score"], ["seconds", "time"], ["modified", "updated"]];

async function pageRuns() {
  let sortKey = "modified", desc = true, rows = [];
  const filter = h("input", {id: "runs-filter", placeholder: "filter: name, method, model, status", size: 40});
  const table = h("table", {id: "runs-table"});
  const chosen = new Set();
  const compareBtn = h("button", {id: "compare-chosen", onclick: () => {
    location.hash = "#/compare?runs=" + encodeURIComponent([...chosen].join(","));
  }}, "compare chosen");
  setPage(h("h2", {}, "Runs"), h("p", {}, filter, " ", compareBtn), table);

  function draw() {
    const q = filter.value.trim().toLowerCase();
    const shown = rows.filter(r => !q || [r.name, r.method, r.model, r.state]
      .some(v => String(v || "").toLowerCase().includes(q)));
    shown.sort((a, b) => {
      const x = a[sortKey], y = b[sortKey];
      const c = (x === null || x === undefined) - (y === null || y === undefined) ||
        (typeof x === "number" ? x - y : String(x).localeCompare(String(y)));
      return desc ? -c : c;
    });
    const head = h("tr", {}, h("th", {}, ""), RUN_COLUMNS.map(([k, label]) => h("th", {
      "data-key": k, class: k === sortKey ? (desc ? "sorted-desc" : "sorted-asc") : null,
      onclick: () => { desc = k === sortKey ? !desc : false; sortKey = k; draw(); }}, label)));
    const body = shown.map(r => h("tr", {"data-run": r.name},
      h("td", {}, h("input", {type: "checkbox", checked: chosen.has(r.name),
        onchange: e => e.target.checked ? chosen.add(r.name) : chosen.delete(r.name)})),
      h("td", {}, h("a", {href: "#/run/" + r.name}, r.name)),
      h("td", {}, stateTag(r.state, r.unreadable)), h("td", {}, r.method || "–"),
      h("td", {}, r.model || "–"),
      h("td", {class: "num"}, r.step + (r.total_steps ? " / " + r.total_steps : "")),
      h("td", {class: "num"}, num(r.last_loss, 4)), h("td", {class: "num"}, num(r.eval_loss, 4)),
      h("td", {class: "num"}, pct(r.score)), h("td", {class: "num"}, duration(r.seconds)),
      h("td", {}, new Date(r.modified * 1000).toLocaleString())));
    table.replaceChildren(head, ...body);
    if (!shown.length) table.append(h("tr", {}, h("td", {colspan: 11, class: "muted"}, "no runs")));
  }
  async function load() {
    const r = await api("/api/runs");
    if (r.ok) { rows = r.data.runs; draw(); }
  }
  filter.addEventListener("input", draw);
  await load();
  const timer = setInterval(load, 3000);
  cleanup.push(() => clearInterval(timer));
}

// ---------------------------------------------------------------- one run
async function pageRun(name) {
  const r = await api("/api/runs/" + name);
  if (!r.ok) { setPage(h("p", {class: "err"}, r.data.error)); return; }
  const d = r.data;
  const stateBox = h("span", {id: "run-state"}, stateTag(d.state, d.unreadable));
  const stopBtn = h("button", {id: "stop", onclick: async () => {
    const res = await api(`/api/runs/${name}/stop`, {method: "POST"});
    msg.textContent = res.ok ? "stopping after this step (a checkpoint is written)" : res.data.error;
  }}, "stop");
  const resumeBtn = h("button", {id: "resume", onclick: async () => {
    const res = await api(`/api/runs/${name}/resume`, {method: "POST"});
    if (res.ok) route(); else msg.textContent = res.data.error;
  }}, "resume");
  const msg = h("span", {class: "muted", id: "run-msg"});
  const charts = h("div", {class: "charts", id: "charts"});
  const loss = new LineChart(charts, {title: "loss"});
  const lr = new LineChart(charts, {title: "learning rate"});
  const tps = new LineChart(charts, {title: "tokens / s"});
  const evl = new LineChart(charts, {title: "held-out loss"});
  loss.el.id = "chart-loss"; lr.el.id = "chart-lr"; tps.el.id = "chart-tps"; evl.el.id = "chart-eval";
  const rewards = new RewardCurves(charts);
  const completions = new CompletionTable(name);
  const ad = d.adapter;
  const facts = h("div", {class: "row"},
    h("div", {class: "card"}, h("b", {}, "adapter"), h("br"),
      ad.exists ? `${bytes(ad.bytes)} at ${ad.path}` : "not written yet", h("br"),
      "merges into the base: ", ad.mergeable === null ? "–" : (ad.mergeable ? "yes" : "no")),
    h("div", {class: "card"}, h("b", {}, "progress"), h("br"),
      h("span", {id: "run-steps"}, `${d.step} / ${d.total_steps || "?"} steps`), h("br"),
      "checkpoints: ", d.checkpoints.join(", ") || "none"),
    h("div", {class: "card"}, h("b", {}, "held-out"), h("br"),
      "loss ", num(d.eval_loss, 4), h("br"),
      "exact match ", d.score_before !== null && d.score_before !== undefined
        ? `${pct(d.score_before)} → ${pct(d.score)}` : pct(d.score)));
  const samples = d.samples.length ? h("div", {},
    h("h3", {}, "Samples before / after"),
    h("table", {id: "samples"}, h("tr", {}, h("th", {}, "prompt"), h("th", {}, "expected"),
      h("th", {}, "before"), h("th", {}, "after")),
      d.samples.map(s => h("tr", {}, h("td", {}, s.prompt || ""), h("td", {}, s.reference || ""),
        h("td", {}, s.before), h("td", {}, s.after))))) : null;
  const evals = d.evals.length ? h("div", {}, h("h3", {}, "Evaluations (loratune eval)"),
    h("table", {id: "evals"}, h("tr", {}, h("th", {}, "task"), h("th", {}, "metric"),
      h("th", {}, "variant"), h("th", {}, "value")),
      d.evals.flatMap(e => e.variants.map(v => h("tr", {}, h("td", {}, e.task), h("td", {}, e.headline),
        h("td", {}, v.label), h("td", {class: "num"}, typeof v.value === "number" ? +v.value.toPrecision(4) : "–")))))) : null;
  setPage(
    h("h2", {}, "Run ", h("span", {id: "run-name"}, name), " ", stateBox),
    h("p", {}, stopBtn, " ", resumeBtn, " ", msg),
    facts, h("h3", {}, "Curves"), charts, samples, completions.box, evals,
    h("h3", {}, "Config"), h("pre", {id: "config"}, d.config),
    d.log ? h("div", {}, h("h3", {}, "Console (last lines)"), h("pre", {id: "log"}, d.log)) : null);
  function showButtons(state) {
    stopBtn.hidden = state !== "running";
    resumeBtn.hidden = !(state === "interrupted" || state === "failed");
  }
  showButtons(d.state);
  let last = 0;
  const stop = streamEvents(`/api/runs/${name}/metrics`, (event, data) => {
    if (event === "metrics") {
      for (const rec of data) {
        if (rec.loss !== undefined) { loss.add("train", rec.step, rec.loss); last = rec.step; }
        if (rec.eval_loss !== undefined) { loss.add("held-out", rec.step, rec.eval_loss); evl.add("held-out", rec.step, rec.eval_loss); }
        if (rec.lr !== undefined) lr.add("lr", rec.step, rec.lr);
        if (rec.tokens_per_s !== undefined) tps.add("tokens/s", rec.step, rec.tokens_per_s);
        rewards.add(rec);
      }
      [loss, lr, tps, evl].forEach(c => c.render());
      rewards.render();
      completions.refresh();
      document.getElementById("run-steps").textContent = `${last} / ${d.total_steps || "?"} steps`;
    } else if (event === "reset") {
      [loss, lr, tps, evl].forEach(c => c.clear());
      rewards.clear();
    } else if (event === "state") {
      stateBox.replaceChildren(stateTag(data));
      showButtons(data);
    } else if (event === "unreadable") {
      stateBox.replaceChildren(stateTag("unreadable", data));
    }
  });
  cleanup.push(stop);
}

// GRPO runs: the mean reward per function (metrics keys reward/<name>/mean) and the held-out
// reward (eval_reward; step 0 is before training), in a chart made on the first such record.
class RewardCurves {
  constructor(container) { this.container = container; this.chart = null; }
  add(rec) {
    const names = Object.keys(rec).filter(k => /^reward\/.+\/mean$/.test(k));
    if (!this.chart && !names.length && rec.eval_reward === undefined) return;
    if (!this.chart) {
      this.chart = new LineChart(this.container, {title: "reward (mean per function)"});
      this.chart.el.id = "chart-reward";
    }
    for (const k of names) this.chart.add(k.slice(7, -5), rec.step, rec[k]);
    if (rec.eval_reward !== undefined) this.chart.add("held-out", rec.step, rec.eval_reward);
  }
  render() { if (this.chart) this.chart.render(); }
  clear() { if (this.chart) this.chart.clear(); }
}

// GRPO runs: the latest sampled completions with their rewards (completions.jsonl, read by the
// server from its tail), fetched again at most every 2 s while metrics arrive.
class CompletionTable {
  constructor(name) {
    this.name = name; this.last = 0;
    this.box = h("div", {id: "completions-box", hidden: true});
    this.refresh();
  }
  async refresh() {
    const now = Date.now();
    if (now - this.last < 2000) return;
    this.last = now;
    const r = await api(`/api/runs/${this.name}/completions`);
    if (!r.ok || !r.data.samples.length) return;
    const samples = r.data.samples.slice().reverse();        // the latest step first
    const names = [...new Set(samples.flatMap(s => Object.keys(s.rewards)))];
    this.box.replaceChildren(h("h3", {}, "Sampled completions (latest steps)"),
      r.data.problem ? h("p", {class: "muted"}, r.data.problem) : null,
      h("table", {id: "completions"},
        h("tr", {}, ["step", "prompt", "completion", "reward", ...names, "advantage"]
          .map(c => h("th", {}, c))),
        samples.map(s => h("tr", {}, h("td", {class: "num"}, s.step), h("td", {}, s.prompt),
          h("td", {}, h("pre", {}, s.completion)), h("td", {class: "num"}, num(s.reward, 3)),
          names.map(n => h("td", {class: "num"}, num(s.rewards[n], 3))),
          h("td", {class: "num"}, num(s.advantage, 2))))));
    this.box.hidden = false;
  }
}

// ---------------------------------------------------------------- compare
async function pageCompare(query) {
  const want = new Set((query.get("runs") || "").split(",").filter(Boolean));
  const runs = (await api("/api/runs")).data.runs || [];
  const pick = h("div", {id: "compare-pick"}, runs.map(r => h("label", {},
    h("input", {type: "checkbox", value: r.name, checked: want.has(r.name)}), " " + r.name + "  ")));
  const charts = h("div", {class: "charts", id: "compare-charts"});
  const reports = h("div", {id: "reports"});
  setPage(h("h2", {}, "Compare"), pick,
    h("p", {}, h("button", {id: "compare-show", onclick: () => {
      const names = [...pick.querySelectorAll("input:checked")].map(i => i.value);
      location.hash = "#/compare?runs=" + encodeURIComponent(names.join(","));
    }}, "overlay")), charts, h("h3", {}, "compare / tune-rank reports"), reports);
  const loss = new LineChart(charts, {title: "training loss", width: 620, height: 280});
  const evl = new LineChart(charts, {title: "held-out loss", width: 620, height: 280});
  loss.el.id = "compare-loss";
  for (const name of want) {
    cleanup.push(streamEvents(`/api/runs/${name}/metrics`, (event, data) => {
      if (event === "reset") { loss.series.delete(name); evl.series.delete(name); }
      if (event !== "metrics") return;
      for (const rec of data) {
        if (rec.loss !== undefined) loss.add(name, rec.step, rec.loss);
        if (rec.eval_loss !== undefined) evl.add(name, rec.step, rec.eval_loss);
      }
      loss.render(); evl.render();
    }));
  }
  const rep = (await api("/api/reports")).data.reports || [];
  if (!rep.length) reports.append(h("p", {class: "muted"}, "none yet: loratune compare / tune-rank write them"));
  for (const r of rep) {
    const cols = [...new Set(r.rows.flatMap(Object.keys))].filter(k => k !== "adapter");
    const img = h("img", {alt: r.name, width: 720});
    reports.append(h("h3", {}, r.name), h("table", {class: "report"},
      h("tr", {}, cols.map(c => h("th", {}, c))),
      r.rows.map(row => h("tr", {}, cols.map(c => h("td", {class: typeof row[c] === "number" ? "num" : null},
        typeof row[c] === "number" ? +row[c].toPrecision(4) : (row[c] ?? "–")))))), img);
    if (r.plot) imageUrl("/api/report-plot/" + r.plot).then(u => { if (u) img.src = u; });
  }
}

// ---------------------------------------------------------------- search studies
// `loratune search` folders: the list, and one study's trials table, score over trials and
// Pareto front. Names and values from the files are drawn as text (h() never parses HTML).
async function pageStudies() {
  const r = await api("/api/studies");
  const rows = r.data.studies || [];
  const table = h("table", {id: "studies-table"},
    h("tr", {}, ["study", "complete", "pruned", "failed", "running", "best trial", "best"].map(c => h("th", {}, c))),
    rows.map(s => h("tr", {"data-study": s.name}, h("td", {}, h("a", {href: "#/study/" + s.name}, s.name)),
      s.unreadable ? h("td", {colspan: 6}, stateTag("unreadable", s.unreadable)) : [
        ["complete", "pruned", "fail", "running"].map(k => h("td", {class: "num"}, s.counts[k])),
        h("td", {class: "num"}, s.best_trial ?? "–"),
        h("td", {}, (s.best_values || []).map((v, i) => s.objectives[i] + " " + num(v, 4)).join(", ") || "–")])));
  setPage(h("h2", {}, "Search studies"), rows.length ? table :
    h("p", {class: "muted"}, "none yet: loratune search writes them (study.db, report.json)"));
}

function studyCharts(box, s) {
  const done = s.trials.filter(t => t.values && t.values.every(v => v !== null));
  const score = new LineChart(box, {title: s.labels[0] + " over trials", xlabel: "trial",
                                    width: 460, height: 240, dots: [s.labels[0]]});
  score.el.id = "study-score";
  const sign = s.directions[0] === "maximize" ? -1 : 1;
  let best = Infinity;
  for (const t of done.slice().sort((a, b) => a.trial - b.trial)) {
    score.add(s.labels[0], t.trial, t.values[0]);
    best = Math.min(best, sign * t.values[0]);
    score.add("best so far", t.trial, sign * best);
  }
  score.render();
  s.labels.slice(1).forEach((label, k) => {
    const chart = new LineChart(box, {title: "Pareto front: " + s.labels[0] + " vs " + label,
      xlabel: s.labels[0], width: 460, height: 240, dots: ["trials"]});
    chart.el.classList.add("study-pareto");
    for (const t of done) chart.add("trials", t.values[0], t.values[k + 1]);
    for (const t of done.filter(t => t.pareto).sort((a, b) => a.values[0] - b.values[0]))
      chart.add("Pareto front", t.values[0], t.values[k + 1]);
    chart.render();
  });
}

function studyTable(name, s) {
  const params = [...new Set(s.trials.flatMap(t => Object.keys(t.params)))];
  const head = h("tr", {}, ["trial", "state", ...params, ...s.labels, "planned GiB",
                            "measured GiB", "time", "pruned / failed why"].map(c => h("th", {}, c)));
  const body = s.trials.map(t => h("tr", {"data-trial": t.trial},
    h("td", {class: "num"}, ["complete", "running"].includes(t.state)
      ? h("a", {href: `#/run/${name}/trials/${t.trial}`}, t.trial) : t.trial),
    h("td", {}, h("span", {class: "state state-" + t.state}, t.state), t.pareto ? " Pareto" : ""),
    params.map(p => h("td", {}, t.params[p] === undefined ? "–" : typeof t.params[p] === "number"
      ? +t.params[p].toPrecision(3) : String(t.params[p]))),
    s.labels.map((_, i) => h("td", {class: "num"}, num(t.values && t.values[i], 4))),
    h("td", {class: "num"}, num(t.planned_gib, 2)), h("td", {class: "num"}, num(t.measured_peak_gib, 2)),
    h("td", {class: "num"}, duration(t.seconds)),
    h("td", {class: "why"}, t.pruned_why || t.failed_why || "")));
  return h("table", {id: "study-trials"}, head, body);
}

async function pageStudy(name) {
  async function load() {
    const r = await api("/api/studies/" + name);
    if (!r.ok) { setPage(h("h2", {}, name), h("p", {class: "err"}, r.data.error)); return; }
    const s = r.data, charts = h("div", {class: "charts"});
    const best = s.best_trial === null ? "no trial complete yet" : `best: trial ${s.best_trial} (best.yaml)`;
    setPage(h("h2", {}, "Study " + name),
      h("p", {}, s.labels.map((l, i) => l + " (" + (s.directions[i] || "?") + ")").join(", "), " · ", best,
        s.pareto.length > 1 ? " · Pareto front: trials " + s.pareto.join(", ") : ""),
      s.stale ? h("p", {class: "muted", id: "study-stale"}, `${s.stale} trial(s) newer than report.json ` +
        "(read from study.db; Pareto marks are the report's)") : null,
      charts, studyTable(name, s));
    studyCharts(charts, s);
  }
  await load();
  const timer = setInterval(load, 5000);
  cleanup.push(() => clearInterval(timer));
}

// ---------------------------------------------------------------- forms from a JSON schema
function resolveRef(schema, root) {
  return schema && schema.$ref ? root.$defs[schema.$ref.split("/").pop()] : schema;
}
function plainOf(schema, root) {
  // X for anyOf [X, null]; returns [schema, nullable]
  schema = resolveRef(schema, root);
  if (schema.anyOf) {
    const rest = schema.anyOf.filter(s => s.type !== "null");
    if (rest.length === 1) return [Object.assign({}, resolveRef(rest[0], root), {default: schema.default, description: schema.description}), true];
  }
  return [schema, false];
}

// Adds one input per field of `schema` under `key` into `box`; returns getters for the values.
function buildFields(box, schema, root, prefix, getters) {
  for (const [name, raw] of Object.entries(schema.properties || {})) {
    const key = prefix ? prefix + "." + name : name;
    const [s, nullable] = plainOf(raw, root);
    if (s.type === "object" || s.properties) {
      const set = h("fieldset", {"data-section": key}, h("legend", {}, key));
      let use = null;
      if (nullable) {
        use = h("input", {type: "checkbox", name: key + ".__use"});
        set.append(h("label", {}, use, " use " + key));
      }
      const sub = {};
      buildFields(set, s, root, key, sub);
      box.append(set);
      getters[name] = () => {
        if (use && !use.checked) return undefined;
        const out = {};
        for (const [k, g] of Object.entries(sub)) { const v = g(); if (v !== undefined) out[k] = v; }
        return out;
      };
      continue;
    }
    const dflt = raw.default !== undefined ? raw.default : s.default;
    let input, get;
    if (s.type === "boolean") {
      input = h("input", {type: "checkbox", name: key, checked: dflt === true});
      get = () => input.checked;
    } else if (s.enum) {
      input = h("select", {name: key}, nullable ? h("option", {value: "null"}, "(none)") : null,
        s.enum.map(v => h("option", {value: JSON.stringify(v), selected: v === dflt}, String(v))));
      if (nullable && dflt === null) input.value = "null";
      get = () => JSON.parse(input.value);
    } else if (s.type === "array" && s.items && s.items.enum) {
      input = h("span", {"data-name": key}, s.items.enum.map(v => h("label", {},
        h("input", {type: "checkbox", name: key, value: v, checked: (dflt || []).includes(v)}), " " + v + " ")));
      get = () => [...input.querySelectorAll("input:checked")].map(i => i.value);
    } else if (s.type === "integer" || s.type === "number") {
      input = h("input", {name: key, type: "text", inputmode: "decimal",
                          value: dflt === null || dflt === undefined ? "" : dflt});
      get = () => input.value.trim() === "" ? (nullable ? null : undefined) : Number(input.value);
    } else if (s.type === "string") {
      input = h("input", {name: key, type: "text", value: dflt === null || dflt === undefined ? "" : dflt});
      get = () => input.value === "" && nullable ? null : input.value;
    } else {      // lists, unions: JSON when it parses, else the text
      const shown = dflt === undefined || dflt === null ? "" : (typeof dflt === "string" ? dflt : JSON.stringify(dflt));
      input = h("input", {name: key, type: "text", value: shown, placeholder: "JSON or text"});
      get = () => {
        const t = input.value.trim();
        if (t === "") return undefined;
        try { return JSON.parse(t); } catch (e) { return t; }
      };
    }
    box.append(h("div", {class: "field", "data-field": key},
      h("label", {for: key}, key), input, h("span", {class: "err", "data-error-for": key}),
      h("span", {class: "help"}, s.description || raw.description || "")));
    getters[name] = get;
  }
}

function collect(getters) {
  const out = {};
  for (const [k, g] of Object.entries(getters)) { const v = g(); if (v !== undefined) out[k] = v; }
  return out;
}

function showErrors(form, errors, general) {
  form.querySelectorAll(".field").forEach(f => f.classList.remove("invalid"));
  form.querySelectorAll("[data-error-for]").forEach(e => { e.textContent = ""; });
  general.textContent = "";
  for (const e of errors) {
    const spot = e.field && form.querySelector(`[data-error-for="${CSS.escape(e.field)}"]`);
    if (spot) {
      spot.textContent = e.message;
      spot.closest(".field").classList.add("invalid");
    } else {
      general.append(h("div", {}, (e.field ? e.field + ": " : "") + e.message));
    }
  }
}

// ---------------------------------------------------------------- launch
async function pageLaunch() {
  const sch = (await api("/api/schema")).data;
  const form = h("form", {class: "config", id: "launch-form"});
  const general = h("div", {class: "err", id: "launch-errors"});
  const name = h("input", {name: "name", type: "text", value: "run-" + new Date().toISOString().slice(0, 19).replace(/[:T]/g, "-")});
  form.append(h("div", {class: "field", "data-field": "name"}, h("label", {}, "run name"), name,
    h("span", {class: "err", "data-error-for": "name"}), h("span", {class: "help"}, "a folder under the runs folder")));
  const method = h("select", {name: "adapter.method"}, Object.keys(sch.adapters).map(m =>
    h("option", {value: m, selected: m === sch.default_method}, m)));
  const adapterBox = h("fieldset", {"data-section": "adapter"}, h("legend", {}, "adapter"),
    h("div", {class: "field"}, h("label", {}, "adapter.method"), method, h("span"), h("span", {class: "help"}, "the method picks the options below")));
  const adapterFields = h("div");
  adapterBox.append(adapterFields);
  let adapterGetters = {};
  function drawAdapter() {
    adapterGetters = {};
    adapterFields.replaceChildren();
    const s = sch.adapters[method.value];
    buildFields(adapterFields, s, s, "adapter", adapterGetters);
  }
  method.addEventListener("change", drawAdapter);
  drawAdapter();
  const getters = {};
  const sections = h("div");
  buildFields(sections, sch.run, sch.run, "", getters);
  form.append(sections.querySelector('[data-section="model"]'), adapterBox, ...sections.children);
  const start = h("button", {class: "primary", type: "submit", id: "launch-start"}, "start training");
  form.append(start, " ", general);
  form.addEventListener("submit", async ev => {
    ev.preventDefault();
    const config = collect(getters);
    config.adapter = Object.assign({method: method.value}, collect(adapterGetters));
    const res = await api("/api/launch", {method: "POST", body: {name: name.value, config}});
    if (res.ok) { location.hash = "#/run/" + res.data.name; return; }
    showErrors(form, res.data.errors && res.data.errors.length ? res.data.errors : [{message: res.data.error}], general);
  });
  setPage(h("h2", {}, "Launch a training run"),
    h("p", {class: "muted"}, "Checked by the same RunConfig as loratune train; starts loratune train in the background."), form);
}

// ---------------------------------------------------------------- plan
async function pagePlan() {
  const sch = (await api("/api/plan/schema")).data;
  const form = h("form", {class: "config", id: "plan-form"});
  const general = h("div", {class: "err"});
  const getters = {};
  buildFields(form, sch, sch, "", getters);
  const chart = h("div", {id: "plan-chart"});
  const report = h("pre", {id: "plan-report"});
  form.append(h("button", {class: "primary", type: "submit", id: "plan-go"}, "estimate"), " ", general);
  form.addEventListener("submit", async ev => {
    ev.preventDefault();
    const res = await api("/api/plan", {method: "POST", body: collect(getters)});
    if (!res.ok) { showErrors(form, res.data.errors.length ? res.data.errors : [{message: res.data.error}], general); return; }
    showErrors(form, [], general);
    const b = res.data.breakdown, gib = 1024 ** 3;
    const items = Object.entries(b).filter(([k, v]) => k !== "total" && v > 0).map(([k, v]) => [k, v / gib]);
    items.push(["total", b.total / gib]);
    barChart(chart, items, " GiB");
    report.textContent = res.data.report;
  });
  setPage(h("h2", {}, "Memory planner"), h("div", {class: "row"}, form, h("div", {}, chart, report)));
  form.requestSubmit();
}

// ---------------------------------------------------------------- chat
async function pageChat() {
  const info = (await api("/api/models")).data;
  const models = h("div", {id: "chat-models"});
  if (info.error) models.append(h("p", {class: "err"}, info.error, " ", h("button", {onclick: route}, "try again")));
  for (const m of info.data || []) {
    models.append(h("label", {}, h("input", {type: "checkbox", value: m.id, checked: true}), " " + m.id + "  "));
  }
  const system = h("input", {id: "chat-system", size: 60, placeholder: "system prompt (optional)"});
  const prompt = h("textarea", {id: "chat-prompt", rows: 3, cols: 70, placeholder: "your message"});
  const maxTokens = h("input", {id: "chat-max", value: 64, size: 5});
  const answers = h("div", {class: "answers", id: "chat-answers"});
  const send = h("button", {class: "primary", id: "chat-send", onclick: async () => {
    const names = [...models.querySelectorAll("input:checked")].map(i => i.value);
    const messages = (system.value ? [{role: "system", content: system.value}] : [])
      .concat([{role: "user", content: prompt.value}]);
    answers.replaceChildren(h("p", {class: "muted"}, "generating..."));
    const res = await api("/api/chat", {method: "POST", body: {models: names, messages,
      max_tokens: Number(maxTokens.value), temperature: 0}});
    if (!res.ok) { answers.replaceChildren(h("p", {class: "err"}, res.data.error)); return; }
    answers.replaceChildren(...res.data.answers.map(a => h("div", {class: "answer", "data-model": a.model},
      h("b", {}, a.model), h("br"), a.error ? h("span", {class: "err"}, a.error) : a.answer)));
  }}, "send");
  setPage(h("h2", {}, "Chat playground"),
    h("p", {class: "muted"}, "Against the loratune serve given by --serve-url; each chosen model (base, adapter or a composition) answers side by side."),
    models, h("p", {}, system), h("p", {}, prompt), h("p", {}, "max tokens ", maxTokens, " ", send), answers);
}

// ---------------------------------------------------------------- router
async function route() {
  cleanup.forEach(f => f()); cleanup = [];
  const [path, q] = (location.hash.slice(1) || "/runs").split("?");
  const query = new URLSearchParams(q || "");
  const parts = path.split("/").filter(Boolean);
  document.querySelectorAll("header nav a").forEach(a =>
    a.classList.toggle("active", a.dataset.page === ({run: "runs", study: "studies"}[parts[0]] || parts[0])));
  const pages = {runs: pageRuns, compare: () => pageCompare(query), launch: pageLaunch,
                 plan: pagePlan, chat: pageChat, run: () => pageRun(parts.slice(1).join("/")),
                 studies: pageStudies, study: () => pageStudy(parts.slice(1).join("/"))};
  await (pages[parts[0]] || pageRuns)();
  document.body.dataset.ready = path;
}

document.getElementById("key-save").addEventListener("click", () => {
  localStorage.setItem("loratune-key", document.getElementById("api-key").value);
  document.getElementById("key-box").hidden = true;
  route();
});
window.addEventListener("hashchange", route);
route();
