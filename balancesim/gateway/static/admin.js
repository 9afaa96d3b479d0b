// Every account at once, kept live by admin_balance_monitor, trading_control_update,
// trade_update and user_update: balances, control mode, open trades with their countdown,
// P&L, and (for a superadmin) disabling, re-enabling and changing the role of an account.
import {
  LiveSession, api, decidedBy, decimal, el, expire, forget, logout, saved, secondsLeft, showLogin, units,
} from "/balancesim.js";

const app = document.getElementById("app");
const PNL_TRADES = 1000;  // GET /api/admin/trades' largest page: P&L counts an account's latest this many
const FETCHES_AT_ONCE = 4;

/**
 * Per-account actions, one button each in the row's last column (a column shown only
 * to the `roles` that some action is for): `{ label, testid, roles, allowed(who, user),
 * run(who, user) }`. `run` resolves to the account as the server now has it
 * (`{user_id, username, role, disabled}`), or to null when nothing was done.
 */
const ROLES = ["user", "admin", "superadmin"];
// PATCH /api/users/{id} is a superadmin's, and never on its own account (409).
const manages = (who, user) => who.role === "superadmin" && user.user_id !== who.user_id;
const change = (body, question) => async (who, user) =>
  !question || confirm(question(user)) ? api("PATCH", `/api/users/${user.user_id}`, body) : null;
const ACCOUNT_ACTIONS = [
  { label: "Disable", testid: "disable", roles: ["superadmin"], allowed: (who, user) => manages(who, user) && !user.disabled,
    run: change({ disabled: true }, (user) =>
      `Disable ${user.username}? Its sessions close at once and it cannot log in until re-enabled. Its money and history stay.`) },
  { label: "Enable", testid: "enable", roles: ["superadmin"], allowed: (who, user) => manages(who, user) && user.disabled,
    run: change({ disabled: false }) },
  ...ROLES.map((role) => ({
    label: `Make ${role}`, testid: `make-${role}`, roles: ["superadmin"],
    allowed: (who, user) => manages(who, user) && user.role !== role,
    run: change({ role }, (user) => `Make ${user.username} ${role === "user" ? "a" : "an"} ${role}? Its sessions close and it must log in again.`),
  })),
];

async function start(who) {
  if (who.role === "user") {
    app.replaceChildren(el("p", { class: "error", "data-testid": "admins-only" }, "The dashboard is for admins and superadmins."),
      el("button", { onclick: () => { forget(); location.reload(); } }, "Log in as someone else"));
    return;
  }
  const status = el("span", { class: "status", "data-testid": "ws-status", "data-state": "connecting" }, "connecting");
  const body = el("tbody");
  const feed = el("ul", { class: "log", "data-testid": "feed" });
  const rows = new Map();  // user_id → <tr> (its .user is the account as last shown)
  const open = new Map();  // trade_id → open Trade, every account's
  const pnl = new Map();   // user_id → { units, counted: Set<trade_id>, capped }
  // GET /api/users?include=disabled says which accounts are disabled; PATCH answers and
  // user_update keep it current.
  const disabled = new Map();  // user_id → bool
  const actions = ACCOUNT_ACTIONS.some((a) => a.roles.includes(who.role));
  const failure = el("p", { class: "error", "data-testid": "action-error" });
  let session = null;
  const columns = ["user", "role", "USDT", "BTC", "ETH", "version", "mode", "open trades", "P&L (USDT)", ...(actions ? [""] : [])];
  app.replaceChildren(
    el("header", {}, el("span", {}, `${who.username} (${who.role})`), status, el("a", { href: "/test-balance-sync.html" }, "test page"),
      el("button", { "data-testid": "logout", onclick: () => logout(session) }, "Log out")),
    failure,
    el("table", { class: "cards accounts", "data-testid": "accounts" },
      el("thead", {}, el("tr", {}, ...columns.map((h) => el("th", {}, h)))), body),
    el("p", { class: "muted" }, `P&L: payouts minus stakes of settled trades (an account's latest ${PNL_TRADES}).`),
    el("section", {}, el("h2", {}, "Changes"), feed));

  const cell = (user, key, label, ...content) =>
    el("td", { "data-testid": `cell-${user.user_id}-${key}`, "data-label": label }, ...content);
  const row = (user) => {
    let tr = rows.get(user.user_id);
    if (!tr) {
      tr = el("tr", { "data-user": user.user_id });
      rows.set(user.user_id, tr);
      body.append(tr);
    }
    user = { ...user, disabled: disabled.get(user.user_id) === true };
    tr.classList.toggle("disabled", user.disabled);
    tr.replaceChildren(
      el("td", { "data-label": "user" }, `${user.username} #${user.user_id}`,
        ...(user.disabled ? [" ", el("span", { class: "badge", "data-testid": `disabled-${user.user_id}` }, "disabled")] : [])),
      cell(user, "role", "role", user.role),
      ...["USDT", "BTC", "ETH"].map((a) => cell(user, a, a, user.balances[a])),
      cell(user, "version", "version", String(user.version)),
      cell(user, "mode", "mode", user.control_mode),
      cell(user, "open", "open trades"),
      cell(user, "pnl", "P&L (USDT)"),
      ...(actions ? [el("td", { class: "actions" }, ...ACCOUNT_ACTIONS.filter((a) => a.allowed(who, user)).map((a) =>
        el("button", { "data-testid": `${a.testid}-${user.user_id}`, onclick: (event) => act(event.currentTarget, a.run(who, user)) }, a.label)))] : []));
    tr.user = user;
    drawOpen(user.user_id);
    drawPnl(user.user_id);
    tr.classList.add("flash");
    setTimeout(() => tr.classList.remove("flash"), 600);
  };

  const drawOpen = (userId) => {
    const target = document.querySelector(`[data-testid="cell-${userId}-open"]`);
    if (!target) return;
    const mine = [...open.values()].filter((t) => t.user_id === userId)
      .sort((a, b) => Date.parse(a.expires_at) - Date.parse(b.expires_at));
    target.replaceChildren(...(mine.length ? mine.map((t) => el("div", { class: "open-trade", "data-trade": t.trade_id },
      `${t.symbol} ${t.direction} ${t.amount} @ ${t.entry_price} `,
      el("b", { class: "countdown", "data-expires": t.expires_at }, `${secondsLeft(t).toFixed(0)} s`))) : ["–"]));
  };
  const drawPnl = (userId) => {
    const target = document.querySelector(`[data-testid="cell-${userId}-pnl"]`);
    const known = pnl.get(userId);
    if (!target || !known) return;
    const text = decimal(known.units);
    target.textContent = known.units > 0n ? `+${text}` : text;
    target.dataset.sign = known.units > 0n ? "up" : known.units < 0n ? "down" : "zero";
    target.title = known.capped ? `over the latest ${PNL_TRADES} settled trades` : "over every settled trade";
  };
  const count = (trade) => {
    const known = pnl.get(trade.user_id);
    if (!known || known.counted.has(trade.trade_id)) return;
    known.counted.add(trade.trade_id);
    known.units += units(trade.payout ?? "0") - units(trade.amount);
  };
  // A trade_update or a fetched trade: a settled one is final and counted once.
  const settledIds = new Set();
  const remember = (trade) => {
    if (trade.status === "open") {
      if (!settledIds.has(trade.trade_id)) open.set(trade.trade_id, trade);
    } else {
      settledIds.add(trade.trade_id);
      open.delete(trade.trade_id);
      count(trade);
    }
  };
  const loadPnl = async (userId) => {
    const { trades } = await api("GET", `/api/admin/trades?status=settled&user_id=${userId}&limit=${PNL_TRADES}`);
    const known = { units: 0n, counted: new Set(), capped: trades.length === PNL_TRADES };
    pnl.set(userId, known);
    trades.forEach(remember);
    drawPnl(userId);
  };
  const reload = async () => (await api("GET", "/api/users?include=disabled")).users.forEach((user) => {
    disabled.set(user.user_id, user.disabled);
    row(user);
  });
  // A PATCH answer or a user_update: the account's role and disabled flag as the server has them.
  const changed = (account) => {
    disabled.set(account.user_id, account.disabled);
    const known = rows.get(account.user_id)?.user;
    if (known) row({ ...known, role: account.role });
  };
  const act = async (button, running) => {
    failure.textContent = "";
    button.disabled = true;
    try {
      const account = await running;
      if (account) changed(account);
    } catch (error) {
      failure.textContent = error.message;
    } finally {
      button.disabled = false;
    }
  };

  try {
    await reload();
    (await api("GET", `/api/admin/trades?status=open&limit=${PNL_TRADES}`)).trades.forEach(remember);
    rows.forEach((_, userId) => drawOpen(userId));
    const pending = [...rows.keys()];
    await Promise.all(Array.from({ length: FETCHES_AT_ONCE }, async () => {
      while (pending.length) await loadPnl(pending.shift());
    }));
  } catch (error) {
    if (error.status === 401) return;  // expire() is already taking the page back to the login form
    feed.prepend(el("li", { class: "error" }, error.message));
  }

  setInterval(() => document.querySelectorAll(".countdown[data-expires]").forEach((node) => {
    node.textContent = `${Math.max(0, (Date.parse(node.dataset.expires) - Date.now()) / 1000).toFixed(0)} s`;
  }), 500);

  session = new LiveSession(who.token, {
    onState: (value) => { status.dataset.state = value; status.textContent = value; },
    onUnauthorized: expire,
    onBalance: () => reload().catch(() => {}),
    onMessage: (message) => {
      const known = rows.get(message.user_id)?.user;
      if (message.type === "admin_balance_monitor") {
        feed.prepend(el("li", {}, `${message.ts} ${message.username}: ${message.change_type} ${message.change} ${message.asset} → ${message.balance} (v${message.version})`));
        if (!known) return reload().then(() => loadPnl(message.user_id)).catch(() => {});
        if (message.version > known.version) row({ ...known, version: message.version, balances: { ...known.balances, [message.asset]: message.balance } });
      } else if (message.type === "user_update") {
        const what = [message.disabled ? "disabled" : "enabled", `role ${message.role}`].join(", ");
        feed.prepend(el("li", {}, `${message.ts} ${message.username}: ${what} (by #${message.set_by})`));
        changed(message);
      } else if (message.type === "trading_control_update") {
        feed.prepend(el("li", {}, `${message.ts} user #${message.user_id}: control mode → ${message.mode} (by #${message.set_by})`));
        if (known) row({ ...known, control_mode: message.mode });
      } else if (message.type === "trade_update") {
        const trade = message.trade;
        const name = rows.get(trade.user_id)?.user.username ?? `#${trade.user_id}`;
        feed.prepend(el("li", {}, trade.status === "open"
          ? `${trade.opened_at} ${name}: ${trade.symbol} ${trade.direction} ${trade.amount} USDT opened at ${trade.entry_price}${trade.forced_outcome ? `, forced to ${trade.forced_outcome}` : ""}`
          : `${trade.settled_at} ${name}: ${trade.symbol} ${trade.direction} ${trade.amount} USDT ${trade.status}, payout ${trade.payout ?? "0"}, ${decidedBy(trade.decided_by)}`));
        remember(trade);
        drawOpen(trade.user_id);
        drawPnl(trade.user_id);
      }
    },
  });
}

const who = saved();
if (who) start(who);
else showLogin(app, start);
