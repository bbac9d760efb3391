// The operator console: plain DOM over the proxy's own admin API.
//
// Safety rules this file keeps: data only ever reaches the page as text (textContent, text
// nodes, attribute values), never parsed as markup or put in a URL; the admin key lives in this
// tab's sessionStorage and travels only as an Authorization header to this origin.
"use strict";

(() => {
  const KEY_STORE = "llm-proxy.admin-key";
  const POLL_MS = 3000;
  const NANO = 1000000000n;
  const LIMIT_FIELDS = ["rps", "rpm", "rph", "rpd", "tpm", "concurrency"];
  const BUDGET_SEGMENTS = { org: "org", apikey: "apikey", external_user: "external-user" };
  const USAGE_COSTS = "/api/v1/llm/usage/costs";
  const MAX_USAGE_DAYS = 62;

  const state = {
    me: null,
    view: "budgets",
    keys: [],
    budgets: [],
    models: [],
    paths: new Set(),
    timer: null,
    editing: null, // the budget or key being edited
    currency: "", // the cluster's, for amounts
  };

  // --- DOM helpers ------------------------------------------------------------------------

  const $ = (id) => document.getElementById(id);

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(props || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = String(value);
      else if (name === "dataset") Object.assign(node.dataset, value);
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function clear(node) {
    node.replaceChildren();
    return node;
  }

  function show(node, visible) {
    node.hidden = !visible;
  }

  function option(value, label, selected) {
    const node = el("option", { value }, label);
    node.selected = Boolean(selected);
    return node;
  }

  // --- API --------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, body) {
      const error = body && typeof body === "object" ? body.error : null;
      super(error && error.message ? error.message : `The proxy answered HTTP ${status}.`);
      this.status = status;
      this.param = error ? error.param : null;
    }
  }

  async function api(method, path, body) {
    const headers = {
      Authorization: "Bearer " + (sessionStorage.getItem(KEY_STORE) || ""),
      Accept: "application/json",
    };
    const init = { method, headers, cache: "no-store", credentials: "omit", redirect: "error" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    let data = null;
    try {
      data = await response.json();
    } catch (_) {
      data = null;
    }
    if (!response.ok) {
      const error = new ApiError(response.status, data);
      if (response.status === 401 && state.me) signOut("The key is no longer valid: sign in again.");
      throw error;
    }
    return data;
  }

  const query = (params) => {
    const search = new URLSearchParams();
    for (const [name, value] of Object.entries(params)) {
      if (value === undefined || value === null || value === "") continue;
      for (const item of Array.isArray(value) ? value : [value]) search.append(name, item);
    }
    const text = search.toString();
    return text ? "?" + text : "";
  };

  // --- formatting -------------------------------------------------------------------------

  function nanoToMajor(nano) {
    // Exact: BigInt nano-units to a decimal string in major units.
    const value = BigInt(nano);
    const whole = value / NANO;
    const frac = (value % NANO).toString().padStart(9, "0").replace(/0+$/, "");
    return frac ? `${whole}.${frac}` : `${whole}`;
  }

  function money(amount, currency) {
    const number = Number(amount);
    const digits = number !== 0 && Math.abs(number) < 1 ? 6 : 2;
    const text = number.toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: digits });
    return currency ? `${text} ${currency}` : text;
  }

  function tokens(amount) {
    return `${Number(amount).toLocaleString("en-US", { maximumFractionDigits: 2 })} tokens`;
  }

  function when(iso) {
    if (!iso) return "";
    const date = new Date(iso);
    return Number.isNaN(date.getTime()) ? String(iso) : date.toISOString().replace("T", " ").slice(0, 19) + "Z";
  }

  function keyLabel(id) {
    const key = state.keys.find((k) => k.id === id);
    return key && key.name ? `${key.name} (${id})` : id;
  }

  function scopeLabel(budget) {
    if (budget.scope === "org") return `org ${budget.scope_id}`;
    if (budget.scope === "apikey") return `key ${keyLabel(budget.scope_id)}`;
    if (budget.scope === "external_user") return `end user ${budget.scope_id}`;
    if (budget.scope === "external_user_default") return "each end user (default)";
    return `${budget.scope} ${budget.scope_id || ""}`.trim();
  }

  // When a window ends (UTC): daily 2026-11-24, weekly 2026-W48 (ISO), monthly 2026-11.
  function windowEnd(window) {
    let m = /^(\d{4})-(\d{2})-(\d{2})$/.exec(window || "");
    if (m) return new Date(Date.UTC(+m[1], +m[2] - 1, +m[3] + 1));
    m = /^(\d{4})-W(\d{2})$/.exec(window || "");
    if (m) {
      const jan4 = new Date(Date.UTC(+m[1], 0, 4));
      const monday = new Date(jan4.getTime() - ((jan4.getUTCDay() + 6) % 7) * 86400000);
      return new Date(monday.getTime() + (+m[2]) * 7 * 86400000);
    }
    m = /^(\d{4})-(\d{2})$/.exec(window || "");
    if (m) return new Date(Date.UTC(+m[1], +m[2], 1));
    return null;
  }

  function resetsIn(window) {
    const end = windowEnd(window);
    if (!end) return "";
    const seconds = Math.max(0, (end.getTime() - Date.now()) / 1000);
    const days = Math.floor(seconds / 86400);
    const hours = Math.floor((seconds % 86400) / 3600);
    const minutes = Math.floor((seconds % 3600) / 60);
    const left = days ? `${days}d ${hours}h` : hours ? `${hours}h ${minutes}m` : `${minutes}m`;
    return `resets in ${left} (${end.toISOString().slice(0, 16).replace("T", " ")} UTC)`;
  }

  // --- sign-in ----------------------------------------------------------------------------

  async function signIn(key) {
    sessionStorage.setItem(KEY_STORE, key);
    let me;
    try {
      me = await api("GET", "/api/v1/me");
    } catch (error) {
      sessionStorage.removeItem(KEY_STORE);
      throw error;
    }
    if (me.role !== "cluster_admin" && me.role !== "org_admin") {
      sessionStorage.removeItem(KEY_STORE);
      throw new Error("This console needs an org_admin or cluster_admin key.");
    }
    state.me = me;
    try {
      state.currency = (await api("GET", "/api/v1/llm/models/pricing/currency")).currency || "";
    } catch (_) {
      state.currency = "";
    }
    show($("sign-in"), false);
    await loadDocumentPaths();
    await refreshKeys().catch(() => {});
    switchView("budgets");
    show($("tabs"), true);
    show($("sign-out"), true);
    document.body.dataset.role = me.role;
    $("who").textContent = `${me.role} · org ${me.org_id} · ${me.key_id}`;
  }

  function signOut(message) {
    sessionStorage.removeItem(KEY_STORE);
    state.me = null;
    stopPolling();
    for (const view of document.querySelectorAll(".view")) show(view, false);
    show($("tabs"), false);
    show($("sign-out"), false);
    $("who").textContent = "";
    delete document.body.dataset.role;
    show($("sign-in"), true);
    $("sign-in-error").textContent = message || "";
    $("admin-key").value = "";
  }

  async function loadDocumentPaths() {
    // Which optional endpoints this proxy serves (end-user budgets, for instance).
    try {
      const response = await fetch("/openapi.json", { cache: "no-store", credentials: "omit" });
      const doc = await response.json();
      state.paths = new Set(Object.keys(doc.paths || {}));
    } catch (_) {
      state.paths = new Set();
    }
  }

  // --- views and polling ------------------------------------------------------------------

  function switchView(view) {
    state.view = view;
    for (const tab of document.querySelectorAll(".tab")) {
      tab.classList.toggle("active", tab.dataset.view === view);
    }
    for (const section of document.querySelectorAll(".view")) {
      show(section, section.id === `view-${view}`);
    }
    stopPolling();
    const refresh = { budgets: refreshBudgets, events: refreshEvents, keys: refreshKeysView, usage: initUsage }[view];
    refresh();
    if (view === "budgets" || view === "events") {
      state.timer = setInterval(() => {
        if (!document.hidden) refresh();
      }, POLL_MS);
    }
  }

  function stopPolling() {
    if (state.timer) clearInterval(state.timer);
    state.timer = null;
  }

  function orgs() {
    const found = new Set(state.keys.map((k) => k.org_id));
    if (state.me) found.add(state.me.org_id);
    if (state.me && state.me.role !== "cluster_admin") return [state.me.org_id];
    return [...found].sort();
  }

  // --- budgets ----------------------------------------------------------------------------

  async function refreshBudgets() {
    try {
      const listing = await api("GET", "/api/v1/llm/budgets");
      state.budgets = sortBudgets(listing.data || []);
      renderGauges();
      $("budgets-error").textContent = "";
      $("budgets-updated").textContent = `updated ${new Date().toISOString().slice(11, 19)} UTC`;
    } catch (error) {
      $("budgets-error").textContent = error.message;
    }
  }

  const SCOPE_ORDER = ["org", "apikey", "external_user"];

  function sortBudgets(budgets) {
    const rank = (b) => (SCOPE_ORDER.includes(b.scope) ? SCOPE_ORDER.indexOf(b.scope) : SCOPE_ORDER.length);
    return [...budgets].sort((a, b) =>
      rank(a) - rank(b) ||
      scopeLabel(a).localeCompare(scopeLabel(b)) ||
      (a.owner === b.owner ? 0 : a.owner === "cluster" ? -1 : 1));
  }

  function mayWrite(budget) {
    return state.me.role === "cluster_admin" || budget.owner !== "cluster";
  }

  function renderGauges() {
    const holder = $("gauges");
    holder.replaceChildren(...state.budgets.map(gaugeCard));
    show($("budgets-empty"), state.budgets.length === 0);
  }

  function gaugeCard(budget) {
    const spend = budget.spend || {};
    const kind = budget.limit_kind || "cost";
    const thresholds = budget.thresholds || [];
    const blocks = thresholds.filter((t) => t.action === "block").map((t) => t.pct);
    const blockLine = blocks.length ? Math.min(...blocks) : null;
    const used = amountIn(kind, kind === "tokens" ? spend.tokens_spent || 0 : spend.cost_spent || 0);
    const limit = amountIn(kind, budget.limit);
    const fired = gaugedAlerts(budget);
    const status = spend.status || "ok";
    const gauged = Boolean(budget.spend);
    const card = el("article", { class: `gauge card ${status}`, dataset: { budgetId: budget.id, scope: budget.scope, scopeId: budget.scope_id || "" } },
      el("header", { class: "gauge-head" },
        el("span", { class: "gauge-scope" }, scopeLabel(budget)),
        el("span", { class: `badge owner-${budget.owner}`, title: `owner: ${budget.owner}` }, ownerLabel(budget)),
        gauged ? el("span", { class: `badge status-${status} gauge-status` }, status) : null,
        fired ? el("span", { class: "badge alert-fired", title: "an alert threshold was crossed in this window" }, `alert fired at ${fired}%`) : null,
      ),
      gauged
        ? el("div", { class: "gauge-figures" },
          el("span", { class: "gauge-pct" }, Charts.formatPct(spend.pct)),
          el("span", { class: "gauge-amount" }, `${used} of ${limit}`))
        : el("div", { class: "gauge-figures" },
          el("span", { class: "gauge-amount" }, `${limit} for each end user (no gauge of its own)`)),
      gauged ? Charts.gauge(Number(spend.pct || 0), thresholds, status) : null,
      el("div", { class: "gauge-meta muted" },
        el("span", {}, gauged ? `${budget.period} · window ${spend.window || "?"}` : budget.period),
        gauged ? el("span", {}, resetsIn(spend.window)) : null,
        el("span", {}, blockLine === null ? "alerts only (no block line)" : `blocks at ${blockLine}%`),
        budget.alert_webhook_url ? el("span", { class: "webhook" }, `webhook ${budget.alert_webhook_url}`) : null,
      ),
      budget.scope === "external_user_default" ? topSpenders(budget) : null,
    );
    if (mayWrite(budget)) {
      const remove = el("button", { type: "button", class: "ghost danger", onclick: () => confirmDelete(card, budget) }, "Delete");
      card.append(el("div", { class: "actions" },
        el("button", { type: "button", class: "ghost", onclick: () => openBudgetForm(budget) }, "Edit"),
        remove,
      ));
    } else {
      card.append(el("div", { class: "actions muted" }, "read-only: set by a cluster admin"));
    }
    return card;
  }

  // The amount with its unit: tokens, or money in the cluster's currency.
  function amountIn(kind, amount) {
    return kind === "tokens" ? tokens(amount) : money(amount, state.currency);
  }

  // Whose budget it is, said for the card's own scope: "org budget" on a key's card read as
  // the org's budget.
  function ownerLabel(budget) {
    if (budget.owner === "cluster") return "cluster ceiling";
    if (budget.scope === "org") return "org budget";
    return "set by the org";
  }

  // The highest alert threshold the window's spend has crossed (alerts fire on crossing).
  function gaugedAlerts(budget) {
    if (!budget.spend) return null;
    const pct = Number(budget.spend.pct || 0);
    const crossed = (budget.thresholds || []).filter((t) => t.action === "alert" && pct >= t.pct).map((t) => t.pct);
    return crossed.length ? Math.max(...crossed) : null;
  }

  // The default for each end user has no gauge of its own: its card lists the end users who
  // spent most against it in the current window (from the usage API).
  function topSpenders(budget) {
    const holder = el("div", { class: "top-spenders muted" }, "top spenders: loading…");
    const org = budget.scope_org_id || budget.scope_id;
    const end = Math.floor(Date.now() / 1000) + 60;
    const start = windowStartSeconds(budget.period);
    api("GET", "/api/v1/llm/usage/costs" + query({ start_time: start, end_time: end, group_by: "external_user_id", org_id: org }))
      .then((report) => {
        const tokensKind = budget.limit_kind === "tokens";
        const rows = (report.data || []).filter((r) => r.external_user_id)
          .map((r) => ({ user: r.external_user_id, value: tokensKind ? r.input_tokens + r.output_tokens : Number(r.cost) }))
          .sort((a, b) => b.value - a.value).slice(0, 5);
        holder.replaceChildren(rows.length ? "top spenders: " : "no end-user spend in this window",
          ...rows.map((r) => el("span", { class: "spender" },
            `${r.user} ${amountIn(budget.limit_kind, r.value)} (${Charts.formatPct(100 * r.value / Number(budget.limit))})`)));
      })
      .catch((error) => holder.replaceChildren(`top spenders: ${error.message}`));
    return holder;
  }

  function windowStartSeconds(period) {
    const now = new Date();
    const day = Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), now.getUTCDate());
    if (period === "monthly") return Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), 1) / 1000;
    if (period === "weekly") return (day - ((now.getUTCDay() + 6) % 7) * 86400000) / 1000;
    return day / 1000;
  }

  function confirmDelete(card, budget) {
    stopPolling(); // keep the card still while the operator decides
    const actions = card.querySelector(".actions");
    clear(actions).append(
      el("span", {}, "Delete this budget?"),
      el("button", { type: "button", class: "danger", onclick: () => deleteBudget(budget) }, "Confirm delete"),
      el("button", { type: "button", class: "ghost", onclick: () => switchView("budgets") }, "Cancel"),
    );
  }

  async function deleteBudget(budget) {
    try {
      await api("DELETE", budgetPath(budget.scope, budget.scope_id) + query({ owner: budget.owner }));
      $("budgets-error").textContent = "";
    } catch (error) {
      $("budgets-error").textContent = error.message;
    }
    switchView("budgets");
  }

  // org/{id}, apikey/{id}, external-user/{id}; a per-user default (external_user_default)
  // has no id of its own: external-user-default.
  function budgetPath(scope, id) {
    const segment = BUDGET_SEGMENTS[scope] || String(scope).replaceAll("_", "-");
    if (String(scope).endsWith("_default")) return `/api/v1/llm/budgets/${segment}`;
    return `/api/v1/llm/budgets/${segment}/${encodeURIComponent(id)}`;
  }

  function endUserBudgets() {
    return [...state.paths].some((path) => path.startsWith("/api/v1/llm/budgets/external-user/"));
  }

  function thresholdRow(pct, action) {
    const row = el("div", { class: "threshold" },
      el("input", { type: "text", inputmode: "numeric", class: "th-pct", "aria-label": "pct", value: pct === undefined ? "" : pct }),
      el("span", {}, "%"),
      el("select", { class: "th-action", "aria-label": "action" }, option("alert", "alert", action === "alert"), option("block", "block", action === "block")),
      el("button", { type: "button", class: "ghost", onclick: () => row.remove() }, "Remove"),
    );
    return row;
  }

  function openBudgetForm(budget) {
    state.editing = budget || null;
    const form = $("budget-form");
    $("budget-form-title").textContent = budget ? `Edit budget ${budget.id}` : "New budget";
    $("budget-form-error").textContent = "";
    const scope = $("bf-scope");
    clear(scope).append(option("org", "org"), option("apikey", "API key"));
    if (endUserBudgets()) scope.append(option("external_user", "end user"));
    scope.value = budget ? budget.scope : "org";
    clear($("bf-org")).append(...orgs().map((o) => option(o, o)));
    clear($("bf-key")).append(...state.keys.filter((k) => k.status === "active").map((k) => option(k.id, `${k.name || "(no name)"} · ${k.id} · ${k.org_id}`)));
    const owner = $("bf-owner");
    owner.querySelector('option[value="cluster"]').disabled = state.me.role !== "cluster_admin";
    owner.value = budget ? budget.owner : "org";
    if (budget) {
      if (budget.scope === "org") $("bf-org").value = budget.scope_id;
      if (budget.scope === "apikey") $("bf-key").value = budget.scope_id;
      if (budget.scope === "external_user") $("bf-user").value = budget.scope_id;
    } else {
      $("bf-user").value = "";
    }
    for (const id of ["bf-scope", "bf-org", "bf-key", "bf-user", "bf-owner"]) $(id).disabled = Boolean(budget);
    if (!budget) owner.disabled = false;
    $("bf-period").value = budget ? budget.period : "monthly";
    $("bf-kind").value = budget ? budget.limit_kind || "cost" : "cost";
    $("bf-limit").value = budget ? String(budget.limit) : "";
    const rows = clear($("bf-thresholds"));
    const thresholds = budget ? budget.thresholds : [{ pct: 80, action: "alert" }, { pct: 100, action: "block" }];
    for (const t of thresholds) rows.append(thresholdRow(t.pct, t.action));
    $("bf-webhook").value = budget && budget.alert_webhook_url ? budget.alert_webhook_url : "";
    $("bf-secret").value = "";
    syncScope();
    show(form, true);
  }

  function syncScope() {
    const scope = $("bf-scope").value;
    show($("bf-org-label"), scope === "org");
    show($("bf-key-label"), scope === "apikey");
    show($("bf-user-label"), scope === "external_user");
  }

  // Values go to the API as typed, so its own validation answers (and names the field).
  function numberOrRaw(text) {
    const trimmed = text.trim();
    if (trimmed === "") return null;
    const number = Number(trimmed);
    return Number.isFinite(number) && /^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$/.test(trimmed) ? number : trimmed;
  }

  async function saveBudget(event) {
    event.preventDefault();
    const scope = $("bf-scope").value;
    const scopeId = scope === "org" ? $("bf-org").value : scope === "apikey" ? $("bf-key").value : $("bf-user").value.trim();
    const body = {
      period: $("bf-period").value,
      limit: numberOrRaw($("bf-limit").value),
      thresholds: [...$("bf-thresholds").children].map((row) => ({
        pct: numberOrRaw(row.querySelector(".th-pct").value),
        action: row.querySelector(".th-action").value,
      })),
      owner: $("bf-owner").value,
      webhook_url: $("bf-webhook").value.trim() || null,
      limit_kind: $("bf-kind").value,
    };
    const secret = $("bf-secret").value;
    if (secret) body.webhook_secret = secret;
    if (!scopeId) {
      $("budget-form-error").textContent = "Choose what the budget applies to.";
      return;
    }
    try {
      await api("PUT", budgetPath(scope, scopeId), body);
      show($("budget-form"), false);
      $("budget-form-error").textContent = "";
      await refreshBudgets();
    } catch (error) {
      $("budget-form-error").textContent = error.message;
    }
  }

  // --- keys -------------------------------------------------------------------------------

  async function refreshKeys() {
    const listing = await api("GET", "/api/v1/keys");
    state.keys = listing.data || [];
    return state.keys;
  }

  async function refreshKeysView() {
    try {
      await refreshKeys();
      renderKeys();
      $("keys-error").textContent = "";
    } catch (error) {
      $("keys-error").textContent = error.message;
    }
  }

  function limitsText(limits) {
    const set = LIMIT_FIELDS.filter((name) => limits && limits[name] !== null && limits[name] !== undefined);
    return set.length ? set.map((name) => `${name} ${limits[name]}`).join(", ") : "none";
  }

  function renderKeys() {
    const body = clear($("keys-table").querySelector("tbody"));
    for (const key of state.keys) {
      const row = el("tr", { dataset: { keyId: key.id }, class: key.status === "revoked" ? "revoked" : "" },
        el("td", { class: "key-name" }, key.name || ""),
        el("td", { class: "mono" }, key.id),
        el("td", {}, key.org_id),
        el("td", {}, key.role),
        el("td", { class: "key-status" }, key.status),
        el("td", {}, key.models ? key.models.join(", ") : "all"),
        el("td", {}, limitsText(key.limits)),
        el("td", { class: "mono" }, key.key_prefix + "…"),
        el("td", {}, key.created_at ? new Date(key.created_at * 1000).toISOString().slice(0, 10) : ""),
        el("td", { class: "key-expires" }, key.expires_at ? unixText(key.expires_at) : "never"),
        el("td", { class: "key-last-used" }, key.last_used_at ? unixText(key.last_used_at) : "never"),
        el("td", { class: "key-metadata" }, Object.entries(key.metadata || {}).map(([k, v]) => `${k}=${v}`).join(" ")),
        el("td", { class: "actions" }),
      );
      const actions = row.lastChild;
      const manageable = key.status !== "revoked" && (state.me.role === "cluster_admin" || key.role !== "cluster_admin");
      if (manageable) {
        actions.append(
          el("button", { type: "button", class: "ghost", onclick: () => openKeyForm(key) }, "Edit"),
          el("button", { type: "button", class: "ghost rotate", onclick: () => confirmRotate(actions, key) }, "Rotate"),
          el("button", { type: "button", class: "ghost danger", onclick: () => confirmRevoke(actions, key) }, "Revoke"),
        );
      }
      body.append(row);
    }
  }

  function unixText(seconds) {
    return new Date(seconds * 1000).toISOString().replace("T", " ").slice(0, 16) + "Z";
  }

  function confirmRotate(actions, key) {
    const grace = el("input", { type: "text", inputmode: "numeric", class: "grace", value: "0", title: "grace seconds" });
    clear(actions).append(
      el("label", {}, "old secret works for ", grace, " s"),
      el("button", { type: "button", class: "confirm-rotate", onclick: () => rotateKey(key, grace.value) }, "Confirm rotate"),
      el("button", { type: "button", class: "ghost", onclick: renderKeys }, "Cancel"),
    );
  }

  async function rotateKey(key, graceText) {
    try {
      const rotated = await api("POST", `/api/v1/keys/${encodeURIComponent(key.id)}/rotate`,
        { grace_seconds: numberOrRaw(graceText) || 0 });
      $("key-created-title").textContent = `New secret for ${key.id}` +
        (rotated.previous_valid_until ? ` (the old one works until ${unixText(rotated.previous_valid_until)})` : "");
      $("key-created-value").textContent = rotated.key;
      show($("key-created"), true);
      $("keys-error").textContent = "";
    } catch (error) {
      $("keys-error").textContent = error.message;
    }
    await refreshKeysView();
  }

  function metadataText(metadata) {
    return Object.entries(metadata || {}).map(([k, v]) => `${k}=${v}`).join("\n");
  }

  function parseMetadata(text) {
    const found = {};
    for (const line of text.split("\n")) {
      if (!line.trim()) continue;
      const at = line.indexOf("=");
      if (at <= 0) throw new Error(`Metadata: '${line}' is not name=value.`);
      found[line.slice(0, at).trim()] = line.slice(at + 1).trim();
    }
    return found;
  }

  function expiresValue(seconds) {
    return seconds ? new Date(seconds * 1000).toISOString().slice(0, 16) : "";
  }

  function parseExpires(text) {
    if (!text) return null;
    const millis = Date.parse(text + ":00Z");
    if (Number.isNaN(millis)) throw new Error(`Expires: '${text}' is not a date and time.`);
    return Math.floor(millis / 1000);
  }

  function confirmRevoke(actions, key) {
    clear(actions).append(
      el("button", { type: "button", class: "danger", onclick: () => revokeKey(key) }, "Confirm revoke"),
      el("button", { type: "button", class: "ghost", onclick: renderKeys }, "Cancel"),
    );
  }

  async function revokeKey(key) {
    try {
      await api("DELETE", `/api/v1/keys/${encodeURIComponent(key.id)}`);
      $("keys-error").textContent = "";
    } catch (error) {
      $("keys-error").textContent = error.message;
    }
    await refreshKeysView();
  }

  async function loadModels() {
    if (state.models.length) return state.models;
    try {
      const listing = await api("GET", "/v1/models");
      state.models = (listing.data || []).map((m) => m.id);
    } catch (_) {
      state.models = [];
    }
    return state.models;
  }

  async function openKeyForm(key) {
    state.editing = key || null;
    $("key-form-title").textContent = key ? `Edit key ${key.id}` : "New key";
    $("kf-submit").textContent = key ? "Save key" : "Create key";
    $("key-form-error").textContent = "";
    const cluster = state.me.role === "cluster_admin";
    show($("kf-org-label"), !key);
    $("kf-org").value = key ? key.org_id : cluster ? "" : state.me.org_id;
    $("kf-org").readOnly = !cluster;
    clear($("kf-orgs")).append(...orgs().map((o) => option(o, o)));
    $("kf-name").value = key ? key.name : "";
    const role = $("kf-role");
    role.querySelector('option[value="cluster_admin"]').disabled = !cluster;
    role.value = key ? key.role : "member";
    const models = await loadModels();
    const allowed = key && key.models ? new Set(key.models) : null;
    $("kf-all-models").checked = !allowed;
    const checks = clear($("kf-models"));
    const names = [...new Set([...models, ...(key && key.models ? key.models : [])])];
    for (const name of names) {
      checks.append(el("label", { class: "check" },
        el("input", { type: "checkbox", value: name, checked: allowed ? allowed.has(name) : false }),
        name,
      ));
    }
    syncModels();
    const limits = clear($("kf-limits"));
    for (const name of LIMIT_FIELDS) {
      const value = key && key.limits && key.limits[name] !== null ? key.limits[name] : "";
      limits.append(el("label", {}, name, el("input", { type: "text", inputmode: "numeric", "data-limit": name, value })));
    }
    $("kf-expires").value = expiresValue(key && key.expires_at);
    $("kf-metadata").value = metadataText(key && key.metadata);
    show($("key-form"), true);
  }

  function syncModels() {
    const all = $("kf-all-models").checked;
    for (const box of $("kf-models").querySelectorAll("input")) box.disabled = all;
  }

  async function saveKey(event) {
    event.preventDefault();
    const limits = {};
    for (const input of $("kf-limits").querySelectorAll("input")) {
      limits[input.dataset.limit] = numberOrRaw(input.value);
    }
    const models = $("kf-all-models").checked
      ? null
      : [...$("kf-models").querySelectorAll("input:checked")].map((box) => box.value);
    const key = state.editing;
    try {
      const expires = parseExpires($("kf-expires").value);
      const metadata = parseMetadata($("kf-metadata").value);
      if (key) {
        const change = { name: $("kf-name").value, models, limits, expires_at: expires, metadata };
        if ($("kf-role").value !== key.role) change.role = $("kf-role").value;
        await api("PATCH", `/api/v1/keys/${encodeURIComponent(key.id)}`, change);
      } else {
        const spec = { name: $("kf-name").value, role: $("kf-role").value, models, metadata };
        if (expires !== null) spec.expires_at = expires;
        const setLimits = Object.fromEntries(Object.entries(limits).filter(([, v]) => v !== null));
        if (Object.keys(setLimits).length) spec.limits = setLimits;
        const org = $("kf-org").value.trim();
        if (org) spec.org_id = org;
        const created = await api("POST", "/api/v1/keys", spec);
        $("key-created-title").textContent = "Key created";
        $("key-created-value").textContent = created.key;
        show($("key-created"), true);
      }
      show($("key-form"), false);
      await refreshKeysView();
    } catch (error) {
      $("key-form-error").textContent = error.message;
    }
  }

  // --- usage ------------------------------------------------------------------------------

  function isoDay(date) {
    return date.toISOString().slice(0, 10);
  }

  function initUsage() {
    if (!$("usage-start").value) {
      const today = new Date();
      $("usage-end").value = isoDay(today);
      $("usage-start").value = isoDay(new Date(today.getTime() - 6 * 86400000));
    }
    const cluster = state.me.role === "cluster_admin";
    show($("usage-org-label"), cluster);
    if (cluster) {
      const select = $("usage-org");
      const current = select.value;
      clear(select).append(option("", "all orgs"), ...orgs().map((o) => option(o, o)));
      select.value = current;
    }
    showUsage();
  }

  function seriesLabel(row, group) {
    const value = row[group];
    if (value === null || value === undefined) return "(none)";
    return group === "api_key_id" ? keyLabel(value) : String(value);
  }

  async function showUsage(event) {
    if (event) event.preventDefault();
    const status = $("usage-status");
    const chart = clear($("usage-chart"));
    const table = $("usage-table");
    show(table, false);
    const start = Date.parse($("usage-start").value + "T00:00:00Z");
    const end = Date.parse($("usage-end").value + "T00:00:00Z") + 86400000;
    const group = $("usage-group").value;
    const org = state.me.role === "cluster_admin" ? $("usage-org").value : "";
    if (!Number.isFinite(start) || !Number.isFinite(end) || end <= start) {
      status.textContent = "Choose a range: the first day, then the last.";
      return;
    }
    const days = [];
    for (let t = start; t < end; t += 86400000) days.push(t / 1000);
    if (days.length > MAX_USAGE_DAYS) {
      status.textContent = `At most ${MAX_USAGE_DAYS} days at a time.`;
      return;
    }
    status.textContent = "Loading…";
    delete chart.dataset.state;
    const call = (from, to) => api("GET", USAGE_COSTS + query({ start_time: from, end_time: to, group_by: group, org_id: org }));
    let total, perDay;
    try {
      total = await call(start / 1000, end / 1000);
      perDay = await Promise.all(days.map((day) => call(day, day + 86400)));
    } catch (error) {
      if (error.status === 404) {
        status.textContent = `The usage API (GET ${USAGE_COSTS}) is not available on this proxy.`;
        chart.dataset.state = "unavailable";
      } else {
        status.textContent = error.message;
        chart.dataset.state = "error";
      }
      return;
    }
    const labels = new Map();
    perDay.forEach((answer, i) => {
      for (const row of answer.data || []) {
        const label = seriesLabel(row, group);
        if (!labels.has(label)) labels.set(label, { label, nano: days.map(() => 0n) });
        labels.get(label).nano[i] += BigInt(row.cost_nano || "0");
      }
    });
    const series = [...labels.values()].map((s) => ({
      label: s.label,
      nano: s.nano.reduce((a, b) => a + b, 0n),
      values: s.nano.map((n) => Number(nanoToMajor(n))),
    }));
    series.sort((a, b) => (b.nano > a.nano ? 1 : b.nano < a.nano ? -1 : 0));
    const currency = total.currency || "";
    chart.append(Charts.stacked(days.map((d) => isoDay(new Date(d * 1000))), series, currency));
    const legend = el("ul", { class: "legend" });
    series.forEach((s, k) => {
      const swatch = document.createElementNS("http://www.w3.org/2000/svg", "svg");
      swatch.setAttribute("viewBox", "0 0 10 10");
      swatch.setAttribute("class", "swatch");
      const box = document.createElementNS("http://www.w3.org/2000/svg", "rect");
      for (const [n, v] of Object.entries({ width: 10, height: 10, fill: Charts.color(k) })) box.setAttribute(n, String(v));
      swatch.append(box);
      legend.append(el("li", {}, swatch, s.label));
    });
    chart.append(legend);
    chart.dataset.state = "ready";
    $("usage-group-head").textContent = $("usage-group").selectedOptions[0].textContent;
    const body = clear(table.querySelector("tbody"));
    for (const s of series) {
      body.append(el("tr", {},
        el("td", {}, s.label),
        el("td", { class: "num" }, money(nanoToMajor(s.nano), currency)),
        el("td", { class: "num mono" }, s.nano.toString()),
      ));
    }
    $("usage-total").textContent = money(nanoToMajor(total.total_cost_nano || "0"), currency);
    $("usage-total-nano").textContent = String(total.total_cost_nano);
    show(table, true);
    status.textContent = series.length ? "" : "No spend in this range.";
  }

  // --- events and deliveries --------------------------------------------------------------

  async function refreshEvents() {
    try {
      const listing = await api("GET", "/api/v1/llm/budgets");
      state.budgets = listing.data || [];
      const scopes = new Map();
      for (const b of state.budgets) scopes.set(`${b.scope}\u0000${b.scope_id}`, b);
      const lists = await Promise.all([...scopes.values()].map((b) =>
        api("GET", budgetPath(b.scope, b.scope_id) + "/events" + query({ limit: 50 }))
          .then((answer) => (answer.data || []).map((event) => ({ event, budget: b })))
          .catch(() => [])));
      const byBudget = new Map(state.budgets.map((b) => [b.id, b]));
      const events = lists.flat().sort((a, b) => String(b.event.created_at).localeCompare(String(a.event.created_at)));
      const body = clear($("events-table").querySelector("tbody"));
      for (const { event, budget } of events) {
        const owner = byBudget.get(event.budget_id) || budget;
        body.append(el("tr", { dataset: { eventId: event.id } },
          el("td", {}, when(event.created_at)),
          el("td", {}, el("span", { class: `badge ${event.type}` }, event.type)),
          el("td", { class: "num" }, event.pct === null ? "" : `${event.pct}%`),
          el("td", {}, `${scopeLabel(owner)} · ${owner.owner || ""}`),
          el("td", {}, event.period_key),
          el("td", { class: "num" }, amountIn(owner.limit_kind, event.spend_snapshot)),
          el("td", { class: "num" }, amountIn(owner.limit_kind, event.limit_snapshot)),
        ));
      }
      if (!events.length) body.append(el("tr", {}, el("td", { colspan: 7, class: "muted" }, "No threshold crossed yet.")));
      const deliveries = await api("GET", "/api/v1/webhooks/deliveries" + query({ limit: 100 }));
      const rows = clear($("deliveries-table").querySelector("tbody"));
      for (const d of deliveries.data || []) {
        rows.append(el("tr", { dataset: { eventId: d.event_id } },
          el("td", {}, when(d.created_at)),
          el("td", {}, d.type),
          el("td", {}, d.org_id),
          el("td", { class: "mono" }, d.url || ""),
          el("td", {}, el("span", { class: `badge delivery-${d.status}` }, d.status)),
          el("td", { class: "num" }, d.attempts),
          el("td", { class: "last-error" }, d.last_error || ""),
          el("td", {}, when(d.last_attempt_at)),
          el("td", {}, when(d.next_attempt_at)),
        ));
      }
      if (!(deliveries.data || []).length) rows.append(el("tr", {}, el("td", { colspan: 9, class: "muted" }, "No webhook deliveries.")));
      $("events-error").textContent = "";
      $("events-updated").textContent = `updated ${new Date().toISOString().slice(11, 19)} UTC`;
    } catch (error) {
      $("events-error").textContent = error.message;
    }
  }

  // --- wiring -----------------------------------------------------------------------------

  function wire() {
    $("sign-in-form").addEventListener("submit", async (event) => {
      event.preventDefault();
      const key = $("admin-key").value.trim();
      $("sign-in-error").textContent = "";
      try {
        await signIn(key);
        $("admin-key").value = "";
      } catch (error) {
        $("sign-in-error").textContent = error.message;
      }
    });
    $("sign-out").addEventListener("click", () => signOut(""));
    for (const tab of document.querySelectorAll(".tab")) {
      tab.addEventListener("click", () => switchView(tab.dataset.view));
    }
    $("budget-new").addEventListener("click", () => openBudgetForm(null));
    $("bf-scope").addEventListener("change", syncScope);
    $("bf-add-threshold").addEventListener("click", () => $("bf-thresholds").append(thresholdRow("", "alert")));
    $("bf-cancel").addEventListener("click", () => show($("budget-form"), false));
    $("budget-form").addEventListener("submit", saveBudget);
    $("key-new").addEventListener("click", () => openKeyForm(null));
    $("kf-cancel").addEventListener("click", () => show($("key-form"), false));
    $("kf-all-models").addEventListener("change", syncModels);
    $("key-form").addEventListener("submit", saveKey);
    $("key-copy").addEventListener("click", () => navigator.clipboard.writeText($("key-created-value").textContent).catch(() => {}));
    $("key-created-done").addEventListener("click", () => {
      $("key-created-value").textContent = "";
      show($("key-created"), false);
    });
    $("usage-form").addEventListener("submit", showUsage);
  }

  wire();
  const saved = sessionStorage.getItem(KEY_STORE);
  if (saved) signIn(saved).catch((error) => signOut(error.message));
})();
