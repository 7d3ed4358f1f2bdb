// The page at /: every panel is one GET to the API, shown with where its answer came from.
// Plain JS, no build step, nothing fetched from elsewhere. State lives in the URL's query
// (?q=&item=&user=&session=&model=), so a link opens the same view.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { q: "", item: null, user: null, session: [], model: null };
const titles = new Map();  // item id -> title, from every answer seen (session chips)
const FIELDS = "fields=title,genres";

// --- fetching: retried while the server restarts or swaps its snapshot ---------------------
// 0.25, 0.5, 1, 2, 2, ... s apart: about 40 s for a server that does not answer (a restart on a busy
// machine); an answer of 503 (no snapshot yet, a model that failed) is shown after three tries
const RETRIES = 22, RETRIES_503 = 3;

class ApiError extends Error {
  constructor(status, detail) { super(detail); this.status = status; }
}

function sleep(ms) { return new Promise((r) => setTimeout(r, ms)); }

// GET path -> {body, ms}. A network failure or a 502/503/504 is retried with backoff; any other
// answer is final. Throws ApiError whose message is the API's own detail (problem+json) or a
// readable sentence.
async function api(path, opts = {}) {
  let last = null;
  for (let attempt = 0; attempt <= RETRIES; attempt++) {
    if (attempt) {
      setStatus(`retrying (${attempt}/${RETRIES})...`);
      await sleep(Math.min(2000, 250 * 2 ** (attempt - 1)));
    }
    const t0 = performance.now();
    let resp;
    try {
      resp = await fetch(path, { signal: opts.signal, headers: { Accept: "application/json" } });
    } catch (e) {
      if (e.name === "AbortError") throw e;
      last = new ApiError(0, "the server did not answer (network error)");
      continue;
    }
    const ms = performance.now() - t0;
    let body = null;
    try { body = await resp.json(); } catch (e) { body = null; }
    if (resp.ok) { setStatus("connected"); return { body, ms }; }
    const detail = body && body.detail ? body.detail : `${resp.status} ${resp.statusText || "error"}`;
    last = new ApiError(resp.status, `${resp.status} ${(body && body.title) || ""}: ${detail}`.replace(" :", ":"));
    if (![502, 503, 504].includes(resp.status) || opts.noRetry) break;
    if (resp.status === 503 && attempt >= RETRIES_503) break;
  }
  setStatus(last.status ? "connected" : "server unreachable; the next action retries");
  throw last;
}

function setStatus(text) { $("status").textContent = text; }

// --- rendering ---------------------------------------------------------------------------
function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

// "precomputed · snapshot 2026... · age 12.3 s · 4 ms"
function showMeta(target, body, ms) {
  const m = $(target);
  m.replaceChildren();
  if (!body) return;
  // ms null: the answer came in the page itself (the server put it there)
  m.append(el("span", { class: `src ${body.source}` }, body.source),
           ` · snapshot ${body.snapshot} · age ${Number(body.age_s).toFixed(1)} s · ${ms === null ? "in the page" : `${ms.toFixed(0)} ms`}`);
}

function showError(target, err, listId) {
  if (err.name === "AbortError") return;
  $(target).replaceChildren(el("div", { class: "error", role: "alert" }, err.message || String(err)));
  if (listId) $(listId).replaceChildren();
}

function itemLabel(it) {
  if (it.title) titles.set(it.item_id, it.title);
  return it.title || `item ${it.item_id} (no title)`;
}

// One listed item: its title opens it, "+ session" adds it to the session.
function itemRow(it) {
  const li = el("li", {},
    el("button", { class: "link title", type: "button", "data-item": it.item_id, onclick: () => openItem(it.item_id) },
       itemLabel(it)));
  if (it.genres && it.genres.length) li.append(el("span", { class: "genres" }, it.genres.join(", ")));
  if (it.score !== undefined) li.append(el("span", { class: "score" }, it.score.toFixed(3)));
  li.append(el("button", { class: "small", type: "button", "aria-label": `add ${itemLabel(it)} to the session`,
                           onclick: () => addToSession(it.item_id) }, "+ session"));
  return li;
}

function showList(listId, items) {
  const list = $(listId);
  list.replaceChildren(...items.map(itemRow));
  // the browser's Element Timing: when the list's first title was painted (tests/test_page.py prints it)
  const first = list.querySelector("button.title");
  if (first) first.setAttribute("elementtiming", listId);
  if (!items.length) list.append(el("li", { class: "help" }, "nothing"));
}

// --- the URL -----------------------------------------------------------------------------
function readUrl() {
  const p = new URLSearchParams(location.search);
  state.q = p.get("q") || "";
  state.item = p.get("item");
  state.user = p.get("user");
  state.session = (p.get("session") || "").split(",").filter((s) => s !== "");
  state.model = p.get("model");
}

function writeUrl() {
  const p = new URLSearchParams();
  if (state.q) p.set("q", state.q);
  if (state.item !== null && state.item !== "") p.set("item", state.item);
  if (state.user !== null && state.user !== "") p.set("user", state.user);
  if (state.session.length) p.set("session", state.session.join(","));
  if (state.model) p.set("model", state.model);
  const qs = p.toString().replace(/%2C/g, ",");
  history.replaceState(null, "", qs ? `?${qs}` : location.pathname);
}

// --- search ------------------------------------------------------------------------------
let searchCtl = null, searchTimer = null;

function onSearchInput() {
  state.q = $("q").value;
  writeUrl();
  clearTimeout(searchTimer);
  searchTimer = setTimeout(runSearch, 120);
}

async function runSearch() {
  if (searchCtl) searchCtl.abort();
  const q = state.q;
  if (q.trim() === "") { $("search-results").replaceChildren(); $("search-meta").replaceChildren(); return; }
  searchCtl = new AbortController();
  try {
    const { body, ms } = await api(`v1/items?q=${encodeURIComponent(q)}&limit=8`, { signal: searchCtl.signal });
    showMeta("search-meta", body, ms);
    showList("search-results", body.items);
  } catch (e) { showError("search-meta", e, "search-results"); }
}

function onSearchKey(ev) {
  const first = $("search-results").querySelector("button.title");
  if (ev.key === "Enter" && first) { ev.preventDefault(); first.click(); }
  if (ev.key === "ArrowDown" && first) { ev.preventDefault(); first.focus(); }
}

// arrow keys move between the titles of a list
function onListKey(ev) {
  if (!["ArrowDown", "ArrowUp"].includes(ev.key) || !ev.target.matches("button.title")) return;
  const all = [...ev.currentTarget.querySelectorAll("button.title")];
  const i = all.indexOf(ev.target) + (ev.key === "ArrowDown" ? 1 : -1);
  ev.preventDefault();
  if (i >= 0 && i < all.length) all[i].focus();
  else if (i < 0 && ev.currentTarget.id === "search-results") $("q").focus();
}

// --- an item and its similar items ---------------------------------------------------------
const SIMILAR_QUERY = `k=10&${FIELDS}`;

// The answer the server put in the page for its ?item= (a precomputed hit), taken once: {body} or null
// (null too when it answered another item or another query than this script asks).
function embeddedSimilar(id) {
  const data = $("first-similar");
  if (!data) return null;
  data.remove();
  const body = JSON.parse(data.textContent);
  return String(body.item_id) === id && data.dataset.query === SIMILAR_QUERY ? { body, ms: null } : null;
}

// The similar items first (what the visitor came for), the item's own card beside them.
function openItem(id) {
  state.item = String(id);
  writeUrl();
  const shown = state.item;
  $("item").replaceChildren();
  const similar = (async () => {
    try {
      const { body, ms } = embeddedSimilar(shown) || await api(`v1/items/${encodeURIComponent(shown)}/similar?${SIMILAR_QUERY}`);
      if (state.item !== shown) return;
      showMeta("similar-meta", body, ms);
      showList("similar", body.items);
    } catch (e) { showError("similar-meta", e, "similar"); }
  })();
  const card = (async () => {
    try {
      const { body } = await api(`v1/items/${encodeURIComponent(shown)}`);
      if (state.item !== shown) return;
      $("item").replaceChildren(el("p", { class: "answer" }, itemLabel(body)),
                                el("p", { class: "genres" }, (body.genres || []).join(", ")),
                                el("button", { type: "button", class: "small", onclick: () => addToSession(body.item_id) },
                                   "+ session"));
    } catch (e) { showError("item", e); }
  })();
  return Promise.all([similar, card]);
}

// --- a user's recommendations ----------------------------------------------------------------
async function showUser(id) {
  state.user = id;
  writeUrl();
  if (id === "") { $("recs").replaceChildren(); $("recs-meta").replaceChildren(); return; }
  try {
    const { body, ms } = await api(`v1/users/${encodeURIComponent(id)}/recommendations?k=10&${FIELDS}`);
    showMeta("recs-meta", body, ms);
    showList("recs", body.items);
  } catch (e) { showError("recs-meta", e, "recs"); }
}

// --- the session ---------------------------------------------------------------------------
function addToSession(id) {
  const s = String(id);
  if (!state.session.includes(s)) state.session.push(s);
  refreshSession();
}

function removeFromSession(id) {
  state.session = state.session.filter((s) => s !== id);
  refreshSession();
}

let sessionCtl = null;

const asked = new Set();  // session items whose title was fetched

function refreshChips() {
  $("session-items").replaceChildren(...state.session.map((id) =>
    el("li", {}, titles.get(Number(id)) || `item ${id}`, " ",
       el("button", { class: "small", type: "button", "aria-label": `remove item ${id} from the session`,
                      onclick: () => removeFromSession(id) }, "×"))));
}

async function refreshSession() {
  writeUrl();
  refreshChips();
  // a session opened from a link: its items' titles, once each
  for (const id of state.session) {
    if (!titles.has(Number(id)) && !asked.has(id)) {
      asked.add(id);
      api(`v1/items/${encodeURIComponent(id)}`, { noRetry: true }).then(({ body }) => {
        if (body.title) { titles.set(body.item_id, body.title); refreshChips(); }
      }).catch(() => {});  // an unknown id: the session's own answer says so
    }
  }
  if (sessionCtl) sessionCtl.abort();
  if (!state.session.length) { $("session-recs").replaceChildren(); $("session-meta").replaceChildren(); return; }
  sessionCtl = new AbortController();
  try {
    const items = state.session.map(encodeURIComponent).join(",");
    const { body, ms } = await api(`v1/recommendations?items=${items}&k=10&${FIELDS}`, { signal: sessionCtl.signal });
    showMeta("session-meta", body, ms);
    showList("session-recs", body.items);
  } catch (e) { showError("session-meta", e, "session-recs"); }
}

// --- models: a form per registered model, from its schema -------------------------------------
let models = [];

async function loadModels() {
  try {
    const { body } = await api("v1/models");
    models = body.models || [];
  } catch (e) { showError("model-meta", e); return; }
  const select = $("model");
  select.replaceChildren(...models.map((m) => el("option", { value: m.name }, `${m.name} (${m.version})`)));
  if (state.model && models.some((m) => m.name === state.model)) select.value = state.model;
  buildForm();
}

function inputFor(inp) {
  const id = `in-${inp.name}`;
  let field;
  if (inp.values || inp.type === "bool") {
    const values = inp.values || [true, false];
    field = el("select", { id, name: inp.name });
    if (!inp.required) field.append(el("option", { value: "" }, `(default: ${inp.default})`));
    for (const v of values) field.append(el("option", { value: String(v) }, String(v)));
  } else {
    const attrs = { id, name: inp.name, autocomplete: "off" };
    if (inp.type === "int" || inp.type === "float") {
      Object.assign(attrs, { type: "number", step: inp.type === "int" ? "1" : "any" });
      if (inp.min !== undefined && inp.min !== null) attrs.min = inp.min;
      if (inp.max !== undefined && inp.max !== null) attrs.max = inp.max;
    } else attrs.type = "text";
    if (!inp.required) attrs.placeholder = `default: ${inp.default}`;
    field = el("input", attrs);
  }
  const range = inp.min !== undefined && inp.min !== null ? ` ${inp.min} to ${inp.max}` : "";
  return el("div", {}, el("label", { for: id }, `${inp.name} `,
                          el("span", { class: "help" }, `${inp.type}${range}${inp.required ? "" : ", optional"}`)), field);
}

// fromUser: the visitor chose this model, so the URL names it (the first one shown by default does not)
function buildForm(fromUser) {
  const m = models.find((x) => x.name === $("model").value);
  if (fromUser === true) { state.model = m ? m.name : null; writeUrl(); }
  $("model-inputs").replaceChildren(...(m ? m.inputs.map(inputFor) : []));
  $("model-answer").textContent = "";
  $("model-meta").replaceChildren();
}

async function predict(ev) {
  ev.preventDefault();
  const m = models.find((x) => x.name === $("model").value);
  if (!m) return;
  const p = new URLSearchParams();
  for (const inp of m.inputs) {
    const f = $(`in-${inp.name}`);
    // what the user typed, as typed (a number field the browser cannot read as a number sends its text)
    const raw = f.validity && f.validity.badInput ? "not a number" : f.value;
    if (raw !== "" || inp.required) p.set(inp.name, raw);
  }
  $("model-answer").textContent = "";
  try {
    const { body, ms } = await api(`v1/models/${encodeURIComponent(m.name)}/predict?${p}`);
    showMeta("model-meta", body, ms);
    const v = body.prediction;
    $("model-answer").textContent = typeof v === "number" ? String(Math.round(v * 1e4) / 1e4) : String(v);
  } catch (e) { showError("model-meta", e); }
}

// --- the live panel: hit rate by endpoint and source, from /metrics --------------------------------
const SOURCES = ["precomputed", "cache", "live", "error"];
const SAMPLE = /^hybridserve_requests_total\{([^}]*)\}\s+([0-9.eE+-]+)$/;

function parseCounts(text) {
  const by = new Map();
  for (const line of text.split("\n")) {
    const m = SAMPLE.exec(line.trim());
    if (!m) continue;
    const labels = Object.fromEntries([...m[1].matchAll(/(\w+)="([^"]*)"/g)].map((x) => [x[1], x[2]]));
    if (!SOURCES.includes(labels.source)) continue;  // "none": not a lookup (/v1/models, /v1/snapshot)
    const row = by.get(labels.endpoint) || Object.fromEntries(SOURCES.map((s) => [s, 0]));
    const src = labels.source;
    row[src] += Number(m[2]);
    by.set(labels.endpoint, row);
  }
  return by;
}

async function refreshLive() {
  const t0 = performance.now();
  try {
    const resp = await fetch("metrics", { cache: "no-store" });
    if (!resp.ok) throw new Error(`/metrics answered ${resp.status}`);
    const by = parseCounts(await resp.text());
    const rows = [...by.entries()].sort((a, b) => a[0].localeCompare(b[0])).map(([ep, c]) => {
      const answered = c.precomputed + c.cache + c.live;
      const rate = answered ? `${(100 * c.precomputed / answered).toFixed(0)} %` : "-";
      return el("tr", {}, el("td", {}, ep), ...SOURCES.map((s) => el("td", {}, String(c[s]))), el("td", {}, rate));
    });
    $("live-table").tBodies[0].replaceChildren(...rows);
    $("live-meta").textContent = `updated ${new Date().toLocaleTimeString()} · ${(performance.now() - t0).toFixed(0)} ms`;
  } catch (e) {
    $("live-meta").replaceChildren(el("span", { class: "error" }, `live counters unavailable (${e.message}); retrying`));
  }
}

// --- start ---------------------------------------------------------------------------------
function start() {
  readUrl();
  $("q").value = state.q;
  $("q").addEventListener("input", onSearchInput);
  $("q").addEventListener("keydown", onSearchKey);
  for (const id of ["search-results", "similar", "recs", "session-recs"]) $(id).addEventListener("keydown", onListKey);
  $("user-id").value = state.user || "";
  $("user-form").addEventListener("submit", (ev) => { ev.preventDefault(); showUser($("user-id").value.trim()); });
  $("session-clear").addEventListener("click", () => { state.session = []; refreshSession(); });
  $("model").addEventListener("change", () => buildForm(true));
  $("model-form").addEventListener("submit", predict);
  // survive anything unexpected without a console error: show it where the user looks
  window.addEventListener("unhandledrejection", (ev) => { ev.preventDefault(); setStatus(`error: ${ev.reason}`); });
  // what the URL shows first; the models' forms and the counters after it (one server thread may
  // answer them in turn)
  const first = state.item ? openItem(state.item) : Promise.resolve();
  if (state.q) runSearch();
  if (state.user) showUser(state.user);
  if (state.session.length) refreshSession();
  first.finally(() => {
    loadModels();
    refreshLive();
    setInterval(refreshLive, 3000);
  });
}

document.addEventListener("DOMContentLoaded", start);
