// The test page: live balances of the logged-in account, every operation its role
// may do, a trader's view (prices with a live chart, open and settled trades, the
// account's transactions page by page) beside a log of every message, and a
// comprehensive test that checks each operation against what the socket delivers.
import {
  LiveSession, api, decidedBy, decimal, el, expire, logout, saved, secondsLeft, showLogin, units,
} from "/balancesim.js";

const app = document.getElementById("app");
const SYMBOLS = ["BTCUSDT", "ETHUSDT"];
const CHART_POINTS = 120;  // recent price_ticks kept per symbol
const SETTLED_SHOWN = 30;
const TX_PAGE = 10;
const SVG = "http://www.w3.org/2000/svg";
const state = {
  balances: {}, version: 0, open: new Map(), settled: new Map(), prices: {}, history: {}, messages: [], waiters: [],
};

function start(who) {
  const status = el("span", { class: "status", "data-testid": "ws-status", "data-state": "connecting" }, "connecting");
  const balances = el("div", { class: "balances" },
    ...["USDT", "BTC", "ETH"].map((asset) => el("span", {}, `${asset} `, el("b", { "data-testid": `balance-${asset}` }, "…"))),
    el("span", {}, "version ", el("b", { "data-testid": "version" }, "…")));
  const mode = el("b", { "data-testid": "control-mode" }, "…");
  const openList = el("ul", { class: "trades", "data-testid": "open-trades" });
  const settledList = el("ul", { class: "trades", "data-testid": "settled-trades" });
  const log = el("div", { class: "log", "data-testid": "log" });
  const results = el("ol", { "data-testid": "test-results" });
  const summary = el("p", { "data-testid": "test-summary" });
  const transactions = transactionsView();
  app.replaceChildren(
    el("header", {},
      el("span", { "data-testid": "who" }, `${who.username} (${who.role}, #${who.user_id})`), status,
      el("span", {}, "control mode ", mode),
      el("button", { "data-testid": "logout", onclick: () => logout(session) }, "Log out")),
    balances,
    el("div", { class: "columns" },
      el("div", { class: "trader", "data-testid": "trader-view" },
        pricesView(),
        ...panels(who),
        el("section", {}, el("h2", {}, "Open trades"), openList),
        el("section", {}, el("h2", {}, "Settled trades"), settledList),
        transactions.section,
        el("section", {}, el("h2", {}, "Comprehensive test"),
          el("button", { "data-testid": "run-test", onclick: () => runTest(who, results, summary) }, "Run comprehensive test"),
          results, summary)),
      el("section", { class: "messages" }, el("h2", {}, "Messages"), log)),
  );

  const show = () => {
    for (const asset of ["USDT", "BTC", "ETH"]) {
      document.querySelector(`[data-testid="balance-${asset}"]`).textContent = state.balances[asset] ?? "0";
    }
    document.querySelector('[data-testid="version"]').textContent = state.version;
  };
  const session = new LiveSession(who.token, {
    onState: (value) => { status.dataset.state = value; status.textContent = value; },
    onUnauthorized: expire,
    onBalance: (balances, version, controlMode, polled) => {
      if (version >= state.version || !polled) Object.assign(state, { balances: { ...balances }, version });
      mode.textContent = controlMode;
      show();
      transactions.changed();
    },
    onMessage: (message) => {
      state.messages.push(message);
      if (message.type === "price_tick") {
        tick(message.prices);
      } else {
        log.prepend(el("div", { "data-type": message.type }, JSON.stringify(message)));
      }
      if (message.type === "balance_update" && message.user_id === who.user_id && message.version > state.version) {
        state.balances[message.asset] = message.balance;
        state.version = message.version;
        show();
        transactions.changed();
      } else if (message.type === "trading_control_update" && message.user_id === who.user_id) {
        mode.textContent = message.mode;
      } else if (message.type === "trade_update") {
        remember(message.trade);
        drawSettled(settledList, who);
      }
      state.waiters = state.waiters.filter((waiter) => !waiter(message));
    },
  });
  loadTrades(who).then(() => drawSettled(settledList, who));
  api("GET", "/api/market").then(({ prices }) => { if (!Object.keys(state.prices).length) tick(prices); }, () => {});
  setInterval(() => drawOpen(openList, who), 250);
}

// -- trades ------------------------------------------------------------------------

// A settled trade is final: an "open" copy that arrives later (a fetch racing the socket) never revives it.
function remember(trade) {
  if (trade.status === "open") {
    if (!state.settled.has(trade.trade_id)) state.open.set(trade.trade_id, trade);
  } else {
    state.open.delete(trade.trade_id);
    state.settled.set(trade.trade_id, trade);
  }
}

async function loadTrades(who) {
  // Admins receive every account's trade_update, so they see every account's trades here too.
  const lists = who.role === "user"
    ? [api("GET", "/api/options?status=open"), api("GET", "/api/options?status=settled")]
    : [api("GET", "/api/admin/trades?status=open&limit=1000"), api("GET", `/api/admin/trades?status=settled&limit=${SETTLED_SHOWN}`)];
  for (const list of await Promise.allSettled(lists)) {
    if (list.status === "fulfilled") list.value.trades.forEach(remember);
  }
}

function owner(trade, who) {
  return trade.user_id === who.user_id ? "" : `#${trade.user_id} `;
}

function drawOpen(list, who) {
  const trades = [...state.open.values()].sort((a, b) => Date.parse(a.expires_at) - Date.parse(b.expires_at));
  list.replaceChildren(...trades.map((trade) => {
    const force = who.role === "user" ? [] : ["win", "lose"].map((outcome) =>
      el("button", { "data-testid": `force-${outcome}-${trade.trade_id}`, onclick: () => act(api("POST", `/api/admin/trades/${trade.trade_id}/force`, { outcome })) }, `force ${outcome}`));
    return el("li", { "data-trade": trade.trade_id },
      el("span", {}, `${owner(trade, who)}${trade.symbol} ${trade.direction} ${trade.amount} USDT, entry ${trade.entry_price}`),
      el("b", { class: "countdown", "data-testid": `countdown-${trade.trade_id}` }, `${secondsLeft(trade).toFixed(1)} s left`),
      trade.forced_outcome ? el("span", { class: "muted" }, `forced to ${trade.forced_outcome}`) : "",
      el("small", { class: "muted" }, trade.trade_id), ...force);
  }));
}

function drawSettled(list, who) {
  const trades = [...state.settled.values()]
    .sort((a, b) => Date.parse(b.settled_at) - Date.parse(a.settled_at)).slice(0, SETTLED_SHOWN);
  list.replaceChildren(...trades.map((trade) => {
    const payout = trade.payout ?? "0";
    const net = decimal(units(payout) - units(trade.amount));
    return el("li", { "data-trade": trade.trade_id, "data-status": trade.status, "data-testid": `settled-${trade.trade_id}` },
      el("span", {}, `${owner(trade, who)}${trade.symbol} ${trade.direction} ${trade.amount} USDT, entry ${trade.entry_price} → exit ${trade.exit_price}`),
      el("b", { class: `outcome ${trade.status}` }, trade.status),
      el("span", {}, `payout ${payout} USDT (${net.startsWith("-") ? net : `+${net}`})`),
      el("span", { class: "muted", "data-testid": `decided-${trade.trade_id}` }, decidedBy(trade.decided_by)),
      el("small", { class: "muted" }, trade.trade_id));
  }));
}

// -- prices ------------------------------------------------------------------------

function pricesView() {
  return el("section", { "data-testid": "prices" }, el("h2", {}, "Prices"),
    ...SYMBOLS.map((symbol) => {
      const svg = document.createElementNS(SVG, "svg");
      svg.setAttribute("viewBox", "0 0 300 60");
      svg.setAttribute("preserveAspectRatio", "none");
      svg.setAttribute("class", "spark");
      svg.setAttribute("role", "img");
      svg.setAttribute("aria-label", `${symbol}, recent prices`);
      svg.dataset.testid = `chart-${symbol}`;
      const line = document.createElementNS(SVG, "polyline");
      line.setAttribute("fill", "none");
      line.setAttribute("vector-effect", "non-scaling-stroke");
      svg.append(line);
      return el("div", { class: "price" },
        el("span", { class: "symbol" }, symbol),
        el("b", { "data-testid": `price-${symbol}` }, "…"),
        el("small", { class: "muted", "data-testid": `range-${symbol}` }, ""), svg);
    }));
}

function tick(prices) {
  for (const symbol of SYMBOLS) {
    if (prices[symbol] === undefined) continue;
    const points = (state.history[symbol] ??= []);
    points.push(Number(prices[symbol]));
    if (points.length > CHART_POINTS) points.shift();
    const previous = state.prices[symbol];
    state.prices[symbol] = prices[symbol];
    const price = document.querySelector(`[data-testid="price-${symbol}"]`);
    if (!price) continue;
    price.textContent = prices[symbol];
    if (previous !== undefined) price.dataset.move = Number(prices[symbol]) >= Number(previous) ? "up" : "down";
    const low = Math.min(...points), high = Math.max(...points), span = high - low || 1;
    document.querySelector(`[data-testid="range-${symbol}"]`).textContent = `low ${low} · high ${high}`;
    const step = 300 / Math.max(1, points.length - 1);
    document.querySelector(`[data-testid="chart-${symbol}"] polyline`).setAttribute("points",
      points.map((p, i) => `${(i * step).toFixed(1)},${(56 - ((p - low) / span) * 52).toFixed(1)}`).join(" "));
  }
}

// -- transactions ------------------------------------------------------------------

// GET /api/transactions pages by version (each account's versions run 1, 2, 3 … without
// gaps): page k holds versions k·TX_PAGE+1 …. The newest page follows new entries live.
function transactionsView() {
  let after = null;  // null: follow the newest page
  let timer = null;
  const body = el("tbody", { "data-testid": "transactions" });
  const range = el("span", { "data-testid": "tx-range" });
  const previous = el("button", { "data-testid": "tx-previous", onclick: () => go(shown() - TX_PAGE) }, "‹ Previous");
  const next = el("button", { "data-testid": "tx-next", onclick: () => go(shown() + TX_PAGE) }, "Next ›");
  const newest = () => Math.max(0, Math.floor((state.version - 1) / TX_PAGE) * TX_PAGE);
  const shown = () => after ?? newest();
  const go = (value) => { after = value >= newest() ? null : Math.max(0, value); load(); };
  const columns = ["version", "type", "amount", "balance after", "description", "time (UTC)"];
  async function load() {
    const from = shown();
    const { transactions } = await api("GET", `/api/transactions?after_version=${from}&limit=${TX_PAGE}`);
    if (from !== shown()) return;  // the page moved on meanwhile
    body.replaceChildren(...transactions.map((t) => el("tr", { "data-version": t.version },
      ...[t.version, t.type, `${t.amount} ${t.asset}`, t.balance_after, t.description, t.ts.slice(11, 19)]
        .map((value, i) => el("td", { "data-label": columns[i] }, String(value))))));
    range.textContent = transactions.length
      ? `versions ${transactions[0].version}–${transactions.at(-1).version} of ${state.version}` : "no transactions yet";
    previous.disabled = from === 0;
    next.disabled = after === null;
  }
  const section = el("section", {}, el("h2", {}, "Transactions"),
    el("div", { class: "scroll" },
      el("table", { class: "cards tx" }, el("thead", {}, el("tr", {}, ...columns.map((c) => el("th", {}, c)))), body)),
    el("div", { class: "pager" }, previous, range, next));
  return {
    section,
    changed() {
      if (after !== null) { next.disabled = false; return; }
      clearTimeout(timer);
      timer = setTimeout(() => load().catch(() => {}), 150);
    },
  };
}

// -- operations ----------------------------------------------------------------------

const lastError = el("p", { class: "error", "data-testid": "action-error" });

async function act(promise) {
  lastError.textContent = "";
  try {
    return await promise;
  } catch (error) {
    lastError.textContent = error.message;  // an ApiError's message is already "400 invalid_amount: …"
    return null;
  }
}

function field(testid, attributes = {}) {
  return el("input", { "data-testid": testid, ...attributes });
}

function panels(who) {
  const out = [];
  const symbol = el("select", { "data-testid": "symbol" }, el("option", {}, "BTCUSDT"), el("option", {}, "ETHUSDT"));
  const stake = field("option-amount", { value: "10", size: 8 });
  const quantity = field("spot-quantity", { value: "0.001", size: 8 });
  out.push(el("section", {}, el("h2", {}, "Trade on my account"),
    el("div", { class: "row" }, el("label", {}, "Symbol ", symbol), el("label", {}, "Stake ", stake)),
    el("div", { class: "buttons" }, ...[30, 60].flatMap((duration) => ["up", "down"].map((direction) =>
      el("button", { "data-testid": `option-${duration}-${direction}`, onclick: () =>
        act(api("POST", "/api/options", { symbol: symbol.value, direction, amount: stake.value, duration })) },
      `${duration} s ${direction}`)))),
    el("div", { class: "row" }, el("label", {}, "Quantity ", quantity),
      el("span", { class: "buttons" }, ...["buy", "sell"].map((side) => el("button", { "data-testid": `spot-${side}`, onclick: () =>
        act(api("POST", "/api/spot/orders", { symbol: symbol.value, side, quantity: quantity.value })) }, `spot ${side}`)))),
    lastError));
  if (who.role === "superadmin") {
    const target = el("select", { "data-testid": "target-user" });
    api("GET", "/api/users").then(({ users }) => target.replaceChildren(
      ...users.map((u) => el("option", { value: u.user_id }, `${u.username} (#${u.user_id})`))), () => {});
    const amount = field("admin-amount", { value: "100", size: 8 });
    const asset = el("select", { "data-testid": "admin-asset" }, ...["USDT", "BTC", "ETH"].map((a) => el("option", {}, a)));
    const description = field("admin-description", { value: "from the test page" });
    const money = (kind) => act(api("POST", `/api/admin/${kind}`, {
      user_id: Number(target.value), amount: amount.value, asset: asset.value, description: description.value }));
    const modeSelect = el("select", { "data-testid": "mode" }, ...["normal", "win", "lose"].map((m) => el("option", {}, m)));
    out.push(el("section", {}, el("h2", {}, "Superadmin"),
      el("label", {}, "User ", target), el("label", {}, "Amount ", amount), asset, description, el("br"),
      el("button", { "data-testid": "deposit", onclick: () => money("deposits") }, "Deposit"),
      el("button", { "data-testid": "withdraw", onclick: () => money("withdrawals") }, "Withdraw"),
      el("button", { "data-testid": "adjust", onclick: () => money("adjustments") }, "Adjust (signed)"),
      el("label", {}, " Control mode ", modeSelect),
      el("button", { "data-testid": "set-mode", onclick: () =>
        act(api("PUT", `/api/admin/controls/${target.value}`, { mode: modeSelect.value })) }, "Set mode")));
  }
  if (who.role !== "user") {
    const tradeId = field("force-trade-id", { placeholder: "trade id", size: 10 });
    out.push(el("section", {}, el("h2", {}, "Admin: force an open trade"), tradeId,
      ...["win", "lose"].map((outcome) => el("button", { "data-testid": `force-${outcome}`, onclick: () =>
        act(api("POST", `/api/admin/trades/${tradeId.value}/force`, { outcome })) }, `force ${outcome}`)),
      el("a", { href: "/admin" }, " admin dashboard →")));
  }
  return out;
}

// -- the comprehensive test ------------------------------------------------------

function arrival(predicate, timeoutMs = 5000) {
  const seen = state.messages.find(predicate);
  if (seen) return Promise.resolve(seen);
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("nothing arrived over the socket")), timeoutMs);
    state.waiters.push((message) => {
      if (!predicate(message)) return false;
      clearTimeout(timer);
      resolve(message);
      return true;
    });
  });
}

const update = (tx) => (m) => m.type === "balance_update" && m.transaction_id === tx.transaction_id && m.balance === tx.balance_after;

function steps(who) {
  const me = who.user_id;
  const common = [
    ["market prices", async () => { const m = await api("GET", "/api/market"); if (!m.prices.BTCUSDT) throw new Error("no price"); }],
    ["balance endpoint agrees with the page", async () => {
      const b = await api("GET", "/api/balance");
      await arrival((m) => (m.version ?? 0) >= b.version || state.version >= b.version);
      if (units(b.balances.USDT) !== units(state.balances.USDT) && b.version === state.version) throw new Error("mismatch");
    }],
  ];
  const trading = [
    ["30 s option: stake debited and trade opened", async () => {
      const { trade } = await api("POST", "/api/options", { symbol: "BTCUSDT", direction: "up", amount: "1", duration: 30 });
      await arrival((m) => m.type === "balance_update" && m.metadata?.trade_id === trade.trade_id && m.change === "-1");
      await arrival((m) => m.type === "trade_update" && m.trade.trade_id === trade.trade_id);
      return trade;
    }],
    ["60 s down option: stake debited and trade opened", async () => {
      const { trade } = await api("POST", "/api/options", { symbol: "ETHUSDT", direction: "down", amount: "1", duration: 60 });
      await arrival((m) => m.type === "trade_update" && m.trade.trade_id === trade.trade_id && m.trade.duration === 60);
    }],
    ["spot buy: both legs arrive", async () => {
      const { order } = await api("POST", "/api/spot/orders", { symbol: "ETHUSDT", side: "buy", quantity: "0.001" });
      for (const tx of order.transactions) await arrival(update(tx));
    }],
    ["spot sell: both legs arrive", async () => {
      const { order } = await api("POST", "/api/spot/orders", { symbol: "ETHUSDT", side: "sell", quantity: "0.001" });
      for (const tx of order.transactions) await arrival(update(tx));
    }],
    ["history lists the spot orders", async () => {
      const { transactions } = await api("GET", `/api/transactions?after_version=${Math.max(0, state.version - 10)}&limit=100`);
      if (!transactions.some((t) => t.type === "spot_sell")) throw new Error("spot_sell missing");
    }],
  ];
  const admin = [
    ["list every account", async () => { const { users } = await api("GET", "/api/users"); if (!users.length) throw new Error("empty"); }],
    ["force my own open trade to win", async () => {
      const { trade } = await api("POST", "/api/options", { symbol: "ETHUSDT", direction: "down", amount: "1", duration: 60 });
      await api("POST", `/api/admin/trades/${trade.trade_id}/force`, { outcome: "win" });
      await arrival((m) => m.type === "trade_update" && m.trade.trade_id === trade.trade_id && m.trade.forced_outcome === "win");
    }],
  ];
  const superadmin = [
    ["deposit to myself", async () => { const { transaction } = await api("POST", "/api/admin/deposits", { user_id: me, amount: "25", description: "comprehensive test" }); await arrival(update(transaction)); }],
    ["withdraw from myself", async () => { const { transaction } = await api("POST", "/api/admin/withdrawals", { user_id: me, amount: "5" }); await arrival(update(transaction)); }],
    ["adjust myself", async () => { const { transaction } = await api("POST", "/api/admin/adjustments", { user_id: me, amount: "-0.5", description: "test adjustment" }); await arrival(update(transaction)); }],
    ["an overdraft is refused", async () => {
      try { await api("POST", "/api/admin/withdrawals", { user_id: me, amount: "1000000000" }); } catch (e) { if (e.code === "insufficient_funds") return; throw e; }
      throw new Error("the overdraft was accepted");
    }],
    ["set my control mode", async () => {
      await api("PUT", `/api/admin/controls/${me}`, { mode: "normal" });
      await arrival((m) => m.type === "trading_control_update" && m.user_id === me && m.mode === "normal");
    }],
  ];
  if (who.role === "superadmin") return [...superadmin, ...admin, ...trading, ...common];
  if (who.role === "admin") return [...admin, ...trading, ...common];
  return [...trading, ...common];
}

async function runTest(who, results, summary) {
  results.replaceChildren();
  summary.textContent = "running…";
  let passed = 0;
  const all = steps(who);
  for (const [name, check] of all) {
    const item = el("li", { "data-result": "running" }, name);
    results.append(item);
    try {
      await check();
      item.dataset.result = "pass";
      passed += 1;
    } catch (error) {
      item.dataset.result = "fail";
      item.append(` — ${error.message}`);
    }
  }
  summary.textContent = `${passed}/${all.length} passed`;
  summary.dataset.done = passed === all.length ? "pass" : "fail";
}

const who = saved();
if (who) start(who);
else showLogin(app, start);
